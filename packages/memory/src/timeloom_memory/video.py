"""Memory for long and streaming video (issue #7 item 6, spec §6): a Titans neural memory over visual tokens.

`VideoMemory` is written frame by frame with a frame's visual tokens (one memory chunk ``b`` per frame, so a
frame's tokens share the chunk-start weights) and read by a video-LLM as ``readout_tokens`` extra tokens: the
memory's answers to learned queries (plus any question features), read with `NeuralMemory.retrieve`, so
reading never changes the memory. Its state is a `NeuralMemoryState` carried across clips and questions,
with ``detach`` / ``reset`` / ``save`` / ``load``; writing a stream clip by clip or all at once gives the same
state, since the memory's outputs never depend on how a stream is cut.

A sinusoidal code of the frame's index in the stream is added to its tokens before the write, so the memory
can tell early frames from late ones ("which digit appeared first?").

`HCAMVideoMemory` is the other memory of spec §6: HCAM with one chunk per frame. Writing appends the frame's
tokens (nothing is forgotten); a question scores every frame by its mean token, keeps the top k and attends
inside them (`timeloom_memory.hcam.HCAMAttention`).

`VideoRecallModel` is a tiny standalone video question answerer over `timeloom_memory.video_tasks`: patch
tokens per frame, a context of the last ``window_clips`` clips (what a plain window sees) and, with
``use_memory``, a memory of every frame: the Titans memory's readout tokens in front of the window and, with
``question_read``, its read by each question added to the question's embedding; or the HCAM read of each
question added to its embedding. Question embeddings attend to the context.
`VideoRecallModule` trains it with the `timeloom` CLI.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timeloom_kernels import attend
from timeloom_kernels.positions import rope_angles
from torch import Tensor, nn

from timeloom.module import TimeloomModule
from timeloom_memory.hcam import HCAMAttention, HCAMState
from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState
from timeloom_memory.video_tasks import QUESTIONS

__all__ = [
    "HCAMVideoMemory",
    "VideoMemory",
    "VideoMemoryConfig",
    "VideoRecallConfig",
    "VideoRecallModel",
    "VideoRecallModule",
    "frame_time_code",
]


def frame_time_code(frames: Tensor, dim: int) -> Tensor:
    """Sinusoidal code ``(T, dim)`` of frame indices ``frames (T,)`` (cos and sin of RoPE's angles)."""
    angles = rope_angles(frames, dim // 2, base=1000.0)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


@dataclass
class VideoMemoryConfig:
    """Sizes of a `VideoMemory`.

    Args:
        dim: width of the visual tokens written and of the tokens read.
        tokens_per_frame: visual tokens of one frame: the memory's chunk size ``b``.
        readout_tokens: learned queries; each read returns this many tokens (0: only the caller's queries read).
        time_code: add a sinusoidal code of the frame index to the tokens written.
        memory: `NeuralMemoryConfig` options (its ``dim`` and ``chunk_size`` are set from the above).
    """

    dim: int = 64
    tokens_per_frame: int = 16
    readout_tokens: int = 4
    time_code: bool = True
    # the clip keeps the update finite on raw visual tokens (as in the MQAR configs)
    memory: NeuralMemoryConfig = field(default_factory=lambda: NeuralMemoryConfig(surprise_clip=1.0))

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            self.memory = NeuralMemoryConfig(**{"surprise_clip": 1.0, **self.memory})
        for name in ("dim", "tokens_per_frame"):
            if getattr(self, name) < 1:
                raise ValueError(f"VideoMemoryConfig.{name} must be ≥ 1; got {getattr(self, name)}")
        if self.readout_tokens < 0:
            raise ValueError(f"VideoMemoryConfig.readout_tokens must be ≥ 0; got {self.readout_tokens}")
        if self.time_code and self.dim % 2:
            raise ValueError(f"VideoMemoryConfig.time_code needs an even dim; got {self.dim}")
        self.memory = replace(self.memory, dim=self.dim, chunk_size=self.tokens_per_frame)


class VideoMemory(nn.Module):
    """A long-term memory of a video stream: ``write`` visual tokens, ``read`` memory tokens (module docstring)."""

    def __init__(self, config: VideoMemoryConfig | None = None):
        super().__init__()
        self.config = config or VideoMemoryConfig()
        self.memory = NeuralMemory(self.config.memory)
        self.readout_queries = nn.Parameter(torch.randn(self.config.readout_tokens, self.config.dim) * 0.02)

    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> NeuralMemoryState:
        return self.memory.init_state(batch_size, device, dtype)

    def reset(self, state: NeuralMemoryState, mask: Tensor) -> NeuralMemoryState:
        """Restart the streams where ``mask`` (B,) is True (a new video in that batch slot)."""
        return self.memory.reset(state, mask)

    def save(self, state: NeuralMemoryState, path: str | Path) -> Path:
        return state.save(path, self.config.memory)

    def load(self, path: str | Path, device=None) -> NeuralMemoryState:
        return NeuralMemoryState.load(path, self.config.memory, device)

    def write(self, frames: Tensor, state: NeuralMemoryState | None = None) -> NeuralMemoryState:
        """Write frames ``(B, T, tokens_per_frame, dim)`` into the memory; ``state=None`` starts new streams."""
        c = self.config
        if frames.dim() != 4 or frames.shape[2:] != (c.tokens_per_frame, c.dim):
            raise ValueError(
                f"VideoMemory.write takes frames (B, T, {c.tokens_per_frame}, {c.dim}); got {tuple(frames.shape)}"
            )
        if c.time_code:
            seen = 0 if state is None else state.position // c.tokens_per_frame
            index = torch.arange(seen, seen + frames.shape[1], device=frames.device)
            frames = frames + frame_time_code(index, c.dim).to(frames.dtype)[:, None]
        _, state = self.memory(frames.flatten(1, 2), state)
        return state

    def read(self, state: NeuralMemoryState, queries: Tensor | None = None) -> Tensor:
        """Memory tokens ``(B, readout_tokens [+ Lq], dim)``: the learned queries' readout, then that of
        ``queries (B, Lq, dim)`` if given (e.g. a question's features). The state is not changed."""
        batch = state.weights[0].shape[0]
        learned = self.readout_queries.expand(batch, -1, -1)
        x = learned if queries is None else torch.cat([learned, queries.to(learned.dtype)], dim=1)
        if x.shape[1] == 0:
            raise ValueError("VideoMemory.read with readout_tokens=0 needs queries")
        return self.memory.retrieve(x, state)

    def forward(
        self, frames: Tensor, state: NeuralMemoryState | None = None
    ) -> tuple[Tensor, NeuralMemoryState]:
        """Streaming step: the memory tokens of the past (read before this clip), and the state after it."""
        if state is None:
            state = self.init_state(frames.shape[0], frames.device, torch.float32)
        return self.read(state), self.write(frames, state)


class HCAMVideoMemory(nn.Module):
    """HCAM over a video stream: one chunk per frame, kept whole (module docstring).

    ``write`` appends frames ``(B, T, tokens_per_frame, dim)`` (with the frame-index code of `VideoMemory`) to an
    `HCAMState`; ``read(state, queries)`` returns one read ``(B, Lq, dim)`` per query: the softmax mix, over the
    ``top_k`` frames whose mean token scores highest, of multi-head attention inside each. As in HCAM, by
    default no gradient flows into the stored tokens and only the read's projections learn; with
    ``detach_memory=False`` a read's gradient also reaches the frames written in the same graph (a video
    trained in one call), so the encoder learns what the read needs. A state carried across calls is
    detached by its owner as usual.
    """

    def __init__(
        self,
        dim: int = 64,
        tokens_per_frame: int = 16,
        heads: int = 2,
        top_k: int = 4,
        detach_memory: bool = True,
    ):
        super().__init__()
        if dim % 2:
            raise ValueError(f"HCAMVideoMemory needs an even dim for its frame-index code; got {dim}")
        self.dim, self.tokens_per_frame = dim, tokens_per_frame
        self.hcam = HCAMAttention(
            dim, heads, chunk_size=tokens_per_frame, top_k=top_k, detach_memory=detach_memory
        )

    def init_state(self, batch_size: int, device=None, dtype: torch.dtype = torch.float32) -> HCAMState:
        return self.hcam.init_state(batch_size, self.dim, device, dtype)

    def write(self, frames: Tensor, state: HCAMState | None = None) -> HCAMState:
        """Append frames ``(B, T, tokens_per_frame, dim)``; ``state=None`` starts new streams."""
        if frames.dim() != 4 or frames.shape[2:] != (self.tokens_per_frame, self.dim):
            raise ValueError(
                f"HCAMVideoMemory.write takes frames (B, T, {self.tokens_per_frame}, {self.dim}); "
                f"got {tuple(frames.shape)}"
            )
        if state is None:
            state = self.init_state(frames.shape[0], frames.device, frames.dtype)
        seen = state.tokens.shape[1] // self.tokens_per_frame
        index = torch.arange(seen, seen + frames.shape[1], device=frames.device)
        frames = frames + frame_time_code(index, self.dim).to(frames.dtype)[:, None]
        return HCAMState(tokens=torch.cat([state.tokens, frames.flatten(1, 2)], 1))

    def read(self, state: HCAMState, queries: Tensor) -> Tensor:
        """One read per query ``(B, Lq, dim)``, over every frame written; the state is not changed."""
        # The queries sit after the stream, where more than a frame of them would complete a chunk of their own
        # and later queries would read it: read them in groups of a frame, each query on its own.
        queries = queries.to(state.tokens.dtype)
        if not queries.shape[1]:  # no queries read nothing, also before any frame is written
            return queries
        groups = queries.split(self.tokens_per_frame, dim=1)
        return torch.cat([self.hcam(group, state)[0] for group in groups], dim=1)


# --------------------------------------------------------------------------------------------------------
# A tiny model that uses it: video question answering over LongVideoRecall
# --------------------------------------------------------------------------------------------------------
@dataclass
class VideoRecallConfig:
    """Sizes of a `VideoRecallModel`.

    Args:
        size, channels: frame size and channels of the videos.
        patch: patch side; a frame becomes ``(size / patch)²`` tokens.
        frames_per_clip: frames of one clip.
        dim: token width.
        heads: heads of the question's attention over the context.
        window_clips: clips of the most recent past in the context (the plain window).
        use_memory: give the model a memory of every frame.
        memory_kind: ``titans`` (`VideoMemory`: readout tokens in front of the window) or ``hcam``
            (`HCAMVideoMemory`: each question's read added to its embedding).
        memory: `VideoMemoryConfig` options (``dim`` and ``tokens_per_frame`` are set from the above).
        question_read: the Titans memory is also read with each question's embedding, and the read is added to
            it (as HCAM's is); its ``readout_tokens`` (0 allowed) still go in front of the window.
        hcam_top_k: frames an HCAM read attends inside.
        hcam_detach_memory: HCAM's stop-gradient on the stored frames. Off, the questions' reads train the
            frame encoder too; on, only the window's questions do.
    """

    size: int = 16
    channels: int = 1
    patch: int = 4
    frames_per_clip: int = 2
    dim: int = 64
    heads: int = 2
    window_clips: int = 2
    use_memory: bool = True
    memory_kind: Literal["titans", "hcam"] = "titans"
    memory: VideoMemoryConfig = field(default_factory=VideoMemoryConfig)
    question_read: bool = False
    hcam_top_k: int = 4
    hcam_detach_memory: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            self.memory = VideoMemoryConfig(**self.memory)
        if self.size % self.patch:
            raise ValueError(f"VideoRecallConfig.patch ({self.patch}) must divide size ({self.size})")
        if self.dim % self.heads:
            raise ValueError(f"VideoRecallConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.window_clips < 1:
            raise ValueError(f"VideoRecallConfig.window_clips must be ≥ 1; got {self.window_clips}")
        if self.memory_kind not in ("titans", "hcam"):
            raise ValueError(
                f"VideoRecallConfig.memory_kind must be titans or hcam; got {self.memory_kind!r}"
            )
        self.memory = replace(self.memory, dim=self.dim, tokens_per_frame=self.tokens_per_frame)
        if (
            self.use_memory
            and self.memory_kind == "titans"
            and not (self.memory.readout_tokens or self.question_read)
        ):
            raise ValueError("VideoRecallConfig: a Titans memory with readout_tokens=0 needs question_read")

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2


class VideoRecallModel(nn.Module):
    """Answers `LongVideoRecall` questions from a window of recent clips, and a memory of all clips."""

    def __init__(self, config: VideoRecallConfig | None = None):
        super().__init__()
        self.config = c = config or VideoRecallConfig()
        self.patches = nn.Conv2d(c.channels, c.dim, c.patch, stride=c.patch)
        self.spatial = nn.Parameter(torch.randn(c.tokens_per_frame, c.dim) * 0.02)
        self.token_norm = nn.LayerNorm(c.dim)
        self.window_time = nn.Parameter(torch.randn(c.window_clips * c.frames_per_clip, c.dim) * 0.02)
        if not c.use_memory:
            self.memory = None
        elif c.memory_kind == "hcam":
            self.memory = HCAMVideoMemory(
                c.dim, c.tokens_per_frame, c.heads, c.hcam_top_k, c.hcam_detach_memory
            )
        else:
            self.memory = VideoMemory(c.memory)
        self.question = nn.Embedding(len(QUESTIONS), c.dim)
        self.norm = nn.LayerNorm(c.dim)
        self.to_q = nn.Linear(c.dim, c.dim, bias=False)
        self.to_kv = nn.Linear(c.dim, 2 * c.dim, bias=False)
        self.out = nn.Linear(c.dim, c.dim, bias=False)
        self.head = nn.Sequential(
            nn.LayerNorm(c.dim), nn.Linear(c.dim, 2 * c.dim), nn.GELU(), nn.Linear(2 * c.dim, 10)
        )

    def frame_tokens(self, video: Tensor) -> Tensor:
        """``(B, C, T, H, W)`` → ``(B, T, tokens_per_frame, dim)``."""
        b, _, t = video.shape[:3]
        x = self.patches(video.transpose(1, 2).flatten(0, 1))  # (B·T, dim, h, w)
        return self.token_norm(x.flatten(2).transpose(1, 2).view(b, t, -1, self.config.dim) + self.spatial)

    def window(self, tokens: Tensor) -> Tensor:
        """The window's tokens ``(B, W·F·N, dim)``: the last ``window_clips`` clips of ``tokens``."""
        c = self.config
        span = c.window_clips * c.frames_per_clip
        if tokens.shape[1] < span:
            raise ValueError(
                f"VideoRecallModel needs at least {span} frames (window_clips clips); got {tokens.shape[1]}"
            )
        return (tokens[:, -span:] + self.window_time[:, None]).flatten(1, 2)

    def forward(self, video: Tensor, questions: Tensor, state: NeuralMemoryState | None = None) -> Tensor:
        """Answer logits ``(B, Q, 10)`` for ``questions (B, Q)`` after ``video (B, C, T, H, W)``.

        ``state`` is the memory of earlier calls of the same streams (None: the stream starts here).
        """
        logits, _ = self.stream(video, questions, state)
        return logits

    def stream(
        self, video: Tensor, questions: Tensor, state: NeuralMemoryState | HCAMState | None = None
    ) -> tuple[Tensor, NeuralMemoryState | HCAMState | None]:
        """`forward` that also returns the memory state after ``video`` (to carry into the next call)."""
        tokens = self.frame_tokens(video)
        context, query = self.window(tokens), self.question(questions)
        if self.memory is not None:
            state = self.memory.write(tokens, state)
        if isinstance(self.memory, HCAMVideoMemory):
            query = query + self.memory.read(state, query)
        elif isinstance(self.memory, VideoMemory):
            readout = self.memory.config.readout_tokens
            reads = self.memory.read(state, query if self.config.question_read else None).to(context.dtype)
            context = torch.cat([reads[:, :readout], context], dim=1)  # readout tokens in front of the window
            if self.config.question_read:
                query = query + reads[:, readout:]
        context = self.norm(context)
        heads, b = self.config.heads, video.shape[0]

        def split(x: Tensor) -> Tensor:
            return x.view(b, x.shape[1], heads, -1).transpose(1, 2)

        k, v = self.to_kv(context).chunk(2, dim=-1)
        read = attend(split(self.to_q(query)), split(k), split(v)).transpose(1, 2).flatten(2)
        return self.head(query + self.out(read)), state


class VideoRecallModule(TimeloomModule):
    """Trains a `VideoRecallModel` on `LongVideoRecall` batches: cross-entropy over every question, and the
    accuracy per question kind (``val/acc_first``, ``val/acc_last``) beside the overall ``val/acc``."""

    def __init__(self, config: VideoRecallConfig | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config or VideoRecallConfig()
        self.model = VideoRecallModel(self.config)

    def forward(self, video: Tensor, questions: Tensor) -> Tensor:
        return self.model(video, questions)

    def count_samples(self, batch: dict) -> int:
        return len(batch["video"])

    def _step(self, batch: dict, split: str) -> Tensor:
        logits = self.model(batch["video"], batch["questions"])
        loss = F.cross_entropy(logits.flatten(0, 1), batch["answers"].flatten())
        correct = (logits.argmax(-1) == batch["answers"]).float()
        on_step, size = split == "train", len(batch["video"])
        log = dict(on_step=on_step, on_epoch=not on_step, batch_size=size)
        self.log(f"{split}/loss", loss, prog_bar=True, **log)
        self.log(f"{split}/acc", correct.mean(), prog_bar=True, **log)
        for index, name in enumerate(QUESTIONS):
            asked = batch["questions"] == index
            if asked.any():
                self.log(f"{split}/acc_{name}", correct[asked].mean(), **log)
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")
