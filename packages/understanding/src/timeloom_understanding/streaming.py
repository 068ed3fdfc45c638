"""Streaming mode (spec §7): online questions about a video that is still arriving (OVO-Bench style).

`OnlineStream` is fed frames as they arrive (`push`) and asked questions at a time ``t`` (`ask`); an answer
uses the frames up to ``t`` only: the video is cut at the question time. The prompt it answers is exactly
the offline one for the cut video,

    [system] <|user|> <video frames 0..t> question <|end|> <|assistant|>

so a stream and `VideoLLM.generate` on ``video[0, t]`` give the same reply.

Where the structure allows it, the frames go into the LLM's key/value cache as they arrive and every
question reuses that prefix: ``ask`` notes the cache length, appends the question, decodes, and rolls the
cache back. That needs visual tokens and LLM states that never change when later tokens arrive:

- the projector must map each frame on its own: `MLPProjector` does; Video-CCAM's queries (block ``b(i) =
  ⌊i·T/Q⌋``) depend on the total frame count ``T``;
- the structure must give earlier tokens the same positions and mask rows whatever follows: `Causal`,
  `TadRope`, `FrameBlockCausal`, `TCLLaVA` and `Concentric` do; AKI's `ModalityMutual` lets visual tokens
  read the question after them, so they change with each question.

Otherwise the stream rebuilds at every question from ``video[0, t]`` (the offline cut protocol), reusing only
the per-frame encoder features. With the ``memory`` projector the stream keeps the neural memory's state
across questions: frames are written once, as they leave the projector's window.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from timeloom_understanding.hf_backbone import cache_length, crop_cache, new_cache
from timeloom_understanding.layouts import (
    ASSISTANT,
    SYSTEM,
    USER,
    LayoutBuilder,
    TokenLayout,
    VisualTokens,
)
from timeloom_understanding.memory_projector import MemoryProjector, MemoryStreamState
from timeloom_understanding.model import VideoLLM
from timeloom_understanding.projectors import MLPProjector
from timeloom_understanding.text import ASSISTANT_HEADER, END, USER_HEADER, encode_conversation

__all__ = ["STREAMING_STRUCTURES", "OnlineStream", "why_no_cache_reuse"]

# structures under which appended frames leave every earlier token's position and mask row unchanged
STREAMING_STRUCTURES = ("causal", "tad_rope", "frame_block_causal", "tc_llava", "concentric")


def why_no_cache_reuse(model: VideoLLM) -> str | None:
    """Why ``model`` cannot reuse a stream's cache across questions, or None when it can (spec §3.8)."""
    if not isinstance(model.projector, MLPProjector):
        return (
            f"the {model.config.projector!r} projector's tokens depend on the total frame count "
            "(only 'mlp' maps each frame on its own)"
        )
    if model.structure.name not in STREAMING_STRUCTURES:
        return (
            f"under the {model.structure.name!r} structure earlier tokens change with what follows "
            f"(visual tokens read the question); cache reuse needs one of {STREAMING_STRUCTURES}"
        )
    return None


class OnlineStream:
    """Questions at time ``t`` about a video stream at ``fps`` frames per second (frame ``k`` is at ``k/fps``).

    Args:
        model: the video-LLM (batch of one stream).
        fps: the rate of the pushed frames.
        max_frames: the most frames the stream holds (no eviction here).
        system: an optional system prompt before the user turn.
        reuse_cache: None reuses the video prefix's key/value cache where the model allows it (see
            `why_no_cache_reuse`) and rebuilds otherwise; False always rebuilds; True raises where reuse is
            impossible.
    """

    def __init__(
        self,
        model: VideoLLM,
        fps: float,
        max_frames: int = 256,
        system: str | None = None,
        reuse_cache: bool | None = None,
    ) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be positive; got {fps}")
        reason = why_no_cache_reuse(model)
        if reuse_cache and reason:
            raise ValueError(f"this stream cannot reuse its cache across questions: {reason}")
        self.model, self.fps, self.max_frames, self.system = model, fps, max_frames, system
        self.reuse_cache = reason is None if reuse_cache is None else reuse_cache
        self.features: list[Tensor] = []  # per pushed chunk: encoder tokens (1, T, h·w, C_v)
        self.grid: tuple[int, int] | None = None
        self.frames = 0
        self.memory: MemoryStreamState | None = None  # the memory projector's state (frames left its window)
        if self.reuse_cache:
            self.cache = new_cache(model.llm)
            self.layout: TokenLayout | None = None
            self.positions: Tensor | None = None
            system_ids = model.tokenizer.encode(system) if system else []
            self._append_text([(system_ids, SYSTEM), ([model.tokenizer.id(USER_HEADER)], USER)])

    def frame_time(self, index: int) -> float:
        return index / self.fps

    def frames_until(self, t: float) -> int:
        """How many frames have a time ``≤ t``."""
        return math.floor(t * self.fps + 1e-9) + 1

    @torch.no_grad()
    def push(self, frames: Tensor) -> None:
        """Append ``frames (C, T, H, W)`` (in [−1, 1], like the model's video input) to the stream."""
        if frames.dim() != 4:
            raise ValueError(f"push takes frames (C, T, H, W); got shape {tuple(frames.shape)}")
        if self.frames + frames.shape[1] > self.max_frames:
            raise ValueError(
                f"the stream holds at most {self.max_frames} frames; {self.frames} pushed, "
                f"{frames.shape[1]} more given"
            )
        features, grid = self.model.encode_frames(frames.unsqueeze(0))
        if self.grid not in (None, grid):
            raise ValueError(f"frames on a {grid} token grid after frames on {self.grid}")
        if self.reuse_cache:  # per-frame projector: this chunk's tokens, renumbered after the earlier frames
            tokens, visual = self.model.project(features, grid)
            visual = VisualTokens(visual.kind, visual.frame + self.frames, visual.row, visual.col)
            self._extend(tokens, LayoutBuilder().media(visual, USER, 0).build())
        self.features.append(features)
        self.grid = grid
        self.frames += frames.shape[1]

    @torch.no_grad()
    def ask(
        self, question: str, t: float | None = None, max_new_tokens: int = 16, return_logits: bool = False
    ) -> list[int] | tuple[list[int], Tensor]:
        """Greedy reply (token ids) to ``question`` asked at time ``t`` (default: the last pushed frame's time),
        using the frames up to ``t`` only; ``return_logits`` adds the logits ``(steps, V)``."""
        if self.frames == 0:
            raise ValueError("ask before any frame was pushed")
        t = self.frame_time(self.frames - 1) if t is None else t
        if t < 0:
            raise ValueError(f"question time {t} s is before the first frame")
        visible = min(self.frames_until(t), self.frames)
        if not self.reuse_cache:
            replies, logits = self._rebuild(question, visible, max_new_tokens)
            return (replies, logits) if return_logits else replies
        if visible < self.frames:
            raise ValueError(
                f"frames up to {self.frame_time(self.frames - 1):.3f} s are already in the cache; a question "
                f"at {t} s must come before them (or use reuse_cache=False, which cuts the video)"
            )
        length, layout, positions = cache_length(self.cache), self.layout, self.positions
        try:
            tokenizer = self.model.tokenizer
            question_ids = tokenizer.encode(question) + [tokenizer.id(END)]
            hidden = self._append_text([(question_ids, USER), ([tokenizer.id(ASSISTANT_HEADER)], ASSISTANT)])
            decoder = self.model.cached_decoder(
                self.cache, self.positions[:, -1], torch.ones(1, cache_length(self.cache), dtype=torch.bool)
            )
            replies, logits = self.model.greedy(
                self.model.llm.lm_head(hidden[:, -1]), decoder, max_new_tokens
            )
        finally:  # roll back to the video prefix
            crop_cache(self.cache, length)
            self.layout, self.positions = layout, positions
        return (replies[0], logits[0]) if return_logits else replies[0]

    # ---- the cached path ---------------------------------------------------------------------------------
    def _append_text(self, pieces: list[tuple[list[int], int]]) -> Tensor:
        """Append text pieces ``(token ids, role)`` to the cache; returns their hidden states."""
        ids = [token for piece, _ in pieces for token in piece]
        roles = torch.tensor([role for piece, role in pieces for _ in piece])
        embeds = self.model.llm.get_input_embeddings()(torch.tensor([ids], device=self._device()))
        return self._extend(embeds, LayoutBuilder().text(len(ids), roles, 0).build())

    def _extend(self, embeds: Tensor, layout: TokenLayout) -> Tensor:
        full = layout if self.layout is None else self.layout.concat(layout)
        if full.shape[1] > self.model.config.max_length:
            raise ValueError(
                f"the stream needs {full.shape[1]} tokens, more than the context of {self.model.config.max_length}"
            )
        hidden, self.positions = self.model.extend(embeds, full, self.cache)
        self.layout = full
        return hidden

    def _device(self) -> torch.device:
        return self.model.llm.get_input_embeddings().weight.device

    # ---- the rebuild path: the offline protocol on video[0, t] -----------------------------------------------
    def _rebuild(self, question: str, visible: int, max_new_tokens: int) -> tuple[list[int], Tensor]:
        features = torch.cat(self.features, dim=1)[:, :visible]
        media = self._project(features)
        item = {
            "id": "stream",
            "video": "stream",
            "conversations": [{"from": "human", "value": "<video> " + question}],
        }
        if self.system:
            item["system"] = self.system
        encoded = encode_conversation(
            item,
            self.model.tokenizer,
            visual_tokens_per_media=media[0].shape[1],
            max_length=self.model.config.max_length,
            for_generation=True,
        )
        batch = {
            key: getattr(encoded, key).unsqueeze(0).to(self._device())
            for key in ("input_ids", "labels", "role", "turn")
        }
        batch |= {"lengths": torch.tensor([len(encoded)]), "media_tokens": media}
        replies, logits = self.model.generate(batch, max_new_tokens, return_logits=True)
        return replies[0], logits[0]

    def _project(self, features: Tensor) -> tuple[Tensor, VisualTokens]:
        """The projector on the visible frames; the memory projector writes only frames not yet written."""
        projector = self.model.projector
        if not isinstance(projector, MemoryProjector):
            return self.model.project(features, self.grid)
        past = max(features.shape[1] - projector.window_frames, 0)
        if self.memory is not None and self.memory.written > past:  # asked about an earlier time: start over
            stream = projector.write_past(features[:, :past], self.grid, None)
        else:
            written = 0 if self.memory is None else self.memory.written
            stream = self.memory = projector.write_past(features[:, written:past], self.grid, self.memory)
        return projector(features, self.grid, stream)
