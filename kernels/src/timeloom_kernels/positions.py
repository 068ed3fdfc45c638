"""Rotary position embeddings and the position-id schemes built on them.

Everything here takes absolute positions (int or fractional) and is vectorised over batch and tokens.

- `apply_rope`: 1-D RoPE, `theta_k = base^(-2k/d)`, half-split pairing (dims k and k + d/2) or, for
  checkpoints that use it, interleaved pairing (dims 2k and 2k+1).
- `axial_rope_angles`, `rope_2d_angles`, `rope_3d_angles`: the rotary pairs are split into one contiguous
  group per axis, and each group is an ordinary 1-D RoPE of its own width driven by that axis' coordinate.
- `temporal_index`, `tad_positions`: TC-LLaVA's temporal-aware dual RoPE ids `p(n) = n + gamma * tau(n)`.
- `concentric_rings`, `concentric_positions`: CCA's ring ids, one id per ring of a frame.

Rotation runs in at least fp32 (fp64 inputs stay fp64) and the result is cast back to the input dtype. Where
RoPE sits relative to qk-norm or learned per-dimension q/k scales is the model's choice: they do not commute
with the rotation, so models document their order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

ROPE_BASE = 10000.0


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for half/bf16/fp32 inputs, fp64 for fp64: the angle and the rotation never run below fp32."""
    return torch.promote_types(dtype, torch.float32)


def rope_frequencies(
    num_pairs: int,
    base: float = ROPE_BASE,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Rotation speeds `theta_k = base^(-2k/d) = base^(-k/num_pairs)` for `k < num_pairs`: `(num_pairs,)`."""
    if num_pairs < 1:
        raise ValueError(f"RoPE needs at least one rotary pair, got num_pairs={num_pairs}")
    exponents = torch.arange(num_pairs, device=device, dtype=torch.float64) / num_pairs
    return (base**-exponents).to(dtype)


def rope_angles(positions: Tensor, num_pairs: int, base: float = ROPE_BASE) -> Tensor:
    """Angles `p * theta_k` for positions of any shape `(...)`; returns `(..., num_pairs)` in >= fp32.

    Fractional positions are allowed (TAD-RoPE with a fractional gamma, interpolated positions).
    """
    dtype = _compute_dtype(positions.dtype) if positions.is_floating_point() else torch.float32
    theta = rope_frequencies(num_pairs, base, device=positions.device, dtype=dtype)
    return positions.to(dtype).unsqueeze(-1) * theta


def default_axial_split(num_pairs: int, num_axes: int) -> tuple[int, ...]:
    """Equal shares of the rotary pairs per axis; the remainder goes to the first axis (t in 3-D)."""
    if num_pairs < num_axes:
        raise ValueError(
            f"cannot split {num_pairs} rotary pairs over {num_axes} axes: need at least one each"
        )
    share, remainder = divmod(num_pairs, num_axes)
    return (share + remainder,) + (share,) * (num_axes - 1)


def axial_rope_angles(
    coords: Tensor, num_pairs: int, split: Sequence[int] | None = None, base: float = ROPE_BASE
) -> Tensor:
    """Axial RoPE angles: axis `a` of `coords (..., L, A)` drives the a-th contiguous group of rotary pairs.

    Each group of `split[a]` pairs is a 1-D RoPE of width `2 * split[a]` (its own frequency ladder), so axial
    RoPE restricted to one group equals 1-D RoPE on that group's dimensions. Returns `(..., L, num_pairs)`.
    """
    num_axes = coords.shape[-1]
    split = tuple(split) if split is not None else default_axial_split(num_pairs, num_axes)
    if len(split) != num_axes or sum(split) != num_pairs or min(split) < 1:
        raise ValueError(
            f"split must give a positive number of pairs to each of the {num_axes} axes and sum to "
            f"{num_pairs}, got {split}"
        )
    groups = [rope_angles(coords[..., axis], pairs, base) for axis, pairs in enumerate(split)]
    return torch.cat(groups, dim=-1)


def grid_coords(*sizes: int, device: torch.device | None = None) -> Tensor:
    """Integer coordinates of a row-major grid: `grid_coords(T, H, W)` is `(T*H*W, 3)`, columns (t, h, w)."""
    axes = [torch.arange(size, device=device) for size in sizes]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(sizes))


def rope_2d_angles(
    height: int, width: int, num_pairs: int, base: float = ROPE_BASE, *, device: torch.device | None = None
) -> Tensor:
    """OmniTokenizer's 2-D RoPE for a row-major `height x width` grid: `(height*width, num_pairs)`.

    The first half of the pairs rotates by the column index, the second half by the row index.
    """
    rows_cols = grid_coords(height, width, device=device)
    return axial_rope_angles(rows_cols.flip(-1), num_pairs, base=base)


def rope_3d_angles(
    frames: int,
    height: int,
    width: int,
    num_pairs: int,
    split: Sequence[int] | None = None,
    base: float = ROPE_BASE,
    *,
    device: torch.device | None = None,
) -> Tensor:
    """Axial (t, h, w) RoPE angles for a row-major `frames x height x width` grid: `(T*H*W, num_pairs)`.

    `split` gives the pairs per axis in (t, h, w) order; by default about thirds, remainder to t.
    """
    return axial_rope_angles(grid_coords(frames, height, width, device=device), num_pairs, split, base)


def apply_rotary(x: Tensor, angles: Tensor, *, interleaved: bool = False) -> Tensor:
    """Rotate `x (B, H, L, D)` by `angles (L, D/2)` or `(B, L, D/2)` (shared by all heads).

    Half-split pairing rotates dims `(k, k + D/2)`; `interleaved=True` rotates `(2k, 2k+1)`. The rotation runs
    in at least fp32 and returns `x.dtype`.
    """
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (B, H, L, D), got {tuple(x.shape)}")
    batch, _, length, dim = x.shape
    if dim % 2:
        raise ValueError(f"RoPE needs an even head dimension, got D={dim}")
    if angles.dim() not in (2, 3) or angles.shape[-2:] != (length, dim // 2):
        raise ValueError(
            f"expected angles of shape (L, D/2) = ({length}, {dim // 2}) or (B, L, D/2), "
            f"got {tuple(angles.shape)}"
        )
    if angles.dim() == 3 and angles.shape[0] not in (1, batch):
        raise ValueError(f"angles batch {angles.shape[0]} does not match x batch {batch}")
    dtype = _compute_dtype(x.dtype)
    angles = angles.to(dtype)
    cos, sin = angles.cos(), angles.sin()
    if angles.dim() == 3:  # one rotation per sample, shared across heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    xf = x.to(dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


def apply_rope(x: Tensor, positions: Tensor, *, base: float = ROPE_BASE, interleaved: bool = False) -> Tensor:
    """1-D RoPE of `x (B, H, L, D)` at absolute `positions (L,)` or `(B, L)` (int or fractional)."""
    if x.dim() != 4:
        raise ValueError(f"expected x of shape (B, H, L, D), got {tuple(x.shape)}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != x.shape[2]:
        raise ValueError(
            f"expected positions of shape (L,) or (B, L) with L={x.shape[2]}, got {tuple(positions.shape)}"
        )
    angles = rope_angles(positions.to(_compute_dtype(x.dtype)), x.shape[-1] // 2, base)
    return apply_rotary(x, angles, interleaved=interleaved)


def _visual_group_starts(frame_ids: Tensor, media_ids: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per token: is it text (frame id -1), and does it open a new time step.

    A text token always opens a step; a visual token opens one when it is the first token of its frame, i.e.
    when its (media, frame) differs from the previous token's.
    """
    if media_ids is not None and media_ids.shape != frame_ids.shape:
        raise ValueError(
            f"media_ids shape {tuple(media_ids.shape)} does not match frame_ids {tuple(frame_ids.shape)}"
        )
    is_text = frame_ids < 0
    new_frame = torch.ones_like(is_text)
    new_frame[..., 1:] = frame_ids[..., 1:] != frame_ids[..., :-1]
    if media_ids is not None:
        new_frame[..., 1:] |= media_ids[..., 1:] != media_ids[..., :-1]
    return is_text, is_text | new_frame


def temporal_index(frame_ids: Tensor, media_ids: Tensor | None = None) -> Tensor:
    """TC-LLaVA's temporal index tau: every text token and every frame's first token opens a new step.

    `frame_ids (L,)` or `(B, L)` holds each token's frame (or CCAM block) index, -1 for text; `media_ids`
    separates consecutive videos whose frame ids would otherwise run together. Returns int64 tau, same shape.
    Example: 3 text, 2 frames x 2 tokens, 2 text -> tau = [0, 1, 2, 3, 3, 4, 4, 5, 6].
    """
    _, opens_step = _visual_group_starts(frame_ids, media_ids)
    return opens_step.long().cumsum(-1) - 1


def tad_positions(frame_ids: Tensor, gamma: float = 1.0, media_ids: Tensor | None = None) -> Tensor:
    """TAD-RoPE dual positions `p(n) = n + gamma * tau(n)` (float64), used in every head and rotary dim.

    `gamma = 0` is vanilla RoPE; each decoded text token advances p by `1 + gamma`. Pass `.long()` to a
    consumer that needs integer ids when gamma is an integer.
    """
    tau = temporal_index(frame_ids, media_ids)
    index = torch.arange(frame_ids.shape[-1], device=frame_ids.device)
    return index.double() + gamma * tau.double()


def num_rings(height: int, width: int) -> int:
    """Number of concentric rings of a `height x width` grid: `ceil(min(h, w) / 2)` (12 for 24 x 24)."""
    return (min(height, width) + 1) // 2


def concentric_rings(rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    """CCA ring of each grid cell: `min(r, c, h-1-r, w-1-c)`; the border is ring 0, the centre the highest."""
    return torch.minimum(torch.minimum(rows, cols), torch.minimum(height - 1 - rows, width - 1 - cols))


def concentric_positions(
    frame_ids: Tensor,
    rows: Tensor,
    cols: Tensor,
    grid: tuple[int, int],
    media_ids: Tensor | None = None,
    start: int = 0,
) -> Tensor:
    """CCA position ids for text tokens and `grid = (h, w)` frames: int64, the shape of `frame_ids`.

    Text advances the position by one. Token (r, c) of a frame starting at s gets `s + ring(r, c)`, and the
    frame advances the position by `R = num_rings(h, w)`, so the next frame or text starts at `s + R`.
    `rows`/`cols` are ignored on text tokens (frame id -1). Frames must be contiguous runs of tokens.
    """
    if rows.shape != frame_ids.shape or cols.shape != frame_ids.shape:
        raise ValueError(
            f"rows {tuple(rows.shape)} and cols {tuple(cols.shape)} must match "
            f"frame_ids {tuple(frame_ids.shape)}"
        )
    height, width = grid
    is_text, opens_step = _visual_group_starts(frame_ids, media_ids)
    is_visual = ~is_text
    outside = is_visual & ((rows < 0) | (rows >= height) | (cols < 0) | (cols >= width))
    if outside.any():
        raise ValueError(f"visual tokens have (row, col) outside the {height} x {width} grid")
    # A frame's advance is charged to its last token, so an exclusive prefix sum gives each token its frame
    # start s (text tokens advance by one).
    closes_frame = torch.ones_like(is_text)
    closes_frame[..., :-1] = opens_step[..., 1:]
    advance = torch.where(is_text, 1, torch.where(closes_frame, num_rings(height, width), 0))
    frame_start = start + advance.cumsum(-1) - advance
    rings = concentric_rings(rows, cols, height, width)
    return frame_start + torch.where(is_visual, rings, 0)
