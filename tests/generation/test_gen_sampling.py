"""Autoregressive sampling (spec §7, §11.2–4, §11.6): the cached sampler equals the full-history recompute with
the same noise, given frames come back bitwise, rollouts extend bitwise, each chunk costs S reads and one write,
guidance 1 is the conditional model alone, and bad input is named before any compute."""

import pytest
import torch
from timeloom_generation.diffusion import euler_levels
from timeloom_generation.sampling import ARSampler, NoiseSource, chunk_plan

BATCH, CHANNELS, SIZE, TEXT, WIDTH = 2, 2, 8, 4, 32  # the micro model of conftest.py


def texts(seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, TEXT, WIDTH, generator=generator), torch.randn(
        BATCH, TEXT, WIDTH, generator=generator
    )


def given_frames(count: int, seed: int = 5):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, CHANNELS, count, SIZE, SIZE, generator=generator)


class ForwardCounter:
    """Counts model calls and records each call's (batch, frames, write)."""

    def __init__(self, model):
        self.calls = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.calls.append((args[0].shape[0], args[0].shape[2], kwargs.get("write", False)))


def test_chunk_plan_covers_the_rollout_once():
    assert chunk_plan(8, 0, 2) == [range(0, 3), range(3, 5), range(5, 7), range(7, 8)]
    assert chunk_plan(7, 3, 2) == [range(0, 3), range(3, 5), range(5, 7)]


def test_noise_is_keyed_by_frame_not_by_call_order():
    noise = NoiseSource(7, (BATCH, CHANNELS, SIZE, SIZE))
    together = noise("init", range(2, 6))
    assert torch.equal(
        torch.cat((noise("init", range(4, 6)), noise("init", range(2, 4))), 2)[:, :, [2, 3, 0, 1]], together
    )
    assert not torch.equal(noise("prefix", range(2, 6)), together)


@pytest.mark.parametrize("given", [0, 1, 3])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_cached_rollout_equals_full_history_recompute_through_evictions(random_model, given, guidance):
    model = random_model()
    context, null = texts()
    # K = 3 frames of cache, C = 2: 15 frames evict many times; positions run far past K + C.
    settings = dict(chunk_frames=2, cache_frames=3, steps=3, guidance=guidance, prefix_noise=0.15, shift=2.0)
    prompt = given_frames(given) if given else None
    grid = (SIZE, SIZE)
    cached = ARSampler(model, mode="cached", **settings).sample(
        context, null, frames=15, given=prompt, grid=grid, seed=1
    )
    history = ARSampler(model, mode="history", **settings).sample(
        context, null, frames=15, given=prompt, grid=grid, seed=1
    )
    assert cached.shape == (BATCH, CHANNELS, 15, SIZE, SIZE)
    assert (cached - history).abs().max() <= 1e-4
    assert cached.abs().max() < 1e3  # a real rollout, not a blow-up compared with itself


def test_cache_changes_the_result_only_through_its_window(random_model):
    """A larger cache sees more context: the rollouts agree until the first eviction, then differ."""
    model = random_model()
    context, _ = texts()
    small = ARSampler(model, chunk_frames=2, cache_frames=3, steps=2).sample(
        context, frames=9, grid=(SIZE, SIZE)
    )
    large = ARSampler(model, chunk_frames=2, cache_frames=9, steps=2).sample(
        context, frames=9, grid=(SIZE, SIZE)
    )
    assert torch.equal(small[:, :, :5], large[:, :, :5])  # chunks [0,3) and [3,5): nothing evicted yet
    assert (small[:, :, 5:] - large[:, :, 5:]).abs().max() > 1e-3


def test_given_frames_come_back_bitwise_and_rollouts_extend_bitwise(random_model):
    model = random_model()
    context, null = texts()
    sampler = ARSampler(model, chunk_frames=2, cache_frames=5, steps=2, guidance=3.0)
    prompt = given_frames(1)
    short = sampler.sample(context, null, frames=7, given=prompt, seed=4)
    longer = sampler.sample(context, null, frames=11, given=prompt, seed=4)
    assert torch.equal(short[:, :, :1], prompt)
    assert torch.equal(longer[:, :, :7], short)


def test_each_chunk_costs_s_reads_and_one_write_with_branches_batched(random_model):
    model = random_model()
    counter = ForwardCounter(model)
    context, null = texts()
    ARSampler(model, chunk_frames=2, cache_frames=5, steps=4, guidance=2.0).sample(
        context, null, frames=8, given=given_frames(2), seed=0
    )
    # chunks: given [0,2) (write only), [2,4), [4,6), [6,8) (last: not written)
    expected = [(2 * BATCH, 2, True)]
    for last in (False, False, True):
        expected += [(2 * BATCH, 2, False)] * 4 + ([] if last else [(2 * BATCH, 2, True)])
    assert counter.calls == expected


def test_guidance_one_runs_only_the_conditional_model(random_model):
    """w = 1 skips the null branch and is exactly a hand-written Euler loop on the conditional model."""
    model = random_model()
    counter = ForwardCounter(model)
    context, null = texts()
    steps, shift = 5, 3.0
    sampled = ARSampler(model, chunk_frames=2, cache_frames=5, steps=steps, guidance=1.0, shift=shift).sample(
        context, null, frames=3, grid=(SIZE, SIZE), seed=2
    )
    assert all(batch == BATCH for batch, _, _ in counter.calls)
    x = NoiseSource(2, (BATCH, CHANNELS, SIZE, SIZE))("init", range(3))
    levels = euler_levels(steps, shift)
    with torch.no_grad():
        for k in range(steps):
            x = x + (levels[k + 1] - levels[k]) * model(x, levels[k].expand(BATCH, 3), context)
    torch.testing.assert_close(sampled, x, atol=1e-6, rtol=0)


def test_guidance_mixes_the_two_branches(random_model):
    model = random_model()
    context, null = texts()
    plain = ARSampler(model, steps=2, guidance=1.0).sample(context, null, frames=3, grid=(SIZE, SIZE))
    guided = ARSampler(model, steps=2, guidance=5.0).sample(context, null, frames=3, grid=(SIZE, SIZE))
    assert (plain - guided).abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(given=torch.zeros(BATCH, 3, 1, SIZE, SIZE)), "latent channels"),
        (dict(given=torch.zeros(BATCH, CHANNELS, 1, 7, 8)), "multiple of the model's patch"),
        (dict(given=torch.zeros(BATCH + 1, CHANNELS, 1, SIZE, SIZE)), "text batch"),
        (dict(given=torch.zeros(BATCH, CHANNELS, 9, SIZE, SIZE)), "cache capacity"),
        (dict(grid=(SIZE, SIZE), frames=0), "frames must be"),
        (dict(), "latent grid"),
        (dict(grid=(SIZE, SIZE), context=torch.zeros(BATCH, TEXT + 1, WIDTH)), "context must be"),
        (dict(grid=(SIZE, SIZE), null=None), "null_context"),
    ],
)
def test_bad_input_is_named_before_any_compute(random_model, kwargs, match):
    model = random_model()
    counter = ForwardCounter(model)
    context, null = texts()
    context, null = kwargs.pop("context", context), kwargs.pop("null", null)
    frames = kwargs.pop("frames", 12)
    with pytest.raises(ValueError, match=match):
        ARSampler(model, cache_frames=5, guidance=3.0).sample(context, null, frames=frames, **kwargs)
    assert counter.calls == []


def test_windowed_recompute_equals_the_cache_only_until_the_first_eviction(random_model):
    model = random_model()
    context, _ = texts()
    settings = dict(chunk_frames=2, cache_frames=5, steps=2)
    cached = ARSampler(model, mode="cached", **settings).sample(context, frames=11, grid=(SIZE, SIZE))
    window = ARSampler(model, mode="window", **settings).sample(context, frames=11, grid=(SIZE, SIZE))
    # chunks [0,3) [3,5) [5,7) [7,9) [9,11): writing [5,7) evicts frames 0-1, so from chunk [7,9) on the
    # cached keys of frames 2-4 still carry frames 0-1 while the window recomputes them without
    assert (cached[:, :, :7] - window[:, :, :7]).abs().max() <= 1e-4
    assert (cached[:, :, 7:] - window[:, :, 7:]).abs().max() > 1e-3


def test_a_long_rollout_sees_only_the_frame_distances_of_training(random_model):
    """36 frames with K = 7, C = 2 (the tiny recipe): past the training clip's 9 frames, every temporal attention
    still has at most K + C keys, all at distances 0..K+C-1 behind or at its queries (RoPE sees only these),
    and the keys are the latest K frames before the chunk (FIFO) plus the chunk itself."""
    model = random_model()
    seen = []

    def record(module, args, kwargs):
        seen.append((kwargs["q_pos"].tolist(), kwargs["kv_pos"].tolist()))

    model.blocks[0].temporal.attend.register_forward_pre_hook(record, with_kwargs=True)
    context, _ = texts()
    ARSampler(model, chunk_frames=2, cache_frames=7, steps=2).sample(context, frames=36, grid=(SIZE, SIZE))
    assert max(max(queries) for queries, _ in seen) == 35
    for queries, keys in seen:
        assert len(keys) <= 9 and max(queries) - min(keys) <= 8
        written = [key for key in keys if key < queries[0]]
        assert sorted(written) == list(range(max(0, queries[0] - 7), queries[0]))  # the latest K, oldest gone
