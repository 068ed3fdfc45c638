"""Video and image decoding and encoding (PyAV, Pillow), plus the conversions between frames and model tensors.

Decoded frames are ``uint8`` numpy arrays of shape ``(T, H, W, C)``: RGB (``C = 3``) unless asked for grey
(1) or RGBA (4), the form PyAV produces, cheap to cache on disk. Model tensors are float ``(C, T, H, W)`` in
``[-1, 1]``; ``frames_to_tensor`` and ``to_uint8`` convert between the two value ranges. The helpers that fit
arbitrary input to a model (``convert_channels``, ``resize_video``, ``center_crop``, ``pad_frames``) each
say what they changed, so a command can report it.
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
    "CHANNEL_NAMES",
    "VideoInfo",
    "center_crop",
    "convert_channels",
    "frames_to_tensor",
    "make_grid_video",
    "pad_frames",
    "read_image",
    "read_video",
    "resize_video",
    "to_uint8",
    "video_info",
    "write_image",
    "write_video",
]

#: What a frame with this many channels holds.
CHANNEL_NAMES = {1: "grey", 3: "RGB", 4: "RGBA"}
_PIXEL_FORMATS = {1: "gray", 3: "rgb24", 4: "rgba"}
# ITU-R BT.601 luma, the weights Pillow's "L" conversion uses.
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class VideoInfo:
    """What a probe of a video file found: frame count, frame rate, frame size in pixels and channels.

    ``channels`` is what the stream carries: 1 (grey), 3 (colour) or 4 (colour with alpha).
    """

    frames: int
    fps: float
    width: int
    height: int
    channels: int = 3

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.frames / self.fps if self.fps > 0 else 0.0


def _stream_fps(stream: av.video.stream.VideoStream) -> float:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    return float(rate) if rate else 0.0


def _stream_channels(stream: av.video.stream.VideoStream) -> int:
    """1 for a grey pixel format, 4 for one with alpha, else 3 (palettes are colour)."""
    pixel_format = stream.codec_context.format
    if pixel_format is None:
        return 3
    if any(component.is_alpha for component in pixel_format.components):
        return 4
    return 1 if len(pixel_format.components) == 1 and not pixel_format.has_palette else 3


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
        channels = _stream_channels(stream)
        if count_packets:
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
        elif stream.frames:
            frames = stream.frames
        elif stream.duration is not None and stream.time_base is not None:
            frames = round(float(stream.duration * stream.time_base) * fps)
        else:  # neither header field is set (e.g. some GIF and WebM files): count instead
            frames = sum(1 for packet in container.demux(stream) if packet.size > 0)
    return VideoInfo(frames=frames, fps=fps, width=width, height=height, channels=channels)


def read_video(
    path: str | Path,
    *,
    start: int = 0,
    num_frames: int | None = None,
    stride: int = 1,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> np.ndarray:
    """Decode frames ``start, start + stride, ...`` of a video as uint8, shape ``(T, H, W, channels)``.

    The decoder seeks to the keyframe before ``start`` when the stream has timestamps, so a clip from the
    middle of a long file does not decode the whole file. Frame indices come from presentation timestamps
    at the stream's average rate. Fewer than ``num_frames`` frames come back when the file ends first.

    Args:
        path: the video file (anything FFmpeg reads, GIF included).
        start: index of the first frame.
        num_frames: how many frames to return; ``None`` reads to the end.
        stride: step between returned frames.
        size: ``(width, height)`` to resize to while converting (FFmpeg's area filter), or ``None``.
        channels: 3 for RGB, 1 for grey (FFmpeg's luma), 4 for RGBA (opaque where the file has no alpha).

    Raises:
        av.error.FFmpegError: the file cannot be opened or its data cannot be decoded.
        ValueError: bad arguments or no video stream.
    """
    if start < 0 or stride < 1 or (num_frames is not None and num_frames < 1):
        raise ValueError(
            f"need start >= 0, stride >= 1, num_frames >= 1; got {start}, {stride}, {num_frames}"
        )
    if channels not in _PIXEL_FORMATS:
        raise ValueError(f"channels must be 1, 3 or 4, got {channels}")
    wanted_last = None if num_frames is None else start + (num_frames - 1) * stride
    pixel_format = _PIXEL_FORMATS[channels]
    frames = _decode_range(path, start, wanted_last, stride, size, pixel_format, seek=start > 0)
    if frames is None:  # the seek landed after `start` (inexact index): decode from the beginning instead
        frames = _decode_range(path, start, wanted_last, stride, size, pixel_format, seek=False)
    if not frames:
        raise ValueError(f"{path}: no frames at index {start} or later")
    return np.stack(frames)


def _decode_range(
    path: str | Path,
    start: int,
    last: int | None,
    stride: int,
    size: tuple[int, int] | None,
    pixel_format: str,
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
            decoded = frame.to_ndarray(format=pixel_format, **resize)
            out.append(decoded[..., None] if decoded.ndim == 2 else decoded)
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


# -- images ----------------------------------------------------------------------------------------------------
def read_image(path: str | Path) -> np.ndarray:
    """Decode an image as a one-frame video: uint8 ``(1, H, W, C)``.

    ``C`` follows the file: 1 for grey (and 1-bit) images, 4 when it has alpha (grey+alpha, RGBA, or a
    palette with transparency), else 3.

    Raises:
        PIL.UnidentifiedImageError / OSError: the file is not an image Pillow can decode.
    """
    with Image.open(path) as image:
        has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
        if has_alpha:
            mode = "RGBA"
        elif image.mode in ("1", "L", "I", "I;16", "F"):
            mode = "L"
        else:
            mode = "RGB"
        pixels = np.asarray(image.convert(mode))
    return (pixels[..., None] if pixels.ndim == 2 else pixels)[None]


def write_image(
    path: str | Path, image: torch.Tensor | np.ndarray, *, channels_first: bool | None = None
) -> Path:
    """Write one image (PNG or any suffix Pillow knows): ``(C, H, W)`` or ``(H, W, C)``, 1 or 3 channels.

    Values and layout follow `write_video`; a video with one frame is accepted too.
    """
    path = Path(path)
    frames = _to_thwc_uint8(image, channels_first)
    if len(frames) != 1:
        raise ValueError(f"expected one image, got {len(frames)} frames for {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(frames[0]).save(path)
    return path


# -- fitting input to a model: each returns what it changed, in words, or None ------------------------------------
def convert_channels(frames: np.ndarray, channels: int) -> tuple[np.ndarray, str | None]:
    """Convert uint8 frames ``(T, H, W, C)`` with ``C`` in (1, 3, 4) to ``channels`` (1 or 3).

    Alpha is composited over black (the background of the project's data) or dropped when fully opaque,
    colour becomes grey by BT.601 luma, and grey is replicated to RGB.
    """
    source = frames.shape[-1]
    if source not in CHANNEL_NAMES or channels not in (1, 3):
        raise ValueError(f"can convert 1, 3 or 4 channels to 1 or 3, got {source} to {channels}")
    if source == channels:
        return frames, None
    steps = []
    values = frames.astype(np.float64)
    if source == 4 and (frames[..., 3] == 255).all():
        values = values[..., :3]
        steps.append("opaque alpha dropped")
    elif source == 4:
        values = values[..., :3] * (values[..., 3:] / 255.0)
        steps.append("alpha composited over black")
    if channels == 1 and values.shape[-1] == 3:
        values = values @ _LUMA[:, None]
        steps.append("BT.601 luma")
    elif channels == 3 and values.shape[-1] == 1:
        values = values.repeat(3, axis=-1)
        steps.append("grey replicated")
    converted = np.clip(np.round(values), 0, 255).astype(np.uint8)
    return converted, f"{CHANNEL_NAMES[source]} → {CHANNEL_NAMES[channels]} ({', '.join(steps)})"


def resize_video(video: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, str | None]:
    """Resize a float video ``(C, T, H, W)`` to ``height × width`` (bilinear, anti-aliased when shrinking)."""
    if video.shape[-2:] == (height, width):
        return video, None
    resized = torch.nn.functional.interpolate(
        video.transpose(0, 1), size=(height, width), mode="bilinear", antialias=True, align_corners=False
    )
    note = f"resized {video.shape[-1]}×{video.shape[-2]} → {width}×{height}"
    return resized.transpose(0, 1).contiguous(), note


def center_crop(video: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, str | None]:
    """The centre ``height × width`` of a video ``(..., H, W)`` at least that large."""
    full_height, full_width = video.shape[-2:]
    if height > full_height or width > full_width:
        raise ValueError(f"cannot crop {full_width}×{full_height} to the larger {width}×{height}")
    if (full_height, full_width) == (height, width):
        return video, None
    top, left = (full_height - height) // 2, (full_width - width) // 2
    cropped = video[..., top : top + height, left : left + width]
    return cropped, f"centre-cropped {full_width}×{full_height} → {width}×{height}"


def pad_frames(video: torch.Tensor, frames: int) -> tuple[torch.Tensor, str | None]:
    """Lengthen a video ``(C, T, H, W)`` to ``frames`` by repeating its last frame."""
    missing = frames - video.shape[1]
    if missing < 0:
        raise ValueError(f"cannot pad {video.shape[1]} frames to the fewer {frames}")
    if missing == 0:
        return video, None
    padded = torch.cat([video, video[:, -1:].expand(-1, missing, -1, -1)], dim=1)
    return padded, f"padded {video.shape[1]} → {frames} frames by repeating the last"
