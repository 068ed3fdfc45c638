"""EM-LLM's episodic memory pieces (Fountas et al., ICLR 2025, arXiv 2407.09450), spec §4.

A causal LM's past is cut into *events* where its surprise ``−log p(x_t | x_{<t})`` spikes, the cuts are
refined on the key-similarity graph, and each query block attends to its initial tokens, the events it
retrieves and its local window:

1. `surprise_boundaries`: a boundary at t where ``s_t > μ_t + γ·σ_t`` over the previous ``window`` tokens;
   `enforce_event_sizes` splits long events and merges short ones.
2. `refine_boundaries`: each boundary moves within ±½ of its neighbouring events to maximise the modularity
   of the split on ``A = Σ_{layers, heads} K Kᵀ`` (negatives clipped to 0); the number of events is kept.
3. `representative_tokens`: per event, the ``r`` tokens that received most attention.
4. `retrieve_events`: a similarity buffer (events whose representative keys best match the block's mean
   query, until the budget is full) and a contiguity buffer (their ±1 neighbours, a share of the budget).
5. `episodic_attention`: softmax attention through `timeloom_kernels.attend` over the selected tokens, at
   their original positions, with the causal mask.
"""

from __future__ import annotations

import torch
from timeloom_kernels import attend, masks
from torch import Tensor

__all__ = [
    "conductance",
    "enforce_event_sizes",
    "episodic_attention",
    "event_labels",
    "modularity",
    "refine_boundaries",
    "representative_tokens",
    "retrieve_events",
    "select_context",
    "similarity_graph",
    "surprise_boundaries",
]


# --------------------------------------------------------------------------------------------------------
# 1. Surprise segmentation
# --------------------------------------------------------------------------------------------------------
def surprise_boundaries(surprise: Tensor, gamma: float = 1.0, window: int = 128) -> list[int]:
    """Starts of new events: ``t`` where ``s_t > μ_t + γ·σ_t``, statistics over ``s_{t−window..t−1}``.

    ``surprise (L,)`` is ``−log p(x_t | x_{<t})``. Position 0 always starts an event; a token needs two
    earlier ones for a standard deviation. Returns sorted starts, 0 first.
    """
    if surprise.dim() != 1:
        raise ValueError(f"surprise must be (L,); got {tuple(surprise.shape)}")
    if not torch.isfinite(surprise).all():
        raise ValueError("surprise holds NaN or inf")
    starts = [0]
    for t in range(2, len(surprise)):
        past = surprise[max(0, t - window) : t].double()
        if surprise[t] > past.mean() + gamma * past.std(unbiased=False):
            starts.append(t)
    return starts


def enforce_event_sizes(starts: list[int], length: int, min_size: int = 8, max_size: int = 128) -> list[int]:
    """Merge events shorter than ``min_size`` into the one before (the first into the next), then split
    events longer than ``max_size`` into equal parts. Returns the new starts."""
    if not 1 <= min_size <= max_size:
        raise ValueError(f"need 1 ≤ min_size ≤ max_size; got {min_size}, {max_size}")
    merged = [0]
    for s in sorted(set(starts) - {0}):
        if s - merged[-1] >= min_size and length - s >= min_size:
            merged.append(s)
    result = []
    for start, end in zip(merged, merged[1:] + [length]):
        parts = -(-(end - start) // max_size)
        result.extend(start + (end - start) * i // parts for i in range(parts))
    return result


def event_labels(starts: list[int], length: int) -> Tensor:
    """``(L,)`` event index of every token."""
    labels = torch.zeros(length, dtype=torch.long)
    for s in starts[1:]:
        labels[s:] += 1
    return labels


# --------------------------------------------------------------------------------------------------------
# 2. Boundary refinement on the key-similarity graph
# --------------------------------------------------------------------------------------------------------
def similarity_graph(keys: Tensor) -> Tensor:
    """``A = Σ_{layers, heads} K Kᵀ`` with negatives clipped to 0; ``keys (…, L, d)`` → ``(L, L)``."""
    gram = keys @ keys.transpose(-1, -2)
    return gram.reshape(-1, *gram.shape[-2:]).sum(0).clamp_min(0)


def modularity(adjacency: Tensor, labels: Tensor) -> float:
    """Newman's ``Q = (1/2m) Σ_ij [A_ij − k_i k_j / 2m] δ(c_i, c_j)`` with ``2m = Σ_ij A_ij``."""
    degree = adjacency.sum(1)
    two_m = degree.sum()
    if two_m <= 0:
        return 0.0
    same = labels[:, None] == labels[None, :]
    return float(((adjacency - degree[:, None] * degree[None, :] / two_m) * same).sum() / two_m)


def conductance(adjacency: Tensor, inside: Tensor) -> float:
    """``cut(S, S̄) / min(vol S, vol S̄)`` of the token set ``inside`` (bool ``(L,)``)."""
    degree = adjacency.sum(1)
    cut = adjacency[inside][:, ~inside].sum()
    volume = torch.minimum(degree[inside].sum(), degree[~inside].sum())
    return float(cut / volume) if volume > 0 else 0.0


def refine_boundaries(adjacency: Tensor, starts: list[int]) -> list[int]:
    """Move each boundary, in order, within ±½ of its two neighbouring events to the position with the
    highest modularity of the whole split (the current position wins ties, so Q never falls)."""
    length = adjacency.shape[0]
    starts = list(starts)
    for i in range(1, len(starts)):
        before = starts[i] - starts[i - 1]
        after = (starts[i + 1] if i + 1 < len(starts) else length) - starts[i]
        low, high = starts[i] - before // 2, starts[i] + after // 2
        best, best_q = starts[i], modularity(adjacency, event_labels(starts, length))
        for candidate in range(max(low, starts[i - 1] + 1), min(high, length - 1) + 1):
            trial = starts[:i] + [candidate] + starts[i + 1 :]
            q = modularity(adjacency, event_labels(trial, length))
            if q > best_q + 1e-12:
                best, best_q = candidate, q
        starts[i] = best
    return starts


# --------------------------------------------------------------------------------------------------------
# 3–4. Representative tokens and two-stage retrieval
# --------------------------------------------------------------------------------------------------------
def representative_tokens(attention_received: Tensor, starts: list[int], r: int = 4) -> list[Tensor]:
    """Per event, the indices of its ``r`` tokens with the most attention received (ties: earlier first)."""
    length = attention_received.shape[0]
    out = []
    for start, end in zip(starts, starts[1:] + [length]):
        scores = attention_received[start:end]
        order = torch.sort(scores, descending=True, stable=True).indices[:r]
        out.append(start + order)
    return out


def retrieve_events(
    query: Tensor,
    representative_keys: list[Tensor],
    event_sizes: list[int],
    budget: int,
    contiguity: float = 0.3,
) -> tuple[list[int], list[int]]:
    """Events for a query block: ``(similarity, contiguity)`` buffers, each in temporal order.

    ``query (d,)`` is the block's mean query; ``representative_keys[e] (r, d)``. Events enter the similarity
    buffer by their best representative score until ``(1 − contiguity)·budget`` tokens are used; the ±1
    neighbours of those events fill the contiguity buffer (nearest-retrieved first) up to the rest.
    """
    if not 0 <= contiguity < 1:
        raise ValueError(f"contiguity must be in [0, 1); got {contiguity}")
    scores = torch.stack([(k @ query).max() for k in representative_keys])
    similar_budget = int(round((1 - contiguity) * budget))
    similar, used = [], 0
    for e in torch.sort(scores, descending=True, stable=True).indices.tolist():
        if used + event_sizes[e] <= similar_budget:
            similar.append(e)
            used += event_sizes[e]
    neighbours, used_c = [], 0
    for e in similar:
        for n in (e - 1, e + 1):
            if 0 <= n < len(event_sizes) and n not in similar and n not in neighbours:
                if used + used_c + event_sizes[n] <= budget:
                    neighbours.append(n)
                    used_c += event_sizes[n]
    return sorted(similar), sorted(neighbours)


def select_context(
    length: int, block_start: int, starts: list[int], retrieved: list[int], n_init: int, n_local: int
) -> Tensor:
    """Sorted token indices a query block at ``block_start`` attends to: the first ``n_init`` tokens, the
    retrieved events' tokens and the ``n_local`` tokens before the block, plus the block itself."""
    bounds = list(zip(starts, starts[1:] + [block_start]))
    chosen = set(range(min(n_init, block_start)))
    for e in retrieved:
        chosen.update(range(bounds[e][0], min(bounds[e][1], block_start)))
    chosen.update(range(max(0, block_start - n_local), length))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def episodic_attention(q: Tensor, k: Tensor, v: Tensor, block_start: int, context: Tensor) -> Tensor:
    """Attention of the block's queries ``q (B, H, n, d)`` (positions ``block_start…``) to the tokens
    ``context`` of ``k, v (B, H, L, d)``, causal on the original positions."""
    n = q.shape[2]
    q_pos = torch.arange(block_start, block_start + n)
    return attend(q, k[:, :, context], v[:, :, context], masks.causal(), q_pos=q_pos, kv_pos=context)
