"""What every benchmark loader shares: the item type, layout errors, the manifest check and frame sampling.

A loader reads a local copy of a benchmark's annotations and yields `EvalItem`s: the question with the
benchmark's own prompt, the options, the answer the scoring rule compares with, the video and which part of
it the model may see (``bounds`` in seconds, or ``cut_at``: nothing after that time, for online questions).
Videos are only looked for, never decoded, until evaluation: `missing_videos` lists every absent file
before any compute.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from torch import Tensor

from timeloom.video_io import (
    convert_channels,
    frames_to_tensor,
    read_image,
    read_video,
    resize_video,
    video_info,
)

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "LETTERS",
    "BenchmarkLayoutError",
    "EvalItem",
    "frame_indices",
    "listed_options",
    "load_clip",
    "missing_videos",
    "shown_duration",
    "option_listing",
    "read_json",
    "require_keys",
]

LETTERS = "ABCDEFGHIJ"
#: How an item is answered and scored: options by letter, yes/no, a number, or free text only a judge scores.
FORMATS = ("multi_choice", "caption_matching", "yes_no", "count", "captioning")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
FRAME_FOLDER_FPS = 3.0  # MVBench's frame folders (TVQA) are sampled at 3 fps


class BenchmarkLayoutError(ValueError):
    """An annotation file is not in the layout its loader expects; the message names the file and the layout."""


@dataclass
class EvalItem:
    """One benchmark question, ready to ask.

    Attributes:
        id: unique within the benchmark.
        benchmark: ``mvbench``, ``tempcompass``, ``ovobench``, ``tomato``, ``temporalbench`` or ``temporal_qa``.
        task: the benchmark's task (MVBench task, TempCompass aspect, OVO task, TOMATO reasoning type, …).
        video: the video file (or a folder of frames), or an already decoded ``(C, T, H, W)`` tensor.
        question: the question as annotated.
        options: the option texts, in the order shown (empty for yes/no, counts, captioning).
        answer: what the rule compares with: an option letter, ``yes``/``no`` or a number.
        prompt: the full user text (question, options and the benchmark's instruction).
        format: one of `FORMATS`.
        bounds: ``(start, end)`` seconds of the video to sample from, or None for all of it.
        cut_at: seconds; frames after it are never shown (online questions), or None.
        sampler: ``uniform_mid`` (segment midpoints) or ``linspace``.
        system: the benchmark's system prompt, if any.
        prefill: text the assistant's reply starts with (MVBench's ``Best option:(``).
        extra: anything else the report groups by (aspect, category, dataset, group, …).
    """

    id: str
    benchmark: str
    task: str
    video: Path | Tensor | None
    question: str
    options: list[str]
    answer: str
    prompt: str
    format: str = "multi_choice"
    bounds: tuple[float, float] | None = None
    cut_at: float | None = None
    sampler: str = "linspace"
    system: str = ""
    prefill: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"item {self.id!r}: format {self.format!r} is not one of {FORMATS}")
        if self.sampler not in ("uniform_mid", "linspace"):
            raise ValueError(f"item {self.id!r}: sampler {self.sampler!r} is not uniform_mid or linspace")

    @property
    def candidates(self) -> list[str]:
        """What a likelihood ranking chooses between: option letters, ``yes``/``no``, or nothing."""
        if self.format in ("multi_choice", "caption_matching"):
            return list(LETTERS[: len(self.options)])
        return ["yes", "no"] if self.format == "yes_no" else []


# -- reading annotation files --------------------------------------------------------------------------------
def read_json(path: Path, expected: type, layout: str) -> Any:
    """The JSON in ``path``, which must be a ``expected`` (list or dict); else a `BenchmarkLayoutError`."""
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise BenchmarkLayoutError(f"{path}: not valid JSON ({error}); expected {layout}") from error
    if not isinstance(data, expected):
        raise BenchmarkLayoutError(f"{path}: holds a JSON {type(data).__name__}; expected {layout}")
    return data


def require_keys(record: Any, keys: tuple[str, ...], path: Path, item: Any, layout: str) -> None:
    """Raise a `BenchmarkLayoutError` naming the file, the item and the missing keys."""
    missing = [key for key in keys if not isinstance(record, dict) or key not in record]
    if missing:
        raise BenchmarkLayoutError(f"{path}: item {item!r} lacks {missing}; expected {layout}")


def option_listing(options: list[str], style: str) -> str:
    """Options one per line: ``(A) text`` (style ``paren``) or ``A. text`` (style ``dot``)."""
    form = "({letter}) {text}" if style == "paren" else "{letter}. {text}"
    return "\n".join(form.format(letter=LETTERS[k], text=text) for k, text in enumerate(options))


_OPTION_LINE = re.compile(r"^\s*(?:caption\s+)?(?:\(([A-J])\)|([A-J])\s*[.:)])\s*(.*)$", re.IGNORECASE)


def listed_options(text: str) -> list[tuple[str, str]]:
    """``(letter, text)`` of every option line in ``text``: ``A. …``, ``(A) …``, ``A) …`` or ``Caption A: …``."""
    matches = (_OPTION_LINE.match(line) for line in text.splitlines())
    return [((m.group(1) or m.group(2)).upper(), m.group(3).strip()) for m in matches if m]


def option_lines(text: str) -> list[str]:
    """The option lines of ``text`` as written (``(A) left``): the spans PINE reads position-invariantly."""
    return [line.strip() for line in text.splitlines() if _OPTION_LINE.match(line)]


def missing_videos(items: list[EvalItem]) -> list[tuple[str, Path]]:
    """``(item id, path)`` of every item whose video file (or frame folder) does not exist."""
    return [
        (item.id, item.video)
        for item in items
        if isinstance(item.video, Path) and not (item.video.is_file() or item.video.is_dir())
    ]


# -- frame sampling -------------------------------------------------------------------------------------------
def frame_indices(
    sampler: str,
    total: int,
    fps: float,
    frames: int,
    bounds: tuple[float, float] | None = None,
    cut_at: float | None = None,
) -> list[int]:
    """Which of ``total`` frames to show.

    ``uniform_mid`` (MVBench): split ``[first, last]`` into ``frames`` equal segments and take each one's
    middle. ``linspace`` (TOMATO, LITA): ``frames`` evenly spaced indices from ``first`` to ``last``, ends
    included. ``bounds`` (seconds) narrow ``[first, last]``; ``cut_at`` (seconds) ends it at the last frame
    shown at or before that time, so nothing later is ever seen.
    """
    if total < 1 or frames < 1:
        raise ValueError(f"need at least one frame to sample and to show; got {total} and {frames}")
    first, last = 0, total - 1
    if bounds is not None:
        first = min(max(first, round(bounds[0] * fps)), last)
        last = max(min(last, round(bounds[1] * fps)), first)
    if cut_at is not None:
        last = min(last, math.floor(cut_at * fps + 1e-6))
        if last < first:
            raise ValueError(f"nothing to show: the cut at {cut_at} s comes before the first frame to show")
    if sampler == "uniform_mid":
        segment = (last - first) / frames
        return [min(last, int(first + segment / 2 + round(segment * k))) for k in range(frames)]
    if sampler == "linspace":
        return np.linspace(first, last, frames).round().astype(int).tolist()
    raise ValueError(f"unknown sampler {sampler!r}; use uniform_mid or linspace")


def _frame_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: a frame folder with no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def shown_duration(
    path: Path, bounds: tuple[float, float] | None = None, cut_at: float | None = None
) -> float:
    """Seconds of the video the model is shown: the whole file, its ``bounds``, or up to ``cut_at``."""
    path = Path(path)
    total = len(_frame_files(path)) / FRAME_FOLDER_FPS if path.is_dir() else video_info(path).duration
    start, end = bounds if bounds is not None else (0.0, total)
    end = min(end, total, cut_at if cut_at is not None else total)
    return max(end - start, 0.0)


def load_clip(
    path: Path,
    frames: int,
    height: int,
    width: int,
    channels: int,
    sampler: str = "linspace",
    bounds: tuple[float, float] | None = None,
    cut_at: float | None = None,
) -> Tensor:
    """Decode the sampled frames of a video file or frame folder as ``(channels, frames, height, width)``.

    Frames are resized to the model's size (the whole frame is kept, aspect ratio not preserved) and
    converted to its channels. Only frames up to the last one sampled are decoded.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: naming the file, when it cannot be decoded or holds no frames.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video {path} does not exist")
    try:
        if path.is_dir():
            files = _frame_files(path)
            wanted = frame_indices(sampler, len(files), FRAME_FOLDER_FPS, frames, bounds, cut_at)
            decoded = np.concatenate([convert_channels(read_image(files[k]), channels)[0] for k in wanted])
            return resize_video(frames_to_tensor(decoded), height, width)[0]
        info = video_info(path)
        wanted = frame_indices(sampler, max(info.frames, 1), info.fps, frames, bounds, cut_at)
        first = min(wanted)
        decoded = read_video(
            path, start=first, num_frames=max(wanted) - first + 1, size=(width, height), channels=channels
        )
    except (av.error.FFmpegError, OSError, ValueError) as error:
        raise ValueError(f"video {path} cannot be decoded: {error}") from error
    # a header may promise more frames than the file holds: repeat the last one decoded
    picked = np.minimum(np.asarray(wanted) - first, len(decoded) - 1)
    return frames_to_tensor(decoded[picked])
