"""MovingDigits: procedural videos of handwritten digits with captions and exact metadata.

The glyphs are scikit-learn's 1797 handwritten 8x8 digits (bundled with the package, nothing is downloaded),
upscaled smoothly. Positions are glyph centres ``(x, y)`` in pixel coordinates: pixel ``(row, col)`` sits
at ``x = col, y = row``, so ``y`` grows downwards. Angles are in degrees, counter-clockwise from "right" as
seen on screen (90 is up). Rendering is sub-pixel (bilinear), so a digit's intensity centroid moves exactly
with its trajectory while the glyph is fully inside the frame.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch.utils.data import Dataset

__all__ = [
    "COMPASS",
    "SPLITS",
    "MovingDigits",
    "digit_glyphs",
    "direction_name",
    "render_digits",
    "split_glyph_indices",
]

SPLITS = ("train", "val", "test")
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
# The glyph split is fixed, independent of any dataset seed, so splits of differently seeded datasets
# never share a handwritten image.
_GLYPH_SPLIT_SEED = 20240917

COMPASS = {
    "right": 0.0,
    "up-right": 45.0,
    "up": 90.0,
    "up-left": 135.0,
    "left": 180.0,
    "down-left": 225.0,
    "down": 270.0,
    "down-right": 315.0,
}
_DIRECTION_SETS = {
    "cardinal": ("right", "up", "left", "down"),
    "compass": tuple(COMPASS),
}


@functools.lru_cache(maxsize=8)
def digit_glyphs(glyph_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 scikit-learn digits as ``(1797, glyph_size, glyph_size)`` ink in ``[0, 1]``, and their labels.

    The 8x8 images get a one-pixel blank border before bicubic upscaling, so glyphs fade to the background
    instead of ending in a hard box edge.
    """
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0)
    padded = F.pad(images, (1, 1, 1, 1)).unsqueeze(1)
    glyphs = F.interpolate(padded, size=(glyph_size, glyph_size), mode="bicubic", align_corners=False)
    return glyphs.squeeze(1).clamp(0.0, 1.0), torch.from_numpy(digits.target).long()


@functools.cache
def split_glyph_indices(split: str) -> np.ndarray:
    """Indices into the 1797 digits used by ``split``: 80/10/10 per class, disjoint between splits."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    labels = load_digits().target
    rng = np.random.default_rng(_GLYPH_SPLIT_SEED)
    position = SPLITS.index(split)
    bounds = np.cumsum((0.0, *_SPLIT_FRACTIONS))
    chosen = []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        lo, hi = (round(b * len(members)) for b in bounds[position : position + 2])
        chosen.append(members[lo:hi])
    return np.sort(np.concatenate(chosen))


def direction_name(angle: float) -> str:
    """The nearest of the eight compass names ("right", "up-right", "up", ...) to an angle in degrees."""
    sector = round((angle % 360.0) / 45.0) % 8
    return list(COMPASS)[sector]


def render_digits(
    glyphs: torch.Tensor,
    positions: torch.Tensor,
    visible: torch.Tensor,
    size: int | tuple[int, int],
    *,
    wrap: bool = False,
) -> torch.Tensor:
    """Draw digits at sub-pixel positions; overlapping digits combine by their maximum.

    Args:
        glyphs: ``(n, g, g)`` ink in ``[0, 1]``.
        positions: ``(T, n, 2)`` glyph centres ``(x, y)``.
        visible: ``(T, n)`` bool, whether digit ``i`` is drawn in frame ``t``.
        size: canvas ``H = W`` or ``(H, W)``.
        wrap: draw on a torus, so a digit leaving one border re-enters at the opposite one.

    Returns:
        Ink ``(T, H, W)`` in ``[0, 1]``.
    """
    height, width = (size, size) if isinstance(size, int) else size
    frames, count = positions.shape[:2]
    glyph_size = glyphs.shape[-1]
    half = (glyph_size - 1) / 2

    def glyph_coordinate(pixels: int, centre: torch.Tensor) -> torch.Tensor:
        # offset of every canvas pixel from the centre, in glyph pixels, normalised for grid_sample
        offset = torch.arange(pixels, dtype=torch.float32) - centre.reshape(-1, 1)
        if wrap:
            offset = torch.remainder(offset + pixels / 2, pixels) - pixels / 2
        return (offset + half) / max(glyph_size - 1, 1) * 2 - 1

    x = glyph_coordinate(width, positions[..., 0].float())  # (T*n, W)
    y = glyph_coordinate(height, positions[..., 1].float())  # (T*n, H)
    grid = torch.stack(
        (x[:, None, :].expand(-1, height, -1), y[:, :, None].expand(-1, -1, width)), dim=-1
    )  # (T*n, H, W, 2)
    source = glyphs.float().unsqueeze(0).expand(frames, -1, -1, -1).reshape(frames * count, 1, glyph_size, -1)
    ink = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    ink = ink.reshape(frames, count, height, width) * visible.reshape(frames, count, 1, 1)
    return ink.amax(dim=1).clamp(0.0, 1.0)


def _reflect(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold positions into ``[lo, hi]`` as a ball bouncing between the two walls (a triangle wave)."""
    span = hi - lo
    if span <= 0:
        return np.full_like(values, lo)
    phase = np.mod(values - lo, 2 * span)
    return lo + np.where(phase <= span, phase, 2 * span - phase)


def _as_range(value: float | Sequence[float], name: str) -> tuple[float, float]:
    low, high = (value, value) if isinstance(value, (int, float)) else tuple(value)
    if low > high or low < 0:
        raise ValueError(
            f"{name} must be a value or a (low, high) range with 0 <= low <= high, got {value!r}"
        )
    return low, high


def _caption(labels: Sequence[int], directions: Sequence[str], appear: Sequence[int], moving: bool) -> str:
    """E.g. "the digit 3 moves left and the digit 7 moves up; 7 appears after 3"."""
    parts = [f"the digit {label}" + (f" moves {d}" if moving else "") for label, d in zip(labels, directions)]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if len(set(appear)) > 1:  # digits are ordered by appearance
        if len(labels) == 2:
            text += f"; {labels[1]} appears after {labels[0]}"
        else:
            text += f"; {labels[0]} appears first, then " + ", then ".join(str(x) for x in labels[1:])
    return text


class MovingDigits(Dataset):
    """Videos of handwritten digits moving across a black canvas, deterministic per ``(seed, split, index)``.

    Each item is ``{"video": (C, T, H, W) float in [-1, 1], "caption": str, "meta": dict}``; ``meta`` holds
    ``labels (n,)``, ``glyph_index (n,)`` (into scikit-learn's digits), ``start (n, 2)`` (centre where
    each digit appears), ``velocity (n, 2)`` px/frame at first (bounces flip it), ``speed (n,)``,
    ``angle (n,)``, ``direction`` (list of compass names), ``trajectory (T, n, 2)``, ``visible (T, n)``,
    ``appear_frame (n,)`` and ``index``/``seed``/``split``. Digits in one video have distinct labels and are
    listed in the order they appear. A digit stays at its start position until it appears, then moves.

    Args:
        size: canvas height and width in pixels.
        frames: frames per video; 1 gives images.
        num_digits: digits per video, or an inclusive ``(low, high)`` range (at most 10: labels are distinct).
        directions: ``"any"`` (uniform angle), ``"cardinal"`` (left/right/up/down), ``"compass"`` (8 ways),
            or a list of compass names and/or angles in degrees.
        speed: pixels per frame, or a ``(low, high)`` range drawn uniformly.
        bounce: reflect at the borders (the whole glyph stays inside); otherwise wrap around.
        appearance: ``"together"`` (all at frame 0) or ``"staggered"`` (digit k appears at ``k * gap``).
        appearance_gap: frames between appearances; defaults to ``frames // num_digits``.
        glyph_size: glyph side in pixels (8x8 digits upscaled); defaults to ``size // 2``.
        length: number of videos.
        seed: base seed.
        split: ``"train"``, ``"val"`` or ``"test"``: each uses its own disjoint subset of the glyph images.
        channels: 1 (grey) or 3 (grey replicated to RGB).
    """

    def __init__(
        self,
        size: int = 32,
        frames: int = 16,
        num_digits: int | tuple[int, int] = 1,
        directions: str | Sequence[str | float] = "any",
        speed: float | tuple[float, float] = (1.0, 3.0),
        bounce: bool = True,
        appearance: str = "together",
        appearance_gap: int | None = None,
        glyph_size: int | None = None,
        length: int = 10_000,
        seed: int = 0,
        split: str = "train",
        channels: int = 1,
    ):
        self.size = size
        self.frames = frames
        self.num_digits = tuple(int(n) for n in _as_range(num_digits, "num_digits"))
        self.angles = self._resolve_directions(directions)
        self.speed = _as_range(speed, "speed")
        self.bounce = bounce
        self.appearance = appearance
        self.appearance_gap = appearance_gap
        self.glyph_size = glyph_size or max(size // 2, 1)
        self.length = length
        self.seed = seed
        self.split = split
        self.channels = channels
        if not 1 <= self.num_digits[0] <= self.num_digits[1] <= 10:
            raise ValueError(f"num_digits must lie in [1, 10], got {num_digits!r}")
        if frames < 1 or length < 0 or channels not in (1, 3):
            raise ValueError(
                f"need frames >= 1, length >= 0, channels in (1, 3); got {frames}, {length}, {channels}"
            )
        if appearance not in ("together", "staggered"):
            raise ValueError(f"appearance must be 'together' or 'staggered', got {appearance!r}")
        if appearance_gap is not None and appearance_gap * (self.num_digits[1] - 1) >= frames:
            raise ValueError(
                f"appearance_gap {appearance_gap} leaves digits that never appear in {frames} frames"
            )
        if self.glyph_size > size:
            raise ValueError(f"glyph_size {self.glyph_size} exceeds the canvas size {size}")
        glyph_pool = split_glyph_indices(split)  # also validates `split`
        _, labels = digit_glyphs(self.glyph_size)
        self._pool_by_label = [glyph_pool[labels.numpy()[glyph_pool] == label] for label in range(10)]

    @staticmethod
    def _resolve_directions(directions: str | Sequence[str | float]) -> np.ndarray | None:
        """Allowed angles in degrees, or ``None`` for any angle."""
        if isinstance(directions, str):
            if directions == "any":
                return None
            if directions in _DIRECTION_SETS:
                directions = _DIRECTION_SETS[directions]
            else:
                directions = [directions]
        angles = []
        for direction in directions:
            if isinstance(direction, str) and direction not in COMPASS:
                raise ValueError(
                    f"unknown direction {direction!r}: use 'any', 'cardinal', 'compass', {list(COMPASS)}"
                )
            angles.append(COMPASS[direction] if isinstance(direction, str) else float(direction))
        if not angles:
            raise ValueError("directions is empty")
        return np.asarray(angles, dtype=np.float64)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} videos")
        meta = self.sample_meta(index)
        glyphs = digit_glyphs(self.glyph_size)[0][meta["glyph_index"]]
        ink = render_digits(glyphs, meta["trajectory"], meta["visible"], self.size, wrap=not self.bounce)
        video = (ink * 2 - 1).unsqueeze(0).expand(self.channels, -1, -1, -1).contiguous()
        caption = _caption(
            meta["labels"].tolist(), meta["direction"], meta["appear_frame"].tolist(), self.frames > 1
        )
        return {"video": video, "caption": caption, "meta": meta}

    def sample_meta(self, index: int) -> dict[str, Any]:
        """Draw the metadata of video ``index`` (everything but the pixels)."""
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        count = int(rng.integers(self.num_digits[0], self.num_digits[1] + 1))
        labels = rng.choice(10, size=count, replace=False)
        glyph_index = np.array([rng.choice(self._pool_by_label[label]) for label in labels])
        if self.angles is None:
            angles = rng.uniform(0.0, 360.0, size=count)
        else:
            angles = rng.choice(self.angles, size=count)
        speeds = rng.uniform(*self.speed, size=count)
        radians = np.deg2rad(angles)
        velocity = np.stack([np.cos(radians), -np.sin(radians)], axis=-1) * speeds[:, None]  # y grows down

        # the glyph centre may range over [lo, hi] with the whole glyph inside the canvas
        lo, hi = (self.glyph_size - 1) / 2, self.size - 1 - (self.glyph_size - 1) / 2
        start = (
            rng.uniform(lo, hi, size=(count, 2))
            if self.bounce
            else rng.uniform(0, self.size, size=(count, 2))
        )

        gap = self.appearance_gap if self.appearance_gap is not None else self.frames // count
        appear = np.arange(count) * gap if self.appearance == "staggered" else np.zeros(count, dtype=np.int64)
        time = np.arange(self.frames)[:, None]
        elapsed = np.clip(time - appear[None, :], 0, None)  # (T, n)
        trajectory = start[None] + elapsed[..., None] * velocity[None]
        trajectory = _reflect(trajectory, lo, hi) if self.bounce else np.mod(trajectory, self.size)
        return {
            "index": index,
            "seed": self.seed,
            "split": self.split,
            "labels": torch.from_numpy(labels).long(),
            "glyph_index": torch.from_numpy(glyph_index).long(),
            "start": torch.from_numpy(start).float(),
            "velocity": torch.from_numpy(velocity).float(),
            "speed": torch.from_numpy(speeds).float(),
            "angle": torch.from_numpy(angles).float(),
            "direction": [direction_name(a) for a in angles],
            "trajectory": torch.from_numpy(trajectory).float(),
            "visible": torch.from_numpy(time >= appear[None, :]),
            "appear_frame": torch.from_numpy(appear).long(),
        }

    def __repr__(self) -> str:
        return (
            f"MovingDigits(split={self.split!r}, length={self.length}, size={self.size}, "
            f"frames={self.frames}, num_digits={self.num_digits}, bounce={self.bounce}, "
            f"appearance={self.appearance!r})"
        )
