"""Linear/recurrent attention: chunked == token loop == closed form on outputs, states and gradients (fp64).

fla's pattern: random q, k, v, decay, initial state and cotangents for the output and the final state; backprop
`(o * do).sum() + (S * dS).sum()` and compare every input's gradient.
"""

import math

import pytest
import torch
from timeloom_kernels.linear import (
    AarenState,
    LightNetState,
    aaren_attention,
    alibi_decay,
    lightnet_attention,
    lightning_attention,
)
from timeloom_kernels.linear.aaren import hillis_steele_scan
from timeloom_kernels.linear.lightning import SEGMENT_BLOCKS

B, H, DK, DV = 2, 3, 8, 5
LENGTH = 50  # not a multiple of any chunk size below
TOL = 1e-10  # relative L2 error in fp64


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float = TOL) -> None:
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all()
    error = (actual - expected).norm() / expected.norm().clamp_min(1e-300)
    assert error <= tol, f"relative error {error:.3e} > {tol:.0e}"


def _randn(*shape: int, gen: torch.Generator, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)


def _gradients(outputs: list[torch.Tensor], inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    loss = sum((out * torch.randn(out.shape, generator=gen, dtype=out.dtype)).sum() for out in outputs)
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


def _softmax_oracle(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    scores = (q @ k.transpose(-1, -2)).expand(-1, -1, k.shape[2], -1) * k.shape[-1] ** -0.5
    if causal:
        allowed = torch.ones(k.shape[2], k.shape[2], dtype=torch.bool).tril()
        scores = scores.masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


# ---------------------------------------------------------------- Lightning Attention-2


def _lightning_case(decay_value: float, seed: int = 0, length: int = LENGTH):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (
        _randn(B, H, length, DK, gen=gen),
        _randn(B, H, length, DK, gen=gen),
        _randn(B, H, length, DV, gen=gen),
    )
    decay = torch.full((H,), decay_value, dtype=torch.float64, requires_grad=True)
    h0 = _randn(B, H, DK, DV, gen=gen)
    return q, k, v, decay, h0


@pytest.mark.parametrize("decay_value", [1.0, math.exp(-1)])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_lightning_chunk_matches_references(chunk_size, decay_value):
    q, k, v, decay, h0 = _lightning_case(decay_value)
    inputs = [q, k, v, decay, h0]
    results = {}
    for backend in ("recurrent", "quadratic", "chunk"):
        o, state = lightning_attention(
            q, k, v, decay, initial_state=h0, output_final_state=True, chunk_size=chunk_size, backend=backend
        )
        results[backend] = [o, state, *_gradients([o, state], inputs)]
    for name in ("quadratic", "chunk"):
        for actual, expected in zip(results[name], results["recurrent"]):
            assert_rel_close(actual, expected)


def test_lightning_chunk_spanning_several_segments_matches_recurrent():
    length = 2 * SEGMENT_BLOCKS * 16 + 21  # three segments of 16-token blocks, then a short block
    gen = torch.Generator().manual_seed(5)
    q, k, v = (_randn(1, 2, length, 4, gen=gen) for _ in range(3))
    decay, h0 = (
        torch.tensor([0.99, 1.0], dtype=torch.float64, requires_grad=True),
        _randn(1, 2, 4, 4, gen=gen),
    )
    inputs = [q, k, v, decay, h0]
    results = {}
    for backend in ("recurrent", "chunk"):
        o, state = lightning_attention(
            q, k, v, decay, initial_state=h0, output_final_state=True, chunk_size=16, backend=backend
        )
        results[backend] = [o, state, *_gradients([o, state], inputs)]
    for actual, expected in zip(results["chunk"], results["recurrent"]):
        assert_rel_close(actual, expected)


def test_lightning_decoding_and_state_passing_match_one_call():
    q, k, v, decay, h0 = _lightning_case(0.9, seed=1)
    full, full_state = lightning_attention(
        q, k, v, decay, initial_state=h0, output_final_state=True, chunk_size=16
    )
    first, state = lightning_attention(
        q[:, :, :23],
        k[:, :, :23],
        v[:, :, :23],
        decay,
        initial_state=h0,
        output_final_state=True,
        chunk_size=16,
    )
    second, chained = lightning_attention(
        q[:, :, 23:],
        k[:, :, 23:],
        v[:, :, 23:],
        decay,
        initial_state=state,
        output_final_state=True,
        chunk_size=16,
    )
    assert_rel_close(torch.cat((first, second), dim=2), full)
    assert_rel_close(chained, full_state)
    state, decoded = h0, []
    for t in range(LENGTH):
        token = slice(t, t + 1)
        o, state = lightning_attention(
            q[:, :, token],
            k[:, :, token],
            v[:, :, token],
            decay,
            initial_state=state,
            output_final_state=True,
        )
        decoded.append(o)
    assert_rel_close(torch.cat(decoded, dim=2), full)
    assert_rel_close(state, full_state)


def test_lightning_is_causal():
    q, k, v, decay, _ = _lightning_case(0.8, seed=2)
    with torch.no_grad():
        before, _ = lightning_attention(q, k, v, decay, chunk_size=16)
        t = 37
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t] += 3.0
        after, _ = lightning_attention(q2, k2, v2, decay, chunk_size=16)
    assert torch.equal(after[:, :, :t], before[:, :, :t])
    assert not torch.equal(after[:, :, t], before[:, :, t])


def test_lightning_non_causal_is_q_times_kv():
    q, k, v, _, h0 = _lightning_case(1.0, seed=3)
    o, state = lightning_attention(q, k, v, causal=False, initial_state=h0, output_final_state=True)
    assert_rel_close(o, (q @ k.transpose(-1, -2)) @ v + q @ h0)
    assert_rel_close(state, h0 + k.transpose(-1, -2) @ v)
    with pytest.raises(ValueError, match="no decay"):
        lightning_attention(q, k, v, 0.5, causal=False)


def test_lightning_fp32_keeps_dtype_and_fp32_state():
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 70, 16, generator=gen) for _ in range(3))
    decay = alibi_decay(2)
    o, state = lightning_attention(q, k, v, decay, output_final_state=True, chunk_size=32)
    ref, ref_state = lightning_attention(
        q.double(), k.double(), v.double(), decay.double(), output_final_state=True, backend="recurrent"
    )
    assert o.dtype == torch.float32 and state.dtype == torch.float32
    assert_rel_close(o.double(), ref, tol=1e-5)
    assert_rel_close(state.double(), ref_state, tol=1e-5)


def test_alibi_decay():
    decay = alibi_decay(8)
    expected = torch.exp(-(2.0 ** (-8.0 * torch.arange(1, 9) / 8)))
    torch.testing.assert_close(decay, expected.float())
    assert (alibi_decay(8, layer=3, num_layers=4) > decay).all()  # deeper layers decay less


def test_lightning_rejects_bad_input():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="shape"):
        lightning_attention(q, q[:, :, :3], q)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        lightning_attention(q, q, q, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="decay per head"):
        lightning_attention(q, q, q, torch.tensor([0.5, 0.5, 0.5]))
    with pytest.raises(ValueError, match="initial_state"):
        lightning_attention(q, q, q, initial_state=torch.zeros(1, 2, 8, 7))
    with pytest.raises(ValueError, match="backend"):
        lightning_attention(q, q, q, backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        lightning_attention(q, q, q, chunk_size=0)


# ---------------------------------------------------------------- LightNet


def _lightnet_case(seed: int = 0, length: int = LENGTH):
    gen = torch.Generator().manual_seed(seed)
    q, v = _randn(B, H, length, DK, gen=gen), _randn(B, H, length, DV, gen=gen)
    k = (torch.randn(B, H, length, DK, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    state = LightNetState(_randn(B, H, DK, DV, gen=gen), _randn(B, H, DK, gen=gen))
    return q, k, v, state


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("chunk_size", [16, 32, 64])
def test_lightnet_chunk_matches_references(chunk_size, with_state):
    q, k, v, h0 = _lightnet_case()
    initial = h0 if with_state else None
    inputs = [q, k, v, *h0] if with_state else [q, k, v]
    results = {}
    for backend in ("recurrent", "quadratic", "chunk"):
        o, state = lightnet_attention(
            q, k, v, initial_state=initial, output_final_state=True, chunk_size=chunk_size, backend=backend
        )
        results[backend] = [o, *state, *_gradients([o, *state], inputs)]
    for name in ("quadratic", "chunk"):
        for actual, expected in zip(results[name], results["recurrent"]):
            assert_rel_close(actual, expected)


def test_lightnet_is_a_running_softmax_mean():
    q, k, v, _ = _lightnet_case(seed=1, length=12)
    o, _ = lightnet_attention(q, k, v)
    t = 7  # S_t[d] = softmax_{s<=t}(k_{s,d}) . v_{<=t}
    state_t = torch.einsum("hsd,hse->hde", k[0, :, : t + 1].softmax(dim=1), v[0, :, : t + 1])
    assert_rel_close(o[0, :, t], torch.einsum("hd,hde->he", q[0, :, t], state_t))


def test_lightnet_decoding_and_state_passing_match_one_call():
    q, k, v, h0 = _lightnet_case(seed=2)
    full, full_state = lightnet_attention(q, k, v, initial_state=h0, output_final_state=True, chunk_size=16)
    first, state = lightnet_attention(
        q[:, :, :29], k[:, :, :29], v[:, :, :29], output_final_state=True, initial_state=h0
    )
    second, chained = lightnet_attention(
        q[:, :, 29:], k[:, :, 29:], v[:, :, 29:], initial_state=state, output_final_state=True
    )
    assert_rel_close(torch.cat((first, second), dim=2), full)
    for actual, expected in zip(chained, full_state):
        assert_rel_close(actual, expected)
    state, decoded = h0, []
    for t in range(LENGTH):
        token = slice(t, t + 1)
        o, state = lightnet_attention(
            q[:, :, token], k[:, :, token], v[:, :, token], initial_state=state, output_final_state=True
        )
        decoded.append(o)
    assert_rel_close(torch.cat(decoded, dim=2), full)


def test_lightnet_is_causal_and_survives_large_keys():
    q, k, v, _ = _lightnet_case(seed=3)
    with torch.no_grad():
        k = k.clone()
        k[:, :, 20:] += 500.0  # a jump that would overflow exp(k) or any factorisation of exp(k_s - z_t)
        before, _ = lightnet_attention(q, k, v, chunk_size=16)
        reference, _ = lightnet_attention(q, k, v, backend="quadratic")
        t = 33
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t] -= 5.0
        v2[:, :, t] += 5.0
        after, _ = lightnet_attention(q, k2, v2, chunk_size=16)
    assert_rel_close(before, reference)
    assert torch.equal(after[:, :, :t], before[:, :, :t])
    assert not torch.equal(after[:, :, t], before[:, :, t])


def test_lightnet_non_causal_state_is_order_independent():
    q, k, v, h0 = _lightnet_case(seed=4)
    with torch.no_grad():
        o, state = lightnet_attention(q, k, v, causal=False, initial_state=h0, output_final_state=True)
        order = torch.randperm(LENGTH, generator=torch.Generator().manual_seed(0))
        _, permuted = lightnet_attention(
            q[:, :, order],
            k[:, :, order],
            v[:, :, order],
            causal=False,
            initial_state=h0,
            output_final_state=True,
        )
        _, causal_final = lightnet_attention(q, k, v, initial_state=h0, output_final_state=True)
    for actual, expected in zip(permuted, state):
        assert_rel_close(actual, expected)
    for actual, expected in zip(causal_final, state):
        assert_rel_close(actual, expected)
    assert_rel_close(o, q @ state.kv)


def test_lightnet_rejects_bad_state():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="initial_state.lse"):
        lightnet_attention(
            q, q, q, initial_state=LightNetState(torch.zeros(1, 2, 8, 8), torch.zeros(1, 2, 7))
        )


# ---------------------------------------------------------------- Aaren


def _aaren_case(seed: int = 0, length: int = LENGTH, logit_scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(1, H, 1, DK, generator=gen, dtype=torch.float64) * logit_scale).requires_grad_()
    return q, _randn(B, H, length, DK, gen=gen), _randn(B, H, length, DV, gen=gen)


@pytest.mark.parametrize("length", [1, 2, 3, 16, 17, LENGTH])
def test_aaren_scan_matches_sequential_and_softmax_oracle(length):
    q, k, v = _aaren_case(length=length)
    inputs = [q, k, v]
    oracle = _softmax_oracle(q, k, v, causal=True)
    results = {}
    for backend in ("recurrent", "scan"):
        o, state = aaren_attention(q, k, v, output_final_state=True, backend=backend)
        assert_rel_close(o, oracle)
        results[backend] = [o, *state, *_gradients([o], inputs)]
    for actual, expected in zip(results["scan"], results["recurrent"]):
        assert_rel_close(actual, expected)
    oracle_grads = _gradients([oracle], inputs)
    for actual, expected in zip(results["scan"][4:], oracle_grads):
        assert_rel_close(actual, expected)


def test_aaren_huge_logits_stay_finite():
    q, k, v = _aaren_case(seed=1, logit_scale=1.0)
    with torch.no_grad():
        scores_scale = 1e4 / (q @ k.transpose(-1, -2)).abs().amax() * DK**0.5  # logits up to 1e4
        q = q * scores_scale
        oracle = _softmax_oracle(q, k, v, causal=True)
        for backend in ("recurrent", "scan"):
            o, state = aaren_attention(q, k, v, output_final_state=True, backend=backend)
            assert torch.isfinite(o).all() and all(torch.isfinite(x).all() for x in state)
            assert_rel_close(o, oracle)
        o32, _ = aaren_attention(q.float(), k.float(), v.float())
    assert torch.isfinite(o32).all()
    assert_rel_close(o32.double(), oracle, tol=1e-5)


def test_aaren_streaming_and_state_passing():
    q, k, v = _aaren_case(seed=2)
    with torch.no_grad():
        full, full_state = aaren_attention(q, k, v, output_final_state=True)
        first, state = aaren_attention(q, k[:, :, :21], v[:, :, :21], output_final_state=True)
        second, chained = aaren_attention(
            q, k[:, :, 21:], v[:, :, 21:], initial_state=state, output_final_state=True
        )
        state, streamed = None, []
        for t in range(LENGTH):
            o, state = aaren_attention(
                q, k[:, :, t : t + 1], v[:, :, t : t + 1], initial_state=state, output_final_state=True
            )
            streamed.append(o)
            assert state.numerator.shape == (B, H, DV)  # O(1) state
    assert_rel_close(torch.cat((first, second), dim=2), full)
    for actual, expected in zip(chained, full_state):
        assert_rel_close(actual, expected)
    assert_rel_close(torch.cat(streamed, dim=2), full)


def test_aaren_is_causal_and_non_causal_is_global_attention():
    q, k, v = _aaren_case(seed=3)
    with torch.no_grad():
        before, _ = aaren_attention(q, k, v)
        t = 30
        k2 = k.clone()
        k2[:, :, t] += 2.0
        after, _ = aaren_attention(q, k2, v)
        global_o, state = aaren_attention(q, k, v, causal=False, output_final_state=True)
        _, causal_final = aaren_attention(q, k, v, output_final_state=True)
    assert torch.equal(after[:, :, :t], before[:, :, :t]) and not torch.equal(after[:, :, t], before[:, :, t])
    assert_rel_close(global_o, _softmax_oracle(q, k, v, causal=False))
    assert_rel_close(
        state.numerator / state.normalizer[..., None],
        causal_final.numerator / causal_final.normalizer[..., None],
    )


def test_hillis_steele_scan_of_equal_scores_is_running_mean():
    leaves = AarenState(torch.zeros(1, 1, 9), torch.ones(1, 1, 9), torch.arange(9.0).reshape(1, 1, 9, 1))
    scanned = hillis_steele_scan(leaves)  # equal scores: running mean of 0..t
    torch.testing.assert_close(
        scanned.numerator[0, 0, :, 0] / scanned.normalizer[0, 0], torch.arange(9.0) / 2
    )


def test_aaren_rejects_bad_query():
    k = torch.randn(2, 3, 5, 4)
    with pytest.raises(ValueError, match="one query per head"):
        aaren_attention(torch.randn(2, 3, 2, 4), k, k)
