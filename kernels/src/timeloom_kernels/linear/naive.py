"""Readable references for the linear/recurrent attention ops: token loops and closed forms.

They are the oracles the chunked forms are tested against, and the `recurrent`/`quadratic` backends of each op.
Layout `(B, H, L, D)`; states are `(B, H, Dk, Dv)`. No input checking here: the public ops check.
"""

from __future__ import annotations

import torch
from torch import Tensor


def recurrent_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Token loop `S_t = exp(g_t) * S_{t-1} + k_t^T v_t`, `o_t = q_t S_t`; returns `(o, S_L)`.

    `log_decay` g broadcasts to `(B, H, L, Dk)`: one gate per key channel (gated linear attention), or one per
    head for Lightning Attention's `log lambda`. None means no decay.
    """
    batch, heads, length, dim_k = q.shape
    state = q.new_zeros(batch, heads, dim_k, v.shape[-1]) if initial_state is None else initial_state
    if log_decay is not None:
        gates = log_decay.exp().expand(batch, heads, length, dim_k)
    outputs = []
    for t in range(length):
        if log_decay is not None:
            state = gates[:, :, t, :, None] * state
        state = state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhd,bhde->bhe", q[:, :, t], state))
    return torch.stack(outputs, dim=2), state


def quadratic_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Closed form `O = [(Q K^T) * D] V` with `D_ts = prod_{s<u<=t} exp(g_u)` for t >= s, plus the initial state.

    Needs finite gates. Memory is O(L^2 Dk): an oracle, not a kernel.
    """
    batch, heads, length, dim_k = q.shape
    gates = q.new_zeros(()) if log_decay is None else log_decay
    cumulative = gates.expand(batch, heads, length, dim_k).cumsum(dim=2)  # log prod_{u<=t} exp(g_u)
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    log_weights = cumulative[:, :, :, None, :] - cumulative[:, :, None, :, :]  # (B, H, t, s, Dk)
    weights = log_weights.masked_fill(~causal[:, :, None], float("-inf")).exp()
    scores = torch.einsum("bhtd,bhsd,bhtsd->bhts", q, k, weights)
    output = scores @ v
    last = cumulative[:, :, -1:, :]
    final_state = torch.einsum("bhsd,bhse->bhde", k * (last - cumulative).exp(), v)
    if initial_state is not None:
        output = output + (q * cumulative.exp()) @ initial_state
        final_state = final_state + last.transpose(-1, -2).exp() * initial_state
    return output, final_state


def closed_form_lightnet_attention(
    q: Tensor, k: Tensor, v: Tensor, initial_state: Tensor, initial_lse: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """LightNet, written out: `S_t = exp(z0 - z_t) S_0 + sum_{s<=t} exp(k_s - z_t) v_s` per key channel.

    `z_t = log(exp(z0) + sum_{s<=t} exp(k_s))`: each channel's state is a softmax-weighted running mean of the
    values. Returns `(o, S_L, z_L)`.
    """
    length = q.shape[2]
    lse = torch.logcumsumexp(torch.cat((initial_lse[:, :, None], k), dim=2), dim=2)[:, :, 1:]
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    log_weights = k[:, :, None, :, :] - lse[:, :, :, None, :]  # (B, H, t, s, Dk)
    weights = log_weights.masked_fill(~causal[:, :, None], float("-inf")).exp()
    carried = (initial_lse[:, :, None] - lse).exp()
    output = torch.einsum("bhtd,bhtsd,bhse->bhte", q, weights, v) + (q * carried) @ initial_state
    final_lse = lse[:, :, -1]
    final_state = torch.einsum("bhsd,bhse->bhde", (k - final_lse[:, :, None]).exp(), v)
    final_state = final_state + carried[:, :, -1, :, None] * initial_state
    return output, final_state, final_lse


def sequential_aaren_scan(
    scores: Tensor, v: Tensor, initial: tuple[Tensor, Tensor, Tensor] | None = None
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """Aaren's many-to-many RNN, one token at a time: `o_t = softmax(s_{<=t}) . v_{<=t}`.

    State `(m, u, w)`: running max of the scores, normaliser and numerator, both relative to `exp(m)`.
    `scores (B, H, L)`, `v (B, H, L, Dv)`; returns `(o, (m_L, u_L, w_L))`.
    """
    if initial is None:
        m = scores[:, :, 0]
        u = torch.ones_like(m)
        w = v[:, :, 0]
        start = 1
        outputs = [w]
    else:
        m, u, w = initial
        start = 0
        outputs = []
    for t in range(start, scores.shape[2]):
        s_t = scores[:, :, t]
        m_new = torch.maximum(m, s_t)
        old_scale, new_scale = (m - m_new).exp(), (s_t - m_new).exp()
        u = u * old_scale + new_scale
        w = w * old_scale[..., None] + v[:, :, t] * new_scale[..., None]
        m = m_new
        outputs.append(w / u[..., None])
    return torch.stack(outputs, dim=2), (m, u, w)
