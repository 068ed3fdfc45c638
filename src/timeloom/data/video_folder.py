"""Datasets over folders of real videos (decoded with PyAV) and images (one-frame videos).

Bad files never kill a run: a file that fails its probe at indexing time is skipped with a warning naming it,
and a sample that fails to decode later is replaced by the next readable one, again with a warning. A
folder (or split) with nothing readable raises; a split that the hash leaves without files is empty.

Splits are decided per file by a hash of its path relative to its root, so a file is in exactly one of
train/val/test whatever the seed, the file order or the machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.progress import track
from torch.utils.data import Dataset

from timeloom.video_io import VideoInfo, frames_to_tensor, read_video, video_info

__all__ = ["IMAGE_EXTENSIONS", "VIDEO_EXTENSIONS", "ImageFolder", "VideoFolder", "split_of"]

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".gif")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")


def split_of(relative_path: str, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> str:
    """The split ("train", "val" or "test") of a file, from a hash of its path relative to its root.

    Args:
        relative_path: POSIX path of the file relative to the dataset root.
        fractions: relative sizes of train, val and test (normalised to sum to 1).
    """
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(f"split fractions must be three non-negative numbers, got {fractions!r}")
    digest = hashlib.sha256(relative_path.encode()).digest()
    uniform = int.from_bytes(digest[:8], "big") / 2**64
    bounds = np.cumsum(fractions) / sum(fractions)
    return SPLIT_NAMES[min(int(np.searchsorted(bounds, uniform, side="right")), 2)]


@dataclass(frozen=True)
class _MediaFile:
    path: Path
    relative: str
    stamp: str  # modification time and size at indexing: cache keys change when the file does
    info: VideoInfo


class _MediaFolder(Dataset):
    """Shared indexing, bad-file policy, crop and cache of `VideoFolder` and `ImageFolder`.

    Subclasses say how to probe a file, which samples (start frames) it holds and how to decode one sample,
    resized so its shorter side is ``size``.
    """

    kind = "media"

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        *,
        size: int,
        crop: str,
        extensions: Sequence[str],
        split: str | None,
        split_fractions: Sequence[float],
        cache_dir: str | Path | None,
        seed: int,
        progress: bool,
    ):
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES} or None, got {split!r}")
        self.roots = [Path(root)] if isinstance(root, (str, Path)) else [Path(r) for r in root]
        self.size = size
        self.crop = crop
        self.extensions = tuple(e.lower() for e in extensions)
        self.split = split
        self.split_fractions = tuple(split_fractions)
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.seed = seed
        self.progress = progress
        self._failed: set[Path] = set()
        where = ", ".join(str(r) for r in self.roots)
        found = self._list_files()
        if not found:
            raise ValueError(f"no {self.kind} files ({', '.join(self.extensions)}) in {where}")
        in_split = [(p, r) for p, r in found if split is None or split_of(r, self.split_fractions) == split]
        self.files = self._index(in_split)
        self.samples = [(i, start) for i, file in enumerate(self.files) for start in self._starts(file)]
        if in_split and not self.samples:
            split_note = "" if split is None else f" (split {split!r})"
            raise ValueError(f"no readable {self.kind} files in {where}{split_note}")
        if not in_split:  # a small folder may hash no file into a split: an empty split, not an error
            warnings.warn(
                f"split {split!r} of {where} is empty ({len(found)} files, fractions {self.split_fractions})",
                stacklevel=3,
            )

    # -- hooks ------------------------------------------------------------------------------------------------
    def _probe(self, path: Path) -> VideoInfo:
        """Check that ``path`` decodes and describe it; raise on a bad file."""
        raise NotImplementedError

    def _starts(self, file: _MediaFile) -> list[int]:
        """First frames of the samples taken from ``file``."""
        raise NotImplementedError

    def _decode(self, file: _MediaFile, start: int) -> np.ndarray:
        """uint8 frames ``(T, h, w, 3)`` of one sample with the shorter side resized to ``size``."""
        raise NotImplementedError

    def _sample_meta(self, file: _MediaFile, start: int) -> dict[str, Any]:
        return {}

    # -- indexing -----------------------------------------------------------------------------------------
    def _list_files(self) -> list[tuple[Path, str]]:
        found = []
        for root in self.roots:
            if not root.is_dir():
                raise ValueError(f"{root} is not a folder")
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() in self.extensions and path.is_file():
                    found.append((path, path.relative_to(root).as_posix()))
        return found

    def _index(self, candidates: list[tuple[Path, str]]) -> list[_MediaFile]:
        probes = self._load_probe_cache()
        before = len(probes)
        files = []
        steps = track(
            candidates, description=f"indexing {self.kind} files", transient=True, disable=not self.progress
        )
        for path, relative in steps:
            stat = path.stat()
            stamp = f"{stat.st_mtime_ns}-{stat.st_size}"
            key = f"{path.resolve()}|{stamp}"
            if key not in probes:
                try:
                    probes[key] = asdict(self._probe(path))
                except Exception as error:  # any decoder error: the file is unusable, the folder is not
                    probes[key] = {"error": f"{type(error).__name__}: {error}"}
            if "error" in probes[key]:
                warnings.warn(
                    f"skipping unreadable {self.kind} file {path}: {probes[key]['error']}", stacklevel=3
                )
                continue
            files.append(_MediaFile(path, relative, stamp, VideoInfo(**probes[key])))
        if len(probes) > before:
            self._save_probe_cache(probes)
        return files

    def _load_probe_cache(self) -> dict[str, dict[str, Any]]:
        if self.cache_dir is None or not (self.cache_dir / "probes.json").exists():
            return {}
        return json.loads((self.cache_dir / "probes.json").read_text())

    def _save_probe_cache(self, probes: dict[str, dict[str, Any]]) -> None:
        if self.cache_dir is not None:
            _atomic_write(self.cache_dir / "probes.json", lambda f: f.write(json.dumps(probes).encode()))

    # -- reading --------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.samples):
            raise IndexError(f"index {index} out of range for {len(self.samples)} samples")
        for attempt in range(len(self.samples)):
            file_index, start = self.samples[(index + attempt) % len(self.samples)]
            file = self.files[file_index]
            frames = self._read(file, start)
            if frames is None:
                continue
            meta = {"path": str(file.path), "index": index, "start": start, **self._sample_meta(file, start)}
            video = frames_to_tensor(self._crop(frames, np.random.default_rng([self.seed, index])))
            return {"video": video, "caption": file.path.stem, "meta": meta}
        raise RuntimeError(f"no sample of {', '.join(map(str, self.roots))} could be decoded")

    def _read(self, file: _MediaFile, start: int) -> np.ndarray | None:
        """Decoded sample (through the cache when there is one), or None after warning about a bad file."""
        if file.path in self._failed:
            return None
        cached = self._cache_path(file, start)
        if cached is not None and cached.exists():
            return np.load(cached)
        try:
            frames = self._decode(file, start)
        except Exception as error:  # any decoder error: replace the sample, keep the epoch going
            warnings.warn(
                f"{self.kind} file {file.path} failed to decode ({type(error).__name__}: {error}); "
                "using another sample instead",
                stacklevel=3,
            )
            self._failed.add(file.path)
            return None
        if cached is not None:
            _atomic_write(cached, lambda f: np.save(f, frames))
        return frames

    def _cache_path(self, file: _MediaFile, start: int) -> Path | None:
        if self.cache_dir is None:
            return None
        key = f"{file.path.resolve()}|{file.stamp}|{start}|{self._decode_params()}"
        return self.cache_dir / "samples" / f"{hashlib.sha1(key.encode()).hexdigest()}.npy"

    def _decode_params(self) -> str:
        """Everything besides the file and start that changes a decoded sample (part of the cache key)."""
        return f"size={self.size}"

    def fill_cache(self) -> None:
        """Decode every sample into ``cache_dir`` now (e.g. in ``prepare_data``) instead of during epoch 1."""
        if self.cache_dir is None:
            return
        for file_index, start in track(
            self.samples,
            description=f"caching {self.kind} samples",
            transient=True,
            disable=not self.progress,
        ):
            self._read(self.files[file_index], start)

    def _crop(self, frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        height, width = frames.shape[1:3]
        if self.crop == "random":
            top, left = (
                int(rng.integers(0, height - self.size + 1)),
                int(rng.integers(0, width - self.size + 1)),
            )
        else:
            top, left = (height - self.size) // 2, (width - self.size) // 2
        return frames[:, top : top + self.size, left : left + self.size]

    def _resized(self, info: VideoInfo) -> tuple[int, int]:
        """``(width, height)`` with the shorter side scaled to ``size`` and the aspect ratio kept."""
        scale = self.size / min(info.width, info.height)
        return max(self.size, round(info.width * scale)), max(self.size, round(info.height * scale))

    def __repr__(self) -> str:
        roots = ", ".join(str(r) for r in self.roots)
        return f"{type(self).__name__}({roots}, split={self.split!r}, files={len(self.files)}, samples={len(self)})"


def _atomic_write(path: Path, write: Any) -> None:
    """Write through a temporary file, so readers (other workers, other ranks) never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        write(handle)
    os.replace(temporary, path)


class VideoFolder(_MediaFolder):
    """Clips from every video file under ``root`` (recursively), decoded with PyAV.

    A clip is ``frames`` frames taken every ``stride`` source frames; each video gives ``clips_per_video``
    clips with evenly spaced starts. Clips are resized (shorter side to ``size``, at decode time) and
    cropped to ``size x size``. Items: ``{"video": (3, frames, size, size) in [-1, 1], "caption": file stem,
    "meta": {"path", "index", "start", "stride", "fps", "source_frames"}}``.

    Args:
        root: a folder or several.
        frames: frames per clip.
        stride: step between the source frames of a clip.
        size: output height and width.
        crop: ``"center"`` or ``"random"`` (deterministic per ``(seed, index)``).
        clips_per_video: clips indexed per video; videos shorter than one clip are skipped with a warning.
        extensions: file suffixes to index (case-insensitive).
        cache_dir: where to keep probe results and decoded clips (``.npy``, keyed by file path, mtime, size
            and the decode parameters); ``None`` decodes every time.
        seed: seed of the random crops.
        split: ``"train"``, ``"val"``, ``"test"`` (files chosen by `split_of`) or ``None`` for every file.
        split_fractions: relative sizes of train/val/test.
        progress: show progress bars while indexing and filling the cache.
    """

    kind = "video"

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        frames: int = 16,
        stride: int = 1,
        size: int = 64,
        crop: str = "center",
        clips_per_video: int = 1,
        extensions: Sequence[str] = VIDEO_EXTENSIONS,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        split: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        progress: bool = True,
    ):
        if frames < 1 or stride < 1 or clips_per_video < 1:
            raise ValueError(
                f"need frames, stride, clips_per_video >= 1; got {frames}, {stride}, {clips_per_video}"
            )
        self.frames = frames
        self.stride = stride
        self.clips_per_video = clips_per_video
        super().__init__(
            root,
            size=size,
            crop=crop,
            extensions=extensions,
            split=split,
            split_fractions=split_fractions,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress,
        )

    def _probe(self, path: Path) -> VideoInfo:
        # Counting packets finds the frames a truncated file really holds; decoding one frame rejects files
        # whose container parses but whose stream does not.
        info = video_info(path, count_packets=True)
        read_video(path, num_frames=1)
        return info

    def _starts(self, file: _MediaFile) -> list[int]:
        span = (self.frames - 1) * self.stride + 1
        if file.info.frames < span:
            warnings.warn(
                f"skipping {file.path}: {file.info.frames} frames, shorter than one clip ({span})",
                stacklevel=4,
            )
            return []
        starts = np.linspace(0, file.info.frames - span, self.clips_per_video).round().astype(int)
        return sorted(set(starts.tolist()))

    def _decode(self, file: _MediaFile, start: int) -> np.ndarray:
        frames = read_video(
            file.path, start=start, num_frames=self.frames, stride=self.stride, size=self._resized(file.info)
        )
        if len(frames) < self.frames:
            raise ValueError(f"only {len(frames)} of {self.frames} frames from frame {start} decode")
        return frames

    def _decode_params(self) -> str:
        return f"size={self.size},frames={self.frames},stride={self.stride}"

    def _sample_meta(self, file: _MediaFile, start: int) -> dict[str, Any]:
        return {"stride": self.stride, "fps": file.info.fps, "source_frames": file.info.frames}


class ImageFolder(_MediaFolder):
    """Every image under ``root`` (recursively) as a one-frame video ``(3, 1, size, size)`` in ``[-1, 1]``.

    Images are converted to RGB, resized (shorter side to ``size``) and cropped. Items:
    ``{"video", "caption": file stem, "meta": {"path", "index", "start": 0, "width", "height"}}`` with the
    original width and height. Arguments as for `VideoFolder`.
    """

    kind = "image"

    def __init__(
        self,
        root: str | Path | Sequence[str | Path],
        size: int = 64,
        crop: str = "center",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        cache_dir: str | Path | None = None,
        seed: int = 0,
        split: str | None = None,
        split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
        progress: bool = True,
    ):
        super().__init__(
            root,
            size=size,
            crop=crop,
            extensions=extensions,
            split=split,
            split_fractions=split_fractions,
            cache_dir=cache_dir,
            seed=seed,
            progress=progress,
        )

    def _probe(self, path: Path) -> VideoInfo:
        # verify() misses truncated JPEG data, so the probe decodes (at reduced scale where JPEG allows)
        with Image.open(path) as image:
            width, height = image.size
            image.draft("RGB", (self.size, self.size))
            image.load()
        return VideoInfo(frames=1, fps=0.0, width=width, height=height)

    def _starts(self, file: _MediaFile) -> list[int]:
        return [0]

    def _decode(self, file: _MediaFile, start: int) -> np.ndarray:
        target = self._resized(file.info)
        with Image.open(file.path) as image:
            image.draft("RGB", target)  # JPEG decodes straight at a smaller scale
            rgb = image.convert("RGB").resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return np.asarray(rgb)[None]

    def _sample_meta(self, file: _MediaFile, start: int) -> dict[str, Any]:
        return {"width": file.info.width, "height": file.info.height}
