"""VSTAR's Temporal Attention Regularisation (arXiv 2403.13501; spec §8.3) as a sampling-time processor.

Before the softmax of a temporal layer, every noisy query row gets a Gaussian band around its own frame:

    Z'_ij = Z_ij + s · (max over visible j of Z_ij) · Δ_ij,    Δ_ij = exp(−(i − j)² / (2σ²))

with ``i``, ``j`` frame indices (σ in latent frames). The row max is signed, as upstream (a negative max
weakens the diagonal); ``max_mode="abs"`` uses ``max |Z_ij|`` instead. Clean rows (the cached or recomputed
context), masked keys and cache writes are never touched, so the KV cache stays exact with the plug-in on.

Key frames are contiguous and the queries are the last ``Lq`` of them in every sampler mode (cache + chunk,
window + chunk, or full history + chunk), so ``i − j`` follows from the shapes alone.

    set_processor(model, "blocks.*.temporal.attend", TemporalAttentionRegularization(sigma=1.0))
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from timeloom_kernels.processors import AttentionContext, AttentionProcessor
from torch import Tensor

__all__ = ["TemporalAttentionRegularization", "gaussian_band", "noisy_rows"]


def noisy_rows(ctx: AttentionContext, q_len: int, device=None) -> Tensor:
    """``(Lq, 1)`` bool: query frames being denoised (the sampler puts ``clean_rows`` clean frames first)."""
    clean = int(ctx.extra.get("clean_rows", 0))
    return (torch.arange(q_len, device=device) >= clean).unsqueeze(-1)


def gaussian_band(q_len: int, k_len: int, sigma: float, device=None) -> Tensor:
    """``Δ (Lq, Lk)``: ``exp(−(i − j)²/(2σ²))`` for queries at the last ``Lq`` of ``Lk`` consecutive frames."""
    rows = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(-1)
    cols = torch.arange(k_len, device=device)
    return torch.exp(-((rows - cols).double() ** 2) / (2 * sigma**2)).float()


class TemporalAttentionRegularization(AttentionProcessor):
    """Adds the Gaussian band to noisy rows' temporal logits during the first ``active_fraction`` of steps.

    Args:
        sigma: band width σ in latent frames.
        strength: ``s``; 0 is the identity.
        active_fraction: steps ``k < ceil(fraction · S)`` of each chunk are regularised (upstream 14 of 25).
        max_mode: ``"signed"`` (upstream) or ``"abs"``.
    """

    def __init__(
        self,
        sigma: float = 1.0,
        strength: float = 1.0,
        active_fraction: float = 0.56,
        max_mode: Literal["signed", "abs"] = "signed",
    ) -> None:
        if sigma <= 0 or not 0 <= active_fraction <= 1 or max_mode not in ("signed", "abs"):
            raise ValueError(
                f"need sigma > 0, active_fraction in [0, 1] and max_mode 'signed' or 'abs'; "
                f"got {sigma}, {active_fraction}, {max_mode!r}"
            )
        self.sigma, self.strength, self.active_fraction, self.max_mode = (
            sigma,
            strength,
            active_fraction,
            max_mode,
        )

    def active(self, ctx: AttentionContext) -> bool:
        if ctx.step is None or ctx.extra.get("write", False):
            return False
        return ctx.step < math.ceil(self.active_fraction * ctx.num_steps)

    def logits(self, ctx: AttentionContext, scores: Tensor) -> Tensor:
        q_len, k_len = scores.shape[-2:]
        visible = torch.isfinite(scores)
        magnitude = scores.abs() if self.max_mode == "abs" else scores
        row_max = magnitude.masked_fill(~visible, -math.inf).amax(-1, keepdim=True)
        band = gaussian_band(q_len, k_len, self.sigma, scores.device).to(scores.dtype)
        edited = scores + self.strength * row_max * band
        return torch.where(noisy_rows(ctx, q_len, scores.device) & visible, edited, scores)
