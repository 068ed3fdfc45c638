"""`timeloom reconstruct` and `timeloom encode`: a trained tokenizer on any video or image files or folders.

    timeloom reconstruct --checkpoint CKPT_OR_EXPORT INPUT... --out DIR [--size N] [--frames N]
    timeloom encode      --checkpoint CKPT_OR_EXPORT INPUT... --out DIR [--size N] [--frames N]

Every input is fitted to the model and each change is said, in the console and in the JSON written:
colour/grey/alpha converted to the model's channels, sizes centre-cropped (after resizing when too small)
to a multiple of what the model's patches and windows need, and clips whose length is not ``1 + k·t``
padded by repeating their last frame. A file that cannot be decoded is reported by name, the others are
still processed, and the command exits non-zero at the end.

`reconstruct` writes each reconstruction (MP4 for videos, PNG for images), an input | reconstruction
side-by-side (MP4 and GIF, or PNG) and ``metrics.json`` with PSNR/SSIM per item and their means (spec §7).
`encode` writes token ids (VQ, LFQ) or latent means (KL) as one safetensors file per item plus
``index.json``; `load_encoded` reads them back and `encoded_latent` turns them into decoder input.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure
from tqdm import tqdm

from timeloom.data.video_folder import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from timeloom.video_io import (
    center_crop,
    convert_channels,
    frames_to_tensor,
    pad_frames,
    read_image,
    read_video,
    resize_video,
    video_info,
    write_image,
    write_video,
)
from timeloom_tokenizer.model import OmniTokenizer, OmniTokenizerConfig
from timeloom_tokenizer.module import OmniTokenizerModule

__all__ = [
    "EncodedItem",
    "InputItem",
    "encode_main",
    "encoded_latent",
    "find_inputs",
    "input_from_tensor",
    "load_encoded",
    "load_input",
    "load_tokenizer",
    "psnr_per_frame",
    "reconstruct",
    "reconstruct_and_write",
    "write_reconstruction",
    "reconstruct_main",
    "ssim_per_frame",
    "write_metrics",
]

PSNR_CAP = 100.0  # dB, for identical frames (spec §7)
DEFAULT_FPS = 8.0  # for outputs of inputs without a frame rate (images, some GIFs)
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS  # what a folder input is searched for


# -- the model --------------------------------------------------------------------------------------------------
def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> OmniTokenizerModule:
    """A trained tokenizer in eval mode: a Lightning checkpoint file or a ``save_pretrained`` folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    module = (
        OmniTokenizerModule.from_pretrained(path)
        if path.is_dir()
        else OmniTokenizerModule.from_checkpoint(path)
    )
    return module.to(device).eval()


def _size_multiple(config: OmniTokenizerConfig) -> tuple[int, str]:
    """What H and W must be multiples of, and why."""
    if config.has_windows:
        return config.patch * config.window, f"patch {config.patch} × window {config.window}"
    return config.patch, f"patch {config.patch}"


def _model_frames(frames: int, temporal_patch: int) -> int:
    """The fewest frames ``1 + k·t`` that hold ``frames``."""
    return 1 + math.ceil((frames - 1) / temporal_patch) * temporal_patch


# -- inputs -------------------------------------------------------------------------------------------------------
@dataclass
class InputItem:
    """One input fitted to a model.

    Attributes:
        source: the file it came from (or a description, for tensors).
        name: output name, unique within a run (relative path under a folder input, without suffix).
        kind: ``"video"`` or ``"image"``.
        video: ``(C, T, H, W)`` in [-1, 1] ready for the model, with ``T = 1 + k·t`` after any padding.
        frames: the real frames in ``video``; any after them are padding.
        fps: the source frame rate (0 for images).
        notes: every change made to fit the model, in words.
    """

    source: str
    name: str
    kind: str
    video: Tensor
    frames: int
    fps: float
    notes: list[str] = field(default_factory=list)


def find_inputs(paths: Sequence[str | Path]) -> list[tuple[Path, str]]:
    """``(file, output name)`` for every input: files as given, folders searched for videos and images.

    Names are relative paths without suffix (just the stem for a file argument), made unique by a counter.
    A path that does not exist, or a folder without media, is kept, so that loading it fails with its name
    among the other results.
    """
    found: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            media = [
                p for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in MEDIA_EXTENSIONS
            ]
            found.extend((p, p.relative_to(path).with_suffix("").as_posix()) for p in media)
            if not media:  # kept, so that it is reported among the failures
                found.append((path, path.name))
        else:
            found.append((path, path.stem))
    taken: dict[str, int] = {}
    unique = []
    for path, name in found:
        taken[name] = taken.get(name, 0) + 1
        unique.append((path, name if taken[name] == 1 else f"{name}-{taken[name]}"))
    return unique


def load_input(
    path: str | Path,
    config: OmniTokenizerConfig,
    *,
    name: str | None = None,
    size: int | None = None,
    max_frames: int | None = None,
) -> InputItem:
    """Decode a video or image file and fit it to a model with ``config`` (see `fit_to_model`).

    Files with an image suffix are images; anything else is tried as a video.

    Raises:
        ValueError: the file cannot be decoded; the message names it and the decoder's reason.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder without video or image files ({', '.join(MEDIA_EXTENSIONS)})")
    is_image = path.suffix.lower() in IMAGE_EXTENSIONS
    try:
        if not path.is_file():
            raise FileNotFoundError("no such file")
        if is_image:
            frames, fps = read_image(path), 0.0
        else:
            info = video_info(path)
            frames = read_video(path, num_frames=max_frames, channels=info.channels)
            fps = info.fps
    except Exception as error:  # any decoder error: the file is unusable, and the message says which one
        kind = "image" if is_image else "video"
        raise ValueError(f"cannot decode {kind} file {path}: {type(error).__name__}: {error}") from error
    frames, channel_note = convert_channels(frames, config.channels)
    item = input_from_tensor(
        frames_to_tensor(frames),
        config,
        source=str(path),
        name=name or path.stem,
        kind="image" if len(frames) == 1 and is_image else "video",
        fps=fps,
        size=size,
    )
    item.notes[:0] = [channel_note] if channel_note else []
    return item


def input_from_tensor(
    video: Tensor,
    config: OmniTokenizerConfig,
    *,
    source: str,
    name: str,
    kind: str = "video",
    fps: float = 0.0,
    size: int | None = None,
) -> InputItem:
    """An `InputItem` from a ``(C, T, H, W)`` video in [-1, 1] with the model's channels (see `fit_to_model`)."""
    if video.dim() != 4 or video.shape[0] != config.channels:
        raise ValueError(
            f"{source}: expected a (C={config.channels}, T, H, W) video, got shape {tuple(video.shape)}"
        )
    fitted, notes = fit_to_model(video, config, size=size)
    return InputItem(source, name, kind, fitted, frames=video.shape[1], fps=fps, notes=notes)


def fit_to_model(
    video: Tensor, config: OmniTokenizerConfig, *, size: int | None = None
) -> tuple[Tensor, list[str]]:
    """Fit a ``(C, T, H, W)`` video with the model's channels to the model's shape rules, saying how.

    With ``size`` the shorter side is resized to ``size`` and the centre ``size × size`` kept. Then H and W
    are centre-cropped to multiples of the patch (× window), after enlarging a side that is smaller than one
    multiple, and the frames are padded to ``1 + k·t`` by repeating the last one.
    """
    notes: list[str | None] = []
    multiple, why = _size_multiple(config)
    if size is not None:
        height, width = video.shape[-2:]
        scale = size / min(height, width)
        video, note = resize_video(video, max(size, round(height * scale)), max(size, round(width * scale)))
        notes.append(note)
        video, note = center_crop(video, size, size)
        notes.append(note)
    height, width = video.shape[-2:]
    if min(height, width) < multiple:
        scale = multiple / min(height, width)
        video, note = resize_video(
            video, max(multiple, round(height * scale)), max(multiple, round(width * scale))
        )
        notes.append(f"{note} (smaller than {multiple} px)")
    height, width = video.shape[-2:]
    video, note = center_crop(video, height // multiple * multiple, width // multiple * multiple)
    notes.append(note and f"{note} (H and W must be multiples of {multiple}: {why})")
    frames = video.shape[1]
    video, note = pad_frames(video, _model_frames(frames, config.temporal_patch))
    notes.append(note and f"{note} (videos need 1 + k·{config.temporal_patch} frames)")
    return video, [note for note in notes if note]


# -- metrics (spec §7) ------------------------------------------------------------------------------------------
def psnr_per_frame(target: Tensor, prediction: Tensor) -> Tensor:
    """PSNR in dB of each frame of ``(C, T, H, W)`` videos in [-1, 1], on ``(x+1)/2`` with data range 1.

    Identical frames get `PSNR_CAP`.
    """
    mse = ((target.double() - prediction.double()) / 2).pow(2).mean(dim=(0, 2, 3))
    return (10 * torch.log10(1 / mse)).clamp(max=PSNR_CAP).float()


def ssim_per_frame(target: Tensor, prediction: Tensor) -> Tensor:
    """SSIM of each frame of ``(C, T, H, W)`` videos in [-1, 1] (Gaussian window 11, σ 1.5, range 1)."""
    return structural_similarity_index_measure(
        (prediction.transpose(0, 1).float() + 1) / 2,
        (target.transpose(0, 1).float() + 1) / 2,
        gaussian_kernel=True,
        sigma=1.5,
        kernel_size=11,
        data_range=1.0,
        reduction="none",
    )


# -- reconstruct --------------------------------------------------------------------------------------------------
@torch.inference_mode()
def reconstruct(model: OmniTokenizer, item: InputItem) -> Tensor:
    """Encode and decode an item; the reconstruction ``(C, frames, H, W)`` of its real frames, in [-1, 1]."""
    device = next(model.parameters()).device
    recon, _ = model(item.video[None].to(device))
    return recon[0, :, : item.frames].clamp(-1, 1).float().cpu()


def reconstruct_and_write(model: OmniTokenizer, item: InputItem, out: Path) -> dict[str, Any]:
    """Reconstruct ``item``, write its files under ``out`` and return its metrics-JSON entry."""
    return write_reconstruction(item, reconstruct(model, item), out)


def write_reconstruction(item: InputItem, recon: Tensor, out: Path) -> dict[str, Any]:
    """Write ``item``'s reconstruction and input | reconstruction files under ``out``; its metrics-JSON entry."""
    target = item.video[:, : item.frames]
    psnr, ssim = psnr_per_frame(target, recon), ssim_per_frame(target, recon)
    pair = torch.cat([target, recon], dim=-1)  # input | reconstruction
    if item.kind == "image":
        files = [
            write_image(out / "reconstructions" / f"{item.name}.png", recon[:, 0]),
            write_image(out / "side_by_side" / f"{item.name}.png", pair[:, 0]),
        ]
    else:
        fps = item.fps or DEFAULT_FPS
        files = [
            write_video(out / "reconstructions" / f"{item.name}.mp4", recon, fps=fps),
            *(
                write_video(out / "side_by_side" / f"{item.name}{suffix}", pair, fps=fps)
                for suffix in (".mp4", ".gif")
            ),
        ]
    return {
        "name": item.name,
        "source": item.source,
        "kind": item.kind,
        "frames": item.frames,
        "size": list(target.shape[-2:]),
        "psnr": float(psnr.mean()),
        "ssim": float(ssim.mean()),
        "notes": item.notes,
        "files": [str(f) for f in files],
    }


def write_metrics(
    out: Path, checkpoint: str | Path, entries: list[dict[str, Any]], failures: list[dict[str, str]]
) -> dict[str, Any]:
    """Write ``out/metrics.json`` (items, failures, mean PSNR/SSIM over items), print it briefly, return it."""
    mean = {
        name: sum(e[name] for e in entries) / len(entries) if entries else None for name in ("psnr", "ssim")
    }
    metrics = {"checkpoint": str(checkpoint), "items": entries, "failed": failures, "mean": mean}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    for entry in entries:
        print(f"{entry['source']}: PSNR {entry['psnr']:.2f} dB, SSIM {entry['ssim']:.4f}")
    if entries:
        print(f"mean over {len(entries)} items: PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.4f}")
    return metrics


# -- encode -------------------------------------------------------------------------------------------------------
@dataclass
class EncodedItem:
    """One encoded input, as `load_encoded` returns it.

    Attributes:
        kind: ``"tokens"`` (int64 ids ``(T', h, w)``, VQ or LFQ) or ``"latent"`` (KL means ``(c, T', h, w)``).
        tensor: the ids or the latent.
        source: the file it came from.
        fps: the source frame rate (0 for images).
        frames: real frames encoded; ``padded_frames - frames`` repeats of the last one follow them.
        padded_frames: frames the model saw, ``1 + (T'−1)·t``.
        notes: what was changed to fit the model.
    """

    kind: str
    tensor: Tensor
    source: str
    fps: float
    frames: int
    padded_frames: int
    notes: list[str]


@torch.inference_mode()
def encode(model: OmniTokenizer, item: InputItem) -> tuple[str, Tensor]:
    """``("tokens", ids (T', h, w))`` for VQ/LFQ or ``("latent", mean (c, T', h, w))`` for KL."""
    device = next(model.parameters()).device
    latent = model.encode_latent(item.video[None].to(device))
    if model.config.quantizer == "kl":
        return "latent", model.quantizer.mode(latent)[0].float().cpu()
    return "tokens", model.quantizer(latent).indices[0].long().cpu()


def encoded_latent(model: OmniTokenizer, item: EncodedItem) -> Tensor:
    """The decoder input ``(1, latent_dim, T', h, w)`` of an encoded item (codes looked up for token ids)."""
    device = next(model.parameters()).device
    if item.kind == "latent":
        return item.tensor[None].to(device)
    return model.quantizer.indices_to_codes(item.tensor[None].to(device)).to(next(model.parameters()).dtype)


def load_encoded(directory: str | Path) -> list[EncodedItem]:
    """Every item that `timeloom encode` wrote to ``directory``, in its index order."""
    directory = Path(directory)
    index_path = directory / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{directory} holds no index.json: not written by `timeloom encode`")
    index = json.loads(index_path.read_text())
    items = []
    for entry in index["items"]:
        tensor = load_file(directory / entry["file"])[index["kind"]]
        fields = ("source", "fps", "frames", "padded_frames", "notes")
        items.append(EncodedItem(kind=index["kind"], tensor=tensor, **{k: entry[k] for k in fields}))
    return items


# -- the commands -----------------------------------------------------------------------------------------------
def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"timeloom {command}", description=description)
    parser.add_argument(
        "--checkpoint", required=True, help="a Lightning checkpoint (.ckpt) or a `timeloom export` folder"
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="video or image files, or folders of them")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--size", type=int, help="resize the shorter side to N and keep the centre N×N (default: native size)"
    )
    parser.add_argument("--frames", type=int, help="read at most N frames of each video (default: all)")
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device, help=f"torch device (default: {default_device})")
    return parser


def _run(
    args: argparse.Namespace, verb: str, process: Any
) -> tuple[list[dict[str, Any]], list[dict[str, str]], OmniTokenizerModule]:
    """Load the model, then ``process(model, item)`` for every input with a progress bar.

    Returns the processed entries, the failures ``{"source", "error"}`` and the module.
    """
    for flag in ("size", "frames"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise SystemExit(f"--{flag} must be ≥ 1, got {getattr(args, flag)}")
    module = load_tokenizer(args.checkpoint, args.device)
    inputs = find_inputs(args.inputs)
    if not inputs:
        raise SystemExit(f"no video or image files in {', '.join(args.inputs)}")
    entries, failures = [], []
    for path, name in tqdm(inputs, desc=verb, unit="item"):
        try:
            item = load_input(path, module.config, name=name, size=args.size, max_frames=args.frames)
        except ValueError as error:
            tqdm.write(f"error: {error}")
            failures.append({"source": str(path), "error": str(error)})
            continue
        for note in item.notes:
            tqdm.write(f"{path}: {note}")
        entries.append(process(module.model, item))
    return entries, failures, module


def _finish(failures: list[dict[str, str]], total: int) -> None:
    if failures:
        names = ", ".join(failure["source"] for failure in failures)
        raise SystemExit(f"{len(failures)} of {total} inputs failed: {names}")


def reconstruct_main(argv: list[str]) -> None:
    """`timeloom reconstruct`: see the module docstring."""
    args = _parser(
        "reconstruct", "Encode and decode videos and images; write them, side-by-sides and PSNR/SSIM."
    ).parse_args(argv)
    entries, failures, _ = _run(
        args, "reconstruct", lambda model, item: reconstruct_and_write(model, item, args.out)
    )
    write_metrics(args.out, args.checkpoint, entries, failures)
    print(f"wrote reconstructions, side-by-sides and metrics.json under {args.out}")
    _finish(failures, len(entries) + len(failures))


def encode_main(argv: list[str]) -> None:
    """`timeloom encode`: see the module docstring."""
    args = _parser(
        "encode", "Encode videos and images to token ids (VQ, LFQ) or latent means (KL)."
    ).parse_args(argv)

    def encode_and_write(model: OmniTokenizer, item: InputItem) -> dict[str, Any]:
        kind, tensor = encode(model, item)
        file = f"{item.name}.safetensors"
        (args.out / file).parent.mkdir(parents=True, exist_ok=True)
        save_file({kind: tensor.contiguous()}, args.out / file, metadata={"source": item.source})
        return {
            "file": file,
            "source": item.source,
            "shape": list(tensor.shape),
            "fps": item.fps,
            "frames": item.frames,
            "padded_frames": item.video.shape[1],
            "notes": item.notes,
        }

    entries, failures, module = _run(args, "encode", encode_and_write)
    config = module.config
    index = {
        "checkpoint": str(args.checkpoint),
        "kind": "latent" if config.quantizer == "kl" else "tokens",
        "quantizer": config.quantizer,
        "latent_dim": config.latent_dim,
        "vocabulary": None if config.quantizer == "kl" else int(module.model.quantizer.num_codes),
        "temporal_patch": config.temporal_patch,
        "patch": config.patch,
        "items": entries,
        "failed": failures,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "index.json").write_text(json.dumps(index, indent=2, ensure_ascii=False))
    print(f"wrote {len(entries)} {index['kind']} files and index.json under {args.out}")
    _finish(failures, len(entries) + len(failures))
