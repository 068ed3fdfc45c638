"""End-to-end runs of `timeloom fit`: artefacts, exact resume after SIGKILL, and DDP == one big batch."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from timeloom.module import TimeloomModule

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "configs/core/autoencoder-tiny.yaml"
TIMELOOM = str(Path(sys.executable).parent / "timeloom")

# Small enough for seconds per run, big enough to cross an epoch boundary with shuffled data.
TINY = """
data:
  init_args: {{size: 16, frames: 4, batch_size: {batch_size}, train_length: 64, val_length: 8, test_length: 8}}
model:
  init_args:
    config: {{width: 8, latent_channels: 4, levels: 1}}
trainer:
  max_epochs: 2
  max_steps: {max_steps}
  limit_val_batches: 0
  enable_progress_bar: false
  default_root_dir: {run}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {run}}}
checkpoint:
  dirpath: {run}/checkpoints
  every_n_train_steps: 1
"""


def fit(run: Path, *extra: str, batch_size: int = 8, max_steps: int = -1, env: dict | None = None):
    run.mkdir(parents=True, exist_ok=True)
    config = run / "tiny.yaml"
    config.write_text(TINY.format(run=run, batch_size=batch_size, max_steps=max_steps))
    cmd = [TIMELOOM, "fit", "-c", str(DEMO), "-c", str(config), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=run)


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"parameter {key} differs")


def test_fit_writes_config_metrics_videos_and_exports(tmp_path):
    result = fit(tmp_path / "run", "--trainer.limit_val_batches=1")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoints = tmp_path / "run/checkpoints"
    assert "MovingDigitsDataModule" in (checkpoints / "config.yaml").read_text()
    assert sorted(p.suffix for p in (tmp_path / "run/media").glob("val_reconstruction_0000016.*")) == [
        ".gif",
        ".mp4",
    ]

    export = subprocess.run(
        [TIMELOOM, "export", str(checkpoints / "last.ckpt"), str(tmp_path / "export")],
        capture_output=True,
        text=True,
    )
    assert export.returncode == 0, export.stderr[-3000:]
    exported = TimeloomModule.from_pretrained(tmp_path / "export")
    for key, value in exported.model.state_dict().items():
        torch.testing.assert_close(value, final_weights(tmp_path / "run")[f"model.{key}"], rtol=0, atol=0)
    metrics = next((tmp_path / "run").rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    assert {"train/loss", "train/samples_per_s", "train/tokens_per_s", "train/mfu"} <= set(metrics)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "kill_at_step.py").write_text(
        textwrap.dedent(
            """
            import os, signal
            from lightning.pytorch import Callback

            class KillAtStep(Callback):
                def __init__(self, step: int):
                    self.step = step

                def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                    # The checkpoint of the previous step is on disk; die like a pre-empted job.
                    if trainer.global_step == self.step:
                        os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    env = {"PYTHONPATH": str(killer)}
    # 8 steps per epoch: step 11 is in the middle of the second epoch.
    killed = fit(
        tmp_path / "run",
        "--trainer.callbacks+=kill_at_step.KillAtStep",
        "--trainer.callbacks.step=11",
        env=env,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["global_step"] == 11
    resumed = fit(tmp_path / "run", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = fit(tmp_path / "reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "run"), final_weights(tmp_path / "reference"), atol=1e-6)


def test_ddp_two_processes_equal_one_process_with_the_doubled_batch(tmp_path):
    ddp = fit(tmp_path / "ddp", "-c", str(ROOT / "configs/trainer/ddp_cpu.yaml"), batch_size=4, max_steps=6)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = fit(tmp_path / "single", batch_size=8, max_steps=6)
    assert single.returncode == 0, single.stderr[-3000:]
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "single"), atol=1e-5)
