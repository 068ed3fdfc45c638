"""Input checks shared by the linear/recurrent attention ops."""

from __future__ import annotations

import torch
from torch import Tensor


def check_qkv(q: Tensor, k: Tensor, v: Tensor) -> None:
    """q, k `(B, H, L, Dk)` and v `(B, H, L, Dv)` with L >= 1, or ValueError."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"expected q, k, v of shape (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape != k.shape or v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"expected q and k of the same shape (B, H, L, Dk) and v of shape (B, H, L, Dv), "
            f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if q.shape[2] == 0:
        raise ValueError("expected at least one token (L >= 1), got L = 0")


def check_state(state: Tensor, expected: tuple[int, ...], name: str = "initial_state") -> None:
    """`state` has shape `expected`, or ValueError."""
    if tuple(state.shape) != expected:
        raise ValueError(f"expected {name} of shape {expected}, got {tuple(state.shape)}")


def check_chunk_size(chunk_size: int) -> None:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of tokens, got {chunk_size}")


def check_backend(backend: str, choices: tuple[str, ...]) -> None:
    if backend not in choices:
        raise ValueError(f"backend must be one of {choices}, got {backend!r}")


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and accumulations run in at least fp32 (bf16 states lose the long-range sum)."""
    return torch.promote_types(dtype, torch.float32)
