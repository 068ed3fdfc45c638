"""``torch.nn.functional.scaled_dot_product_attention`` with a dense bool/float mask or ``is_causal``.

``is_causal`` is upper-left aligned when ``Lq ≠ Lk`` (flash-attn's flag is bottom-right), so it is used only
for plain causal, square, default positions; every other mask goes in densely from its predicate.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem, additive_mask, dense_bias

NAME = "sdpa"


def why_not(problem: Problem) -> str | None:
    if problem.needs_probs:
        return "sdpa does not expose attention probabilities (processors and return_probs need 'reference')"
    return None


def forward(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Tensor:
    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    bias = dense_bias(args, q, k, q.dtype)
    mask = args.mask
    is_causal = (
        bias is None
        and mask is not None
        and mask.is_plain("causal")
        and q_len == kv_len
        and args.q_pos is None
        and args.kv_pos is None
    )
    attn_mask = None
    if mask is not None and not is_causal:
        attn_mask = mask.dense(batch, q_heads, q_len, kv_len, args.q_pos, args.kv_pos, q.device)
    return F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=additive_mask(bias, attn_mask),
        dropout_p=args.dropout_p,
        is_causal=is_causal,
        scale=args.scale,
        enable_gqa=q_heads != k.shape[1],
    )
