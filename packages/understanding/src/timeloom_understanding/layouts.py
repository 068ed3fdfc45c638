"""Token layouts and the attention structures of video-LLMs (spec §2.1, §3).

A `TokenLayout` says, for every token of a batch of LLM inputs, what it is: text, a visual token on a frame
grid, or a Video-CCAM query; which media item and frame (or CCAM block) it belongs to; its grid row and
column; its role and turn; whether it is padding. A *structure* is a pure function of the layout that gives
the LLM its ``position_ids (B, L)`` and its attention mask, built from the kernels' mask algebra and
position schemes and handed to Hugging Face as a 4-D additive mask:

- `Causal`: ``j ≤ i``, positions ``0, 1, 2, …``.
- `TadRope`: TC-LLaVA's temporal-aware dual RoPE, ``p(n) = n + γ·τ(n)``, causal mask.
- `FrameBlockCausal`: TC-LLaVA's FBCAM, causal plus tokens of one frame see each other.
- `TCLLaVA`: both.
- `ModalityMutual`: AKI, causal plus visual tokens see the question after them (never the answer).
- `Concentric`: CCA, ring positions and the concentric mask on each frame.

Video-CCAM's masks live inside its projector (queries to frames), so they are plain functions here:
`ccam_blocks`, `ccam_query_mask`, `ccam_cross_mask`.

Padding never moves a position: each sample's positions are computed on its real tokens only. Pad keys are
masked; a pad query keeps its own diagonal so no row is empty.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from timeloom_kernels import masks
from timeloom_kernels.masks import Mask
from timeloom_kernels.positions import concentric_positions, tad_positions, temporal_index
from torch import Tensor

__all__ = [
    "ASSISTANT",
    "QUERY",
    "STRUCTURES",
    "SYSTEM",
    "TEXT",
    "USER",
    "VISUAL",
    "Causal",
    "Concentric",
    "FrameBlockCausal",
    "LayoutBuilder",
    "ModalityMutual",
    "Structure",
    "TCLLaVA",
    "TadRope",
    "TokenLayout",
    "VisualTokens",
    "ccam_blocks",
    "ccam_cross_mask",
    "ccam_query_mask",
    "make_structure",
    "question_limits",
]

TEXT, VISUAL, QUERY = 0, 1, 2  # token kinds
SYSTEM, USER, ASSISTANT = 0, 1, 2  # roles (a turn's header tokens carry the turn's role)
_FIELDS = ("kind", "media", "frame", "row", "col", "role", "turn")
_PAD_VALUES = {"kind": TEXT, "media": -1, "frame": -1, "row": -1, "col": -1, "role": -1, "turn": -1}


@dataclass(frozen=True)
class VisualTokens:
    """What a projector's tokens for one media item are: ``kind``, ``frame`` (or CCAM block), ``row``, ``col``.

    All ``(N,)`` int64; ``row``/``col`` are −1 where the tokens have no grid (CCAM queries).
    """

    kind: Tensor
    frame: Tensor
    row: Tensor
    col: Tensor

    @classmethod
    def grid(cls, frames: int, height: int, width: int) -> VisualTokens:
        """``frames`` frames of ``height × width`` tokens in raster order."""
        frame, row, col = torch.meshgrid(
            torch.arange(frames), torch.arange(height), torch.arange(width), indexing="ij"
        )
        frame, row, col = frame.reshape(-1), row.reshape(-1), col.reshape(-1)
        return cls(torch.full_like(frame, VISUAL), frame, row, col)

    @classmethod
    def queries(cls, blocks: Tensor) -> VisualTokens:
        """CCAM queries: query ``i`` belongs to block ``blocks[i]`` (the last frame it may read)."""
        blocks = blocks.long()
        none = torch.full_like(blocks, -1)
        return cls(torch.full_like(blocks, QUERY), blocks, none, none.clone())

    def __len__(self) -> int:
        return self.kind.shape[0]


@dataclass(frozen=True)
class TokenLayout:
    """Per-token metadata of a batch: ``(B, L)`` int64 tensors, ``pad`` bool.

    ``kind`` TEXT/VISUAL/QUERY; ``media`` index of the media item (−1 for text); ``frame`` frame or CCAM
    block (−1 for text); ``row``/``col`` grid cell (−1 off the grid); ``role`` SYSTEM/USER/ASSISTANT;
    ``turn`` conversation turn; ``pad`` padding.
    """

    kind: Tensor
    media: Tensor
    frame: Tensor
    row: Tensor
    col: Tensor
    role: Tensor
    turn: Tensor
    pad: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.kind.shape)

    @property
    def visual(self) -> Tensor:
        """``vis(i)``: visual tokens and CCAM queries."""
        return (self.kind != TEXT) & ~self.pad

    def sample(self, index: int) -> TokenLayout:
        """Sample ``index`` without its padding, as a batch of one."""
        keep = ~self.pad[index]
        values = {f.name: getattr(self, f.name)[index][keep].unsqueeze(0) for f in dataclasses.fields(self)}
        return TokenLayout(**values)

    def concat(self, other: TokenLayout) -> TokenLayout:
        """This layout followed by ``other`` along the sequence (same batch size), e.g. a stream growing."""
        fields = dataclasses.fields(self)
        return TokenLayout(
            **{f.name: torch.cat((getattr(self, f.name), getattr(other, f.name)), 1) for f in fields}
        )

    @classmethod
    def stack(cls, layouts: list[TokenLayout], side: str = "right", length: int | None = None) -> TokenLayout:
        """Pad batch-1 layouts to ``length`` (default: the longest) on ``side`` and stack them.

        Right padding is for training, left padding for generation (new tokens then line up at the end).
        """
        if side not in ("left", "right"):
            raise ValueError(f"side must be 'left' or 'right'; got {side!r}")
        length = length or max(layout.shape[1] for layout in layouts)
        rows: dict[str, list[Tensor]] = {f.name: [] for f in dataclasses.fields(cls)}
        for number, layout in enumerate(layouts):
            missing = length - layout.shape[1]
            if missing < 0:
                raise ValueError(f"layout {number} has {layout.shape[1]} tokens, more than length {length}")
            for name in rows:
                value = True if name == "pad" else _PAD_VALUES[name]
                filler = torch.full((1, missing), value, dtype=getattr(layout, name).dtype)
                parts = (filler, getattr(layout, name)) if side == "left" else (getattr(layout, name), filler)
                rows[name].append(torch.cat(parts, dim=1))
        return cls(**{name: torch.cat(values) for name, values in rows.items()})


class LayoutBuilder:
    """Builds one sample's layout segment by segment: ``LayoutBuilder().text(3, USER).media(tokens)…``."""

    def __init__(self) -> None:
        self._parts: list[dict[str, Tensor]] = []
        self._media = 0

    def text(self, count: int, role: int | Tensor, turn: int | Tensor = 0) -> LayoutBuilder:
        """``count`` text tokens spoken by ``role`` in ``turn`` (ints, or one value per token)."""
        none = torch.full((count,), -1)
        self._parts.append(
            {
                "kind": torch.full((count,), TEXT),
                "media": none,
                "frame": none,
                "row": none,
                "col": none,
                "role": torch.as_tensor(role).long().expand(count),
                "turn": torch.as_tensor(turn).long().expand(count),
            }
        )
        return self

    def media(self, tokens: VisualTokens, role: int | Tensor = USER, turn: int | Tensor = 0) -> LayoutBuilder:
        """The next media item's visual tokens (media items are numbered in order of appearance)."""
        count = len(tokens)
        self._parts.append(
            {
                "kind": tokens.kind,
                "media": torch.full((count,), self._media),
                "frame": tokens.frame,
                "row": tokens.row,
                "col": tokens.col,
                "role": torch.as_tensor(role).long().expand(count),
                "turn": torch.as_tensor(turn).long().expand(count),
            }
        )
        self._media += 1
        return self

    def build(self) -> TokenLayout:
        if not self._parts:
            raise ValueError("a layout needs at least one token")
        values = {
            name: torch.cat([part[name] for part in self._parts]).long().unsqueeze(0) for name in _FIELDS
        }
        return TokenLayout(**values, pad=torch.zeros_like(values["kind"], dtype=torch.bool))


# --------------------------------------------------------------------------------------------------------
# Structures: positions and masks as pure functions of the layout
# --------------------------------------------------------------------------------------------------------
def _per_sample(layout: TokenLayout, positions_of, dtype: torch.dtype) -> Tensor:
    """Positions computed on each sample's real tokens only and scattered back (pads get 0)."""
    out = torch.zeros(layout.shape, dtype=dtype)
    for b in range(layout.shape[0]):
        out[b, ~layout.pad[b]] = positions_of(layout.sample(b))[0].to(dtype)
    return out


def _frame_groups(layout: TokenLayout) -> Tensor:
    """TC-LLaVA's temporal index τ: one id per text token and per frame (or CCAM block) of a media item."""
    return temporal_index(layout.frame, layout.media)


def question_limits(layout: TokenLayout) -> tuple[Tensor, Tensor]:
    """AKI's tables for `masks.modality_mutual_tables`: per token, how far ahead it may look, and which
    tokens are the user's text.

    A visual token's limit ``a(i)`` is the first assistant-role token after the end of its media item (the
    whole rest of the sequence if none), so it sees the question after it and never the answer or a later
    turn; every other token's limit is 0. Several media items and turns per sample work (upstream: one
    image, one turn).
    """
    batch, length = layout.shape
    index = torch.arange(length).expand(batch, -1)
    assistant = (layout.role == ASSISTANT) & ~layout.pad
    # first assistant token at or after each position: a reverse cumulative minimum over assistant positions
    candidates = torch.where(assistant, index, torch.full_like(index, length))
    next_assistant = candidates.flip(-1).cummin(-1).values.flip(-1)
    item_end = _media_end(layout)
    limit = torch.where(layout.visual, next_assistant.gather(1, item_end.clamp(max=length - 1)), 0)
    limit = torch.where(layout.visual & (item_end >= length), length, limit)
    user_text = (layout.kind == TEXT) & (layout.role == USER) & ~layout.pad
    return limit, user_text


def _media_end(layout: TokenLayout) -> Tensor:
    """Per token: one past the last token of its media item (its own index + 1 for text)."""
    batch, length = layout.shape
    index = torch.arange(length).expand(batch, -1)
    same_as_next = torch.zeros_like(layout.pad)
    same_as_next[:, :-1] = (layout.media[:, 1:] == layout.media[:, :-1]) & (layout.media[:, :-1] >= 0)
    # the end of a run is the first position at or after i where the run does not continue
    stops = torch.where(same_as_next, torch.full_like(index, length), index)
    return stops.flip(-1).cummin(-1).values.flip(-1) + 1


class Structure:
    """An attention structure. The defaults are the vanilla baseline (causal mask, positions ``0, 1, 2, …``);
    each method overrides its positions, its mask or both."""

    name = "structure"

    def position_ids(self, layout: TokenLayout) -> Tensor:
        """``(B, L)`` positions: here ``0, 1, 2, …`` over each sample's real tokens."""
        return _per_sample(layout, lambda one: torch.arange(one.shape[1]).unsqueeze(0), torch.long)

    def decode_step(self) -> float:
        """How far each generated text token advances the position."""
        return 1

    def mask(self, layout: TokenLayout) -> Mask:
        """The structure's mask over the whole (padded) sequence, before padding is applied."""
        return masks.causal()

    def allowed(self, layout: TokenLayout, extra: Mask | None = None) -> Tensor:
        """Dense bool ``(B, 1, L, L)``: pad keys masked, every query keeps its diagonal. ``extra`` entries
        are allowed too (PINE's options seeing each other)."""
        batch, length = layout.shape
        diagonal = masks.sliding_window(1)  # j = i
        mask = self.mask(layout) if extra is None else self.mask(layout) | extra
        mask = (mask & masks.key_padding(~layout.pad)) | diagonal
        return mask.dense(batch, 1, length, length)

    def attention_mask(self, layout: TokenLayout, dtype: torch.dtype = torch.float32) -> Tensor:
        """The 4-D additive mask Hugging Face models take: 0 where allowed, ``finfo(dtype).min`` elsewhere.

        Additive, not bool: `eager` attention *adds* a bool mask, which is silently wrong.
        """
        allowed = self.allowed(layout)
        return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Causal(Structure):
    """Vanilla: causal mask and 1-D positions, the baseline every method is compared with."""

    name = "causal"


class TadRope(Structure):
    """TC-LLaVA's temporal-aware dual RoPE: ``p(n) = n + γ·τ(n)`` (γ = 0 is vanilla RoPE), causal mask.

    ``time_steps`` (our option; None is the paper's one step per frame): each video's frames (or CCAM
    blocks) fall into this many equal time steps, frame ``f`` of ``T`` into step ``⌊f·S/T⌋``, so a clip
    sampled denser than in training keeps the steps, positions and frame blocks it was trained with (S = the
    training frame count). With ``T ≤ S`` nothing changes. Not for streaming, where ``T`` grows.
    """

    name = "tad_rope"

    def __init__(self, gamma: float = 1.0, time_steps: int | None = None) -> None:
        if time_steps is not None and time_steps < 1:
            raise ValueError(f"time_steps must be a positive step count or None; got {time_steps}")
        self.gamma, self.time_steps = gamma, time_steps

    def position_ids(self, layout: TokenLayout) -> Tensor:
        integral = float(self.gamma).is_integer()
        dtype = torch.long if integral else torch.float32

        def positions(one: TokenLayout) -> Tensor:
            return tad_positions(one.frame, self.gamma, one.media)

        return _per_sample(in_time_steps(layout, self.time_steps), positions, dtype)

    def decode_step(self) -> float:
        return 1 + self.gamma

    def __repr__(self) -> str:
        return f"{type(self).__name__}(gamma={self.gamma}, time_steps={self.time_steps})"


def in_time_steps(layout: TokenLayout, steps: int | None) -> TokenLayout:
    """The layout with each media item's ``T`` frames (or blocks) numbered by time step ``⌊f·steps/T⌋``."""
    visual = (layout.frame >= 0) & ~layout.pad
    if steps is None or not visual.any():
        return layout
    items = layout.media.clamp(min=0) + (int(layout.media.max()) + 1) * torch.arange(layout.shape[0])[:, None]
    frames = torch.zeros(int(items.max()) + 1, dtype=torch.long)
    frames = frames.scatter_reduce(0, items[visual], layout.frame[visual] + 1, "amax")  # T per media item
    stepped = torch.where(visual, layout.frame * steps // frames[items].clamp(min=1), layout.frame)
    return dataclasses.replace(layout, frame=stepped)


class FrameBlockCausal(Structure):
    """TC-LLaVA's FBCAM: ``j ≤ i``, or ``i`` and ``j`` are visual tokens of the same frame of one media item."""

    name = "frame_block_causal"

    def mask(self, layout: TokenLayout) -> Mask:
        # τ gives every text token its own id and every frame one shared id, so "same id" is "same frame"
        return masks.causal() | masks.same_sequence(_frame_groups(layout))


class TCLLaVA(TadRope):
    """TC-LLaVA: dual RoPE positions and the frame-block causal mask together."""

    name = "tc_llava"

    def mask(self, layout: TokenLayout) -> Mask:
        return FrameBlockCausal().mask(in_time_steps(layout, self.time_steps))


class ModalityMutual(Structure):
    """AKI: causal, plus each visual token sees the user text after its media item up to the next answer."""

    name = "modality_mutual"

    def mask(self, layout: TokenLayout) -> Mask:
        return masks.modality_mutual_tables(*question_limits(layout))


class Concentric(Structure):
    """CCA: concentric ring positions and mask on each frame; earlier frames of a media item fully visible."""

    name = "concentric"

    def grid(self, layout: TokenLayout) -> tuple[int, int]:
        visual = layout.visual
        if (layout.visual & (layout.row < 0)).any():
            raise ValueError(
                "Concentric needs visual tokens on a grid; CCAM queries and SlowFast's fast tokens have none"
            )
        if not visual.any():
            return 1, 1
        return int(layout.row[visual].max()) + 1, int(layout.col[visual].max()) + 1

    def position_ids(self, layout: TokenLayout) -> Tensor:
        grid = self.grid(layout)

        def positions(one: TokenLayout) -> Tensor:
            return concentric_positions(one.frame, one.row, one.col, grid, one.media)

        return _per_sample(layout, positions, torch.long)

    def mask(self, layout: TokenLayout) -> Mask:
        height, width = self.grid(layout)
        return masks.concentric(_media_spans(layout), height, width)


def _media_spans(layout: TokenLayout) -> Tensor:
    """``(B, S, 2)`` ``[start, end)`` of each media item's tokens; samples with fewer items get empty spans."""
    batch, _ = layout.shape
    spans = [[] for _ in range(batch)]
    for b in range(batch):
        media = layout.media[b]
        for item in torch.unique(media[media >= 0]).tolist():
            where = torch.nonzero(media == item).flatten()
            spans[b].append([int(where[0]), int(where[-1]) + 1])
    most = max(1, max(len(s) for s in spans))
    return torch.tensor([s + [[0, 0]] * (most - len(s)) for s in spans], dtype=torch.long)


# --------------------------------------------------------------------------------------------------------
# Video-CCAM: queries in blocks, block-causal among themselves and causal across to the frames
# --------------------------------------------------------------------------------------------------------
def ccam_blocks(num_queries: int, num_frames: int) -> Tensor:
    """Block ``b(i) = ⌊i·T/Q⌋`` of each of the ``Q`` queries: the last frame query ``i`` may read."""
    if num_frames > num_queries:
        raise ValueError(
            f"Video-CCAM needs at least one query per frame: {num_frames} frames > {num_queries} queries"
        )
    return torch.arange(num_queries) * num_frames // num_queries


def ccam_query_mask(num_queries: int, num_frames: int) -> Mask:
    """Query self-attention: ``i`` sees ``j`` iff ``b(j) ≤ b(i)``, or block t would read frame t+1 through
    the queries of block t+1. Reads query slots."""
    ccam_blocks(num_queries, num_frames)  # validates T ≤ Q
    return masks.ccam_queries(num_queries, num_frames, query_frame="start")


def ccam_cross_mask(num_queries: int, num_frames: int, tokens_per_frame: int) -> Mask:
    """Causal cross-attention: query ``i`` sees every token of frames ``f ≤ b(i)``."""
    ccam_blocks(num_queries, num_frames)  # validates T ≤ Q
    return masks.ccam(num_queries, num_frames, tokens_per_frame, query_frame="start")


STRUCTURES: dict[str, type[Structure]] = {
    cls.name: cls for cls in (Causal, TadRope, FrameBlockCausal, TCLLaVA, ModalityMutual, Concentric)
}


def make_structure(name: str, **options) -> Structure:
    """A structure by name (``causal``, ``tad_rope``, ``frame_block_causal``, ``tc_llava``, …)."""
    if name not in STRUCTURES:
        raise ValueError(f"unknown structure {name!r}; choose one of {sorted(STRUCTURES)}")
    return STRUCTURES[name](**options)
