"""Attention processors: named layers, only active layers pay, edits take effect, CFG blocks by metadata."""

from __future__ import annotations

import pytest
import torch
from timeloom_kernels import masks as M
from timeloom_kernels.attention import attend
from timeloom_kernels.processors import (
    Attend,
    AttentionProcessor,
    AttentionStore,
    attention_context,
    clear_processors,
    current_context,
    name_attention_layers,
    set_processor,
)
from torch import nn

BATCH, LENGTH, DIM, HEADS = 2, 7, 16, 2


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.attend = Attend()

    def forward(self, x: torch.Tensor, mask: M.Mask) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, HEADS, DIM // HEADS).permute(2, 0, 3, 1, 4)
        return x + self.attend(q, k, v, mask).transpose(1, 2).reshape(batch, length, DIM)


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(3))
        name_attention_layers(self)

    def forward(self, x: torch.Tensor, mask: M.Mask) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask)
        return x


@pytest.fixture
def model() -> Toy:
    torch.manual_seed(0)
    return Toy()


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(BATCH, LENGTH, DIM, generator=torch.Generator().manual_seed(1))


def record_calls(model: Toy) -> dict[str, tuple]:
    """Each layer's (q, k, v, mask) and output, captured with forward hooks."""
    calls: dict[str, tuple] = {}
    for module in model.modules():
        if isinstance(module, Attend):
            module.register_forward_hook(lambda m, args, out: calls.__setitem__(m.name, (*args, out)))
    return calls


class Scale(AttentionProcessor):
    """Multiplies the logits: the same as attending with a larger scale."""

    def __init__(self, factor: float) -> None:
        self.factor = factor

    def logits(self, ctx, scores):
        return scores * self.factor


class UniformOverAllowed(AttentionProcessor):
    """Replaces each row by the uniform distribution over its allowed keys (still stochastic)."""

    def __init__(self, cfg_block: str | None = None) -> None:
        self.cfg_block = cfg_block

    def probs(self, ctx, probs):
        uniform = (probs > 0).to(probs.dtype)
        uniform = uniform / uniform.sum(-1, keepdim=True)
        if self.cfg_block is None:
            return uniform
        edited = probs.clone()
        rows = ctx.cfg_slice(self.cfg_block)
        edited[rows] = uniform[rows]
        return edited


class Recorder(AttentionProcessor):
    """Active in the first 20 % of steps (like BroadWay); records which (layer, step) it ran on."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int | None]] = []

    def active(self, ctx):
        return ctx.progress is not None and ctx.progress < 0.2

    def logits(self, ctx, scores):
        self.seen.append((ctx.name, ctx.step))
        return scores


def test_layers_are_named_in_order(model):
    assert name_attention_layers(model) == ["blocks.0.attend", "blocks.1.attend", "blocks.2.attend"]
    assert [m.index for m in model.modules() if isinstance(m, Attend)] == [0, 1, 2]


def test_identity_processor_is_bit_identical_on_reference(model, x):
    fast = model(x, M.causal())
    set_processor(model, "*", AttentionProcessor())
    calls = record_calls(model)
    processed = model(x, M.causal())
    for q, k, v, mask, out in calls.values():
        assert torch.equal(out, attend(q, k, v, mask, backend="reference"))
    torch.testing.assert_close(processed, fast, atol=2e-5, rtol=1e-4)


def test_only_matched_layers_switch_backend(model, x):
    assert set_processor(model, "blocks.1.*", AttentionProcessor()) == ["blocks.1.attend"]
    calls = record_calls(model)
    model(x, M.causal())
    for name, (q, k, v, mask, out) in calls.items():
        reference, sdpa = attend(q, k, v, mask, backend="reference"), attend(q, k, v, mask, backend="sdpa")
        assert not torch.equal(reference, sdpa), "inputs too tame to tell the backends apart"
        assert torch.equal(out, reference if name == "blocks.1.attend" else sdpa), name


def test_inactive_processor_costs_nothing(model, x):
    plain = model(x, M.causal())
    recorder = Recorder()
    set_processor(model, "*", recorder)
    with attention_context(step=5, num_steps=10):
        assert torch.equal(model(x, M.causal()), plain)
    assert recorder.seen == []


def test_processor_active_by_step(model, x):
    recorder = Recorder()
    set_processor(model, "blocks.[02].*", recorder)
    for step in range(10):
        with attention_context(step=step, num_steps=10):
            model(x, M.causal())
    assert recorder.seen == [(f"blocks.{i}.attend", s) for s in (0, 1) for i in (0, 2)]


def test_logit_edit_takes_effect(model, x):
    set_processor(model, "*", Scale(3.0))
    calls = record_calls(model)
    model(x, M.block_causal(2))
    for q, k, v, mask, out in calls.values():
        sharper = attend(q, k, v, mask, scale=3.0 * q.shape[-1] ** -0.5, backend="reference")
        torch.testing.assert_close(out, sharper, atol=1e-6, rtol=1e-5)


def test_probs_edit_takes_effect_and_rows_stay_stochastic():
    layer = Attend()
    layer.processor = UniformOverAllowed()
    store = AttentionStore(reduce="none")
    q, k, v = torch.randn(3, BATCH, HEADS, LENGTH, 4, generator=torch.Generator().manual_seed(2))
    out = layer(q, k, v, M.causal())
    running_mean = v.cumsum(2) / torch.arange(1, LENGTH + 1).view(1, 1, -1, 1)
    torch.testing.assert_close(out, running_mean)
    layer.processor = store
    layer(q, k, v, M.causal())
    torch.testing.assert_close(store.maps[""][0].sum(-1), torch.ones(BATCH, HEADS, LENGTH))


def test_attention_store_collects_matched_maps(model, x):
    store = AttentionStore("blocks.[02].*")
    set_processor(model, "*", store)  # the store's own glob decides where it is active
    calls = record_calls(model)
    model(x, M.causal())
    model(x, M.causal())
    assert sorted(store.maps) == ["blocks.0.attend", "blocks.2.attend"]
    for name, maps in store.maps.items():
        q, k, v, mask, _ = calls[name]
        _, probs = attend(q, k, v, mask, return_probs=True)
        assert len(maps) == 2 and maps[-1].shape == (BATCH, LENGTH, LENGTH)
        torch.testing.assert_close(maps[-1], probs.mean(1))
        assert maps[-1].triu(1).eq(0).all()


@pytest.mark.parametrize("layout", [("uncond", "cond"), ("cond", "uncond")])
def test_cfg_blocks_are_addressed_by_metadata(layout):
    layer = Attend()
    q, k, v = torch.randn(3, 4, HEADS, LENGTH, 4, generator=torch.Generator().manual_seed(3))
    plain = attend(q, k, v, M.causal(), backend="reference")
    layer.processor = UniformOverAllowed(cfg_block="cond")
    with attention_context(cfg=layout):
        out = layer(q, k, v, M.causal())
    cond = slice(2, 4) if layout[1] == "cond" else slice(0, 2)
    uncond = slice(0, 2) if layout[1] == "cond" else slice(2, 4)
    running_mean = v.cumsum(2) / torch.arange(1, LENGTH + 1).view(1, 1, -1, 1)
    assert torch.equal(out[uncond], plain[uncond])
    torch.testing.assert_close(out[cond], running_mean[cond])

    store = AttentionStore(cfg="cond")
    layer.processor = store
    with attention_context(cfg=layout):
        layer(q, k, v, M.causal())
    _, probs = attend(q, k, v, M.causal(), return_probs=True)
    torch.testing.assert_close(store.maps[""][0], probs[cond].mean(1))


def test_positions_hook_repositions_the_call():
    class LookBack(AttentionProcessor):
        """Queries placed two positions earlier: each sees two fewer keys under a causal mask."""

        def positions(self, ctx, q, k):
            return torch.arange(q.shape[2]) + k.shape[2] - q.shape[2] - 2, None

    layer = Attend()
    layer.processor = LookBack()
    q, k, v = torch.randn(3, 1, HEADS, LENGTH, 4, generator=torch.Generator().manual_seed(4))
    expected = attend(q, k, v, M.causal(), q_pos=torch.arange(LENGTH) - 2, backend="reference")
    assert torch.equal(layer(q, k, v, M.causal()), expected)


def test_context_nests_and_cfg_slice_checks():
    with attention_context(step=3, num_steps=10, cfg=["uncond", "cond"]):
        with attention_context(step=4, extra={"grid": (2, 3)}):
            ctx = current_context()
            assert (ctx.step, ctx.num_steps, ctx.cfg, ctx.progress) == (4, 10, ("uncond", "cond"), 0.4)
        assert current_context().step == 3
    assert current_context().step is None
    with pytest.raises(ValueError, match="unknown attention context fields"):
        with attention_context(stepp=1):
            pass
    with pytest.raises(ValueError, match="not in the context's layout"):
        current_context().cfg_slice("cond")


def test_explicit_backend_with_active_processor_raises():
    layer = Attend()
    layer.processor = AttentionProcessor()
    q = torch.randn(1, HEADS, LENGTH, 4)
    with pytest.raises(ValueError, match="probabilities"):
        layer(q, q, q, M.causal(), backend="sdpa")


def test_set_and_clear_processors(model, x):
    with pytest.raises(ValueError, match="no attention layer matches"):
        set_processor(model, "decoder.*", AttentionProcessor())
    with pytest.raises(ValueError, match="a processor needs"):
        set_processor(model, "*", object())
    set_processor(model, "*", AttentionProcessor())
    clear_processors(model, "blocks.0.*")
    assert [m.processor is None for m in model.modules() if isinstance(m, Attend)] == [True, False, False]
    clear_processors(model)
    assert all(m.processor is None for m in model.modules() if isinstance(m, Attend))
