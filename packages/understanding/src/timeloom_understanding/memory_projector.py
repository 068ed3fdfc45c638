"""A long-term memory for long and streaming video (issue #7 item 6): a window of recent frames plus memory tokens.

`MemoryProjector` (``projector: memory``) is LLaVA's per-frame MLP with a video memory in front of it:
``memory_kind: titans`` (default), a Titans neural memory (`timeloom_memory.video.VideoMemory`), or ``hcam``,
HCAM over frames (`timeloom_memory.video.HCAMVideoMemory`: every frame kept whole, one chunk per frame; the
memory that answers long-video recall, benchmarks/memory-quality.md §3). Of ``T`` frames, the last
``window_frames`` reach the LLM as they are; every earlier frame is written into the memory (one memory chunk
per frame), and the LLM reads ``readout_tokens`` memory tokens in their place: the memory's answers to as many
learned queries. So a video of any length costs
``readout_tokens + window_frames · tokens_per_frame`` LLM tokens, and what happened before the window reaches
the LLM only through the memory.

The memory tokens come first, as one block (frame 0), then the window's frames (frames 1 … W), so every
structure orders them before the frames they summarise precede. `OnlineStream` keeps the memory's state
across questions: frames are written as they leave its window, never twice (`MemoryStreamState`).
Needs the ``memory`` extra (``pip install timeloom-understanding[memory]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from timeloom_understanding.layouts import QUERY, VisualTokens
from timeloom_understanding.projectors import MLPProjector

__all__ = ["MemoryProjector", "MemoryStreamState"]


def _video_memory(
    kind: str, dim: int, tokens_per_frame: int, readout_tokens: int, options: dict
) -> nn.Module:
    """The ``kind`` memory over frames of ``tokens_per_frame`` tokens of width ``dim``."""
    try:
        from timeloom_memory.video import HCAMVideoMemory, VideoMemory, VideoMemoryConfig
    except ImportError as error:  # an optional dependency: say which package to install
        raise ImportError(
            "projector 'memory' needs the timeloom-memory package: "
            "pip install 'timeloom-understanding[memory]' (or make setup)"
        ) from error
    if kind == "hcam":  # its readout queries live in the projector: an HCAM read takes any queries
        return HCAMVideoMemory(dim, tokens_per_frame, **options)
    config = VideoMemoryConfig(
        dim=dim, tokens_per_frame=tokens_per_frame, readout_tokens=readout_tokens, memory=options
    )
    return VideoMemory(config)


@dataclass
class MemoryStreamState:
    """A stream's memory: its state (`NeuralMemoryState` or `HCAMState`) and how many of the stream's frames
    it holds."""

    memory: Any
    written: int


class MemoryProjector(nn.Module):
    """Per-frame MLP tokens; frames before the last ``window_frames`` go through a neural memory (module docstring).

    Args:
        in_dim, out_dim: encoder width and LLM width.
        tokens_per_frame: visual tokens per frame after pooling (the memory's chunk); checked at each call.
        window_frames: recent frames given to the LLM as they are.
        readout_tokens: memory tokens given to the LLM in place of the older frames.
        pool, hidden: as for `MLPProjector`.
        memory_kind: ``titans`` (`VideoMemory`) or ``hcam`` (`HCAMVideoMemory`).
        memory: the memory's options: for ``titans`` `NeuralMemoryConfig`'s (e.g. ``heads``, ``head_dim``),
            for ``hcam`` `HCAMVideoMemory`'s (``heads``, ``top_k``, ``detach_memory``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        tokens_per_frame: int,
        window_frames: int = 4,
        readout_tokens: int = 8,
        pool: int = 1,
        hidden: int | None = None,
        memory_kind: str = "titans",
        memory: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if window_frames < 1:
            raise ValueError(f"the memory projector needs window_frames ≥ 1; got {window_frames}")
        if memory_kind not in ("titans", "hcam"):
            raise ValueError(
                f"the memory projector's memory_kind must be titans or hcam; got {memory_kind!r}"
            )
        self.window_frames, self.readout_tokens, self.tokens_per_frame, self.memory_kind = (
            window_frames,
            readout_tokens,
            tokens_per_frame,
            memory_kind,
        )
        self.frames = MLPProjector(in_dim, out_dim, pool=pool, hidden=hidden)
        self.memory = _video_memory(memory_kind, out_dim, tokens_per_frame, readout_tokens, memory or {})
        if memory_kind == "hcam":
            self.readout_queries = nn.Parameter(torch.randn(readout_tokens, out_dim) * 0.02)

    def num_tokens(self, frames: int, grid: tuple[int, int]) -> int:
        return self.readout_tokens + self.frames.num_tokens(min(frames, self.window_frames), grid)

    def frame_tokens(self, features: Tensor, grid: tuple[int, int]) -> Tensor:
        """The MLP's tokens of each frame, ``(B, T, tokens_per_frame, D)``."""
        batch, frames = features.shape[:2]
        tokens, _ = self.frames(features, grid)
        if tokens.shape[1] != frames * self.tokens_per_frame:
            raise ValueError(
                f"a {grid[0]}x{grid[1]} token grid pooled by {self.frames.pool} gives "
                f"{tokens.shape[1] // frames} tokens per frame; this memory was built for {self.tokens_per_frame}"
            )
        return tokens.unflatten(1, (frames, self.tokens_per_frame))

    def forward(
        self, features: Tensor, grid: tuple[int, int], stream: MemoryStreamState | None = None
    ) -> tuple[Tensor, VisualTokens]:
        """Memory tokens then the window's tokens, for the ``T`` frames of ``features (B, T, N, C_v)``.

        ``stream`` (from `write_past`) already holds the frames before the window; without it they are
        written here, from an empty memory."""
        batch, frames = features.shape[:2]
        past = max(frames - self.window_frames, 0)
        if stream is None:
            stream = self.write_past(features[:, :past], grid, None)
        elif stream.written != past:
            raise ValueError(f"the stream's memory holds {stream.written} frames; {past} precede the window")
        window = self.frame_tokens(features[:, past:], grid)
        tokens = torch.cat([self.read(stream.memory).to(window.dtype), window.flatten(1, 2)], dim=1)
        return tokens, self.describe(frames - past, grid)

    def read(self, state: Any) -> Tensor:
        """The ``readout_tokens`` memory tokens ``(B, R, D)``; the state is not changed."""
        if self.memory_kind == "titans":  # `VideoMemory` holds its learned queries
            return self.memory.read(state)
        batch = state.tokens.shape[0]
        return self.memory.read(state, self.readout_queries.expand(batch, -1, -1))

    def write_past(
        self, features: Tensor, grid: tuple[int, int], stream: MemoryStreamState | None
    ) -> MemoryStreamState:
        """Write frames ``features (B, T, N, C_v)`` that left the window into the memory (a new one if None)."""
        state = None if stream is None else stream.memory
        if state is None:
            state = self.memory.init_state(features.shape[0], features.device, torch.float32)
        if features.shape[1]:
            state = self.memory.write(self.frame_tokens(features, grid), state)
        return MemoryStreamState(state, (0 if stream is None else stream.written) + features.shape[1])

    def describe(self, window: int, grid: tuple[int, int]) -> VisualTokens:
        """The memory tokens as block 0 (no grid), the window's frames as frames 1 … W."""
        pool = self.frames.pool
        frames = VisualTokens.grid(window, grid[0] // pool, grid[1] // pool)
        none = torch.full((self.readout_tokens,), -1)
        return VisualTokens(
            kind=torch.cat([torch.full((self.readout_tokens,), QUERY), frames.kind]),
            frame=torch.cat([torch.zeros(self.readout_tokens, dtype=torch.long), frames.frame + 1]),
            row=torch.cat([none, frames.row]),
            col=torch.cat([none, frames.col]),
        )
