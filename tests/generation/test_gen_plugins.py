"""Sampling-time plug-ins (spec §8, §11.5): each formula on hand-made maps, identities at their neutral settings,
edits confined to named layers, active steps and noisy rows, per-sample statistics, and the KV cache staying
exact with every plug-in on."""

import argparse
import math

import pytest
import torch
from timeloom_generation.broadway import (
    BroadWay,
    broadway_arguments,
    high_band,
    high_band_energy,
    motion_enhance,
    part_energy,
    row_energy,
)
from timeloom_generation.sampling import ARSampler
from timeloom_generation.vstar import TemporalAttentionRegularization, gaussian_band
from timeloom_kernels import attention_context, clear_processors, set_processor
from timeloom_kernels.processors import AttentionContext

BATCH, CHANNELS, SIZE, TEXT, WIDTH = 2, 2, 8, 4, 32  # the micro model of conftest.py
TEMPORAL = "blocks.*.temporal.attend"


def texts(batch: int = BATCH, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, TEXT, WIDTH, generator=generator), torch.randn(
        batch, TEXT, WIDTH, generator=generator
    )


def causal_map(rows: int, keys: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random row-stochastic maps ``(2, 3, rows, keys)`` under a bottom-right causal mask, and the mask."""
    generator = torch.Generator().manual_seed(seed)
    visible = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
    scores = torch.randn(2, 3, rows, keys, generator=generator) * 2
    return scores.masked_fill(~visible, -math.inf).softmax(-1), visible.expand(2, 3, rows, keys)


def test_gaussian_band_is_toeplitz_with_a_unit_diagonal():
    band = gaussian_band(3, 5, sigma=2.0)
    assert band.shape == (3, 5)
    torch.testing.assert_close(band[:, 2:].diagonal(), torch.ones(3))
    for offset in range(-2, 2):
        values = band.diagonal(offset + 2)
        assert torch.allclose(values, values[0].expand_as(values))
    assert math.isclose(band[2, 0].item(), math.exp(-16 / 8), rel_tol=1e-6)


def test_tar_adds_the_signed_row_max_band_to_noisy_visible_logits_only():
    tar = TemporalAttentionRegularization(sigma=1.0, strength=0.5)
    ctx = AttentionContext(step=0, num_steps=4, extra={"clean_rows": 1})
    scores = torch.tensor([[[[1.0, -math.inf, -math.inf], [2.0, -1.0, -math.inf], [-3.0, -2.0, -4.0]]]])
    edited = tar.logits(ctx, scores)
    assert torch.equal(edited[..., 0, :], scores[..., 0, :])  # a clean row
    band = gaussian_band(3, 3, 1.0)
    expected_row1 = torch.tensor([2.0 + 0.5 * 2.0 * band[1, 0], -1.0 + 0.5 * 2.0 * band[1, 1], -math.inf])
    torch.testing.assert_close(edited[0, 0, 1], expected_row1)
    # a negative row max weakens the diagonal, as upstream; max_mode="abs" strengthens it
    assert edited[0, 0, 2, 2] < scores[0, 0, 2, 2]
    absolute = TemporalAttentionRegularization(sigma=1.0, strength=0.5, max_mode="abs").logits(ctx, scores)
    assert absolute[0, 0, 2, 2] > scores[0, 0, 2, 2]
    assert torch.equal(TemporalAttentionRegularization(strength=0.0).logits(ctx, scores), scores)


def test_fme_keeps_row_sums_and_masked_zeros_and_is_the_identity_at_beta_one():
    probs, visible = causal_map(4, 6)
    enhanced = motion_enhance(probs, visible, 2.5)
    torch.testing.assert_close(enhanced.sum(-1), torch.ones(2, 3, 4))
    assert (enhanced[~visible] == 0).all()
    torch.testing.assert_close(motion_enhance(probs, visible, 1.0), probs)
    # BroadWay v1's clamp: the same edit with negatives zeroed, each row renormalised over its visible keys
    clamped = motion_enhance(probs, visible, 2.5, clamp_negative=True)
    expected = enhanced.clamp(min=0) / enhanced.clamp(min=0).sum(-1, keepdim=True)
    torch.testing.assert_close(clamped, expected)
    assert (enhanced < 0).any() and (clamped >= 0).all() and (clamped[~visible] == 0).all()
    torch.testing.assert_close(clamped.sum(-1), torch.ones(2, 3, 4))
    # the closed form is the non-DC spectrum scaled by beta (full high band), checked with an FFT on one row
    row = probs[0, 0, 3]  # 6 visible keys
    spectrum = torch.fft.fft(row.double())
    spectrum[1:] *= 2.5
    torch.testing.assert_close(enhanced[0, 0, 3].double(), torch.fft.ifft(spectrum).real)


def test_partial_band_fme_matches_a_per_row_fft_reference():
    """The spec's high band ``min(k, n - k) >= ceil(n/2) - tau`` (never DC): bins and edit checked row by row
    with the FFT; a band holding every non-DC bin is the closed form."""
    assert high_band(9, 1).nonzero().flatten().tolist() == [4, 5]
    assert high_band(8, 1).nonzero().flatten().tolist() == [3, 4, 5]  # 2 tau + 1 bins around Nyquist
    assert torch.equal(high_band(8, 4), high_band(8, None)) and not high_band(8, None)[0]
    probs, visible = causal_map(4, 9, seed=5)  # rows of 6 to 9 visible keys
    beta = torch.tensor([2.0, 3.0]).view(2, 1, 1, 1)  # one per sample
    torch.testing.assert_close(
        motion_enhance(probs, visible, beta, tau=9), motion_enhance(probs, visible, beta)
    )
    for clamp in (False, True):
        edited = motion_enhance(probs, visible, beta, clamp_negative=clamp, tau=1)
        for b, h, i in ((0, 0, 0), (1, 2, 3), (1, 1, 2)):
            n = int(visible[b, h, i].sum())
            spectrum = torch.fft.fft(probs[b, h, i, :n].double())
            band = [k for k in range(1, n) if min(k, n - k) >= math.ceil(n / 2) - 1]
            spectrum[band] *= float(beta[b])
            expected = torch.fft.ifft(spectrum).real
            if clamp:
                expected = expected.clamp(min=0) / expected.clamp(min=0).sum()
            torch.testing.assert_close(edited[b, h, i, :n].double(), expected)
            assert (edited[b, h, i, n:] == 0).all()
        torch.testing.assert_close(edited.sum(-1), torch.ones(2, 3, 4))
    # the band's energy (Parseval, 1/n) against the FFT of one row
    n = int(visible[1, 0, 2].sum())
    spectrum = torch.fft.fft(probs[1, 0, 2, :n].double())
    expected = sum(abs(spectrum[k]) ** 2 for k in range(1, n) if min(k, n - k) >= math.ceil(n / 2) - 1) / n
    torch.testing.assert_close(high_band_energy(probs, visible, 1)[1, 0, 2].double(), expected)


def test_adaptive_beta_restores_the_energy_and_alpha_zero_beta_one_is_the_identity():
    probs, visible = causal_map(4, 6)
    ctx = AttentionContext(
        step=0, num_steps=5, cfg=("uncond", "cond"), q_shape=(2, 3, 4, 6), extra={"videos": 1}
    )
    broadway = BroadWay(depth=4, alpha=0.5, beta0=1.0)
    # TSG towards a flat anchor lowers the energy; FME must bring it back
    mixed = 0.5 * probs + 0.5 * torch.where(visible, 1.0 / visible.sum(-1, keepdim=True), 0.0)
    beta = broadway.adaptive_beta(ctx, probs, mixed, visible)
    final = motion_enhance(mixed, visible, beta)
    counted = visible.sum(-1) >= 2
    e1, e3 = row_energy(probs[1])[counted[1]].mean(), row_energy(final[1])[counted[1]].mean()
    assert beta.flatten()[0] > 1 and e3 >= e1 - 1e-6
    identity = BroadWay(depth=4, alpha=0.0, beta0=1.0)
    torch.testing.assert_close(identity.adaptive_beta(ctx, probs, probs, visible).flatten(), torch.ones(2))
    # with a partial band, beta restores the per-sample energy exactly: E3 = E2_L + beta^2 E2_H = E1
    band = BroadWay(depth=4, alpha=0.5, beta0=1.0, tau=1)
    beta = band.adaptive_beta(ctx, probs, mixed, visible)
    final = motion_enhance(mixed, visible, beta, tau=1)
    e3 = row_energy(final[1])[counted[1]].mean()
    assert beta.flatten()[0] > 1
    torch.testing.assert_close(e3, e1)


def test_broadway_on_a_cached_chunk_matches_a_per_row_reference():
    """A cached chunk's rectangular maps (2 chunk queries x 3 cached + 2 chunk keys), CFG [uncond; cond], two
    videos of 3 positions each: the anchor gets FME alone, the target TSG then FME, with each video's beta from
    its own conditional rows, computed here row by row with the FFT (upstream's form of the edit)."""
    videos, positions, heads, rows, keys = 2, 3, 2, 2, 5
    batch = (
        2 * videos * positions
    )  # (branches * videos * positions) rows, branch-major as the sampler lays out
    generator = torch.Generator().manual_seed(7)
    visible = torch.ones(rows, keys, dtype=torch.bool).tril(keys - rows)
    scores = [torch.randn(batch, heads, rows, keys, generator=generator) * 3 for _ in range(2)]
    scores = [z.masked_fill(~visible, -math.inf) for z in scores]
    anchor_map, target_map = (z.softmax(-1) for z in scores)
    alpha, beta0 = 0.3, 1.2
    broadway = BroadWay(depth=4, alpha=alpha, beta0=beta0, active_fraction=1.0)
    context = dict(step=0, num_steps=4, cfg=("uncond", "cond"), extra={"videos": videos, "clean_rows": 0})
    edited = {}
    for layer, z, probs in (("2", scores[0], anchor_map), ("3", scores[1], target_map)):
        ctx = AttentionContext(name=f"blocks.{layer}.temporal.attend", q_shape=tuple(z.shape), **context)
        broadway.logits(ctx, z)
        edited[layer] = broadway.probs(ctx, probs)

    def energy(maps: torch.Tensor, cond: list[int]) -> float:  # mean of sum_j a_j^2 over these rows
        total = sum(
            float((maps[r, h, i, visible[i]].double() ** 2).sum())
            for r in cond
            for h in range(heads)
            for i in range(rows)
        )
        return total / (len(cond) * heads * rows)

    def reference(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(after, dtype=torch.float64)
        for video in range(videos):
            cond = [videos * positions + video * positions + p for p in range(positions)]
            e1, e2 = energy(before, cond), energy(after, cond)
            e2_low = sum(1 / int(visible[i].sum()) for i in range(rows)) / rows
            beta = max(beta0, math.sqrt(max(e1 - e2_low, 0) / (e2 - e2_low)))
            for branch in range(2):
                for p in range(positions):
                    r = branch * videos * positions + video * positions + p
                    for h in range(heads):
                        for i in range(rows):
                            n = int(visible[i].sum())
                            spectrum = torch.fft.fft(after[r, h, i, :n].double())
                            spectrum[1:] *= beta  # every non-DC bin is the high band
                            out[r, h, i, :n] = torch.fft.ifft(spectrum).real
        return out

    torch.testing.assert_close(edited["2"].double(), reference(anchor_map, anchor_map))
    mixed = (1 - alpha) * target_map + alpha * anchor_map  # TSG pulls toward the anchor's vanilla map
    torch.testing.assert_close(edited["3"].double(), reference(target_map, mixed))
    torch.testing.assert_close(edited["3"].sum(-1), torch.ones(batch, heads, rows))


def test_fme_on_the_noisy_keys_keeps_the_cached_keys_weights_and_matches_a_per_row_reference():
    """``fme_keys="noisy"`` on a hand-made map in the history layout (1 clean + 2 noisy frames, each sees itself
    and the frames before): the clean row and every row's clean key keep their weights, the noisy part of a noisy
    row becomes ``m/n + beta (a - m/n)`` (clamped: negatives zeroed, rescaled to ``m``), with beta from the
    noisy part's own energies, and rows stay distributions."""
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.3, 0.0], [0.2, 0.5, 0.3]])
    probs[1, 2] = 0.2  # unnormalised until here; the mask below hides it
    visible = torch.ones(3, 3, dtype=torch.bool).tril()
    probs = torch.where(visible, probs, 0.0)
    probs = (probs / probs.sum(-1, keepdim=True)).expand(1, 1, 3, 3)  # (batch, heads, rows, keys)
    scores = torch.where(visible, probs.log(), -math.inf)
    ctx = AttentionContext(
        name="blocks.2.temporal.attend",
        step=0,
        num_steps=4,
        q_shape=(1, 1, 3, 3),
        extra={"videos": 1, "clean_rows": 1},
    )
    for clamp, beta0 in ((False, 3.0), (True, 10.0)):
        broadway = BroadWay(depth=4, alpha=0.0, beta0=beta0, fme_keys="noisy", clamp_negative=clamp)
        broadway.logits(ctx, scores)
        edited = broadway.probs(ctx, probs)[0, 0]
        assert torch.equal(edited[0], probs[0, 0, 0])  # the clean row
        assert torch.equal(edited[:, 0], probs[0, 0, :, 0])  # the clean key, in every row
        assert torch.equal(edited[1], probs[0, 0, 1])  # one noisy key: nothing to edit
        assert edited[1, 2] == 0 and edited[0, 1:].eq(0).all()  # masked keys
        # row 2's noisy part (0.5, 0.3) of mass 0.8: alpha 0 keeps its energy, so beta is beta0
        mass, part = 0.8, torch.tensor([0.5, 0.3])
        expected = mass / 2 + beta0 * (part - mass / 2)
        if clamp:  # 0.4 +- 1.0: the smaller weight goes negative, so the part collapses onto the larger
            expected = expected.clamp(min=0) * mass / expected.clamp(min=0).sum()
        torch.testing.assert_close(edited[2, 1:], expected)
        torch.testing.assert_close(edited.sum(-1), torch.ones(3))
    # the adaptive beta's energies are the noisy part's, as a distribution: (0.5² + 0.3²) / 0.8²
    part = visible & torch.tensor([False, True, True])
    torch.testing.assert_close(part_energy(probs, part)[0, 0, 2], torch.tensor(0.34 / 0.64))
    # on a whole row the part is the row: the same edit as the default's
    full, full_visible = causal_map(4, 6)
    torch.testing.assert_close(part_energy(full, full_visible), row_energy(full))


def test_default_mapping_of_anchor_and_target_blocks(random_model):
    assert BroadWay(depth=4).anchor_of == {"blocks.3.temporal.attend": "blocks.2.temporal.attend"}
    base = BroadWay(depth=28)
    assert base.anchors == [f"blocks.{b}.temporal.attend" for b in (14, 15, 16, 17)]
    assert base.anchor_of["blocks.22.temporal.attend"] == "blocks.14.temporal.attend"
    with pytest.raises(ValueError, match="after the anchors"):
        BroadWay(depth=4, anchors=[3], targets=[1])
    assert sorted(BroadWay(depth=4).attach(random_model(depth=4))) == [
        "blocks.2.temporal.attend",
        "blocks.3.temporal.attend",
    ]


def plugins(depth: int = 4):
    return {
        "broadway": lambda model: BroadWay(depth=depth, alpha=0.6, beta0=1.5, active_fraction=0.5).attach(
            model
        ),
        "broadway-noisy-keys": lambda model: BroadWay(
            depth=depth, alpha=0.3, beta0=5.0, active_fraction=0.5, fme_keys="noisy"
        ).attach(model),
        "broadway-band": lambda model: BroadWay(
            depth=depth, alpha=0.3, beta0=5.0, active_fraction=0.5, tau=1, clamp_negative=True
        ).attach(model),
        "vstar": lambda model: set_processor(model, TEMPORAL, TemporalAttentionRegularization(sigma=1.0)),
    }


@pytest.mark.parametrize("plugin", ["broadway", "vstar"])
def test_plugins_edit_only_active_steps_and_blocks_from_the_first_named_layer(random_model, plugin):
    model = random_model(depth=4)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, 4, SIZE, SIZE, generator=generator)
    tau = torch.full((BATCH, 4), 0.7)
    context, _ = texts()
    outputs: dict[str, list] = {}

    def record(key):
        return lambda module, args, output: outputs.setdefault(key, []).append(output)

    hooks = [block.register_forward_hook(record(f"block{i}")) for i, block in enumerate(model.blocks)]

    def run(step: int) -> torch.Tensor:
        with (
            torch.no_grad(),
            attention_context(
                step=step, num_steps=4, cfg=("cond",), extra={"clean_rows": 1, "videos": BATCH}
            ),
        ):
            return model(x, tau, context)

    bare_active, bare_inactive = run(0), run(3)
    plugins()[plugin](model)
    edited_active, edited_inactive = run(0), run(3)
    for hook in hooks:
        hook.remove()
    assert torch.equal(edited_inactive, bare_inactive)  # step 3 is outside the active steps
    assert (edited_active - bare_active).abs().max() > 1e-4
    first_named = 2 if plugin == "broadway" else 0
    for block in range(first_named):  # blocks before the first hooked layer: bitwise the bare model
        assert torch.equal(outputs[f"block{block}"][2], outputs[f"block{block}"][0])
    changed = outputs[f"block{first_named}"][2] - outputs[f"block{first_named}"][0]
    assert changed[:, 0].abs().max() < 1e-5  # the clean row (frame 0) is untouched
    assert changed[:, 1:].abs().max() > 1e-4


@pytest.mark.parametrize("plugin", ["broadway", "broadway-noisy-keys", "broadway-band", "vstar"])
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cache_stays_exact_with_plugins_on(random_model, plugin, guidance):
    model = random_model(depth=4)
    plugins()[plugin](model)
    context, null = texts()
    settings = dict(chunk_frames=2, cache_frames=3, steps=4, guidance=guidance)
    cached = ARSampler(model, mode="cached", **settings).sample(
        context, null, frames=9, grid=(SIZE, SIZE), seed=2
    )
    history = ARSampler(model, mode="history", **settings).sample(
        context, null, frames=9, grid=(SIZE, SIZE), seed=2
    )
    assert (cached - history).abs().max() <= 1e-4
    clear_processors(model)
    bare = ARSampler(model, mode="cached", **settings).sample(
        context, null, frames=9, grid=(SIZE, SIZE), seed=2
    )
    assert (cached - bare).abs().max() > 1e-3  # the plug-in did act


@pytest.mark.parametrize("plugin", ["broadway", "broadway-noisy-keys", "broadway-band", "vstar"])
def test_plugins_are_batch_invariant(random_model, plugin):
    model = random_model(depth=4)
    plugins()[plugin](model)
    context, null = texts()
    sampler = ARSampler(model, chunk_frames=2, cache_frames=3, steps=4, guidance=3.0)
    pair = sampler.sample(context, null, frames=5, grid=(SIZE, SIZE), seed=1)
    alone = sampler.sample(context[:1], null[:1], frames=5, grid=(SIZE, SIZE), seed=1)
    # the noise of video 0 is the first row of the batch noise in both runs
    assert (pair[:1] - alone).abs().max() <= 1e-4


def test_synopsis_rows_are_exact_at_anchors_and_interpolate_between():
    from timeloom_generation.text import synopsis_weights

    weights = synopsis_weights(3, 9)  # anchors 0, 4, 8
    torch.testing.assert_close(weights.sum(1), torch.ones(9))
    for k, anchor in enumerate((0, 4, 8)):
        assert torch.equal(weights[anchor], torch.eye(3)[k])
    torch.testing.assert_close(weights[1], torch.tensor([0.75, 0.25, 0.0]))
    same = synopsis_weights(3, 9, mode="same")
    assert torch.equal(same[3], torch.tensor([1.0, 0.0, 0.0])) and torch.equal(
        same[4], torch.tensor([0.0, 1.0, 0.0])
    )
    long = synopsis_weights(4, 300)  # anchors past 127 frames stay exact (int64)
    assert torch.equal(long[299], torch.eye(4)[3]) and torch.equal(long[199], torch.eye(4)[2])


def test_synopsis_context_per_frame_and_named_errors():
    from timeloom_generation.text import TextConditioner

    text = TextConditioner(width=WIDTH, max_tokens=TEXT, encoder="vocab")
    context = text.synopsis(["the digit 1 moves left", "the digit 1 moves up"], frames=5)
    assert context.shape == (5, TEXT, WIDTH)
    torch.testing.assert_close(context[0], text(["the digit 1 moves left"])[0])
    torch.testing.assert_close(context[4], text(["the digit 1 moves up"])[0])
    with pytest.raises(ValueError, match="3 sub-prompts cannot each anchor one of 2 frames"):
        text.synopsis(["a", "b", "c"], frames=2)
    with pytest.raises(ValueError, match="caption 1 is empty"):
        text.synopsis(["a", ""], frames=4)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_cache_stays_exact_with_per_frame_text(random_model, guidance):
    model = random_model()
    generator = torch.Generator().manual_seed(9)
    context = torch.randn(BATCH, 9, TEXT, WIDTH, generator=generator)  # one text row per frame
    null = torch.randn(BATCH, TEXT, WIDTH, generator=generator)
    settings = dict(chunk_frames=2, cache_frames=3, steps=3, guidance=guidance)
    cached = ARSampler(model, mode="cached", **settings).sample(context, null, frames=9, grid=(SIZE, SIZE))
    history = ARSampler(model, mode="history", **settings).sample(context, null, frames=9, grid=(SIZE, SIZE))
    assert (cached - history).abs().max() <= 1e-4
    shared = ARSampler(model, mode="cached", **settings).sample(
        context[:, 0], null, frames=9, grid=(SIZE, SIZE)
    )
    first_chunk = ARSampler(model, mode="cached", **settings).sample(
        context[:, :3], null, frames=3, grid=(SIZE, SIZE)
    )
    assert torch.equal(cached[:, :, :3], first_chunk)  # a frame's text reaches no earlier frame
    assert (cached - shared).abs().max() > 1e-3  # later frames follow their own rows
    with pytest.raises(ValueError, match="per frame"):
        ARSampler(model, **settings).sample(context, null, frames=8, grid=(SIZE, SIZE))


def test_broadway_arguments_parse_the_known_floats_and_name_an_unknown_one():
    assert broadway_arguments("alpha=0.6, beta0=1.5,active_fraction=0.2") == {
        "alpha": 0.6,
        "beta0": 1.5,
        "active_fraction": 0.2,
    }
    assert broadway_arguments("alpha=0,anchors=0,targets=1+2+3") == {
        "alpha": 0.0,
        "anchors": [0],
        "targets": [1, 2, 3],
    }
    assert broadway_arguments("targets=") == {"targets": []}  # FME on the anchors alone
    assert broadway_arguments("clamp_negative=1") == {"clamp_negative": True}
    with pytest.raises(argparse.ArgumentTypeError, match="unknown BroadWay argument 'gamma'"):
        broadway_arguments("gamma=1")
    with pytest.raises(argparse.ArgumentTypeError, match="'targets=1\\+x'.*not a number"):
        broadway_arguments("targets=1+x")
    with pytest.raises(argparse.ArgumentTypeError, match="'clamp_negative=yes'.*0 or 1"):
        broadway_arguments("clamp_negative=yes")
    assert broadway_arguments("fme_keys=noisy,tau=1") == {"fme_keys": "noisy", "tau": 1}
    with pytest.raises(argparse.ArgumentTypeError, match="fme_keys='clean'.*one of"):
        broadway_arguments("fme_keys=clean")
    with pytest.raises(ValueError, match="fme_keys must be one of"):
        BroadWay(depth=4, fme_keys="clean")
    with pytest.raises(ValueError, match="tau must be"):
        BroadWay(depth=4, tau=-1)
