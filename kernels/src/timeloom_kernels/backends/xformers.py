"""xformers ``memory_efficient_attention`` for masks with an exact ``attn_bias`` class.

A wheel built for another torch imports fine but cannot load its kernels, so availability is decided by
running a tiny op (once per device type), never by importing. xformers has no CPU kernels.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem, dense_bias, repeat_kv

NAME = "xformers"
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.cache
def probe(device_type: str) -> str | None:
    """None when xformers' kernels run on ``device_type``; otherwise why not."""
    try:
        import xformers.ops as xops
    except Exception as error:  # a broken install can fail with more than ImportError
        return f"xformers is not importable: {error}"
    dtype = torch.float16 if device_type == "cuda" else torch.float32
    x = torch.zeros(1, 8, 1, 16, device=device_type, dtype=dtype)
    try:
        xops.memory_efficient_attention(x, x, x)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"xformers kernels do not run on {device_type}: {first_line}"
    return None


def why_not(problem: Problem) -> str | None:
    if "xformers" not in problem.available:
        return probe(problem.device_type) or f"xformers is not available on {problem.device_type}"
    if problem.needs_probs:
        return (
            "xformers does not expose attention probabilities (processors and return_probs need 'reference')"
        )
    if problem.dtype not in _DTYPES:
        return f"xformers supports {_DTYPES}, got {problem.dtype}"
    if problem.mask is not None and not problem.xformers_exact:
        return f"mask {problem.mask!r} has no exact xformers attn_bias for this layout"
    if problem.bias != "none" and not (problem.mask is None or problem.plain_causal_square):
        return (
            "xformers combines a bias only with no mask or square causal (LowerTriangularMaskWithTensorBias)"
        )
    return None


def _aligned(bias: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """xformers needs the bias' last-dim stride aligned to 8: copy into a padded buffer and slice."""
    batch, heads, q_len, kv_len = shape
    padded = bias.new_empty(batch, heads, q_len, (kv_len + 7) // 8 * 8)
    padded[..., :kv_len] = bias
    return padded[..., :kv_len]


def forward(q: Tensor, k: Tensor, v: Tensor, args: AttentionArgs) -> Tensor:
    import xformers.ops as xops
    from xformers.ops.fmha import attn_bias

    batch, q_heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    groups = q_heads // k.shape[1]
    # xformers' layout is (B, L, H, D); GQA is served by repeating kv heads.
    q_, k_, v_ = q.transpose(1, 2), repeat_kv(k, groups).transpose(1, 2), repeat_kv(v, groups).transpose(1, 2)
    bias_object = None
    if args.mask is not None:
        bias_object = args.mask.xformers_bias(batch, q_heads, q_len, kv_len, args.q_pos, args.kv_pos)
    tensor_bias = dense_bias(args, q, k, q.dtype)
    if tensor_bias is not None:
        tensor_bias = _aligned(tensor_bias, (batch, q_heads, q_len, kv_len))
        bias_object = (
            tensor_bias if bias_object is None else attn_bias.LowerTriangularMaskWithTensorBias(tensor_bias)
        )
    folded = isinstance(bias_object, attn_bias.BlockDiagonalMask)
    if folded:  # block-diagonal biases describe the whole batch as one sequence
        q_, k_, v_ = (x.reshape(1, -1, *x.shape[2:]) for x in (q_, k_, v_))
    out = xops.memory_efficient_attention(
        q_, k_, v_, attn_bias=bias_object, p=args.dropout_p, scale=args.scale
    )
    if folded:
        out = out.reshape(batch, q_len, *out.shape[2:])
    return out.transpose(1, 2)
