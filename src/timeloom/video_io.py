"""Video decoding and encoding with PyAV, plus the conversions between decoded frames and model tensors.

Decoded frames are ``uint8`` numpy arrays of shape ``(T, H, W, 3)`` (RGB): the form PyAV produces, cheap to
cache on disk. Model tensors are float ``(C, T, H, W)`` in ``[-1, 1]``; ``frames_to_tensor`` and
``to_uint8`` convert between the two value ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

__all__ = [
    "VideoInfo",
    "frames_to_tensor",
    "make_grid_video",
    "read_video",
    "to_uint8",
    "video_info",
    "write_video",
]


@dataclass(frozen=True)
class VideoInfo:
    """What a probe of a video file found: frame count, frame rate and frame size in pixels."""

    frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def video_info(path: str | Path, *, count_packets: bool = False) -> VideoInfo:
    """Probe a video file.

    Args:
        path: the video file.
        count_packets: count the frames by demuxing every packet (no decoding) instead of trusting the
            container header. Slower but exact, and a truncated file reports the frames it really holds.

    Raises:
        av.error.FFmpegError: the file cannot be opened.
        ValueError: the file has no video stream.
    """
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        fps = _stream_fps(stream)
        width, height = stream.codec_context.width, stream.codec_context.height
        if count_packets:
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        elif stream.frames:
            frames = stream.frames
        elif stream.duration is not None and stream.time_base is not None:
            frames = round(float(stream.duration * stream.time_base) * fps)
        else:  # neither header field is set (e.g. some GIF and WebM files): count instead
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    return VideoInfo(frames=frames, fps=fps, width=width, height=height)


def read_video(
    path: str | Path,
    *,
    start: int = 0,
    num_frames: int | None = None,
    stride: int = 1,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``start, start + stride, ...`` of a video as uint8 RGB, shape ``(T, H, W, 3)``.

    The decoder seeks to the keyframe before ``start`` when the stream has timestamps, so a clip from the
    middle of a long file does not decode the whole file. Frame indices come from presentation timestamps
    at the stream's average rate. Fewer than ``num_frames`` frames come back when the file ends first.

    Args:
        path: the video file (anything FFmpeg reads, GIF included).
        start: index of the first frame.
        num_frames: how many frames to return; ``None`` reads to the end.
        stride: step between returned frames.
        size: ``(width, height)`` to resize to while converting (FFmpeg's area filter), or ``None``.

    Raises:
        av.error.FFmpegError: the file cannot be opened or its data cannot be decoded.
        ValueError: bad arguments or no video stream.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            f"need start >= 0, stride >= 1, num_frames >= 1; got {start}, {stride}, {num_frames}"
        )
    wanted_last = None if num_frames is None else start + (num_frames - 1) * stride
    frames = _decode_range(path, start, wanted_last, stride, size, seek=start > 0)
    if frames is None:  # the seek landed after `start` (inexact index): decode from the beginning instead
        frames = _decode_range(path, start, wanted_last, stride, size, seek=False)
    if not frames:
        raise ValueError(f"{path}: no frames at index {start} or later")
    return np.stack(frames)


def _decode_range(
    path: str | Path,
    start: int,
    last: int | None,
    stride: int,
    size: tuple[int, int] | None,
    *,
    seek: bool,
) -> list[np.ndarray] | None:
    """Frames with index in ``start..last`` step ``stride``; ``None`` when a seek overshot ``start``."""
    resize = {} if size is None else {"width": size[0], "height": size[1], "interpolation": "AREA"}
    out: list[np.ndarray] = []
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path} has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = _stream_fps(stream)
        time_base = stream.time_base
        origin = stream.start_time or 0
        timed = fps > 0 and time_base is not None
        if seek and timed:
            container.seek(origin + int(start / fps / time_base), stream=stream, backward=True)
        elif seek:
            seek = False  # no timestamps to seek by
        counter = 0
        for frame in container.decode(stream):
            if timed and frame.pts is not None:
                index = round(float((frame.pts - origin) * time_base) * fps)
            else:
                index = counter
            counter += 1
            if seek and not out and index > start:
                return None
            if index < start or (index - start) % stride:
                continue
            if last is not None and index > last:
                break
            out.append(frame.to_ndarray(format="rgb24", **resize))
            if last is not None and index == last:
                break
    return out


def to_uint8(video: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Map a float video in ``[-1, 1]`` to uint8 ``[0, 255]`` (rounded, clamped); uint8 passes through.

    The layout is unchanged.
    """
    video = torch.as_tensor(video)
    if video.dtype == torch.uint8:
        return video
    return ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


def frames_to_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Turn uint8 frames ``(T, H, W, C)`` into the model layout: float32 ``(C, T, H, W)`` in ``[-1, 1]``."""
    if isinstance(frames, np.ndarray):  # astype copies: arrays from PIL are read-only
        frames = torch.from_numpy(frames.astype(np.float32))
    return frames.permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def _to_thwc_uint8(video: torch.Tensor | np.ndarray, channels_first: bool | None) -> np.ndarray:
    """Normalise a video for encoding: uint8 numpy ``(T, H, W, 3)``."""
    video = torch.as_tensor(video)
    if video.ndim == 3:  # a single image
        video = video.unsqueeze(1 if _looks_channels_first(video.shape, video.dtype) else 0)
    if video.ndim != 4:
        raise ValueError(f"expected a (C, T, H, W) or (T, H, W, C) video, got shape {tuple(video.shape)}")
    if channels_first is None:
        channels_first = _looks_channels_first(video.shape, video.dtype)
    if channels_first:
        video = video.permute(1, 2, 3, 0)
    if video.shape[-1] == 1:
        video = video.expand(-1, -1, -1, 3)
    if video.shape[-1] != 3:
        raise ValueError(f"expected 1 or 3 channels, got a video of shape {tuple(video.shape)}")
    return to_uint8(video).contiguous().numpy()


def _looks_channels_first(shape: torch.Size, dtype: torch.dtype) -> bool:
    """Guess the layout from which end holds 1 or 3 channels; ties follow the conventions of each type."""
    first, last = shape[0] in (1, 3), shape[-1] in (1, 3)
    if first != last:
        return first
    # model tensors are float and channels-first, decoded frames uint8 and channels-last
    return dtype != torch.uint8


def write_video(
    path: str | Path,
    video: torch.Tensor | np.ndarray,
    fps: float = 8,
    *,
    channels_first: bool | None = None,
    crf: int = 18,
) -> Path:
    """Write a video as MP4 (H.264, yuv420p) or GIF, chosen by the file suffix.

    Args:
        path: output file ending in ``.mp4`` or ``.gif``; parent folders are created.
        video: ``(C, T, H, W)`` or ``(T, H, W, C)`` with 1 or 3 channels, float in ``[-1, 1]`` or uint8; a
            3-D input is one image. ``channels_first=None`` infers the layout from where the channel axis
            (size 1 or 3) is; when both ends could be, float means channels-first and uint8 channels-last.
        fps: frames per second.
        crf: H.264 quality (lower is better, 0 is lossless luma).

    Odd frame sizes are padded by one black row/column for yuv420p. GIF frames get an adaptive palette
    each, and GIF stores identical consecutive frames once, with the summed duration.

    Returns:
        The path written.
    """
    path = Path(path)
    frames = _to_thwc_uint8(video, channels_first)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        images = [Image.fromarray(frame) for frame in frames]
        images[0].save(path, save_all=True, append_images=images[1:], duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        _write_mp4(path, frames, fps, crf)
    else:
        raise ValueError(f"unsupported video suffix {path.suffix!r}: use .mp4 or .gif")
    return path


def _write_mp4(path: Path, frames: np.ndarray, fps: float, crf: int) -> None:
    height, width = frames.shape[1:3]
    # yuv420p subsamples chroma 2x2, so H.264 needs even sizes
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder


def make_grid_video(
    videos: torch.Tensor, ncol: int | None = None, *, padding: int = 2, pad_value: float = -1.0
) -> torch.Tensor:
    """Tile a batch ``(B, C, T, H, W)`` into one video ``(C, T, rows*(H+p)+p, ncol*(W+p)+p)`` for logging.

    Args:
        videos: the batch; every video must have the same shape.
        ncol: videos per row; defaults to ``ceil(sqrt(B))``. Empty cells of the last row stay ``pad_value``.
        padding: pixels between (and around) the tiles.
        pad_value: value of the padding, ``-1`` (black) for videos in ``[-1, 1]``.
    """
    if videos.ndim != 5:
        raise ValueError(f"expected (B, C, T, H, W), got shape {tuple(videos.shape)}")
    batch, channels, frames, height, width = videos.shape
    ncol = min(ncol or math.ceil(math.sqrt(batch)), batch)
    nrow = math.ceil(batch / ncol)
    grid = videos.new_full(
        (channels, frames, nrow * (height + padding) + padding, ncol * (width + padding) + padding), pad_value
    )
    for i, video in enumerate(videos):
        top = padding + (i // ncol) * (height + padding)
        left = padding + (i % ncol) * (width + padding)
        grid[:, :, top : top + height, left : left + width] = video
    return grid
