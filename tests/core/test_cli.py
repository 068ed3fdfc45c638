"""The `timeloom` command: help, config composition, every shipped YAML, and clear errors."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from timeloom.cli import ModelCheckpointAtEnd, main

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs/core/autoencoder-tiny.yaml")
MODEL_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in {"trainer", "logger"}
)
OVERLAYS = sorted((ROOT / "configs/trainer").glob("*.yaml")) + sorted(
    (ROOT / "configs/logger").glob("*.yaml")
)


@pytest.fixture(autouse=True)
def _argv_of_the_console_script(monkeypatch):
    # LightningCLI warns when both sys.argv (pytest's) and args are given.
    monkeypatch.setattr(sys, "argv", ["timeloom"])


def run_main(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out + out.err


def test_console_script_help_lists_the_commands():
    out = subprocess.run(
        [str(Path(sys.executable).parent / "timeloom"), "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("fit", "validate", "test", "predict", "bench"):
        assert command in out


@pytest.mark.parametrize("config", MODEL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_model_config_prints(config, capsys):
    code, out = run_main(["fit", "-c", str(config), "--print_config"], capsys)
    assert code == 0, out
    printed = yaml.safe_load(out)
    assert printed["model"]["class_path"] and printed["data"]["class_path"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_overlay_composes_with_the_demo(overlay, capsys):
    code, out = run_main(["fit", "-c", DEMO, "-c", str(overlay), "--print_config"], capsys)
    assert code == 0, out
    printed = yaml.safe_load(out)
    expected = yaml.safe_load(overlay.read_text())["trainer"]
    for key, value in expected.items():
        assert printed["trainer"][key] == value or isinstance(value, dict)


def test_interpolation_and_later_files_win(tmp_path, capsys):
    override = tmp_path / "override.yaml"
    override.write_text("data:\n  init_args:\n    channels: 3\ntrainer:\n  max_epochs: 7\n")
    code, out = run_main(["fit", "-c", DEMO, "-c", str(override), "--print_config"], capsys)
    assert code == 0, out
    printed = yaml.safe_load(out)
    assert printed["trainer"]["max_epochs"] == 7
    # The model's channel count interpolates ${data.init_args.channels} from the merged config.
    assert printed["model"]["init_args"]["config"]["channels"] == 3


def test_unknown_key_is_named(capsys):
    code, out = run_main(["fit", "-c", DEMO, "--model.init_args.no_such_option=1", "--print_config"], capsys)
    assert code != 0
    assert "no_such_option" in out


def test_unknown_class_is_named(capsys):
    code, out = run_main(["fit", "-c", DEMO, "--model=NoSuchModel", "--print_config"], capsys)
    assert code != 0
    assert "NoSuchModel" in out


def test_bench_without_a_suite_says_how(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench"])
    assert "kernels" in str(exit_info.value.code)


def test_evaluate_without_a_suite_says_how():
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate"])
    assert "usage: timeloom evaluate" in str(exit_info.value.code)


def test_last_checkpoint_holds_the_final_step_when_a_run_stops_between_saves(tmp_path):
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.demos.boring_classes import BoringModel

    checkpoint = ModelCheckpointAtEnd(dirpath=tmp_path, every_n_train_steps=5, save_last=True)
    trainer = pl.Trainer(max_steps=7, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, callbacks=[checkpoint])  # fmt: skip
    trainer.fit(BoringModel())
    assert torch.load(tmp_path / "epoch=0-step=5.ckpt", weights_only=False)["global_step"] == 5
    assert (
        torch.load(tmp_path / "last.ckpt", weights_only=False)["global_step"] == 7
    )  # not 5: the last steps kept


def model_class(config: Path) -> str | None:
    return (yaml.safe_load(config.read_text()).get("model") or {}).get("class_path")


# one config per module class: the base module's options reach every module
ONE_CONFIG_PER_MODULE = sorted({model_class(p): p for p in MODEL_CONFIGS if model_class(p)}.values())


@pytest.mark.parametrize("config", ONE_CONFIG_PER_MODULE, ids=model_class)
def test_a_base_module_option_is_set_through_every_module(config, capsys):
    code, out = run_main(
        ["fit", "-c", str(config), "--model.init_args.decay_vectors=false", "--print_config"], capsys
    )
    assert code == 0, out
    assert yaml.safe_load(out)["model"]["init_args"]["decay_vectors"] is False
