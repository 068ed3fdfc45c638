"""EM-LLM pieces (spec §4): segmentation, refinement, retrieval, and attention over the selected context."""

import math

import pytest
import torch
from timeloom_memory.em_llm import (
    conductance,
    enforce_event_sizes,
    episodic_attention,
    event_labels,
    modularity,
    refine_boundaries,
    representative_tokens,
    retrieve_events,
    select_context,
    similarity_graph,
    surprise_boundaries,
)


def test_planted_surprise_spikes_are_exactly_the_boundaries():
    g = torch.Generator().manual_seed(0)
    surprise = 1.0 + 0.05 * torch.rand(200, generator=g, dtype=torch.float64)
    spikes = [17, 60, 61 + 40, 150]
    surprise[spikes] = 5.0
    # Uniform noise never exceeds μ + √3·σ, so γ = 2 leaves only the spikes.
    assert surprise_boundaries(surprise, gamma=2.0, window=32) == [0, *spikes]
    flat = torch.ones(200, dtype=torch.float64)
    flat[spikes] = 5.0
    assert surprise_boundaries(flat, gamma=1.0, window=32) == [0, *spikes]


def test_event_sizes_are_enforced():
    starts = enforce_event_sizes([0, 3, 20, 24, 305], length=310, min_size=8, max_size=128)
    sizes = [b - a for a, b in zip(starts, starts[1:] + [310])]
    assert starts[0] == 0 and all(8 <= s <= 128 for s in sizes), (starts, sizes)
    assert 3 not in starts and 24 not in starts and 305 not in starts  # short events merged
    assert starts == [0, 20, 116, 213]  # 20..310 split into three equal parts
    assert sum(sizes) == 310


def test_refinement_recovers_a_planted_partition_and_never_lowers_modularity():
    plant = [0, 12, 30, 41]
    labels = event_labels(plant, 56)
    g = torch.Generator().manual_seed(0)
    adjacency = (labels[:, None] == labels[None, :]).double() + 0.05 * torch.rand(56, 56, generator=g)
    adjacency = (adjacency + adjacency.T) / 2
    guess = [0, 16, 26, 45]
    before = modularity(adjacency, event_labels(guess, 56))
    refined = refine_boundaries(adjacency, guess)
    assert refined == plant
    assert modularity(adjacency, event_labels(refined, 56)) >= before
    inside = labels == 0
    assert conductance(adjacency, inside) < conductance(adjacency, event_labels(guess, 56) == 0)


def test_similarity_graph_sums_layers_and_heads_and_clips_negatives():
    keys = torch.randn(2, 3, 10, 4, dtype=torch.float64)
    graph = similarity_graph(keys)
    expected = sum(keys[layer, h] @ keys[layer, h].T for layer in range(2) for h in range(3)).clamp_min(0)
    torch.testing.assert_close(graph, expected)


def test_a_query_equal_to_a_representative_key_retrieves_its_event_and_neighbours():
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(6, 2, 16, generator=g, dtype=torch.float64), dim=-1)
    sizes = [10] * 6
    similar, neighbours = retrieve_events(keys[3, 1], list(keys), sizes, budget=30, contiguity=0.3)
    assert 3 in similar and sum(sizes[e] for e in similar) <= 21
    assert set(neighbours) <= {2, 4} and neighbours  # the ±1 neighbours of event 3 within the budget


def test_representative_tokens_received_most_attention():
    received = torch.tensor([0.1, 0.9, 0.3, 0.2, 0.8, 0.7, 0.05, 0.4])
    reps = representative_tokens(received, [0, 4], r=2)
    assert reps[0].tolist() == [1, 2] and reps[1].tolist() == [4, 5]


def test_a_budget_covering_all_history_equals_full_causal_attention():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    starts, block = [0, 9, 20], 32
    context = select_context(40, block, starts, retrieved=[0, 1, 2], n_init=2, n_local=4)
    assert context.tolist() == list(range(40))
    got = episodic_attention(q[:, :, block:], k, v, block, context)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    full = torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ v
    torch.testing.assert_close(got, full[:, :, block:], atol=1e-12, rtol=0)


def test_episodic_attention_is_causal_and_reads_only_the_selected_tokens():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    context = select_context(40, 32, [0, 9, 20], retrieved=[1], n_init=2, n_local=4)
    assert context.tolist() == [0, 1, *range(9, 20), *range(28, 40)]
    out = episodic_attention(q[:, :, 32:], k, v, 32, context)
    changed = v.clone()
    changed[:, :, 36:] += 1.0  # the future of queries 32..35
    changed[:, :, 2:9] += 1.0  # tokens of an event that was not retrieved
    out_changed = episodic_attention(q[:, :, 32:], k, changed, 32, context)
    torch.testing.assert_close(out[:, :, :4], out_changed[:, :, :4], atol=1e-12, rtol=0)


def test_bad_surprise_is_rejected():
    with pytest.raises(ValueError, match="NaN"):
        surprise_boundaries(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match="min_size"):
        enforce_event_sizes([0], 10, min_size=20, max_size=10)
