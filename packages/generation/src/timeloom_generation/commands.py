"""`timeloom generate`: videos from a trained `CausalVDM`, text-only or continuing a first frame.

    timeloom generate --checkpoint CKPT_OR_EXPORT --prompt "the digit 3 moves left" [--prompt ...] [--vstar "p1; p2"]
                      [--tokenizer TOKENIZER] [--frames 36] [--size 32] [--first-frame IMAGE] [--steps 20]
                      [--guidance 3] [--cache-frames K] [--broadway] [--broadway-with ARGS] [--tar] [--seed 0]
                      --out DIR

``--frames`` counts latent frames (pixel frames with the pixel codec). ``--broadway`` turns on ByTheWay at
`BroadWay`'s defaults, ``--broadway-with "alpha=0.6,beta0=1.5,active_fraction=0.2"`` with other values (these
are the paper's AnimateDiff ones), and ``--tar`` VSTAR's temporal attention regularisation
(σ = 1 frame, first 56% of steps) on every temporal layer. ``--vstar "p1; p2; p3"`` adds one video prompted by
VSTAR's synopsis: the sub-prompts anchored evenly over the frames and interpolated between. Each prompt gives
``DIR/sample_{i}.mp4`` and ``.gif``; ``DIR/samples.mp4`` tiles them all. Prompts are checked before the
model is loaded, and the first frame is fitted to the model's channels and size. ``--tokenizer`` names the KL
tokenizer (``.ckpt`` or exported folder) whose latents the VDM diffuses, when the path stored in the checkpoint
does not resolve here; its latent channels and grid are checked against the VDM before any sampling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from timeloom_kernels import set_processor

from timeloom.module import TimeloomModule
from timeloom.video_io import (
    center_crop,
    convert_channels,
    frames_to_tensor,
    read_image,
    resize_video,
    write_video,
)
from timeloom_generation.broadway import BroadWay, broadway_arguments
from timeloom_generation.module import CausalVDM
from timeloom_generation.text import check_captions
from timeloom_generation.vstar import TemporalAttentionRegularization

__all__ = ["generate_main", "load_vdm"]


def load_vdm(path: str | Path, tokenizer: str | Path | None = None) -> CausalVDM:
    """A `CausalVDM` from a Lightning checkpoint or a `save_pretrained` / `timeloom export` folder.

    ``tokenizer`` replaces the latent codec's tokenizer path stored with the model (its latent channels must
    match the VDM's: a `ValueError` says so when the model is built, before any sampling).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint or exported model at {path}")
    overrides = {} if tokenizer is None else {"tokenizer": str(tokenizer)}
    load = TimeloomModule.from_pretrained if path.is_dir() else TimeloomModule.from_checkpoint
    module = load(path, **overrides)
    if not isinstance(module, CausalVDM):
        raise ValueError(f"{path} holds a {type(module).__name__}, not a CausalVDM")
    return module.eval()


def _first_frame(path: Path, channels: int, size: int) -> torch.Tensor:
    """An image as a one-frame video ``(1, C, 1, size, size)`` in [-1, 1]."""
    frames, _ = convert_channels(read_image(path), channels)
    video = frames_to_tensor(frames)  # (C, T, H, W)
    side = min(video.shape[-2:])
    video, _ = center_crop(video, side, side)
    video, _ = resize_video(video, size, size)
    return video[None]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timeloom generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, type=Path, help="a .ckpt or an exported folder")
    parser.add_argument("--prompt", action="append", default=[], help="a caption; repeat for several")
    parser.add_argument(
        "--vstar", action="append", default=[], help="sub-prompts separated by ';' (one video)"
    )
    parser.add_argument(
        "--tokenizer", type=Path, help="the KL tokenizer of the VDM's latents (default: the checkpoint's)"
    )
    parser.add_argument("--frames", type=int, default=36, help="latent frames to generate")
    parser.add_argument("--size", type=int, default=32, help="pixel height = width")
    parser.add_argument("--first-frame", type=Path, help="an image to continue (one given frame)")
    parser.add_argument("--steps", type=int, help="Euler steps per chunk (default: the model's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    parser.add_argument("--cache-frames", type=int, help="frames of context kept (default: the model's)")
    parser.add_argument("--broadway", action="store_true", help="ByTheWay motion guidance at its defaults")
    parser.add_argument(
        "--broadway-with",
        type=broadway_arguments,
        metavar="ARGS",
        help="ByTheWay with these arguments, e.g. 'alpha=0.6,beta0=1.5,active_fraction=0.2'",
    )
    parser.add_argument("--tar", action="store_true", help="VSTAR temporal attention regularisation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--out", required=True, type=Path)
    return parser


def generate_main(argv: list[str]) -> None:
    """`timeloom generate`: see the module docstring."""
    args = _parser().parse_args(argv)
    synopses = [[part.strip() for part in text.split(";")] for text in args.vstar]
    prompts = check_captions(args.prompt) if args.prompt else []
    for synopsis in synopses:
        check_captions(synopsis)
    prompts += synopses
    if not prompts:
        raise ValueError("give at least one --prompt or --vstar")
    module = load_vdm(args.checkpoint, args.tokenizer)
    _, height, width = module.codec.latent_shape(1, args.size, args.size)
    if height % module.config.patch or width % module.config.patch:
        raise ValueError(
            f"--size {args.size} gives a {height}x{width} latent grid, not a multiple of the VDM's patch "
            f"{module.config.patch}"
        )
    denoiser = module.model["denoiser"]
    if args.broadway or args.broadway_with is not None:
        BroadWay(depth=module.config.depth, **(args.broadway_with or {})).attach(denoiser)
    if args.tar:
        set_processor(denoiser, "blocks.*.temporal.attend", TemporalAttentionRegularization())
    overrides = {
        name: value
        for name, value in (
            ("steps", args.steps),
            ("guidance", args.guidance),
            ("cache_frames", args.cache_frames),
        )
        if value is not None
    }
    given = None
    if args.first_frame is not None:
        image = _first_frame(args.first_frame, module.config.in_channels, args.size)
        given = module.codec.encode(image.expand(len(prompts), -1, -1, -1, -1))
    latents = module.generate(
        prompts,
        frames=args.frames,
        given=given,
        grid=(height, width),
        seed=args.seed,
        progress=True,
        **overrides,
    )
    videos = module.codec.decode(latents)
    args.out.mkdir(parents=True, exist_ok=True)
    for index, video in enumerate(videos):
        for suffix in ("mp4", "gif"):
            write_video(args.out / f"sample_{index}.{suffix}", video, fps=args.fps)
    write_video(args.out / "samples.mp4", torch.cat(list(videos), dim=-1), fps=args.fps)
    print(f"wrote {len(videos)} videos of {videos.shape[2]} frames under {args.out}")
