"""Aaren (Feng et al., 2024, "Attention as an RNN"): softmax attention of one learned query as a prefix scan.

With scores `s_i = q . k_i * scale`, the output at t is `softmax(s_{<=t}) . v_{<=t}`. The state `(m, u, w)` is
the running max, the normaliser `sum exp(s_i - m)` and the numerator `sum exp(s_i - m) v_i`. States combine
associatively:

    (m_A, u_A, w_A) + (m_B, u_B, w_B) = (m, u_A e^(m_A - m) + u_B e^(m_B - m), w_A e^(m_A - m) + w_B e^(m_B - m)),
    m = max(m_A, m_B),

with leaves `(s_i, 1, v_i)`. The parallel form is a Hillis-Steele scan (ceil(log2 L) steps); the streaming form
is the same op called on one token at a time with the carried state, which is O(1) in the sequence length.
Only differences `s - m <= 0` are ever exponentiated, so logits of any size are safe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from timeloom_kernels.linear._checks import check_backend, check_state, state_dtype
from timeloom_kernels.linear.naive import sequential_aaren_scan

BACKENDS = ("auto", "scan", "recurrent")


class AarenState(NamedTuple):
    """Running max `m (B, H)`, normaliser `u (B, H)` and numerator `w (B, H, Dv)`."""

    max: Tensor
    normalizer: Tensor
    numerator: Tensor


def combine(earlier: AarenState, later: AarenState) -> AarenState:
    """The associative operator: the state of the concatenated prefix `earlier ++ later` (broadcasts)."""
    m = torch.maximum(earlier.max, later.max)
    scale_earlier, scale_later = (earlier.max - m).exp(), (later.max - m).exp()
    return AarenState(
        m,
        earlier.normalizer * scale_earlier + later.normalizer * scale_later,
        earlier.numerator * scale_earlier[..., None] + later.numerator * scale_later[..., None],
    )


def hillis_steele_scan(leaves: AarenState) -> AarenState:
    """Inclusive prefix scan over the token axis (dim 2) in ceil(log2 L) steps of `combine`."""
    state = leaves
    length = leaves.max.shape[2]
    offset = 1
    while offset < length:
        earlier = AarenState(*(x[:, :, :-offset] for x in state))
        later = AarenState(*(x[:, :, offset:] for x in state))
        merged = combine(earlier, later)
        # the first `offset` prefixes are already complete
        state = AarenState(
            *(torch.cat((done[:, :, :offset], new), dim=2) for done, new in zip(state, merged))
        )
        offset *= 2
    return state


def _final(scanned: AarenState) -> AarenState:
    """The state after the last token of a scanned sequence."""
    return AarenState(*(x[:, :, -1] for x in scanned))


def aaren_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    scale: float | None = None,
    causal: bool = True,
    initial_state: AarenState | None = None,
    output_final_state: bool = False,
    backend: str = "auto",
) -> tuple[Tensor, AarenState | None]:
    """Aaren: every prefix's softmax attention for one query per head.

    Args:
        q: the learned query, `(B, H, 1, Dk)` (B may be 1 and broadcasts). k: `(B, H, L, Dk)`. v: `(B, H, L, Dv)`.
        scale: score scale, default `Dk^-1/2`.
        causal: False gives every token the attention over the whole sequence.
        initial_state: an `AarenState` carried from an earlier call (streaming); None is the empty prefix.
        output_final_state: also return the state after the last token.
        backend: `scan` (Hillis-Steele, default for `auto`) or the sequential reference `recurrent`.

    Returns:
        `(o, state)`: o `(B, H, L, Dv)` in v's dtype; state in at least fp32, or None.
    """
    check_backend(backend, BACKENDS)
    if k.dim() != 4 or v.dim() != 4 or k.shape[:3] != v.shape[:3] or k.shape[2] == 0:
        raise ValueError(
            f"expected k (B, H, L, Dk) and v (B, H, L, Dv) with L >= 1, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    batch, heads, length, dim_k = k.shape
    if q.dim() != 4 or q.shape[1:] != (heads, 1, dim_k) or q.shape[0] not in (1, batch):
        raise ValueError(
            f"expected one query per head of shape ({batch} or 1, {heads}, 1, {dim_k}), got {tuple(q.shape)}"
        )
    dtype = state_dtype(v.dtype)
    scale = dim_k**-0.5 if scale is None else scale
    scores = (k.to(dtype) @ q.to(dtype).transpose(-1, -2)).squeeze(-1) * scale  # (B, H, L)
    values = v.to(dtype)
    if initial_state is not None:
        check_state(initial_state.max, (batch, heads), "initial_state.max")
        check_state(initial_state.normalizer, (batch, heads), "initial_state.normalizer")
        check_state(initial_state.numerator, (batch, heads, v.shape[-1]), "initial_state.numerator")
        initial_state = AarenState(*(x.to(dtype) for x in initial_state))

    if not causal:
        m = scores.amax(dim=2)
        weights = (scores - m[..., None]).exp()
        final = AarenState(m, weights.sum(dim=2), torch.einsum("bhl,bhle->bhe", weights, values))
        if initial_state is not None:
            final = combine(initial_state, final)
        output = (final.numerator / final.normalizer[..., None])[:, :, None].expand(batch, heads, length, -1)
        return output.to(v.dtype), final if output_final_state else None

    if backend == "recurrent":
        output, final = sequential_aaren_scan(scores, values, initial_state)
        final = AarenState(*final)
    else:
        prefixes = hillis_steele_scan(AarenState(scores, torch.ones_like(scores), values))
        if initial_state is not None:
            prefixes = combine(AarenState(*(x[:, :, None] for x in initial_state)), prefixes)
        output = prefixes.numerator / prefixes.normalizer[..., None]
        final = _final(prefixes)
    return output.to(v.dtype), final if output_final_state else None
