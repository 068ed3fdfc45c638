"""SDPA over query tiles, each against only the span of keys its rows may see: exact block sparsity.

For every tile of ``TILE_ROWS`` queries, the mask's dense form gives the first and last key any of its rows
may attend to; the tile runs SDPA on that key span alone, with no mask at all when the span is fully
allowed (e.g. block-causal by frame: a frame's queries see a key prefix). Work shrinks with the mask's
density, so on CPU (where flex has no backward and compiles slowly) it is the fast exact path for
structured video masks, forward and backward. Tiles whose rows see nothing output 0.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem, additive_mask, dense_bias

NAME = "tiled"
TILE_ROWS = 128


def why_not(problem: Problem) -> str | None:
    if problem.needs_probs:
        return "tiled does not expose attention probabilities (processors and return_probs need 'reference')"
    if problem.mask is None:
        return "tiled skips masked key spans, and there is no mask: every tile would see every key (use sdpa)"
    return None


def _rows(t: Tensor | None, rows: slice) -> Tensor | None:
    """Rows of a ``(.., Lq|1, Lk|1)`` mask or bias, keeping broadcast dims as they are."""
    return t if t is None or t.shape[-2] == 1 else t[..., rows, :]


def _keys(t: Tensor | None, keys: slice) -> Tensor | None:
    return t if t is None or t.shape[-1] == 1 else t[..., keys]


def key_spans(allowed: Tensor, tile_rows: int) -> list[tuple[slice, slice, bool]]:
    """For each query tile of ``allowed (B|1, H|1, Lq, Lk)``: (rows, keys, whether every pair is allowed).

    ``keys`` is the smallest span holding every allowed key of the tile's rows (empty when none is).
    Neighbouring tiles with the same span and flag merge into one (e.g. all tiles of one frame under a
    block-causal mask), so fewer, larger SDPA calls run. Remembered per mask tensor (masks are cached and
    shared between layers, so one forward plans once).
    """
    key = (id(allowed), tile_rows)
    cached = _plans.get(key)
    if cached is not None and cached[0]() is allowed:
        return cached[1]
    spans = _plan(allowed, tile_rows)
    if len(_plans) >= _MAX_PLANS:
        _plans.pop(next(iter(_plans)))
    _plans[key] = (weakref.ref(allowed), spans)
    return spans


_MAX_PLANS = 64
_plans: dict[tuple[int, int], tuple[weakref.ref, list[tuple[slice, slice, bool]]]] = {}


def _plan(allowed: Tensor, tile_rows: int) -> list[tuple[slice, slice, bool]]:
    q_len = allowed.shape[-2]
    spans: list[tuple[slice, slice, bool]] = []
    for start in range(0, q_len, tile_rows):
        rows = slice(start, min(start + tile_rows, q_len))
        tile = allowed[..., rows, :]
        columns = tile.flatten(0, -2).any(dim=0).nonzero()
        if len(columns) == 0:
            keys, all_allowed = slice(0, 0), False
        else:
            keys = slice(int(columns[0]), int(columns[-1]) + 1)
            all_allowed = bool(tile[..., keys].all())
        if spans and spans[-1][1:] == (keys, all_allowed):
            spans[-1] = (slice(spans[-1][0].start, rows.stop), keys, all_allowed)
        else:
            spans.append((rows, keys, all_allowed))
    return spans


def skipped_fraction(allowed: Tensor, tile_rows: int = TILE_ROWS) -> float:
    """The share of the ``Lq × Lk`` scores that tiling skips: what ``auto`` weighs against per-tile cost."""
    q_len, kv_len = allowed.shape[-2:]
    computed = sum(
        (rows.stop - rows.start) * (keys.stop - keys.start) for rows, keys, _ in key_spans(allowed, tile_rows)
    )
    return 1.0 - computed / (q_len * kv_len)


def forward(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Tensor:
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    allowed = args.mask.dense(batch, q_heads, q_len, kv_len, args.q_pos, args.kv_pos, q.device)
    bias = dense_bias(args, q, k, q.dtype)
    outputs = []
    for rows, keys, all_allowed in key_spans(allowed, TILE_ROWS):
        q_tile = q[:, :, rows]
        if keys.stop == keys.start:
            outputs.append(q_tile.new_zeros(*q_tile.shape[:-1], v.shape[-1]))
            continue
        tile_allowed = None if all_allowed else _keys(_rows(allowed, rows), keys)
        attn_mask = additive_mask(_keys(_rows(bias, rows), keys), tile_allowed)
        outputs.append(
            F.scaled_dot_product_attention(
                q_tile,
                k[:, :, keys],
                v[:, :, keys],
                attn_mask=attn_mask,
                dropout_p=args.dropout_p,
                scale=args.scale,
                enable_gqa=q_heads != k.shape[1],
            )
        )
    return torch.cat(outputs, dim=2)
