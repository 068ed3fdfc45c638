"""Softmax-attention backends.

Each backend module exposes ``why_not(problem) -> str | None`` (None: it can serve this call; otherwise the
reason it cannot) and ``forward(q, k, v, args) -> Tensor``. `timeloom_kernels.attention.select_backend`
picks among them from a `Problem`, which holds everything the choice depends on and no tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from timeloom_kernels.masks import Mask, ScoreMod

__all__ = ["AttentionArgs", "BiasKind", "Problem", "ScoreHook", "additive_mask", "dense_bias", "repeat_kv"]

BiasKind = Literal["none", "tensor", "score_mod"]


class ScoreHook(Protocol):
    """What the reference backend calls around its softmax (a processor bound to its context)."""

    def logits(self, scores: Tensor) -> Tensor: ...

    def probs(self, probs: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Problem:
    """One attention call as the backend choice sees it: shapes, dtype, mask, bias, dropout, gradients.

    ``available`` names the backends whose kernels run here (probed at run time, e.g. xformers).
    ``block_sparsity`` is the share of the scores a block-sparse kernel skips (CUDA: 128×128 tiles of flex's
    BlockMask; elsewhere: what lies outside each 128-row tile's key span, see `tiled`), filled in only where
    it matters (large calls with a structured mask). ``xformers_exact`` says whether the mask has an exact
    xformers ``attn_bias`` for this layout.
    """

    device_type: str
    dtype: torch.dtype
    batch: int
    q_heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    mask: Mask | None = None
    bias: BiasKind = "none"
    bias_requires_grad: bool = False
    dropout_p: float = 0.0
    needs_grad: bool = False
    default_positions: bool = True
    needs_probs: bool = False
    available: frozenset[str] = frozenset({"reference", "sdpa", "flex"})
    block_sparsity: float | None = None
    xformers_exact: bool = False

    @property
    def plain_causal_square(self) -> bool:
        """Plain causal over the default positions with ``Lq == Lk``: where every kernel's flag agrees."""
        return (
            self.mask is not None
            and self.mask.is_plain("causal")
            and self.default_positions
            and self.q_len == self.kv_len
        )


@dataclass(frozen=True)
class AttentionArgs:
    """Everything but q, k, v that a backend's ``forward`` needs. Positions are as given (None = default)."""

    mask: Mask | None
    bias: Tensor | ScoreMod | None
    scale: float
    dropout_p: float
    q_pos: Tensor | None
    kv_pos: Tensor | None
    processor: ScoreHook | None = None


def dense_bias(args: AttentionArgs, q: Tensor, k: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The additive bias as a 4-D tensor broadcastable to ``(B, Hq, Lq, Lk)``, or None."""
    if args.bias is None:
        return None
    if isinstance(args.bias, ScoreMod):
        batch, heads, q_len, _ = q.shape
        return args.bias.dense(batch, heads, q_len, k.shape[2], args.q_pos, args.kv_pos, q.device, dtype)
    bias = args.bias.to(dtype)
    return bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))  # (Lk,) or a scalar broadcast too


def additive_mask(bias: Tensor | None, allowed: Tensor | None) -> Tensor | None:
    """One SDPA ``attn_mask``: the bias with disallowed pairs at -inf, or whichever of the two is given."""
    if bias is None:
        return allowed
    return bias if allowed is None else bias.masked_fill(~allowed, float("-inf"))


def repeat_kv(x: Tensor, groups: int, dim: int = 1) -> Tensor:
    """GQA: query head ``h`` reads kv head ``h // groups``, so each kv head is repeated ``groups`` times."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=dim)
