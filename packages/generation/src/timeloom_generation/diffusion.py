"""Rectified flow (spec §5): ``x_tau = (1 - tau)·x0 + tau·eps``, the model predicts ``v = eps - x0``.

Training draws ``tau`` logit-normal then shifted; sampling integrates ``dx/dtau = v`` with Euler steps from
``tau = 1`` (noise) to ``tau = 0`` on the same shifted grid. Classifier-free guidance mixes the two branches.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["euler_levels", "guide", "noise_to", "sample_levels", "shift_levels", "velocity_target"]


def shift_levels(tau: Tensor, shift: float) -> Tensor:
    """``s·tau / (1 + (s - 1)·tau)``: ``s > 1`` spends more of training and sampling at high noise."""
    return shift * tau / (1 + (shift - 1) * tau)


def sample_levels(
    batch: int, shift: float = 1.0, generator: torch.Generator | None = None, device=None
) -> Tensor:
    """Training noise levels ``(batch,)``: logit-normal (SD3), then shifted."""
    normal = torch.randn(batch, generator=generator, device=device)
    return shift_levels(torch.sigmoid(normal), shift)


def euler_levels(steps: int, shift: float = 1.0, device=None) -> Tensor:
    """``steps + 1`` levels from 1 to 0: ``tau_k = shift(1 - k/S)``."""
    if steps < 1:
        raise ValueError(f"need at least one sampling step, got steps={steps}")
    return shift_levels(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def noise_to(x0: Tensor, noise: Tensor, tau: Tensor) -> Tensor:
    """``(1 - tau)·x0 + tau·noise``; ``tau`` broadcasts from the left, e.g. ``(B, 1, F, 1, 1)``."""
    return (1 - tau) * x0 + tau * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    return noise - x0


def guide(unconditional: Tensor, conditional: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance ``v_null + w·(v_c - v_null)``."""
    return unconditional + scale * (conditional - unconditional)
