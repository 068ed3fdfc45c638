"""Joint image + video training data: batches alternate between videos and images, each step at a resolution
drawn from a list (OmniTokenizer's stage 2, spec section 4), with exact mid-epoch resume.

- `AlternatingLoader` interleaves two resumable loaders (video, image, video, …) and resizes each batch
  (bilinear) to a size drawn per step from ``(seed, epoch, step)``; its state is the epoch and the batches
  handed out, so a resumed run sees the same batches at the same sizes as an uninterrupted one.
- `JointDataModule` serves it from any video data module and any image data modules (their datasets
  concatenated); validation has one loader per kind at a fixed size.
- `Photos` / `PhotosDataModule`: random square crops of the real photos bundled with scikit-image, as
  one-frame videos; each split uses its own photos.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from timeloom.data.datamodule import TimeloomDataModule, collate_batch
from timeloom.data.loader import ResumableDataLoader, make_eval_loader, make_train_loader
from timeloom.data.moving_digits import SPLITS

__all__ = [
    "PHOTO_SPLITS",
    "AlternatingLoader",
    "JointDataModule",
    "Photos",
    "PhotosDataModule",
    "resize_batch",
]

# scikit-image's bundled photos (no download), split by photo; `cat` is `chelsea` again, so it is left out.
PHOTO_SPLITS = {
    "train": (
        "astronaut", "brick", "camera", "cell", "clock", "coffee", "grass", "gravel", "hubble_deep_field",
        "immunohistochemistry", "moon", "page", "retina", "rocket", "text",
    ),
    "val": ("chelsea", "coins"),
    "test": ("colorwheel", "microaneurysms"),
}  # fmt: skip


@functools.cache
def _photo(name: str, short_side: int) -> torch.Tensor:
    """A scikit-image photo as ``(3, H, W)`` floats in [-1, 1] (grey replicated, alpha dropped), downscaled
    once so its shorter side is at most ``short_side`` (resizing full-size crops per item is slow)."""
    pixels = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32))
    pixels = pixels / 255.0 if pixels.max() > 1 else pixels
    pixels = pixels[..., None].expand(-1, -1, 3) if pixels.dim() == 2 else pixels[..., :3]
    photo = pixels.permute(2, 0, 1)[None] * 2 - 1
    scale = short_side / min(photo.shape[-2:])
    if scale < 1:
        photo = F.interpolate(photo, scale_factor=scale, mode="bilinear", antialias=True)
    return photo[0].contiguous()


class Photos(Dataset):
    """Random square crops of scikit-image's photos, resized to ``size``: ``{"video": (C, frames, size, size)}``.

    Item ``i`` is deterministic per ``(seed, split, i)``: a photo, a crop side of ``min_crop``–1 times the
    photo's shorter side at a random place, and a random horizontal flip. With ``frames > 1`` the crop pans
    in a straight line across the photo, up to ``max_pan`` crop sides over the clip: real textures in camera
    motion, the natural video that MovingDigits lacks.

    Args:
        size: output side in pixels.
        length: items (crops) in the dataset.
        channels: 3 (RGB) or 1 (luma).
        min_crop: smallest crop side as a fraction of the photo's shorter side.
        frames: frames per item; 1 gives images.
        max_pan: longest pan over a clip, in crop sides.
        split: ``"train"``, ``"val"`` or ``"test"``: each uses its own photos (`PHOTO_SPLITS`).
        seed: base seed.
    """

    def __init__(
        self,
        size: int = 64,
        length: int = 1000,
        channels: int = 3,
        min_crop: float = 0.25,
        frames: int = 1,
        max_pan: float = 0.5,
        split: str = "train",
        seed: int = 0,
    ):
        if split not in PHOTO_SPLITS:
            raise ValueError(f"split must be one of {tuple(PHOTO_SPLITS)}, got {split!r}")
        if channels not in (1, 3) or size < 1 or length < 0 or not 0 < min_crop <= 1 or frames < 1:
            raise ValueError(
                "need channels in (1, 3), size >= 1, length >= 0, 0 < min_crop <= 1 and frames >= 1; got "
                f"{channels}, {size}, {length}, {min_crop}, {frames}"
            )
        if max_pan < 0:
            raise ValueError(f"max_pan must be >= 0, got {max_pan}")
        self.size, self.length, self.channels, self.min_crop = size, length, channels, min_crop
        self.frames, self.max_pan = frames, max_pan
        self.split, self.seed = split, seed
        self.names = PHOTO_SPLITS[split]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} photo crops")
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        name = self.names[int(rng.integers(len(self.names)))]
        # The smallest crop still has `size` source pixels a side.
        photo = _photo(name, math.ceil(self.size / self.min_crop))
        height, width = photo.shape[1:]
        side = max(1, round(rng.uniform(self.min_crop, 1.0) * min(height, width)))
        # The pan (dy, dx) over the whole clip, clipped to the photo; the start leaves room for it. Images draw
        # no pan, so their crops stay what they were before clips existed.
        dy = dx = 0
        if self.frames > 1:
            angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0, self.max_pan) * side
            dy = int(np.clip(round(length * math.sin(angle)), side - height, height - side))
            dx = int(np.clip(round(length * math.cos(angle)), side - width, width - side))
        top = int(rng.integers(max(0, -dy), height - side - max(0, dy) + 1))
        left = int(rng.integers(max(0, -dx), width - side - max(0, dx) + 1))
        flip = rng.random() < 0.5
        steps = np.linspace(0, 1, self.frames) if self.frames > 1 else np.zeros(1)
        crops = torch.stack(
            [
                photo[:, y : y + side, x : x + side]
                for y, x in zip(
                    top + np.round(steps * dy).astype(int), left + np.round(steps * dx).astype(int)
                )
            ]
        )
        if flip:
            crops = crops.flip(-1)
        crops = F.interpolate(crops, size=(self.size, self.size), mode="bilinear", antialias=True)
        if self.channels == 1:
            crops = (crops * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
        return {
            "video": crops.clamp(-1, 1).transpose(0, 1),
            "caption": f"a photo ({name})" if self.frames == 1 else f"a pan across a photo ({name})",
            "meta": {"photo": name, "crop": torch.tensor([top, left, side]), "pan": torch.tensor([dy, dx])},
        }


class PhotosDataModule(TimeloomDataModule):
    """`Photos` crops (one-frame videos, or pans with ``frames > 1``); ``train_length`` etc. set the items per split."""

    def __init__(
        self,
        size: int = 64,
        channels: int = 3,
        min_crop: float = 0.25,
        frames: int = 1,
        max_pan: float = 0.5,
        train_length: int = 1000,
        val_length: int = 64,
        test_length: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.photo_args = dict(
            size=size, channels=channels, min_crop=min_crop, frames=frames, max_pan=max_pan
        )
        Photos(length=0, **self.photo_args)  # reject a bad configuration now

    def build_dataset(self, split: str) -> Photos:
        return Photos(length=self.lengths[split], split=split, seed=self.seed, **self.photo_args)


def resize_batch(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """The batch with its ``video`` ``(B, C, T, H, W)`` resized (bilinear, antialiased) to ``size × size``."""
    video = batch["video"]
    if not isinstance(video, torch.Tensor):
        shapes = sorted({tuple(v.shape) for v in video})
        raise ValueError(f"a batch's videos must share one shape to be resized, got {shapes}")
    if video.shape[-2:] == (size, size):
        return batch
    b, c, t, h, w = video.shape
    frames = video.transpose(1, 2).reshape(b * t, c, h, w)
    frames = F.interpolate(frames, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return {**batch, "video": frames.reshape(b, t, c, size, size).transpose(1, 2)}


def _collate_resized(items: Sequence[dict[str, Any]], size: int) -> dict[str, Any]:
    return resize_batch(collate_batch(items), size)


class _SamplerGroup:
    """What Lightning sees as the loader's ``sampler``: setting its epoch sets every inner loader's."""

    def __init__(self, loaders: Sequence[ResumableDataLoader]):
        self.loaders = loaders
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        for loader in self.loaders:
            loader.sampler.set_epoch(epoch)


class AlternatingLoader:
    """Batches from each of ``loaders`` in turn (e.g. video, image, video, …), each resized to one of ``sizes``.

    The size of step ``i`` of epoch ``e`` is drawn from ``(seed, e, i)``. An epoch ends when any loader runs
    out: ``len(loaders)·min(len(loader))`` batches. Lightning restores the position through `state_dict` /
    `load_state_dict` and sets the epoch through ``sampler``.
    """

    def __init__(self, loaders: Sequence[ResumableDataLoader], sizes: Sequence[int], seed: int = 0):
        if not loaders:
            raise ValueError("AlternatingLoader needs at least one loader")
        if not sizes or any(s < 1 for s in sizes):
            raise ValueError(f"sizes must be a non-empty list of positive sizes, got {list(sizes)}")
        self.loaders = list(loaders)
        self.sizes = list(sizes)
        self.seed = seed
        self.sampler = _SamplerGroup(self.loaders)
        self._batches_yielded = 0
        self._resume_at = 0  # set by `load_state_dict`, used by the next epoch only

    def __len__(self) -> int:
        return len(self.loaders) * min(len(loader) for loader in self.loaders)

    def size_at(self, step: int) -> int:
        """The side of batch ``step`` of the current epoch."""
        rng = np.random.default_rng([self.seed, self.sampler.epoch, step])
        return self.sizes[int(rng.integers(len(self.sizes)))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        start, self._resume_at = self._resume_at, 0
        kinds = len(self.loaders)
        # Loader k has handed out the batches of the steps i < start with i % kinds == k.
        for k, loader in enumerate(self.loaders):
            loader.sampler.skip = len(range(k, start, kinds)) * loader.batch_size
        iterators = [iter(loader) for loader in self.loaders]
        self._batches_yielded = start
        for step in range(start, len(self)):
            batch = next(iterators[step % kinds])
            self._batches_yielded = step + 1
            yield resize_batch(batch, self.size_at(step))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self._resume_at = state["batches_yielded"]


class JointDataModule(TimeloomDataModule):
    """Alternating video and image batches at sizes drawn per step (images are one-frame videos).

    The inner data modules only supply datasets; batch sizes, seed and loaders are this module's. With only
    images (stage 1) or only videos (a video-only baseline) every batch is of that kind. Validation and test
    serve one loader per kind (videos first), at ``eval_size``.

    Args:
        videos: data modules whose datasets, concatenated, give the clips (one module is a list of one);
            none means images only.
        images: data modules whose datasets, concatenated, give the images; none means videos only.
        sizes: training sides in pixels, one drawn per step (bilinear resize).
        eval_size: side of validation/test batches; defaults to the smallest of ``sizes``.
        video_batch_size, image_batch_size: clips per video batch, images per image batch.
        num_workers, seed, pin_memory: as for `TimeloomDataModule`.
    """

    def __init__(
        self,
        videos: TimeloomDataModule | list[TimeloomDataModule] | None = None,
        images: list[TimeloomDataModule] | None = None,
        sizes: list[int] | None = None,
        eval_size: int | None = None,
        video_batch_size: int = 4,
        image_batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(
            batch_size=video_batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory
        )
        self.save_hyperparameters(ignore=["videos", "images"])
        self.videos = [videos] if isinstance(videos, TimeloomDataModule) else list(videos or [])
        if not self.videos and not images:
            raise ValueError("JointDataModule needs videos, images or both")
        self.images = list(images or [])
        self.sizes = list(sizes or [32])
        self.eval_size = eval_size if eval_size is not None else min(self.sizes)
        self.batch_sizes = {"video": video_batch_size, "image": image_batch_size}

    @property
    def kinds(self) -> list[str]:
        """The kinds of batch, in the order they alternate."""
        return (["video"] if self.videos else []) + (["image"] if self.images else [])

    def build_dataset(self, split: str) -> Dataset:
        """``"video/<split>"`` or ``"image/<split>"``: that kind's datasets, concatenated."""
        kind, split = split.split("/")
        modules = self.videos if kind == "video" else self.images
        return ConcatDataset([module.dataset(split) for module in modules])

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",)}.get(stage, ("train", "val", "test"))
        for split in splits:
            for kind in self.kinds:
                self.dataset(f"{kind}/{split}")

    def train_dataloader(self) -> AlternatingLoader:
        loaders = [
            make_train_loader(
                self.dataset(f"{kind}/train"),
                batch_size=self.batch_sizes[kind],
                seed=self.seed,
                num_workers=self.num_workers,
                collate_fn=collate_batch,
                pin_memory=self.pin_memory,
                drop_last=True,
            )
            for kind in self.kinds
        ]
        return AlternatingLoader(loaders, self.sizes, seed=self.seed)

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loaders("test")[0]

    def _eval_loaders(self, split: str) -> list[DataLoader]:
        return [
            make_eval_loader(
                self.dataset(f"{kind}/{split}"),
                batch_size=self.batch_sizes[kind],
                num_workers=self.num_workers,
                collate_fn=functools.partial(_collate_resized, size=self.eval_size),
                pin_memory=self.pin_memory,
            )
            for kind in self.kinds
        ]
