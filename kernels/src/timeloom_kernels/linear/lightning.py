"""Lightning Attention-2 (Qin et al., 2024): linear attention with a per-head decay, computed in blocks.

Recurrence: `S_t = lambda * S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`, one `lambda in (0, 1]` per head. There is no
softmax and no scale: TransNormer layers normalise the output afterwards.

The chunked form splits the sequence into blocks of `chunk_size` tokens. Inside a block the output is a masked
matmul `[(Q_i K_i^T) * M] V_i` with `M_ts = lambda^(t-s)` for t >= s; across blocks it is `Lambda Q_i KV` with
the state entering the block. Within a step of `SEGMENT_BLOCKS` blocks everything is a batched matmul,
including the state recurrence `KV <- lambda^B KV + U_i`, unrolled into a small decay matrix over blocks; steps
run in sequence, passing the state. Gradients come from autograd (fla's Triton kernel is the GPU route).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from timeloom_kernels.linear._checks import (
    check_backend,
    check_chunk_size,
    check_qkv,
    check_state,
    state_dtype,
)
from timeloom_kernels.linear.naive import quadratic_linear_attention, recurrent_linear_attention

BACKENDS = ("auto", "chunk", "recurrent", "quadratic")
# Blocks batched per step of the chunked form. Bounding the step keeps its working set (intra scores, states)
# cache-sized, so the cost per token stays nearly flat in L: on 2 CPU cores, time(16384)/time(1024) is ~19 with
# 8 blocks of 64 per step, ~22 with 16 and ~75 with the whole sequence in one step.
SEGMENT_BLOCKS = 8


def alibi_decay(num_heads: int, layer: int | None = None, num_layers: int | None = None) -> Tensor:
    """Per-head decays `lambda_h = exp(-slope_h)` with ALiBi slopes `slope_h = 2^(-8(h+1)/H)`.

    With `layer`/`num_layers`, slopes are scaled by `1 - layer/(num_layers-1) + 1e-5` as in TransNormerLLM's
    code, so deeper layers decay less. Returns float32 `(H,)`.
    """
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)
    if layer is not None:
        if num_layers is None or num_layers < 2 or not 0 <= layer < num_layers:
            raise ValueError(
                f"expected 0 <= layer < num_layers with num_layers >= 2, got {layer}, {num_layers}"
            )
        slopes = slopes * (1 - layer / (num_layers - 1) + 1e-5)
    return torch.exp(-slopes).float()


def _log_decay(decay: Tensor | float | None, heads: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """`log lambda` as `(1, H, 1, 1)` after checking `lambda in (0, 1]`."""
    if decay is None:
        return torch.zeros(1, heads, 1, 1, dtype=dtype, device=device)
    if not torch.is_tensor(decay):
        if not 0 < decay <= 1:
            raise ValueError(f"decay must lie in (0, 1], got {decay}")
        return torch.full((1, heads, 1, 1), math.log(decay), dtype=dtype, device=device)
    if decay.shape not in ((heads,), (1,), ()):
        raise ValueError(
            f"expected a decay per head of shape ({heads},) or a scalar, got {tuple(decay.shape)}"
        )
    if bool(((decay <= 0) | (decay > 1)).any()):
        raise ValueError("decay must lie in (0, 1] for every head")
    return decay.to(dtype).log().reshape(1, -1, 1, 1).expand(1, heads, 1, 1)


def _decay_powers(rows: int, cols: int, log_lambda: Tensor, step: int, offset: int) -> Tensor:
    """`lambda^(step * (i - j - offset))` where `i - j >= offset`, else 0, as `(1, H, rows, cols)`."""
    index = torch.arange(max(rows, cols), device=log_lambda.device, dtype=log_lambda.dtype)
    gap = index[:rows, None] - index[None, :cols] - offset
    return (gap.clamp(min=0) * (step * log_lambda)).exp() * (gap >= 0)


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, state: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Blocks of exactly `chunk` tokens (L % chunk == 0); returns `(o, state after the last token)`."""
    batch, heads, length, dim_k = q.shape
    blocks = length // chunk
    qc, kc, vc = (x.reshape(batch, heads, blocks, chunk, x.shape[-1]) for x in (q, k, v))
    log_lambda = log_decay.reshape(1, heads, 1, 1)
    intra_decay = _decay_powers(chunk, chunk, log_lambda, step=1, offset=0)  # lambda^(t-s), t >= s
    output = ((qc @ kc.transpose(-1, -2)) * intra_decay[:, :, None]) @ vc

    # Token s of a block reaches the block's end state decayed by lambda^(C-1-s); query t sees the entering
    # state decayed by lambda^(t+1). The state entering block c is lambda^(Cc) S_0 + sum_{j<c} lambda^(C(c-1-j))
    # U_j: one small matmul over blocks instead of a loop (row `blocks` is the final state).
    index = torch.arange(chunk, device=q.device, dtype=q.dtype)[:, None]
    key_decay = ((chunk - 1 - index) * log_lambda).exp()[:, :, None]  # (1, H, 1, C, 1)
    query_decay = ((index + 1) * log_lambda).exp()[:, :, None]
    contributions = (kc * key_decay).transpose(-1, -2) @ vc  # U: (B, H, n, Dk, Dv)
    transfer = _decay_powers(blocks + 1, blocks, log_lambda, step=chunk, offset=1)[0]
    carried = _decay_powers(blocks + 1, 1, log_lambda, step=chunk, offset=0)[..., None]  # lambda^(Cc)
    states = torch.einsum("hcj,bhjde->bhcde", transfer, contributions) + carried * state[:, :, None]
    output = output + (qc * query_decay) @ states[:, :, :-1]
    return output.reshape(batch, heads, length, v.shape[-1]), states[:, :, -1]


def lightning_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    decay: Tensor | float | None = None,
    *,
    causal: bool = True,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Lightning Attention-2: `o_t = q_t S_t`, `S_t = lambda_h S_{t-1} + k_t^T v_t`.

    Args:
        q, k: `(B, H, L, Dk)`; v: `(B, H, L, Dv)`. Any feature map (e.g. SiLU) is applied by the caller.
        decay: `lambda` per head, `(H,)` tensor or a float in (0, 1]; None means 1 (no decay). Differentiable.
        causal: False computes `O = Q (S_0 + K^T V)`, which has no decay: pass `decay=None`.
        initial_state: `(B, H, Dk, Dv)` state before the first token.
        output_final_state: also return the state after the last token (else None).
        chunk_size: block length of the chunked form; L need not be a multiple of it.
        backend: `chunk` (default for `auto`), or the references `recurrent` (token loop) and `quadratic`.

    Returns:
        `(o, S_L)`: o `(B, H, L, Dv)` in q's dtype, S_L in at least fp32.
    """
    check_qkv(q, k, v)
    check_chunk_size(chunk_size)
    check_backend(backend, BACKENDS)
    batch, heads, length, dim_k = q.shape
    dtype = state_dtype(q.dtype)
    state_shape = (batch, heads, dim_k, v.shape[-1])
    if initial_state is not None:
        check_state(initial_state, state_shape)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    state = initial_state.to(dtype) if initial_state is not None else qf.new_zeros(state_shape)

    if not causal:
        if decay is not None:
            raise ValueError(
                "non-causal lightning attention O = Q(S_0 + K^T V) has no decay; pass decay=None"
            )
        state = state + kf.transpose(-1, -2) @ vf
        return (qf @ state).to(q.dtype), state if output_final_state else None

    log_decay = _log_decay(decay, heads, dtype, q.device)
    if backend == "recurrent":
        output, state = recurrent_linear_attention(qf, kf, vf, log_decay, state)
    elif backend == "quadratic":
        output, state = quadratic_linear_attention(qf, kf, vf, log_decay, state)
    else:
        # Segments of whole blocks, then the remainder as one shorter block: no padding ever decays the state.
        whole = length - length % chunk_size
        segment = SEGMENT_BLOCKS * chunk_size
        bounds = [(start, min(start + segment, whole)) for start in range(0, whole, segment)]
        if whole < length:
            bounds.append((whole, length))
        output = qf.new_empty(batch, heads, length, v.shape[-1])
        for start, end in bounds:
            block = chunk_size if end <= whole else end - start
            output[:, :, start:end], state = _chunked(
                qf[:, :, start:end], kf[:, :, start:end], vf[:, :, start:end], log_decay, state, block
            )
    return output.to(q.dtype), state if output_final_state else None
