"""KVCache: cached attention equals the uncached forward (fp64, atol 1e-10), FIFO in whole frames, frozen reads."""

import pytest
import torch
from timeloom_kernels.attention import attend
from timeloom_kernels.kv_cache import KVCache, KVCacheStack
from timeloom_kernels.masks import block_causal, causal, frame_window, key_padding
from timeloom_kernels.positions import apply_rope
from torch import nn

ATOL = 1e-10
B, HQ, HKV, D = 2, 4, 2, 8


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=ATOL)


def _qkv(length: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, length, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, HKV, length, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, HKV, length, D, generator=gen, dtype=torch.float64)
    return q, k, v


def _cache(capacity: int | None = None, **kwargs) -> KVCache:
    return KVCache(B, HKV, D, capacity, dtype=torch.float64, **kwargs)


def _attend_cached(q: torch.Tensor, cache: KVCache, q_pos: torch.Tensor, mask=None) -> torch.Tensor:
    k, v, positions, _ = cache.fetch()
    return attend(
        q, k, v, causal() if mask is None else mask, q_pos=q_pos, kv_pos=positions, backend="reference"
    )


def test_token_by_token_decoding_matches_full_causal_pass():
    length = 13
    q, k, v = _qkv(length)
    full = attend(q, k, v, causal(), backend="reference")
    cache = _cache(length)
    for t in range(length):
        cache.append(k[:, :, t : t + 1], v[:, :, t : t + 1], torch.tensor([t]))
        out = _attend_cached(q[:, :, t : t + 1], cache, torch.tensor([t]))
        assert_close(out, full[:, :, t : t + 1])


def test_chunked_prefill_with_random_chunk_sizes_matches_full():
    length = 40
    q, k, v = _qkv(length, seed=1)
    full = attend(q, k, v, causal(), backend="reference")
    gen = torch.Generator().manual_seed(0)
    cache, start, outputs = _cache(length), 0, []
    while start < length:
        end = min(length, start + int(torch.randint(1, 9, (1,), generator=gen)))
        positions = torch.arange(start, end)
        cache.append(k[:, :, start:end], v[:, :, start:end], positions)
        outputs.append(_attend_cached(q[:, :, start:end], cache, positions))
        start = end
    assert_close(torch.cat(outputs, dim=2), full)


def test_fifo_window_matches_frame_window_mask():
    per_frame, window, frames = 3, 2, 6
    q, k, v = _qkv(per_frame * frames, seed=2)
    full = attend(q, k, v, frame_window(per_frame, window), backend="reference")
    cache = _cache(max_len=window * per_frame, unit=per_frame)
    for f in range(frames):
        tokens = slice(f * per_frame, (f + 1) * per_frame)
        positions = torch.arange(f * per_frame, (f + 1) * per_frame)
        evicted = cache.append(k[:, :, tokens], v[:, :, tokens], positions)
        assert evicted == (per_frame if f >= window else 0)
        assert cache.length == min(f + 1, window) * per_frame
        out = _attend_cached(q[:, :, tokens], cache, positions, mask=block_causal(per_frame))
        assert_close(out, full[:, :, tokens])


class RopeAttention(nn.Module):
    """One attention layer: projections, RoPE on q and k, `attend`, output projection."""

    def __init__(self, dim: int = 16, heads: int = HQ, kv_heads: int = HKV) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, dtype=torch.float64)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim, dtype=torch.float64)
        self.out = nn.Linear(dim, dim, dtype=torch.float64)

    def split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        return x.unflatten(-1, (heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None, mask=None):
        q = self.split(self.q(x), self.heads)
        k, v = (self.split(t, self.kv_heads) for t in self.kv(x).chunk(2, dim=-1))
        mask = causal() if mask is None else mask
        if cache is None:
            q, k = apply_rope(q, positions), apply_rope(k, positions)
            out = attend(q, k, v, mask, q_pos=positions, kv_pos=positions, backend="reference")
        else:
            if cache.store == "post_rope":
                k = apply_rope(k, positions)
            cache.append(k, v, positions)
            keys, values, kv_pos, _ = cache.fetch()
            q_pos = kv_pos[
                :, -x.shape[1] :
            ]  # the new tokens are the newest entries (re-based in window mode)
            q = apply_rope(q, q_pos)
            out = attend(q, keys, values, mask, q_pos=q_pos, kv_pos=kv_pos, backend="reference")
        return self.out(out.transpose(1, 2).flatten(2))


class ToyModel(nn.Module):
    """Two pre-norm blocks of RoPE attention and an MLP."""

    def __init__(self, dim: int = 16, layers: int = 2) -> None:
        super().__init__()
        self.attn = nn.ModuleList(RopeAttention(dim) for _ in range(layers))
        self.mlp = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim)).double()
            for _ in range(layers)
        )
        self.norm = nn.ModuleList(nn.LayerNorm(dim, dtype=torch.float64) for _ in range(2 * layers))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, caches: KVCacheStack | None = None):
        for i, (attn, mlp) in enumerate(zip(self.attn, self.mlp)):
            x = x + attn(self.norm[2 * i](x), positions, None if caches is None else caches[i])
            x = x + mlp(self.norm[2 * i + 1](x))
        return x


@pytest.mark.parametrize("store", ["post_rope", "pre_rope"])
def test_two_layer_rope_model_cached_equals_uncached(store):
    torch.manual_seed(0)
    model, length = ToyModel(), 17
    x = torch.randn(B, length, 16, dtype=torch.float64)
    with torch.no_grad():
        full = model(x, torch.arange(length))
        caches = KVCacheStack(2, B, HKV, 4, length, store=store, dtype=torch.float64)
        outputs, start = [], 0
        for size in (5, 1, 1, 7, 3):  # a prefill, then decoding steps and chunks
            positions = torch.arange(start, start + size)
            outputs.append(model(x[:, start : start + size], positions, caches))
            start += size
    assert_close(torch.cat(outputs, dim=1), full)


def test_window_mode_matches_fresh_forward_on_retained_window():
    torch.manual_seed(1)
    layer, per_frame, window, frames = RopeAttention(), 2, 3, 7
    x = torch.randn(B, per_frame * frames, 16, dtype=torch.float64)
    cache = KVCache(
        B,
        HKV,
        4,
        max_len=window * per_frame,
        unit=per_frame,
        position_mode="window",
        store="pre_rope",
        dtype=torch.float64,
    )
    mask = block_causal(per_frame)
    with torch.no_grad():
        for f in range(frames):
            positions = torch.arange(f * per_frame, (f + 1) * per_frame)  # absolute, stored for bookkeeping
            cached = layer(x[:, positions], positions, cache, mask)
            retained = x[:, max(0, f + 1 - window) * per_frame : (f + 1) * per_frame]
            fresh = layer(retained, torch.arange(retained.shape[1]), None, mask)
            assert_close(cached, fresh[:, -per_frame:])
            assert cache.fetch().positions[0].tolist() == list(range(retained.shape[1]))
    assert cache.next_positions(2)[0].tolist() == [window * per_frame, window * per_frame + 1]


def test_frozen_cache_is_bit_identical_after_100_reads():
    q, k, v = _qkv(12, seed=3)
    cache = _cache(max_len=8, unit=4, store="pre_rope")
    for start in range(0, 12, 4):  # the ring wraps, so fetch gathers
        cache.append(k[:, :, start : start + 4], v[:, :, start : start + 4], torch.arange(start, start + 4))
    before = cache.state_dict()
    first = cache.fetch()
    with cache.frozen():
        for _ in range(100):
            view = cache.fetch()
            assert all(torch.equal(a, b) for a, b in zip(view, first))
        with pytest.raises(RuntimeError, match="frozen"):
            cache.append(k[:, :, :1], v[:, :, :1], torch.tensor([12]))
    after = cache.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in ("k", "v", "positions", "valid"))
    assert (before["length"], before["ring_start"]) == (after["length"], after["ring_start"])
    cache.append(k[:, :, :1], v[:, :, :1], torch.tensor([12]))  # unfrozen again


def test_eviction_never_splits_a_frame_and_keeps_the_pinned_prefix():
    per_frame, pinned = 4, 3
    length = 60
    _, k, v = _qkv(length, seed=4)
    cache = _cache(
        max_len=pinned + 3 * per_frame, unit=per_frame, pinned=pinned, capacity=pinned + 3 * per_frame + 5
    )
    gen = torch.Generator().manual_seed(1)
    start = 0
    while start < length:
        end = min(length, start + int(torch.randint(1, 2 * per_frame, (1,), generator=gen)))
        evicted = cache.append(k[:, :, start:end], v[:, :, start:end], torch.arange(start, end))
        assert evicted % per_frame == 0
        start = end
        keys, _, positions, valid = cache.fetch()
        assert positions[0, :pinned].tolist() == list(range(min(pinned, end)))
        recent = positions[0, pinned:]
        if recent.numel():
            assert (recent[0] - pinned) % per_frame == 0  # the oldest unpinned entry opens a frame
            assert recent.tolist() == list(range(int(recent[0]), end))  # contiguous, newest last
        assert cache.length <= pinned + 3 * per_frame and valid.all()
        assert_close(keys, k[:, :, positions[0]])


def test_padded_tokens_are_masked_through_valid():
    q, k, v = _qkv(6, seed=7)
    valid = torch.ones(B, 6, dtype=torch.bool)
    valid[0, :2] = False  # sample 0 is left-padded by two tokens
    cache = _cache(6)
    cache.append(k, v, torch.arange(6), valid=valid)
    keys, values, positions, fetched_valid = cache.fetch()
    assert torch.equal(fetched_valid, valid)
    out = attend(
        q[:, :, -1:],
        keys,
        values,
        causal() & key_padding(fetched_valid),
        kv_pos=positions,
        backend="reference",
    )
    unpadded = attend(q[:1, :, -1:], k[:1, :, 2:], v[:1, :, 2:], backend="reference")
    assert_close(out[:1], unpadded)


def test_non_monotone_positions_raise():
    _, k, v = _qkv(4, seed=5)
    cache = _cache(10)
    with pytest.raises(ValueError, match="strictly increase"):
        cache.append(k, v, torch.tensor([0, 1, 1, 2]))
    cache.append(k[:, :, :2], v[:, :, :2], torch.tensor([[0, 1], [5, 6]]))
    with pytest.raises(ValueError, match="strictly increase"):
        cache.append(k[:, :, :1], v[:, :, :1], torch.tensor([[2], [6]]))  # sample 1 goes back
    assert cache.length == 2


def test_bad_input_raises_value_error():
    _, k, v = _qkv(3)
    with pytest.raises(ValueError, match="pre_rope"):
        _cache(8, position_mode="window")
    with pytest.raises(ValueError, match="multiple of unit"):
        _cache(max_len=10, unit=4)
    cache = _cache(4)
    with pytest.raises(ValueError, match="expected k of shape"):
        cache.append(k[:1], v[:1], torch.arange(3))
    with pytest.raises(ValueError, match="holds torch.float64"):
        cache.append(k.float(), v.float(), torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        cache.append(k, v, torch.arange(3.0))
    cache.append(k, v, torch.arange(3))
    with pytest.raises(ValueError, match="cache full"):
        cache.append(k, v, torch.arange(3, 6))


def test_state_dict_resumes_streaming():
    q, k, v = _qkv(20, seed=6)
    cache = _cache(max_len=8, unit=2)
    for start, end in ((0, 5), (5, 11)):
        cache.append(k[:, :, start:end], v[:, :, start:end], torch.arange(start, end))
    restored = _cache(max_len=8, unit=2)
    restored.load_state_dict(cache.state_dict())
    for c in (cache, restored):
        c.append(k[:, :, 11:14], v[:, :, 11:14], torch.arange(11, 14))
    assert all(torch.equal(a, b) for a, b in zip(cache.fetch(), restored.fetch()))
    with pytest.raises(ValueError, match="this cache holds"):
        _cache(max_len=10, unit=2).load_state_dict(cache.state_dict())


def test_stack_size_freeze_and_state():
    layers, capacity = 3, 25 * 4
    stack = KVCacheStack(layers, 1, HKV, D, capacity, dtype=torch.bfloat16)
    kv_bytes = 2 * layers * HKV * capacity * D * 2  # 2 * layers * Hkv * S * D * bytes per sample
    assert stack.nbytes == kv_bytes + layers * capacity * (8 + 1)  # plus int64 positions and bool valid
    k = torch.ones(1, HKV, 2, D, dtype=torch.bfloat16)
    for cache in stack:
        cache.append(k, k, torch.arange(2))
    with stack.frozen():
        with pytest.raises(RuntimeError):
            stack[1].append(k, k, torch.arange(2, 4))
    copy = KVCacheStack(layers, 1, HKV, D, capacity, dtype=torch.bfloat16)
    copy.load_state_dict(stack.state_dict())
    assert all(c.length == 2 for c in copy)
    stack.reset()
    assert all(c.length == 0 for c in stack) and stack[0].next_positions(1).tolist() == [[0]]


@pytest.mark.parametrize(
    "settings",
    [{}, {"store": "pre_rope"}, {"store": "pre_rope", "position_mode": "window"}, {"pinned": 2}],
    ids=["post_rope", "pre_rope", "window", "pinned"],
)
def test_fetch_with_equals_fetch_then_the_new_entries_and_leaves_the_cache_alone(settings):
    _, k, v = _qkv(20, seed=8)
    cache = _cache(max_len=8 if settings.get("pinned") else 9, unit=3, **settings)
    rotate = settings.get("store") == "pre_rope"

    def expected(start: int, end: int) -> tuple:  # what `fetch` would return after appending the new entries
        held = cache.fetch()
        positions = torch.arange(start, end).expand(B, -1)
        if settings.get("position_mode") == "window":
            positions = torch.arange(cache.length, cache.length + end - start).expand(B, -1)
        new_k = apply_rope(k[:, :, start:end], positions) if rotate else k[:, :, start:end]
        return (
            torch.cat((held.k, new_k), 2),
            torch.cat((held.v, v[:, :, start:end]), 2),
            torch.cat((held.positions, positions), 1),
        )

    for start in (0, 3, 6, 9, 12):  # the ring fills, then wraps (fetch gathers)
        end = start + 3
        before = cache.state_dict()
        with cache.frozen():
            for _ in range(2):  # the second call reuses the staged entries
                view = cache.fetch_with(k[:, :, start:end], v[:, :, start:end], torch.arange(start, end))
                for actual, wanted in zip(view, expected(start, end)):
                    assert torch.equal(actual, wanted)
                assert view.valid.all() and view.valid.shape == view.positions.shape
        after = cache.state_dict()
        assert all(torch.equal(before[name], after[name]) for name in ("k", "v", "positions", "valid"))
        cache.append(k[:, :, start:end], v[:, :, start:end], torch.arange(start, end))
    cache.reset()  # a change the staging must notice, as appends and load_state_dict
    assert torch.equal(cache.fetch_with(k[:, :, :2], v[:, :, :2], torch.arange(2)).v, v[:, :, :2])


def test_fetch_with_passes_gradients_to_the_new_entries():
    _, k, v = _qkv(6, seed=9)
    cache = _cache(6)
    cache.append(k[:, :, :4], v[:, :, :4], torch.arange(4))
    new_k, new_v = k[:, :, 4:].clone().requires_grad_(), v[:, :, 4:].clone().requires_grad_()
    keys, values, _, _ = cache.fetch_with(new_k, new_v, torch.arange(4, 6))
    (keys.sum() + 2 * values.sum()).backward()
    assert torch.equal(new_k.grad, torch.ones_like(new_k)) and torch.equal(
        new_v.grad, 2 * torch.ones_like(new_v)
    )
    with pytest.raises(ValueError, match="expected k of shape"):
        cache.fetch_with(k[:1, :, 4:], v[:1, :, 4:], torch.arange(4, 6))
