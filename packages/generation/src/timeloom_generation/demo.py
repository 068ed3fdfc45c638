"""The generation demo, `make demo`'s second step: train the tiny VDM, then generate long videos and judge them.

    python -m timeloom_generation.demo [--config configs/generation/vdm-tiny.yaml]
        [--tokenizer outputs/tokenizer-demo/checkpoints/last.ckpt] [--checkpoint CKPT] [--out outputs/generation-demo]

1. ``timeloom fit -c CONFIG`` in the latent space of the tokenizer the first demo step trained (Lightning's
   progress bar), checkpoints under ``OUT/checkpoints``; skipped when ``--checkpoint`` names a trained VDM.
2. Generates one video per ``--prompt`` at ``--length-factor`` times the training length (4x: 36 latent, 71
   pixel frames), continuing nothing but the text, and writes them tiled side by side as MP4 and GIF, each
   alone, and a filmstrip picture.
3. Runs ``timeloom evaluate generation`` on ``--count`` rollouts (the judge is trained once into
   ``runs/judge`` when missing) and prints its headline numbers and where everything is.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from timeloom.video_io import write_video
from timeloom_generation import evaluate
from timeloom_generation.commands import load_vdm

DEFAULT_CONFIG = "configs/generation/vdm-tiny.yaml"
DEFAULT_TOKENIZER = Path("outputs/tokenizer-demo/checkpoints/last.ckpt")
DEFAULT_PROMPTS = (
    "the digit 3 moves left",
    "the digit 7 moves up",
    "the digit 0 moves right",
    "the digit 5 moves down",
)


def train(config: str, tokenizer: Path, out: Path, steps: int | None) -> Path:
    """``timeloom fit -c config`` on ``tokenizer``'s latents, checkpoints under ``out/checkpoints``."""
    if not tokenizer.is_file():
        raise SystemExit(
            f"the VDM trains in the latent space of the tokenizer at {tokenizer}, which is missing: run the "
            "tokenizer demo first (python -m timeloom_tokenizer.demo) or pass --tokenizer"
        )
    checkpoints = out / "checkpoints"
    command = [
        sys.executable,
        "-m",
        "timeloom.cli",
        "fit",
        "-c",
        config,
        f"--data.init_args.tokenizer={tokenizer}",
        f"--trainer.default_root_dir={out / 'run'}",
        f"--checkpoint.dirpath={checkpoints}",
    ]
    if steps is not None:
        command.append(f"--trainer.max_steps={steps}")
    print("training:", " ".join(command[2:]), flush=True)
    (checkpoints / "last.ckpt").unlink(missing_ok=True)  # never generate with a stale model
    if subprocess.run(command).returncode != 0:
        raise SystemExit(f"training failed: {' '.join(command[2:])}")
    return checkpoints / "last.ckpt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m timeloom_generation.demo", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="the VDM recipe to train")
    parser.add_argument(
        "--tokenizer", type=Path, default=DEFAULT_TOKENIZER, help="the KL tokenizer's checkpoint"
    )
    parser.add_argument("--checkpoint", type=Path, help="generate with this trained VDM instead of training")
    parser.add_argument("--steps", type=int, help="training steps (default: the recipe's)")
    parser.add_argument("--prompt", action="append", help="a caption; repeat for several")
    parser.add_argument("--length-factor", type=int, default=4, help="video length / training length")
    parser.add_argument("--count", type=int, default=8, help="rollouts the evaluation judges")
    parser.add_argument("--judge", type=Path, default=evaluate.DEFAULT_JUDGE)
    parser.add_argument("--out", type=Path, default=Path("outputs/generation-demo"))
    args = parser.parse_args(argv)

    started = time.perf_counter()
    checkpoint = args.checkpoint or train(args.config, args.tokenizer, args.out, args.steps)
    module = load_vdm(checkpoint)
    prompts = args.prompt or list(DEFAULT_PROMPTS)
    frames = args.length_factor * module.clip_frames
    judge = evaluate.load_judge(args.judge)
    size = judge.config.size
    setting = evaluate.Setting("plain", prompts)
    videos = evaluate.rollouts(module, setting, frames=frames, size=size, batch_size=len(prompts), seed=0)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for index, video in enumerate(videos):
        for suffix in ("mp4", "gif"):
            written.append(args.out / f"video_{index}.{suffix}")
            write_video(written[-1], video, fps=8)
    tiled = torch.cat(list(videos), dim=-1)
    for suffix in ("mp4", "gif"):
        write_video(args.out / f"long_videos.{suffix}", tiled, fps=8)
    filmstrip = args.out / "filmstrip.png"
    evaluate.plot_samples({p: (v, p) for p, v in zip(prompts, videos)}, filmstrip, shown=12)

    evaluation = args.out / "evaluation"
    evaluate.main(
        ["--checkpoint", str(checkpoint), "--judge", str(args.judge), "--count", str(args.count)]
        + ["--length-factor", str(args.length_factor), "--out", str(evaluation)]
    )
    print("\nthe generation demo wrote:")
    print(f"  checkpoint       {checkpoint}")
    print(f"  long videos      {args.out / 'long_videos.mp4'} (.gif): {len(prompts)} prompts side by side, ")
    print(f"                   {videos.shape[2]} frames each ({args.length_factor}x the training length)")
    print(f"  one per prompt   {args.out}/video_*.mp4 (.gif)")
    print(f"  filmstrip        {filmstrip}")
    print(f"  evaluation       {evaluation}/results.md, results.json, identity.png, samples.png")
    print(f"  took             {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
