"""Titans' neural memory: the chunked parallel update against the token-by-token definition (spec §2.7).

Which equivalence the paper's chunking implies: with chunk size ``b`` every gradient of a chunk is taken at
the chunk-start weights ``W_{t'}`` (Eq. 16), so the chunked parallel form equals the *chunk-wise* sequential
definition (a token loop whose gradient point moves only at chunk boundaries), not the fully online rule; the
two coincide at ``b = 1``. Both are tested against one independent token loop below.
"""

import random

import pytest
import torch
import torch.nn.functional as F
from timeloom_memory.neural_memory import (
    NO_MOMENTUM,
    DualStep,
    NeuralMemory,
    NeuralMemoryConfig,
    NeuralMemoryState,
    causal_depthwise_conv,
    chunk_loop,
    clipped_theta,
    dual_chunk,
    dual_chunks,
    dual_plans,
    linear_scan,
    mlp_forward,
    sequential_chunk,
)

TOL = 1e-10


def memory(**overrides) -> NeuralMemory:
    torch.manual_seed(0)
    options = dict(dim=8, heads=2, head_dim=4, depth=2, chunk_size=3, theta_max=0.5, eta_bias=0.0)
    options.update(alpha_bias=-1.0)
    options.update(overrides)
    return NeuralMemory(NeuralMemoryConfig(**options)).double()


def inputs(batch=2, length=13, dim=8, seed=1) -> torch.Tensor:
    return torch.randn(batch, length, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def token_by_token(m: NeuralMemory, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The definition (spec §2.2) as a plain loop: autograd gradient at the chunk-start weights."""
    c = m.config
    q, k, v, _ = m.project(x, None)
    theta, log_eta, log_keep = m.gates(x)
    w = [w0.unsqueeze(0).expand(x.shape[0], -1, -1, -1) for w0 in m.initial_weights]
    s = [torch.zeros_like(t) for t in w]
    outputs = []
    for t in range(x.shape[1]):
        if t % c.chunk_size == 0:
            start = [t_.detach().requires_grad_() for t_ in w]
        loss = (mlp_forward(start, k[:, :, t : t + 1]) - v[:, :, t : t + 1]).pow(2).sum()
        grads = torch.autograd.grad(loss, start)
        if c.read == "before":
            outputs.append(mlp_forward(w, q[:, :, t : t + 1]))
        eta, keep, lr = log_eta[:, :, t].exp(), log_keep[:, :, t].exp(), theta[:, :, t]
        s = [eta[..., None, None] * s_l - lr[..., None, None] * g for s_l, g in zip(s, grads)]
        w = [keep[..., None, None] * w_l + s_l for w_l, s_l in zip(w, s)]
        if c.read == "after":
            outputs.append(mlp_forward(w, q[:, :, t : t + 1]))
    return torch.cat(outputs, 2).detach(), [t_.detach() for t_ in w]


def raw_readout(m: NeuralMemory, x: torch.Tensor, state=None):
    """The memory's per-head readout before the output gate, and the state."""
    q, k, v, tail = m.project(x, None if state is None else state.conv_tail)
    state = state or m.init_state(x.shape[0], dtype=x.dtype)
    return m.write_and_read(state, q, k, v, *m.gates(x))


@pytest.mark.parametrize("update", ["dual", "scan", "sequential"])
@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("read", ["after", "before"])
def test_chunked_update_equals_the_token_by_token_definition(update, chunk_size, depth, read):
    m = memory(chunk_size=chunk_size, depth=depth, read=read, update=update, heads=2 if depth != 3 else 1)
    x = inputs(length=13)  # not a multiple of 3 or 8
    with torch.no_grad():
        y, state = raw_readout(m, x)
        final = m.current_weights(state)
    expected_y, expected_w = token_by_token(m, x)
    torch.testing.assert_close(y, expected_y, atol=TOL, rtol=0)
    for got, want, w0 in zip(final, expected_w, m.initial_weights):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        assert (want - w0).abs().max() > 1e-3, "the memory must actually have been written"


@pytest.mark.parametrize("chunk_size", [1, 4])
def test_the_three_kernels_agree_on_momentum(chunk_size):
    states = {}
    for update in ("dual", "scan", "sequential"):
        m = memory(chunk_size=chunk_size, update=update)
        with torch.no_grad():
            _, states[update] = m(inputs(length=12))
    for update in ("scan", "sequential"):
        for got, want in zip(states[update].momentum, states["dual"].momentum):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        assert any(s.abs().max() > 1e-3 for s in states["dual"].momentum)


@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_the_three_kernels_agree_with_a_binding_surprise_clip(momentum, chunk_size):
    """The clip scales each token's gradient (``dual`` scales its δ rows, the others θ): the same update."""
    results = {}
    for update in ("dual", "scan", "sequential"):
        m = memory(chunk_size=chunk_size, update=update, momentum=momentum, surprise_clip=0.05)
        with torch.no_grad():
            results[update] = m(inputs(length=11))
    y, state = results["dual"]
    for update in ("scan", "sequential"):
        other_y, other = results[update]
        torch.testing.assert_close(other_y, y, atol=TOL, rtol=0)
        for got, want in zip(other.weights + other.momentum, state.weights + state.momentum):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    with torch.no_grad():
        unclipped, _ = memory(chunk_size=chunk_size, momentum=momentum)(inputs(length=11))
    assert (unclipped - y).abs().max() > 1e-3, "the clip must bind in this test"


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("read", ["after", "before"])
def test_without_momentum_the_kernels_equal_the_definition(chunk_size, depth, read):
    """``momentum=False`` (η = 0): the dual kernel skips the surprise terms; outputs, weights and the surprise
    ``S_n = −θ_n u_n`` still equal the scan, the sequential kernel and the token loop, also in pieces."""
    x = inputs(length=13)
    results = {}
    for update in ("dual", "scan", "sequential"):
        m = memory(chunk_size=chunk_size, depth=depth, read=read, update=update, momentum=False)
        with torch.no_grad():
            y, state = raw_readout(m, x)
            pieces, streamed = [], None
            for piece in x.split(5, dim=1):  # pieces across chunk boundaries, with a pending tail
                out, streamed = m(piece, streamed)
                pieces.append(out)
            whole, _ = m(x)
        torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=TOL, rtol=0)
        results[update] = (y, m.current_weights(state), state.momentum)
    expected_y, expected_w = token_by_token(m, x)
    for y, weights, surprise in results.values():
        torch.testing.assert_close(y, expected_y, atol=TOL, rtol=0)
        for got, want in zip(weights, expected_w):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
        for got, want in zip(surprise, results["sequential"][2]):
            torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert any(s.abs().max() > 1e-3 for s in results["dual"][2])


def update_inputs(depth: int, momentum: bool, batch=2, heads=2, length=11, width=3, seed=0):
    """Projected tokens and a carried state (weights and momentum away from their start), as leaves."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, dtype=torch.float64, generator=generator)

    q, k, v = (F.normalize(rand(batch, heads, length, width), dim=-1) for _ in range(3))
    theta = 0.5 * torch.sigmoid(rand(batch, heads, length))
    log_eta = F.logsigmoid(rand(batch, heads, length)) if momentum else torch.full_like(theta, NO_MOMENTUM)
    log_keep = F.logsigmoid(rand(batch, heads, length) + 2)
    shapes = NeuralMemoryConfig(head_dim=width, depth=depth, expansion=2).layer_shapes
    weights = [rand(batch, heads, o, i) / i**0.5 for o, i in shapes]
    surprise = [0.1 * rand(batch, heads, o, i) for o, i in shapes]
    tokens = [t.requires_grad_() for t in (q, k, v, theta, log_eta, log_keep)]
    return tokens, [w.requires_grad_() for w in weights], [s.requires_grad_() for s in surprise]


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("read", ["after", "before"])
@pytest.mark.parametrize("surprise_clip", [None, 0.05])
def test_the_dual_backward_equals_autograd_through_the_definition(depth, momentum, read, surprise_clip):
    """`DualStep`'s hand-written backward, with and without a binding surprise clip: the gradients of the
    tokens, the gates, the carried weights and momentum equal autograd through the token loop, for a loss on
    the readout, the end weights and the end momentum (chunks of 3 and a pending tail)."""
    tokens, weights, surprise = update_inputs(depth, momentum)
    leaves = tokens[:4] + tokens[5:] + weights + (tokens[4:5] + surprise if momentum else [])
    options = dict(read=read, surprise_clip=surprise_clip)
    results = {
        "dual": dual_chunks(weights, surprise, *tokens, 3, with_momentum=momentum, **options),
        "sequential": chunk_loop(sequential_chunk, weights, surprise, *tokens, 3, **options),
    }
    if surprise_clip is not None:
        unclipped = dual_chunks(weights, surprise, *tokens, 3, with_momentum=momentum, read=read)[0]
        assert (unclipped - results["dual"][0]).abs().max() > 1e-3, "the clip must bind"
    generator = torch.Generator().manual_seed(1)
    y, end_w, end_s = results["sequential"]
    cotangents = [torch.randn(t.shape, dtype=t.dtype, generator=generator) for t in [y, *end_w, *end_s]]
    grads = {}
    for kernel, (y, end_w, end_s) in results.items():
        loss = sum((t * c).sum() for t, c in zip([y, *end_w, *end_s], cotangents))
        grads[kernel] = torch.autograd.grad(loss, leaves)
    for i, (got, want) in enumerate(zip(grads["dual"], grads["sequential"])):
        assert want.abs().max() > 1e-6, f"leaf {i} must get a gradient"
        torch.testing.assert_close(got, want, atol=1e-8, rtol=0, msg=f"leaf {i}")


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("momentum", [True, False])
@pytest.mark.parametrize("surprise_clip", [None, 0.05])
def test_gradcheck_of_the_dual_backward(depth, momentum, surprise_clip):
    tokens, weights, surprise = update_inputs(depth, momentum, batch=1, heads=1, length=5, width=2)
    count = len(weights)

    def run(*leaves, clip=surprise_clip):
        tokens, weights, surprise = leaves[:6], leaves[6 : 6 + count], leaves[6 + count :]
        y, end_w, end_s = dual_chunks(list(weights), list(surprise), *tokens, 2, surprise_clip=clip,
                                      with_momentum=momentum)  # fmt: skip
        return y, *end_w, *end_s

    leaves = (*tokens, *weights, *surprise)
    if surprise_clip is not None:
        assert (run(*leaves)[0] - run(*leaves, clip=None)[0]).abs().max() > 1e-3, "the clip must bind"
    assert torch.autograd.gradcheck(run, leaves, eps=1e-6, atol=1e-6)


def test_the_dual_backward_runs_in_float32_when_called_inside_autocast():
    """Under ``bf16-mixed`` the update runs in float32 (autocast off inside it); `DualStep`'s backward does
    too, also when ``backward()`` is called inside an autocast region (which would otherwise run its products
    in bf16 and fail on its float32 buffers): the same gradients as outside it."""
    tokens, weights, surprise = update_inputs(2, True, length=4)
    q, k, v, theta, log_eta, log_keep = (t.detach().float().flatten(0, 1) for t in tokens)
    (plan,) = dual_plans(*(t.unsqueeze(1) for t in (q, k, theta, log_eta, log_keep)), "after", True)
    state = [t.detach().float().flatten(0, 1) for t in weights + surprise]
    leaves = [t.requires_grad_() for t in (q, k, v, *plan, *state)]
    grads = []
    for backward_inside in (False, True):
        y, *end_state = DualStep.apply(2, None, *leaves)
        loss = y.pow(2).sum() + sum(t.sum() for t in end_state)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=backward_inside):
            grads.append(torch.autograd.grad(loss, leaves))
    for outside, inside in zip(*grads):
        assert inside.dtype == torch.float32
        torch.testing.assert_close(inside, outside, atol=0, rtol=0)


def test_the_dual_backward_is_differentiable_once():
    """A second derivative through the hand-written backward is refused, not silently wrong."""
    tokens, weights, surprise = update_inputs(2, True)
    y, _, _ = dual_chunks(weights, surprise, *tokens, 3)
    (grad_q,) = torch.autograd.grad(y.pow(2).sum(), tokens[0], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        grad_q.sum().backward()


def test_linear_scan_equals_the_loop():
    a, x, h0 = torch.rand(2, 11, dtype=torch.float64), torch.randn(2, 11, 3, 4, dtype=torch.float64), None
    h0 = torch.randn(2, 3, 4, dtype=torch.float64)
    h, expected = h0, []
    for i in range(11):
        h = a[:, i, None, None] * h + x[:, i]
        expected.append(h)
    torch.testing.assert_close(linear_scan(a, x, h0), torch.stack(expected, 1), atol=TOL, rtol=0)


def test_matrix_memory_without_momentum_is_the_gated_delta_rule():
    """``L_M = 1``, ``η = 0``, ``b = 1``: ``W_t = W_{t−1}((1−α_t)I − 2θ_t k kᵀ) + 2θ_t v kᵀ`` (App. C)."""
    g = torch.Generator().manual_seed(0)
    d, n = 4, 6
    w0 = torch.randn(1, 1, d, d, dtype=torch.float64, generator=g)
    k = torch.nn.functional.normalize(torch.randn(1, 1, n, d, dtype=torch.float64, generator=g), dim=-1)
    v = torch.randn(1, 1, n, d, dtype=torch.float64, generator=g)
    theta = torch.rand(1, 1, n, dtype=torch.float64, generator=g) * 0.3
    alpha = torch.rand(1, 1, n, dtype=torch.float64, generator=g) * 0.2
    no_momentum = torch.full_like(theta, -1e4)  # log η: exp underflows to exactly 0
    w, s = [w0], [torch.zeros_like(w0)]
    expected = w0[0, 0]
    for t in range(n):
        _, w, s = dual_chunk(w, s, k[:, :, t : t + 1], k[:, :, t : t + 1], v[:, :, t : t + 1],
                             theta[:, :, t : t + 1], no_momentum[:, :, t : t + 1],
                             torch.log1p(-alpha[:, :, t : t + 1]))  # fmt: skip
        kt, vt, th, al = k[0, 0, t], v[0, 0, t], theta[0, 0, t], alpha[0, 0, t]
        expected = expected @ ((1 - al) * torch.eye(d, dtype=torch.float64) - 2 * th * torch.outer(kt, kt))
        expected = expected + 2 * th * torch.outer(vt, kt)
        torch.testing.assert_close(w[0][0, 0], expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("update", ["dual", "scan"])
def test_pieces_with_carried_state_equal_the_whole_sequence(update):
    m = memory(chunk_size=4, update=update)
    x = inputs(length=23)
    with torch.no_grad():
        whole, whole_state = m(x)
        rng = random.Random(0)
        cuts = sorted(rng.sample(range(1, 23), 9)) + [23]  # single tokens and pieces shorter than a chunk
        cuts = sorted(set([1, 2, 3] + cuts))
        state, pieces, start = None, [], 0
        for end in cuts:
            y, state = m(x[:, start:end], state)
            pieces.append(y)
            start = end
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=TOL, rtol=0)
    assert state.position == whole_state.position == 23
    for got, want in zip(m.current_weights(state), m.current_weights(whole_state)):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_a_sequence_shorter_than_a_chunk_still_updates():
    """titans-pytorch #59: with fewer tokens than a chunk nothing was stored. Here pending tokens write."""
    m = memory(chunk_size=64)
    x = inputs(length=5)
    with torch.no_grad():
        y, state = m(x)
        assert state.pending_k.shape[2] == 5
        for w, w0 in zip(m.current_weights(state), m.initial_weights):
            assert (w - w0).abs().max() > 1e-3
        # The read after write already used the 5 writes: it equals the definition.
        y_raw, _ = raw_readout(m, x)
    torch.testing.assert_close(y_raw, token_by_token(m, x)[0], atol=TOL, rtol=0)
    # And a later read sees them.
    fresh = m.retrieve(x, m.init_state(2, dtype=torch.float64))
    assert (m.retrieve(x, state) - fresh).abs().max() > 1e-4


def test_gradients_reach_every_outer_parameter():
    m = memory(chunk_size=4)
    y, _ = m(inputs(length=10))
    y.pow(2).sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_outer_gradients_of_the_parallel_form_equal_those_of_the_definition():
    """Also through u's dependence on the chunk-start weights (autograd through autograd in the loop)."""
    grads = {}
    for update in ("dual", "sequential"):
        m = memory(chunk_size=3, update=update)
        y, _ = m(inputs(length=8))
        y.pow(2).sum().backward()
        grads[update] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for name, g in grads["dual"].items():
        torch.testing.assert_close(g, grads["sequential"][name], atol=1e-9, rtol=1e-9, msg=name)


def test_gradcheck_on_tiny_dims():
    m = memory(dim=3, heads=1, head_dim=2, chunk_size=2, conv_kernel=2)
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = inputs(batch=1, length=5, dim=3).requires_grad_()

    def run(x, *values):
        return torch.func.functional_call(m, dict(zip(names, values)), (x,))[0]

    assert torch.autograd.gradcheck(run, (x, *params), eps=1e-6, atol=1e-6)


def test_the_causal_depthwise_conv_equals_torch_conv1d_and_its_backward_autograd():
    """The layer's conv (shifted multiply-adds with a hand-written backward) against ``F.conv1d(groups=C)`` on
    the channels-first layout: outputs and the gradients of input and weight, in float64; and gradcheck."""
    generator = torch.Generator().manual_seed(0)
    padded = torch.randn(2, 3 + 9, 5, dtype=torch.float64, generator=generator).requires_grad_()
    weight = torch.randn(5, 1, 4, dtype=torch.float64, generator=generator).requires_grad_()
    cotangent = torch.randn(2, 9, 5, dtype=torch.float64, generator=generator)
    ours = causal_depthwise_conv(padded, weight)
    reference = F.conv1d(padded.transpose(1, 2), weight, groups=5).transpose(1, 2)
    torch.testing.assert_close(ours, reference, atol=1e-12, rtol=0)
    got = torch.autograd.grad((ours * cotangent).sum(), (padded, weight))
    want = torch.autograd.grad((reference * cotangent).sum(), (padded, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(causal_depthwise_conv, (padded, weight))


def test_save_load_continue_equals_one_run(tmp_path):
    m = memory(chunk_size=4)
    x = inputs(length=19)
    with torch.no_grad():
        whole, _ = m(x)
        first, state = m(x[:, :10])  # 2 chunks committed, 2 tokens pending
        state.save(tmp_path / "memory.safetensors", m.config)
        fresh = memory(chunk_size=4)
        fresh.load_state_dict(m.state_dict())
        loaded = NeuralMemoryState.load(tmp_path / "memory.safetensors", fresh.config)
        second, _ = fresh(x[:, 10:], loaded)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="another NeuralMemoryConfig"):
        NeuralMemoryState.load(tmp_path / "memory.safetensors", NeuralMemoryConfig(chunk_size=5))


def test_query_projection_alone_equals_the_full_projection():
    m = memory(chunk_size=4)
    x = inputs(length=9)
    torch.testing.assert_close(m.project_queries(x), m.project(x, None)[0], atol=TOL, rtol=0)


def test_detach_cuts_the_graph_and_retrieve_leaves_the_state_unchanged():
    m = memory(chunk_size=4)
    _, state = m(inputs(length=9))
    assert state.weights[0].requires_grad
    detached = state.detach()
    assert not any(t.requires_grad for t in detached.tensors().values())
    before = {k: v.clone() for k, v in detached.tensors().items()}
    m.retrieve(inputs(length=3), detached)
    for key, value in detached.tensors().items():
        assert torch.equal(value, before[key]), key


def test_reset_restarts_only_the_chosen_samples():
    m = memory(chunk_size=4)
    x = inputs(batch=3, length=8)
    with torch.no_grad():
        _, state = m(x)
        state = m.reset(state, torch.tensor([False, True, False]))
        y, _ = m(x, state)
        y_fresh, _ = m(x)
        _, carried = m(x)
        y_carried, _ = m(x, carried)
    torch.testing.assert_close(y[1], y_fresh[1], atol=TOL, rtol=0)
    torch.testing.assert_close(y[[0, 2]], y_carried[[0, 2]], atol=TOL, rtol=0)


@pytest.mark.parametrize("update", ["dual", "scan"])
def test_causality(update):
    m = memory(chunk_size=4, update=update)
    x = inputs(length=12)
    changed = x.clone()
    changed[:, 7:] += torch.randn_like(changed[:, 7:])
    with torch.no_grad():
        y, _ = m(x)
        y_changed, _ = m(changed)
    torch.testing.assert_close(y[:, :7], y_changed[:, :7], atol=TOL, rtol=0)
    assert (y[:, 7:] - y_changed[:, 7:]).abs().max() > 1e-6


def test_nan_input_is_a_clear_error():
    m = memory()
    x = inputs()
    x[0, 3, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="input x"):
        m(x)


def test_an_exploding_update_raises_and_the_surprise_clip_guards_it():
    def explosive(**extra):
        m = memory(chunk_size=1, theta_max=100.0, **extra).float()
        with torch.no_grad():
            m.to_gates.weight.zero_()
            m.to_gates.bias.copy_(torch.tensor([20.0, 20.0, 20.0, 20.0, -20.0, -20.0]))  # θ=θ_max, η→1, α→0
        return m

    x = inputs(length=64).float()
    with torch.no_grad(), pytest.raises(FloatingPointError, match="memory state or readout"):
        explosive()(x)
    with torch.no_grad():
        y, state = explosive(surprise_clip=1.0)(x)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in state.tensors().values())


def test_long_streams_stay_finite_in_float32():
    """L = 4096 at θ = θ_max, η → 1, α → 0 (the regime of titans-pytorch #29).

    Without friction (η = 1, α = 0) and with 64 gradients at one point per chunk, the update itself is
    unstable: it raises. The surprise clip bounds every step, so the same stream stays finite.
    """

    def frictionless(surprise_clip):
        torch.manual_seed(0)
        config = NeuralMemoryConfig(dim=16, heads=2, head_dim=8, chunk_size=64, surprise_clip=surprise_clip)
        m = NeuralMemory(config)
        with torch.no_grad():
            m.to_gates.weight.zero_()
            m.to_gates.bias.copy_(torch.tensor([20.0, 20.0, 20.0, 20.0, -20.0, -20.0]))
        return m

    x = torch.randn(1, 4096, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), pytest.raises(FloatingPointError, match="memory state or readout"):
        frictionless(None)(x)
    with torch.no_grad():
        y, state = frictionless(1.0)(x)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in state.tensors().values())


def test_the_surprise_clip_keeps_gradients_finite_for_tiny_surprises():
    # 1/‖u‖² overflows float32 for ‖u‖ near 1e-20; the clip's backward pass must not form it (it turned MAC's
    # weights into NaN after about 100 S-NIAH steps)
    theta = torch.full((1, 1, 3), 0.1, requires_grad=True)
    inputs = [torch.randn(1, 1, 3, 4, requires_grad=True)]
    deltas = torch.randn(1, 1, 3, 4)
    deltas[..., 1, :] = 1e-20
    deltas.requires_grad_(True)
    scaled = clipped_theta(theta, inputs, [deltas], 1.0)
    scaled.sum().backward()
    for grad in (theta.grad, inputs[0].grad, deltas.grad):
        assert torch.isfinite(grad).all()
    norms = deltas.detach().norm(dim=-1) * inputs[0].detach().norm(dim=-1)
    torch.testing.assert_close(scaled.detach(), 0.1 * torch.clamp(1.0 / norms, max=1.0))
