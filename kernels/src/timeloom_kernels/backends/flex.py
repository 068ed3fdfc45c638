"""``torch.nn.attention.flex_attention`` with the mask's cached ``BlockMask`` and a ``score_mod`` bias.

On CUDA it runs compiled (fused kernel, forward and backward). On CPU it runs eager, forward only: torch
raises on any CPU input that requires grad, and compiling on CPU costs ~30 s per shape, so `auto` never
picks it there (an explicit ``backend="flex"`` may, without gradients). Flex has no dropout.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem
from timeloom_kernels.masks import ScoreMod, resolve_positions

NAME = "flex"


def why_not(problem: Problem) -> str | None:
    if "flex" not in problem.available:
        return "flex_attention is not available in this torch (needs torch >= 2.5)"
    if problem.needs_probs:
        return "flex does not expose attention probabilities (processors and return_probs need 'reference')"
    if problem.dropout_p > 0:
        return "flex_attention has no dropout"
    if problem.needs_grad and problem.device_type == "cpu":
        return "flex_attention has no backward pass on CPU (inputs require grad)"
    if problem.bias_requires_grad:
        return "flex: gradients w.r.t. tensors a score_mod captures are not supported here; use 'sdpa'"
    return None


# Each mask or score_mod closure, and each grad mode, compiles its own graph. Past dynamo's default limit of 8,
# torch silently falls back to the unfused kernel that materialises every score (seen on an H200: 10-30x slower).
FLEX_RECOMPILE_LIMIT = 64


@functools.cache
def _compiled_flex():
    import torch._dynamo.config as dynamo_config
    from torch.nn.attention.flex_attention import flex_attention

    limit = (
        "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    )  # torch < 2.6
    setattr(dynamo_config, limit, max(getattr(dynamo_config, limit), FLEX_RECOMPILE_LIMIT))
    # Automatic dynamic shapes: one graph serves every length after the second, rather than one per length.
    return torch.compile(flex_attention, dynamic=None)


def _score_mod(args: AttentionArgs, q: Tensor, k: Tensor):
    if args.bias is None:
        return None
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if isinstance(args.bias, ScoreMod):
        q_pos, kv_pos = resolve_positions(args.q_pos, args.kv_pos, batch, q_len, kv_len, q.device)
        return args.bias.flex_score_mod(q_pos, kv_pos)
    table = args.bias.to(q.dtype).expand(batch, heads, q_len, kv_len)
    return lambda score, b, h, q_idx, kv_idx: score + table[b, h, q_idx, kv_idx]


def forward(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Tensor:
    from torch.nn.attention.flex_attention import flex_attention

    batch, q_heads, q_len, _ = q.shape
    block_mask = None
    if args.mask is not None:
        block_mask = args.mask.block_mask(
            batch, q_heads, q_len, k.shape[2], args.q_pos, args.kv_pos, q.device
        )
    kwargs = dict(
        score_mod=_score_mod(args, q, k),
        block_mask=block_mask,
        scale=args.scale,
        enable_gqa=q_heads != k.shape[1],
    )
    if q.device.type == "cuda":
        return _compiled_flex()(q, k, v, **kwargs)
    if not torch.is_grad_enabled():
        # torch refuses CPU inputs that *require* grad even under no_grad, where detaching changes nothing.
        q, k, v = q.detach(), k.detach(), v.detach()
    with warnings.catch_warnings():
        # Eager on CPU is deliberate (see the module docstring), so torch's "use torch.compile" hint is noise.
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, **kwargs)
