"""The reference backend: ``softmax(QKᵀ·scale + bias + mask)·V`` written out, in fp32 (fp64 stays fp64).

It is the truth every other backend is tested against, the only one that returns the probabilities, and
the one attention processors run on (they edit the logits and probabilities it exposes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem, dense_bias, repeat_kv

NAME = "reference"


def why_not(problem: Problem) -> str | None:
    """The reference serves every call."""
    return None


def masked_softmax(scores: Tensor) -> Tensor:
    """Softmax over the last dim where fully masked rows (all ``-inf``) give 0 with a zero gradient.

    ``torch.softmax`` gives NaN on such rows, and NaN poisons every gradient through the batch.
    """
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()  # the shift never changes softmax
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    return weights / total.masked_fill(total == 0, 1.0)


def attention_with_probs(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> tuple[Tensor, Tensor]:
    """Output ``(B, Hq, Lq, Dv)`` in q's dtype and probabilities ``(B, Hq, Lq, Lk)`` in the compute dtype."""
    compute = torch.promote_types(q.dtype, torch.float32)
    batch, q_heads, q_len, _ = q.shape
    groups = q_heads // k.shape[1]
    k = repeat_kv(k.to(compute), groups)
    v = repeat_kv(v.to(compute), groups)
    scores = torch.matmul(q.to(compute), k.transpose(-2, -1)) * args.scale
    bias = dense_bias(args, q, k, compute)
    if bias is not None:
        scores = scores + bias
    if args.mask is not None:
        allowed = args.mask.dense(batch, q_heads, q_len, k.shape[2], args.q_pos, args.kv_pos, q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
    if args.processor is not None:
        scores = args.processor.logits(scores)
    probs = masked_softmax(scores)
    if args.processor is not None:
        probs = args.processor.probs(probs)
    weights = F.dropout(probs, args.dropout_p) if args.dropout_p > 0 else probs
    return torch.matmul(weights, v).to(q.dtype), probs


def forward(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Tensor:
    return attention_with_probs(q, k, v, args)[0]
