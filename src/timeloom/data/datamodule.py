"""Lightning data modules: one base that owns the loaders, and one subclass per dataset family.

A subclass only says how to build the dataset of a split (`build_dataset`). Train/val/test never overlap:
- `MovingDigitsDataModule`: each split draws from its own disjoint subset of the handwritten glyph images
  (`split_glyph_indices`, fixed whatever the seed) and from its own random stream.
- `VideoFolderDataModule` / `ImageFolderDataModule`: each file goes to one split by a hash of its path
  relative to its root (`split_of`), so no file (hence no clip of it) is in two splits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timeloom.data.loader import make_eval_loader, make_train_loader
from timeloom.data.moving_digits import MovingDigits
from timeloom.data.video_folder import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, ImageFolder, VideoFolder

__all__ = [
    "ImageFolderDataModule",
    "MovingDigitsDataModule",
    "TimeloomDataModule",
    "VideoFolderDataModule",
    "collate_batch",
]

_STAGE_SPLITS = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("test",),
}


def collate_batch(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Collate dataset items (dicts) into a batch dict.

    Per key, recursively: tensors (and numpy arrays) of one shape are stacked, and ragged ones kept as a
    list; numbers become a tensor; nested dicts with the same keys are collated key by key; anything else
    (strings such as captions, lists of names) becomes a list with one entry per item.
    """
    return _collate(list(items))


def _collate(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, (torch.Tensor, np.ndarray)):
        tensors = [torch.as_tensor(v) for v in values]
        if all(t.shape == tensors[0].shape for t in tensors):
            return torch.stack(tensors)
        return tensors
    if isinstance(first, Mapping) and all(
        isinstance(v, Mapping) and v.keys() == first.keys() for v in values
    ):
        return {key: _collate([v[key] for v in values]) for key in first}
    if all(isinstance(v, (bool, int, float)) for v in values):
        return torch.tensor(values)
    return list(values)


class TimeloomDataModule(pl.LightningDataModule):
    """Base data module: builds one dataset per split on demand and serves them through the shared loaders.

    The train loader is `make_train_loader` (seeded shuffle, DDP sharding, exact mid-epoch resume, last
    partial batch dropped); val/test/predict use `make_eval_loader` (fixed order). Predict serves the test
    split. Subclasses implement `build_dataset` and call ``self.save_hyperparameters()``.

    Args:
        batch_size: samples per batch (per process under DDP).
        num_workers: loader worker processes.
        seed: seed of the data (datasets) and of the training order.
        pin_memory: pin batches for faster host-to-GPU copies.
    """

    def __init__(self, batch_size: int = 8, num_workers: int = 0, seed: int = 0, pin_memory: bool = False):
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.pin_memory = pin_memory
        self._datasets: dict[str, Dataset] = {}

    def build_dataset(self, split: str) -> Dataset:
        """The dataset of ``split`` ("train", "val" or "test"); splits must not share samples."""
        raise NotImplementedError(f"{type(self).__name__} must implement build_dataset(split)")

    def dataset(self, split: str) -> Dataset:
        """The dataset of ``split``, built on first use."""
        if split not in self._datasets:
            self._datasets[split] = self.build_dataset(split)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        for split in _STAGE_SPLITS.get(stage, ("train", "val", "test")):
            self.dataset(split)

    def train_dataloader(self) -> DataLoader:
        return make_train_loader(
            self.dataset("train"),
            batch_size=self.batch_size,
            seed=self.seed,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
            drop_last=True,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _eval_loader(self, split: str) -> DataLoader:
        return make_eval_loader(
            self.dataset(split),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            collate_fn=collate_batch,
            pin_memory=self.pin_memory,
        )


class MovingDigitsDataModule(TimeloomDataModule):
    """`MovingDigits` videos; see that class for the data arguments.

    Args:
        train_length: videos in the train split (``val_length``, ``test_length`` likewise).
    """

    def __init__(
        self,
        size: int = 32,
        frames: int = 16,
        num_digits: int | tuple[int, int] = 1,
        directions: str | list[str | float] = "any",
        speed: float | tuple[float, float] = (1.0, 3.0),
        bounce: bool = True,
        appearance: str = "together",
        appearance_gap: int | None = None,
        glyph_size: int | None = None,
        channels: int = 1,
        train_length: int = 10_000,
        val_length: int = 256,
        test_length: int = 256,
        batch_size: int = 16,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.dataset_args = dict(
            size=size,
            frames=frames,
            num_digits=num_digits,
            directions=directions,
            speed=speed,
            bounce=bounce,
            appearance=appearance,
            appearance_gap=appearance_gap,
            glyph_size=glyph_size,
            channels=channels,
        )
        MovingDigits(length=0, **self.dataset_args)  # reject a bad configuration now, not at the first batch

    def build_dataset(self, split: str) -> MovingDigits:
        return MovingDigits(length=self.lengths[split], seed=self.seed, split=split, **self.dataset_args)


class _FolderDataModule(TimeloomDataModule):
    """Shared by the folder data modules: train crops as configured, evaluation crops at the centre, and
    ``prepare_data`` fills the on-disk cache once per node."""

    def build_dataset(self, split: str) -> Dataset:
        crop = self.train_crop if split == "train" else "center"
        return self._folder(split=split, crop=crop)

    def _folder(self, *, split: str, crop: str) -> VideoFolder | ImageFolder:
        raise NotImplementedError

    def prepare_data(self) -> None:
        if self.cache_dir is None:
            return
        for split in ("train", "val", "test"):
            self._folder(split=split, crop="center").fill_cache()


class VideoFolderDataModule(_FolderDataModule):
    """`VideoFolder` clips from one or more folders of real videos, split by a hash of each file's path.

    Args:
        root: a folder or a list of folders.
        train_crop: ``"random"`` or ``"center"`` for training clips; evaluation clips are centre-cropped.
        split_fractions: relative sizes of train/val/test.
        Other arguments as for `VideoFolder`.
    """

    def __init__(
        self,
        root: str | list[str],
        frames: int = 16,
        stride: int = 1,
        size: int = 64,
        clips_per_video: int = 1,
        train_crop: str = "random",
        extensions: tuple[str, ...] = VIDEO_EXTENSIONS,
        cache_dir: str | None = None,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.root = root
        self.frames, self.stride, self.size, self.clips_per_video = frames, stride, size, clips_per_video
        self.train_crop = train_crop
        self.extensions = extensions
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.split_fractions = split_fractions

    def _folder(self, *, split: str, crop: str) -> VideoFolder:
        return VideoFolder(
            self.root,
            frames=self.frames,
            stride=self.stride,
            size=self.size,
            crop=crop,
            clips_per_video=self.clips_per_video,
            extensions=self.extensions,
            cache_dir=self.cache_dir,
            seed=self.seed,
            split=split,
            split_fractions=self.split_fractions,
        )


class ImageFolderDataModule(_FolderDataModule):
    """`ImageFolder` images as one-frame videos, split by a hash of each file's path.

    Args as for `VideoFolderDataModule`.
    """

    def __init__(
        self,
        root: str | list[str],
        size: int = 64,
        train_crop: str = "random",
        extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
        cache_dir: str | None = None,
        split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.root = root
        self.size = size
        self.train_crop = train_crop
        self.extensions = extensions
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.split_fractions = split_fractions

    def _folder(self, *, split: str, crop: str) -> ImageFolder:
        return ImageFolder(
            self.root,
            size=self.size,
            crop=crop,
            extensions=self.extensions,
            cache_dir=self.cache_dir,
            seed=self.seed,
            split=split,
            split_fractions=self.split_fractions,
        )
