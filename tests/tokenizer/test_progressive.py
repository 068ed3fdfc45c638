"""Progressive training (spec section 4): tubelet and discriminator inflation, stage → stage initialisation,
joint image/video batches, resume of a tokenizer fit, and a short joint run whose loss falls."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from timeloom_tokenizer import OmniTokenizerConfig, OmniTokenizerModule, TokenizerLossConfig
from timeloom_tokenizer.inflate import inflate_conv, transfer_state
from timeloom_tokenizer.losses import PatchDiscriminator2D, PatchDiscriminator3D
from timeloom_tokenizer.model import OmniTokenizer, patchify, unpatchify

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs/tokenizer"
TIMELOOM = str(Path(sys.executable).parent / "timeloom")


def module(**overrides) -> OmniTokenizerModule:
    config = OmniTokenizerConfig.micro(channels=3, **overrides.pop("config", {}))
    overrides.setdefault("loss", TokenizerLossConfig(image_gan_weight=0.0))
    return OmniTokenizerModule(config, **overrides)


def image_trained_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A stage-1 module's state with non-trivial (random) first-frame weights and an image discriminator."""
    torch.manual_seed(seed)
    stage1 = module(loss=TokenizerLossConfig(image_gan_weight=0.01, disc_channels=8, disc_layers=2))
    with torch.no_grad():
        for parameter in stage1.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))  # LayerNorm affines away from (1, 0)
    return stage1.state_dict()


def inflated_model(strategy: str) -> OmniTokenizer:
    stage2 = module()
    state, _ = transfer_state(
        image_trained_state(),
        stage2.state_dict(),
        channels=3,
        patch=4,
        temporal_patch=2,
        inflate=strategy,
    )
    stage2.load_state_dict(state)
    return stage2.model.double()


@pytest.mark.parametrize("strategy", ["static", "first"])
def test_a_static_tubelet_embeds_exactly_like_its_image_patch(strategy):
    model = inflated_model(strategy)
    image = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    static = image.expand(-1, -1, 5, -1, -1)  # frame 0 + two tubelets of t = 2 identical frames
    tokens = model._embed(static)  # (B, 3, h, w, d): latent frame 0 is the image patch embedding
    for latent_frame in (1, 2):
        torch.testing.assert_close(tokens[:, latent_frame], tokens[:, 0], rtol=0, atol=1e-12)


def test_a_static_inflated_head_decodes_a_token_to_t_copies_of_the_image_patch():
    model = inflated_model("static")
    tokens = torch.randn(2, 1, 2, 2, 32, dtype=torch.float64)
    image = unpatchify(model.first_frame_head(tokens), 1, 4, 3)  # (B, 3, 1, 8, 8)
    tubelet = unpatchify(model.tubelet_head(tokens), 2, 4, 3)  # (B, 3, 2, 8, 8)
    for frame in range(2):
        torch.testing.assert_close(tubelet[:, :, frame], image[:, :, 0], rtol=0, atol=1e-12)


def test_upstream_inflation_breaks_the_static_video_property():
    # Kept for reproducing upstream only; this guards against someone merging it with "static".
    model = inflated_model("upstream")
    image = torch.rand(2, 3, 1, 8, 8, dtype=torch.float64) * 2 - 1
    tokens = model._embed(image.expand(-1, -1, 3, -1, -1))
    assert (tokens[:, 1] - tokens[:, 0]).abs().max() > 1e-2


def test_static_inflation_runs_along_the_time_axis_of_the_tubelet_layout():
    # A tubelet whose frames differ: the inflated embedding reads the time-average of its frames.
    model = inflated_model("static")
    video = torch.rand(1, 3, 3, 8, 8, dtype=torch.float64) * 2 - 1
    proj = model.tubelet_embedding.proj
    normed = model.tubelet_embedding.norm_in(patchify(video[:, :, 1:], 2, 4))
    frames = normed.unflatten(-1, (2, -1))  # (…, t, p·p·c): time is the outer axis of the layout
    expected = model.first_frame_embedding.proj(frames.mean(-2))
    torch.testing.assert_close(proj(normed), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("slot", ["center", "first", "last", "average"])
def test_inflated_video_discriminator_sees_a_static_clip_like_the_image_one(slot):
    torch.manual_seed(0)
    image_d = PatchDiscriminator2D(3, 8, n_layers=1, use_norm=False).double()
    video_d = PatchDiscriminator3D(3, 8, n_layers=1, use_norm=False, temporal_kernel_size=3).double()
    state = {}
    for key, value in image_d.state_dict().items():
        target = video_d.state_dict()[key]
        state[key] = inflate_conv(value, 3, slot) if value.dim() == 4 and target.dim() == 5 else value
    video_d.load_state_dict(state)
    frame = torch.rand(2, 3, 16, 16, dtype=torch.float64) * 2 - 1
    # One frame: the temporal padding leaves only the centre tap, so only "center"/"average" matter there;
    # a long static clip's interior frames see every tap.
    clip = frame[:, :, None].expand(-1, -1, 17, -1, -1)
    logits = video_d(clip)  # (B, 1, T', H', W')
    interior = logits[:, :, logits.shape[2] // 2]
    torch.testing.assert_close(interior, image_d(frame), rtol=0, atol=1e-12)


def save_checkpoint(path: Path, state: dict[str, torch.Tensor]) -> Path:
    torch.save({"state_dict": state}, path)
    return path


def test_stage2_from_a_stage1_checkpoint_loads_every_shared_weight_and_inflates_the_rest(tmp_path):
    source = image_trained_state()
    checkpoint = save_checkpoint(tmp_path / "stage1.ckpt", source)
    stage2 = module(
        loss=TokenizerLossConfig(image_gan_weight=0.0, video_gan_weight=0.01, disc_channels=8, disc_layers=2),
        init_from=str(checkpoint),
        inflate="static",
    )
    unused = stage2.load_initial_weights(checkpoint)
    loaded = stage2.state_dict()
    inflated = ("model.tubelet_embedding.", "model.tubelet_head.", "loss.video_discriminator.")
    for key, value in loaded.items():
        if not key.startswith(inflated):
            assert torch.equal(value, source[key]), key
    assert torch.equal(loaded["model.quantizer.initialized"], source["model.quantizer.initialized"])
    # The image discriminator is dropped in stage 2: its weights seeded the video one.
    assert all(k.startswith(("loss.image_discriminator.", "model.tubelet_")) for k in unused), unused
    conv = "loss.video_discriminator.blocks.0.0.weight"
    torch.testing.assert_close(loaded[conv][:, :, 1], source[conv.replace("video", "image")])


def test_stage3_kl_from_vq_reinitialises_pre_quant_and_names_mismatches(tmp_path):
    checkpoint = save_checkpoint(tmp_path / "vq.ckpt", module().state_dict())
    with pytest.raises(KeyError, match=r"model\.pre_quant\.weight: checkpoint \(4, 32\) vs model \(8, 32\)"):
        module(config={"quantizer": "kl"}).load_initial_weights(checkpoint)
    kl = module(config={"quantizer": "kl"}, reinitialize=["model.pre_quant"])
    fresh = kl.model.pre_quant.weight.detach().clone()
    unused = kl.load_initial_weights(checkpoint)
    assert torch.equal(kl.model.pre_quant.weight, fresh)
    assert {"model.pre_quant.weight", "model.quantizer.codebook"} <= set(unused)
    source = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert torch.equal(kl.model.post_quant.weight, source["model.post_quant.weight"])


def test_init_from_a_missing_file_says_which(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        module().load_initial_weights(tmp_path / "nowhere.ckpt")


# -- end to end: the CLI, stage 1 → stage 2, resume ---------------------------------------------------------
# Micro sizes of the tiny joint configs: seconds per run.
TINY_JOINT = """
model:
  init_args:
    config: {{dim: 32, heads: 2, head_dim: 16, encoder_temporal_depth: 1, decoder_temporal_depth: 1,
              decoder_spatial_depth: 1, codebook_size: 64}}
    loss: {{disc_start: 2}}
    scheduler:
      init_args: {{warmup_steps: 2}}
data:
  init_args:
    sizes: [16, 32]
    eval_size: 16
    video_batch_size: 2
    image_batch_size: 4
    {data}
trainer:
  max_epochs: {epochs}
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {run}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {run}}}
checkpoint:
  dirpath: {run}/checkpoints
  every_n_train_steps: 1
"""
SMALL_SOURCES = {
    "stage1": """images:
      - class_path: MovingDigitsDataModule
        init_args: {size: 32, frames: 1, channels: 3, train_length: 16, val_length: 4}
      - class_path: PhotosDataModule
        init_args: {size: 32, train_length: 16, val_length: 4}""",
    "stage2": """videos:
      class_path: MovingDigitsDataModule
      init_args: {size: 32, frames: 5, channels: 3, train_length: 8, val_length: 2}
    images:
      - class_path: MovingDigitsDataModule
        init_args: {size: 32, frames: 1, channels: 3, train_length: 8, val_length: 4}
      - class_path: PhotosDataModule
        init_args: {size: 32, train_length: 8, val_length: 4}""",
}


def fit(run: Path, stage: str, *extra: str, epochs: int = 1, env: dict | None = None):
    run.mkdir(parents=True, exist_ok=True)
    overlay = run / "micro.yaml"
    overlay.write_text(TINY_JOINT.format(run=run, epochs=epochs, data=SMALL_SOURCES[stage]))
    config = CONFIGS / f"omnitokenizer-tiny-{stage}.yaml"
    cmd = [TIMELOOM, "fit", "-c", str(config), "-c", str(overlay), *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=run)
    return result


def weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def test_stage1_then_stage2_through_the_cli_inflates_and_trains_on_alternating_batches(tmp_path):
    stage1 = fit(tmp_path / "stage1", "stage1")
    assert stage1.returncode == 0, stage1.stderr[-3000:]
    init = tmp_path / "stage1/checkpoints/last.ckpt"
    # The micro model learns in a few dozen steps only at a higher rate than the tiny config's 5e-4.
    stage2 = fit(
        tmp_path / "stage2",
        "stage2",
        f"--model.init_args.init_from={init}",
        "--model.init_args.optimizer.init_args.lr=0.002",
        epochs=3,
    )
    assert stage2.returncode == 0, stage2.stderr[-3000:]
    with next((tmp_path / "stage2").rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    # Both kinds were validated under their own names.
    assert any(row.get("val/psnr") for row in rows) and any(row.get("val_image/psnr") for row in rows)
    # 3 epochs of 4 video + 4 image batches; the first and last six steps hold both kinds equally.
    rec = [float(row["train/rec"]) for row in rows if row.get("train/rec")]
    assert len(rec) == 24
    assert sum(rec[-6:]) < 0.8 * sum(rec[:6]), rec


KILLER = """
import os, signal
from lightning.pytorch import Callback

class KillAtStep(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.train_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_then_resume_of_a_joint_fit_matches_an_uninterrupted_one(tmp_path):
    killer = tmp_path / "killer"
    killer.mkdir()
    (killer / "kill_at_step.py").write_text(textwrap.dedent(KILLER))
    # From scratch (no stage-1 checkpoint): the alternation, sizes and GAN are what is resumed here.
    deterministic = ("--trainer.deterministic=true", "--model.init_args.init_from=null")
    # 4 video + 4 image batches per epoch over 2 epochs: batch 11 is mid-way through the second epoch,
    # after the discriminator started (step 2).
    killed = fit(
        tmp_path / "run",
        "stage2",
        *deterministic,
        "--trainer.callbacks+=kill_at_step.KillAtStep",
        "--trainer.callbacks.step=11",
        epochs=2,
        env={"PYTHONPATH": str(killer)},
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    resumed = fit(tmp_path / "run", "stage2", *deterministic, "--ckpt_path", "last", epochs=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    reference = fit(tmp_path / "reference", "stage2", *deterministic, epochs=2)
    assert reference.returncode == 0, reference.stderr[-3000:]
    a, b = weights(tmp_path / "run"), weights(tmp_path / "reference")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=f"{key} differs")
