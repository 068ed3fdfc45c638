"""LightNet's additive linear recurrence (Qin et al., 2024, "You Only Scan Once").

With `delta_t = exp(k_t)` per key channel and `g_t = sum_{s<=t} delta_s`, the state is

    S_t = (g_{t-1} / g_t) S_{t-1} + (delta_t / g_t) v_t  =  sum_{s<=t} (delta_s / g_t) v_s,

i.e. each key channel holds a softmax-weighted running mean of the values, and `o_t = q_t S_t`. In log space,
`z_t = log g_t = logcumsumexp(k)` (fp32), the effective key is `exp(k_t - z_t)` and the per-channel log-decay is
`z_{t-1} - z_t`: gated linear attention with data-dependent gates. The sum is order independent, so one pass
gives the global (non-causal) state.

The op takes q as it comes: LightNet passes q through SiLU, but that is the model layer's feature map (xmixers
makes it configurable), not part of the recurrence. The carried state is `(S, z)`: the running log-normaliser
is part of it, otherwise two chained calls would not equal one. An empty prefix has `z = -inf`
(xmixers starts from `z = 0`, i.e. one unit of extra mass; pass `LightNetState(zeros, zeros)` to match it).

Every weight `exp(k_s - z_t)` with s <= t is <= 1, and the chunked form only ever exponentiates such
differences, so it cannot overflow whatever the keys do. The price is an intra-block tensor of
`B*H*C*C*Dk` values per block of C tokens (kept for backward under autograd): pick a smaller `chunk_size` for
long training inputs on CPU; fla's `chunk_gla` is the GPU route.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from timeloom_kernels.linear._checks import (
    check_backend,
    check_chunk_size,
    check_qkv,
    check_state,
    state_dtype,
)
from timeloom_kernels.linear.naive import closed_form_lightnet_attention, recurrent_linear_attention

BACKENDS = ("auto", "chunk", "recurrent", "quadratic")


class LightNetState(NamedTuple):
    """The recurrent state: `kv (B, H, Dk, Dv)` and the running log-normaliser `lse (B, H, Dk)`."""

    kv: Tensor
    lse: Tensor


def _chunked(
    q: Tensor, k: Tensor, v: Tensor, state: Tensor, lse: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Block loop: intra-block pairwise weights, inter-block through the carried state. `lse (B, H, L+1, Dk)`."""
    length = q.shape[2]
    outputs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        entering_lse, block_lse = lse[:, :, start : start + 1], lse[:, :, start + 1 : end + 1]
        causal = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).tril()
        # log exp(k_s - z_t) as (B, H, t, s, Dk): <= 0 wherever s <= t, so exp never overflows
        log_weights = kc[:, :, None, :, :] - block_lse[:, :, :, None, :]
        weights = log_weights.masked_fill(~causal[:, :, None], float("-inf")).exp()
        scores = torch.einsum("bhtd,bhtsd->bhts", qc, weights)
        outputs.append(scores @ vc + (qc * (entering_lse - block_lse).exp()) @ state)
        end_lse = block_lse[:, :, -1:]
        state = (entering_lse - end_lse).transpose(-1, -2).exp() * state
        state = state + (kc - end_lse).exp().transpose(-1, -2) @ vc
    return torch.cat(outputs, dim=2), state


def lightnet_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    initial_state: LightNetState | None = None,
    output_final_state: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, LightNetState | None]:
    """LightNet's additive recurrence: `o_t = q_t sum_{s<=t} softmax_{s<=t}(k_s) v_s`, per key channel.

    Args:
        q: `(B, H, L, Dk)`, used as given (the model applies SiLU). k: `(B, H, L, Dk)` raw logits, `delta = exp(k)`.
        v: `(B, H, L, Dv)`.
        causal: False gives every token the global state (order independent).
        initial_state: a `LightNetState` carried from an earlier call; None is the empty prefix.
        output_final_state: also return the state after the last token.
        chunk_size: block length of the chunked form; L need not be a multiple of it.
        backend: `chunk` (default for `auto`), or the references `recurrent` (token loop) and `quadratic`
            (closed form).

    Returns:
        `(o, state)`: o `(B, H, L, Dv)` in q's dtype; state in at least fp32, or None.
    """
    check_qkv(q, k, v)
    check_chunk_size(chunk_size)
    check_backend(backend, BACKENDS)
    batch, heads, length, dim_k = q.shape
    dtype = state_dtype(q.dtype)
    qf, kf, vf = q.to(dtype), k.to(dtype), v.to(dtype)
    if initial_state is None:
        state = qf.new_zeros(batch, heads, dim_k, v.shape[-1])
        initial_lse = qf.new_full((batch, heads, dim_k), float("-inf"))
    else:
        check_state(initial_state.kv, (batch, heads, dim_k, v.shape[-1]), "initial_state.kv")
        check_state(initial_state.lse, (batch, heads, dim_k), "initial_state.lse")
        state, initial_lse = initial_state.kv.to(dtype), initial_state.lse.to(dtype)

    if not causal:
        final_lse = torch.logsumexp(torch.cat((initial_lse[:, :, None], kf), dim=2), dim=2)
        state = (initial_lse - final_lse)[..., None].exp() * state
        state = state + (kf - final_lse[:, :, None]).exp().transpose(-1, -2) @ vf
        output = (qf @ state).to(q.dtype)
        return output, LightNetState(state, final_lse) if output_final_state else None

    if backend == "quadratic":
        output, state, final_lse = closed_form_lightnet_attention(qf, kf, vf, state, initial_lse)
        return output.to(q.dtype), LightNetState(state, final_lse) if output_final_state else None

    lse = torch.logcumsumexp(torch.cat((initial_lse[:, :, None], kf), dim=2), dim=2)  # z_0 .. z_L
    if backend == "recurrent":
        gated_keys = (kf - lse[:, :, 1:]).exp()
        output, state = recurrent_linear_attention(qf, gated_keys, vf, lse[:, :, :-1] - lse[:, :, 1:], state)
    else:
        output, state = _chunked(qf, kf, vf, state, lse, chunk_size)
    return output.to(q.dtype), LightNetState(state, lse[:, :, -1]) if output_final_state else None
