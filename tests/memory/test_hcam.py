"""HCAM (spec §3): the two-level formula, the exact case, causality, streaming, stop-gradient, paths."""

import math

import pytest
import torch
from timeloom_memory.hcam import HCAMAttention, sinusoidal_positions

TOL = 1e-10


def hcam(**overrides) -> HCAMAttention:
    torch.manual_seed(0)
    options = dict(dim=8, heads=2, chunk_size=4, top_k=2)
    options.update(overrides)
    return HCAMAttention(**options).double()


def inputs(batch=2, length=19, seed=0) -> torch.Tensor:
    return torch.randn(batch, length, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def two_level_reference(m: HCAMAttention, x: torch.Tensor) -> torch.Tensor:
    """``Σ_i softmax(r)_i · softmax-attention inside chunk i`` over every completed chunk, one query at a time."""
    b, n, d = x.shape
    c, h = m.chunk_size, m.heads
    dh = d // h
    out = torch.zeros(b, n, d, dtype=x.dtype)
    pe = sinusoidal_positions(c, d, dtype=x.dtype) if m.positional else 0
    for t in range(n):
        visible = [i for i in range(n // c) if (i + 1) * c <= t]
        if not visible:
            continue
        chunks = [x[:, i * c : (i + 1) * c] for i in visible]
        r = torch.stack([(m.relevance_q(x[:, t]) * m.relevance_k(ch.mean(1))).sum(-1) for ch in chunks], -1)
        w = torch.softmax(r / math.sqrt(d), -1)  # k = M: every visible chunk
        q = m.q(x[:, t]).view(b, h, dh)
        mixed = torch.zeros(b, h, dh, dtype=x.dtype)
        for idx, ch in enumerate(chunks):
            k, v = m.kv(ch + pe).chunk(2, -1)
            k, v = k.view(b, c, h, dh), v.view(b, c, h, dh)
            a = torch.softmax(torch.einsum("bhd,bchd->bhc", q, k) / math.sqrt(dh), -1)
            mixed = mixed + w[:, idx, None, None] * torch.einsum("bhc,bchd->bhd", a, v)
        out[:, t] = m.out(mixed.reshape(b, d))
    return out


def test_all_chunks_selected_equals_the_two_level_formula():
    m = hcam(top_k=100)
    x = inputs()
    with torch.no_grad():
        got, _ = m(x)
    torch.testing.assert_close(got, two_level_reference(m, x), atol=TOL, rtol=0)


def test_oracle_summaries_with_all_chunks_are_exact_softmax_attention():
    """One head, no position encoding, ``r = logsumexp_j(q·k_j/√d)``: full attention over stored tokens."""
    m = hcam(heads=1, top_k=100, summary="oracle", positional=False)
    x = inputs()
    b, n, d = x.shape
    with torch.no_grad():
        got, _ = m(x)
        q, (k, v) = m.q(x), m.kv(x).chunk(2, -1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        pos = torch.arange(n)
        completed = (pos[None, :] // 4 + 1) * 4 <= pos[:, None]  # key j's chunk is complete before t
        completed = completed & (pos[None, :] < (n // 4) * 4)
        probs = torch.softmax(scores.masked_fill(~completed, -math.inf), -1).nan_to_num(0.0)
        expected = m.out(probs @ v)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("path", ["dense", "gather"])
def test_causality(path):
    m = hcam(path=path)
    x = inputs()
    changed = x.clone()
    changed[:, 11:] += 1.0
    with torch.no_grad():
        a, _ = m(x)
        b, _ = m(changed)
    torch.testing.assert_close(a[:, :11], b[:, :11], atol=TOL, rtol=0)
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-6  # chunk 2 (8..11) completes at 12


def test_dense_equals_gather():
    x = inputs()
    with torch.no_grad():
        dense, _ = hcam(path="dense")(x)
        gather, _ = hcam(path="gather")(x)
    torch.testing.assert_close(dense, gather, atol=TOL, rtol=0)


def test_top_k_reads_fewer_chunks_than_all():
    x = inputs(length=24)
    with torch.no_grad():
        one, _ = hcam(top_k=1)(x)
        every, _ = hcam(top_k=100)(x)
    torch.testing.assert_close(one[:, :8], every[:, :8], atol=TOL, rtol=0)  # ≤ 1 chunk visible there
    assert (one[:, 9:] - every[:, 9:]).abs().max() > 1e-6


def test_streaming_with_the_accumulator_equals_one_pass():
    m = hcam()
    x = inputs(length=23)
    with torch.no_grad():
        whole, _ = m(x)
        state, pieces = None, []
        for start, end in [(0, 1), (1, 6), (6, 7), (7, 15), (15, 23)]:
            y, state = m(x[:, start:end], state)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=TOL, rtol=0)


@pytest.mark.parametrize("detach", [True, False])
def test_no_gradient_reaches_stored_inputs_through_the_memory(detach):
    m = hcam(detach_memory=detach)
    past = inputs(length=12).requires_grad_()
    _, state = m(past)
    out, _ = m(inputs(length=4, seed=1), state)
    out.pow(2).sum().backward()
    for p in m.parameters():
        assert p.grad is not None
    reached = past.grad is not None and past.grad.abs().max() > 0
    assert reached != detach


def test_nothing_visible_reads_zero_and_bad_input_raises():
    m = hcam()
    with torch.no_grad():
        out, _ = m(inputs(length=4))
    assert torch.equal(out, torch.zeros_like(out))
    x = inputs()
    x[0, 0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="HCAMAttention input"):
        m(x)


def test_dense_path_mixes_float32_weights_into_bfloat16_values():
    # what CUDA autocast hands the dense path: float32 softmax weights beside bfloat16 queries, keys, values
    m = hcam(path="dense").float()
    g = torch.Generator().manual_seed(0)
    b, h, n, dh, num_chunks, c = 1, 2, 5, 4, 3, 4
    q = torch.randn(b, h, n, dh, generator=g)
    k, v = (torch.randn(b, num_chunks, h, c, dh, generator=g) for _ in range(2))
    order = torch.tensor([[0, 2]] * n).unsqueeze(0)
    weights = torch.softmax(torch.randn(b, n, 2, generator=g), -1)
    expected = m._dense(q, k, v, order, weights, num_chunks)
    got = m._dense(q.bfloat16(), k.bfloat16(), v.bfloat16(), order, weights, num_chunks)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, atol=3e-2, rtol=3e-2)
