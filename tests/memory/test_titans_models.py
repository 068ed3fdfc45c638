"""Titans LMM / MAC / MAG / MAL and the attention baselines (spec §2.5, §2.7)."""

import math
from dataclasses import replace

import pytest
import torch
from timeloom_kernels.positions import apply_rope
from timeloom_memory.neural_memory import NeuralMemoryConfig
from timeloom_memory.titans import BLOCKS, Attention, TitansConfig, TitansLM


def model(block: str, **overrides) -> TitansLM:
    torch.manual_seed(0)
    memory = NeuralMemoryConfig(
        heads=2, head_dim=8, chunk_size=4, theta_max=0.5, eta_bias=0.0, alpha_bias=-2.0
    )
    options = dict(vocab_size=32, dim=16, depth=2, heads=2, block=block, persistent_tokens=2, segment=8)
    options.update(window=6, ffn_mult=2.0, memory=memory, hcam_chunk_size=4, hcam_top_k=2)
    options.update(overrides)
    return TitansLM(TitansConfig(**options)).double()


def tokens(batch=2, length=24, seed=0) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def in_pieces(m: TitansLM, ids: torch.Tensor, cuts) -> tuple[torch.Tensor, list]:
    """The logits of ``ids`` fed piece by piece (``cuts``: (start, end) pairs), the state carried between."""
    states, pieces = None, []
    for start, end in cuts:
        logits, states = m(ids[:, start:end], states)
        pieces.append(logits)
    return torch.cat(pieces, 1), states


@pytest.mark.parametrize("block", BLOCKS)
def test_causality(block):
    m = model(block)
    ids = tokens()
    changed = ids.clone()
    changed[:, 13:] = (changed[:, 13:] + 1) % 32
    with torch.no_grad():
        logits, _ = m(ids)
        logits_changed, _ = m(changed)
    torch.testing.assert_close(logits[:, :13], logits_changed[:, :13], atol=1e-10, rtol=0)
    assert (logits[:, 13:] - logits_changed[:, 13:]).abs().max() > 1e-6


@pytest.mark.parametrize("block", BLOCKS)
def test_every_parameter_gets_a_finite_nonzero_gradient(block):
    m = model(block)
    logits, _ = m(tokens())
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens(seed=1).flatten()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("block", ["lmm", "mac", "mag", "mal", "hcam", "swa"])
def test_pieces_with_carried_state_equal_the_whole_sequence(block):
    m = model(block)
    ids = tokens(length=32)
    cuts = [(0, 8), (8, 16), (16, 32)] if block == "mac" else [(0, 1), (1, 6), (6, 7), (7, 19), (19, 32)]
    with torch.no_grad():
        whole, _ = m(ids)
        streamed, states = in_pieces(m, ids, cuts)
    torch.testing.assert_close(streamed, whole, atol=1e-10, rtol=0)
    assert all(state.position == 32 for state in states)


def test_full_attention_refuses_to_stream():
    m = model("attention")
    with torch.no_grad():
        _, states = m(tokens(length=5))
        with pytest.raises(ValueError, match="keeps no cache"):
            m(tokens(length=3), states)


def test_mac_refuses_to_continue_inside_a_segment():
    m = model("mac")
    with torch.no_grad():
        _, states = m(tokens(length=5))
        with pytest.raises(ValueError, match="segment boundaries"):
            m(tokens(length=3), states)


def test_mac_attention_never_crosses_segments_only_the_memory_does():
    """With the memory's writes and forgetting switched off (θ, α → 0) nothing of segment 0 reaches segment 1 (the memory's
    causal conv is off too: it would carry the last tokens of the write stream over the boundary)."""
    ids = tokens(length=16)
    changed = ids.clone()
    changed[:, :8] = (changed[:, :8] + 3) % 32
    for theta_bias, carried in ((-60.0, False), (0.0, True)):
        memory = NeuralMemoryConfig(heads=2, head_dim=8, chunk_size=4, theta_max=0.5, conv_kernel=0)
        m = model("mac", depth=1, memory=memory)
        with torch.no_grad():
            m.blocks[0].memory.to_gates.bias[:2] = theta_bias
            m.blocks[0].memory.to_gates.bias[4:] = theta_bias - 4.0  # α, which also depends on the input
            a, _ = m(ids)
            b, _ = m(changed)
        differs = (a[:, 8:] - b[:, 8:]).abs().max() > 1e-9
        assert bool(differs) == carried


def test_mac_interleaved_attention_equals_the_explicit_segment_layout():
    """Keys ``[P ‖ h ‖ x]``; query i sees all of P and h_j, x_j for j ≤ i (spec §2.5 MAC step 2)."""
    torch.manual_seed(0)
    attn = Attention(8, heads=2).double()
    b, n, p = 2, 5, 3
    x, h = torch.randn(b, n, 8, dtype=torch.float64), torch.randn(b, n, 8, dtype=torch.float64)
    prefix = torch.randn(1, p, 8, dtype=torch.float64)
    got = attn(x, prefix, memory=h)

    def heads(t):
        return t.view(t.shape[0], t.shape[1], 2, 4).transpose(1, 2)

    pos = torch.arange(n)
    q, kx, vx = (heads(t) for t in attn.qkv(x).chunk(3, -1))
    _, kh, vh = (heads(t) for t in attn.qkv(h).chunk(3, -1))
    _, kp, vp = (heads(t) for t in attn.qkv(prefix.expand(b, -1, -1)).chunk(3, -1))
    q, kx, kh = apply_rope(q, pos), apply_rope(kx, pos), apply_rope(kh, pos)
    k, v = torch.cat([kp, kh, kx], 2), torch.cat([vp, vh, vx], 2)
    causal = pos[None, :] <= pos[:, None]
    visible = torch.cat([torch.ones(n, p, dtype=torch.bool), causal, causal], 1)
    scores = (q @ k.transpose(-1, -2) / 2.0).masked_fill(~visible, -math.inf)
    expected = attn.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, 8))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_sliding_window_forgets_what_is_out_of_the_window():
    m = model("swa", depth=1, persistent_tokens=0)
    ids = tokens(length=20)
    changed = ids.clone()
    changed[:, 2] = (changed[:, 2] + 1) % 32
    with torch.no_grad():
        a, _ = m(ids)
        b, _ = m(changed)
    assert (a[:, 2:8] - b[:, 2:8]).abs().max() > 1e-9  # within the window of 6
    torch.testing.assert_close(a[:, 8:], b[:, 8:], atol=1e-12, rtol=0)


def test_memory_layers_pick_which_blocks_remember():
    m = model("mag", depth=3, memory_layers=[1])
    assert [b.kind for b in m.blocks] == ["swa", "mag", "swa"]
    with pytest.raises(ValueError, match="memory_layers"):
        model("mag", memory_layers=[5])
    with pytest.raises(ValueError, match="divide segment"):
        model("mac", segment=6)


@pytest.mark.parametrize("block", ["mac", "mag"])
def test_the_gate_can_put_the_sigmoid_on_the_attention_branch(block):
    """``gate_sigmoid_on="attention"``: ``W_O(σ(norm y) ⊙ norm m)``, so the memory's readout passes linearly."""
    m = model(block, gate_sigmoid_on="attention")
    gate = m.blocks[0].gate
    y, mem = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 5, 16, dtype=torch.float64)
    expected = gate.out(torch.sigmoid(gate.norm_y(y)) * gate.norm_m(mem))
    torch.testing.assert_close(gate(y, mem), expected, atol=1e-12, rtol=0)
    ids = tokens(length=32)
    with torch.no_grad():
        whole, _ = m(ids)
        streamed, _ = in_pieces(m, ids, [(0, 8), (8, 16), (16, 32)])
        default, _ = model(block)(ids)
    torch.testing.assert_close(streamed, whole, atol=1e-10, rtol=0)
    assert (whole - default).abs().max() > 1e-6  # the option changes the model


def test_an_unknown_gate_branch_is_a_clear_error():
    with pytest.raises(ValueError, match="gate_sigmoid_on"):
        model("mag", gate_sigmoid_on="both")


def test_mac_can_store_the_stream_rather_than_the_attention_output():
    """``mac_store="stream"``: the memory stores ``x_s + y`` (normed segment plus attention output) and the gate
    reads that write; the attention and its retrieval are unchanged."""
    m = model("mac", depth=1, mac_store="stream")
    block = m.blocks[0]
    h = block.norm(m.embed(tokens(length=8)))  # one segment
    with torch.no_grad():
        got, _ = block._mac(h, None)
        state = block.memory.init_state(h.shape[0], h.device, torch.float64)
        y = block.attention(h, block.persistent, memory=block.memory.retrieve(h, state))
        read, _ = block.memory(h + y, state)
        expected = block.gate(y, read)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "block, option, value",
    [("mac", "mac_store", "stream"), ("mal", "mal_attend", "stream"), ("mal", "mal_attend", "residual")],
)
def test_the_data_flow_options_are_causal_and_stream_in_pieces(block, option, value):
    """``mac_store="stream"`` and ``mal_attend="stream"|"residual"`` change the model and keep causality and
    streaming."""
    m = model(block, **{option: value})
    ids = tokens(length=32)
    changed = ids.clone()
    changed[:, 13:] = (changed[:, 13:] + 1) % 32
    with torch.no_grad():
        whole, _ = m(ids)
        torch.testing.assert_close(m(changed)[0][:, :13], whole[:, :13], atol=1e-10, rtol=0)
        streamed, _ = in_pieces(m, ids, [(0, 8), (8, 16), (16, 32)])
        default, _ = model(block)(ids)
    torch.testing.assert_close(streamed, whole, atol=1e-10, rtol=0)
    assert (whole - default).abs().max() > 1e-6  # the option changes the model
    with pytest.raises(ValueError, match=option):
        model(block, **{option: "both"})


def test_mal_can_attend_to_the_stream_plus_the_memory():
    """``mal_attend="stream"``: the attention reads ``[P ‖ h] + Mem([P ‖ h])``, its first P rows the prefix."""
    m = model("mal", depth=1, mal_attend="stream")
    block = m.blocks[0]
    h = block.norm(m.embed(tokens(length=8)))
    with torch.no_grad():
        got, _ = block(m.embed(tokens(length=8)))
        z = torch.cat([block.persistent.expand(2, -1, -1), h], 1)
        y, _ = block.memory(z, None)
        y = z + y
        expected = m.embed(tokens(length=8)) + block.attention(y[:, 2:], y[:, :2])
        expected = expected + block.ffn(block.ffn_norm(expected))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


def test_mal_can_add_the_memory_to_the_residual_stream():
    """``mal_attend="residual"``: ``x ← x + Mem([P ‖ norm x])``, then the attention reads the RMSNorm of that
    stream, its first P rows (``P + Mem``) the prefix; every parameter, the new norm included, gets a gradient."""
    m = model("mal", depth=1, mal_attend="residual")
    block = m.blocks[0]
    x = m.embed(tokens(length=8))
    with torch.no_grad():
        got, _ = block(x)
        p = block.persistent.expand(2, -1, -1)
        y, _ = block.memory(torch.cat([p, block.norm(x)], 1), None)
        stream = torch.cat([p, x], 1) + y
        expected = stream[:, 2:] + block.attention(
            block.attention_norm(stream[:, 2:]), block.attention_norm(stream[:, :2])
        )
        expected = expected + block.ffn(block.ffn_norm(expected))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    logits, _ = m(tokens())
    logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in m.parameters())


def test_a_zero_initialised_memory_output_starts_mal_as_its_attention_alone():
    """``zero_init_output``: at initialisation MAL's residual branch adds nothing, so the block is ``x`` plus the
    attention over ``norm′ x``; the output projection still gets a gradient, and the state's fingerprint is the
    same with or without it."""
    base = model("mal").config.memory
    m = model("mal", depth=1, mal_attend="residual", memory=replace(base, zero_init_output=True))
    block = m.blocks[0]
    x = m.embed(tokens(length=8))
    with torch.no_grad():
        got, _ = block(x)
        p = block.attention_norm(block.persistent.expand(2, -1, -1))
        expected = x + block.attention(block.attention_norm(x), p)
        expected = expected + block.ffn(block.ffn_norm(expected))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    logits, _ = m(tokens())
    logits.sum().backward()
    assert block.memory.to_out.weight.grad.abs().max() > 0
    assert replace(base, zero_init_output=True).fingerprint() == base.fingerprint()
