"""A per-layer key/value cache with absolute positions, FIFO eviction in whole units, and a frozen mode.

One implementation serves the causal VDM (a clean-frame cache shared across denoising steps), the video-LLMs
(token decoding) and the memory models (a pinned prefix plus a recent window).

Storage is a preallocated ring buffer per layer: `k (B, Hkv, S_max, D)`, `v (B, Hkv, S_max, Dv)`,
`positions (B, S_max)` int64 and `valid (B, S_max)`. Every entry keeps its absolute position, so attention
needs no particular slot order (masks and RoPE read positions) and eviction never moves data. `fetch()` still
returns the entries oldest first, as views when they are contiguous in the buffer.

`fetch_with(k, v, positions)` returns the held entries followed by new ones that are not stored: what a
query chunk attends over when it reads the cache without writing it (a VDM's denoising steps read the same
held entries with new keys at every step). It copies the held entries, oldest first, into a staging buffer
once per change of the cache (a second copy of the held keys and values, allocated on first use and not
counted in `nbytes`), and each call copies only the new entries behind them, where concatenating would copy
everything at every call.

Position modes:
- `absolute`: keys keep their positions. Since RoPE and ALiBi scores depend only on `i - j`, keys may be cached
  after RoPE (`store="post_rope"`) or before it (`store="pre_rope"`, rotated at fetch).
- `window` (Ca2-VDM's RoPE mode): every fetch re-bases the retained keys to `0..S-1` by age and new queries
  continue at `S` (`next_positions`); needs `store="pre_rope"` since the rotation changes at every fetch.

The cache stores detached tensors: it is an inference/streaming structure, not part of the autograd graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from timeloom_kernels.positions import apply_rope

PositionMode = Literal["absolute", "window"]
Store = Literal["post_rope", "pre_rope"]


class CacheView(NamedTuple):
    """What `KVCache.fetch` returns, oldest entry first: `k`, `v`, `positions (B, S)`, `valid (B, S)`."""

    k: Tensor
    v: Tensor
    positions: Tensor
    valid: Tensor


class KVCache:
    """Ring-buffer KV cache for one attention layer.

    Args:
        batch_size, num_kv_heads, head_dim: shape of the stored keys `(B, Hkv, S, D)`.
        capacity: slots to preallocate; defaults to `max_len`. Without `max_len`, appending past it raises.
        max_len: retained entries (pinned ones included); before each append the oldest unpinned entries are
            evicted in whole `unit`s until the new tokens fit.
        unit: eviction granularity in tokens, e.g. tokens per frame, so a frame is never split.
            `max_len - pinned` must be a multiple of it.
        pinned: the first `pinned` tokens ever appended are never evicted (attention sinks, memory prefixes).
        value_dim: `Dv`, defaults to `head_dim`.
        position_mode: `absolute` or `window` (see the module docstring).
        store: `post_rope` (keys stored as given) or `pre_rope` (rotated by `rotate` at fetch).
        rotate: `rotate(k, positions (B, S)) -> k`, used with `store="pre_rope"`; 1-D RoPE by default.
        dtype, device: of the buffers; appended tensors must match the dtype.
    """

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity: int | None = None,
        *,
        max_len: int | None = None,
        unit: int = 1,
        pinned: int = 0,
        value_dim: int | None = None,
        position_mode: PositionMode = "absolute",
        store: Store = "post_rope",
        rotate: Callable[[Tensor, Tensor], Tensor] = apply_rope,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if position_mode not in ("absolute", "window"):
            raise ValueError(f"position_mode must be 'absolute' or 'window', got {position_mode!r}")
        if store not in ("post_rope", "pre_rope"):
            raise ValueError(f"store must be 'post_rope' or 'pre_rope', got {store!r}")
        if position_mode == "window" and store != "pre_rope":
            raise ValueError(
                "position_mode='window' re-bases positions at every fetch: it needs store='pre_rope'"
            )
        if unit < 1 or pinned < 0:
            raise ValueError(f"expected unit >= 1 and pinned >= 0, got unit={unit}, pinned={pinned}")
        if max_len is not None:
            if max_len <= pinned or (max_len - pinned) % unit:
                raise ValueError(
                    f"max_len - pinned must be a positive multiple of unit={unit}, "
                    f"got max_len={max_len}, pinned={pinned}"
                )
            capacity = max_len if capacity is None else capacity
            if capacity < max_len:
                raise ValueError(f"capacity {capacity} cannot hold max_len={max_len} entries")
        if capacity is None or capacity <= pinned:
            raise ValueError(
                f"capacity must exceed pinned={pinned}, got {capacity} (pass capacity or max_len)"
            )
        value_dim = head_dim if value_dim is None else value_dim
        self.max_len, self.unit, self.pinned = max_len, unit, pinned
        self.position_mode, self.store, self.rotate = position_mode, store, rotate
        self.k = torch.zeros(batch_size, num_kv_heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros(batch_size, num_kv_heads, capacity, value_dim, dtype=dtype, device=device)
        self.positions = torch.zeros(batch_size, capacity, dtype=torch.int64, device=device)
        self.valid = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.length = 0  # entries held, pinned ones included
        self.ring_start = 0  # offset (within the ring region) of the oldest unpinned entry
        self._frozen = False
        # Every change of the held entries bumps the version; `fetch_with` restages them only then. The
        # buffers are written only by `append`, `reset` and `load_state_dict`.
        self._version = 0
        self._stage: CacheView | None = None  # raw entries, oldest first, then room for new ones
        self._staged_version = -1

    # ---- shape bookkeeping ---------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    @property
    def ring_size(self) -> int:
        """Slots after the pinned region, used as a ring."""
        return self.capacity - self.pinned

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (`2 * Hkv * S_max * D * bytes` per sample, plus positions)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v, self.positions, self.valid))

    def _ordered_slots(self) -> Tensor | slice:
        """Slot of each held entry, oldest first: a slice when they are contiguous in the buffer."""
        pinned_held = min(self.length, self.pinned)
        ring_held = self.length - pinned_held
        wraps = self.ring_start + ring_held > self.ring_size
        # pinned slots are 0..pinned_held-1; the ring continues them only while its oldest entry is in slot `pinned`
        if not wraps and (ring_held == 0 or pinned_held == 0 or self.ring_start == 0):
            first = self.pinned + self.ring_start - pinned_held if ring_held else 0
            return slice(first, first + self.length)
        ring = (
            self.pinned + (self.ring_start + torch.arange(ring_held, device=self.k.device)) % self.ring_size
        )
        return torch.cat((torch.arange(pinned_held, device=self.k.device), ring))

    # ---- writing -------------------------------------------------------------------------------------------
    def _check_entries(
        self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Shapes and dtypes of new entries; returns their positions ``(B, L)`` int64 and valid mask."""
        batch, heads, _, dim = self.k.shape
        length = k.shape[2] if k.dim() == 4 else -1
        if k.dim() != 4 or k.shape[:2] != (batch, heads) or k.shape[3] != dim:
            raise ValueError(f"expected k of shape ({batch}, {heads}, L, {dim}), got {tuple(k.shape)}")
        if v.shape != (batch, heads, length, self.v.shape[3]):
            raise ValueError(
                f"expected v of shape ({batch}, {heads}, {length}, {self.v.shape[3]}), got {tuple(v.shape)}"
            )
        if k.dtype != self.k.dtype or v.dtype != self.v.dtype:
            raise ValueError(f"cache holds {self.k.dtype}, got k {k.dtype} and v {v.dtype}")
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
        if positions.dim() == 1:
            positions = positions.expand(batch, -1)
        if positions.shape != (batch, length):
            raise ValueError(
                f"expected positions of shape ({length},) or ({batch}, {length}), got {tuple(positions.shape)}"
            )
        if valid is None:
            valid = torch.ones_like(positions, dtype=torch.bool)
        elif valid.shape != positions.shape or valid.dtype != torch.bool:
            raise ValueError(
                f"expected a bool valid mask of shape {tuple(positions.shape)}, got {tuple(valid.shape)}"
            )
        positions = positions.to(device=self.positions.device, dtype=torch.int64)
        return positions, valid.to(self.valid.device)

    def _check_append(
        self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        positions, valid = self._check_entries(k, v, positions, valid)
        length = k.shape[2]
        increasing = (positions[:, 1:] > positions[:, :-1]).all()
        if self.length and length:
            newest = self.positions[:, self._newest_slot()]
            increasing = increasing & (positions[:, 0] > newest).all()
        if not bool(increasing):
            raise ValueError(
                "positions must strictly increase per sample, within the new tokens and after the cache"
            )
        return positions, valid

    def _newest_slot(self) -> int:
        if self.length <= self.pinned:
            return self.length - 1
        return self.pinned + (self.ring_start + self.length - self.pinned - 1) % self.ring_size

    def _evict_for(self, incoming_ring: int) -> int:
        """Evict the oldest unpinned entries, in whole units, so `incoming_ring` more fit. Returns the count."""
        ring_held = self.length - min(self.length, self.pinned)
        limit = self.ring_size if self.max_len is None else self.max_len - self.pinned
        if incoming_ring > limit:
            raise ValueError(
                f"cannot append {incoming_ring} tokens: at most {limit} unpinned entries are kept"
            )
        overflow = ring_held + incoming_ring - limit
        if overflow <= 0:
            return 0
        if self.max_len is None:
            raise ValueError(
                f"cache full: {self.length} of {self.capacity} slots held, {incoming_ring} more given "
                "(set max_len for FIFO eviction)"
            )
        evicted = min(-(-overflow // self.unit) * self.unit, ring_held)
        slots = self.pinned + (self.ring_start + torch.arange(evicted, device=self.k.device)) % self.ring_size
        self.valid[:, slots] = False
        self.ring_start = (self.ring_start + evicted) % self.ring_size
        self.length -= evicted
        return evicted

    def append(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None = None) -> int:
        """Store `k (B, Hkv, L, D)`, `v (B, Hkv, L, Dv)` at absolute `positions (L,)` or `(B, L)` int64.

        Positions must strictly increase per sample (within the new tokens and after the newest cached one).
        `valid (B, L)` marks padding tokens as False (stored but masked). With `max_len`, the oldest unpinned
        entries are first evicted in whole units; returns the number of entries evicted.
        """
        if self._frozen:
            raise RuntimeError("append on a frozen KVCache: leave the `frozen()` block first")
        positions, valid = self._check_append(k, v, positions, valid)
        length = k.shape[2]
        to_pinned = max(0, min(length, self.pinned - self.length))
        evicted = self._evict_for(length - to_pinned)
        ring_held = self.length - min(self.length, self.pinned)
        ring_offsets = torch.arange(length - to_pinned, device=self.k.device) + self.ring_start + ring_held
        slots = torch.cat(
            (
                torch.arange(self.length, self.length + to_pinned, device=self.k.device),
                self.pinned + ring_offsets % self.ring_size,
            )
        )
        self.k[:, :, slots] = k.detach()
        self.v[:, :, slots] = v.detach()
        self.positions[:, slots] = positions
        self.valid[:, slots] = valid
        self.length += length
        self._version += 1
        return evicted

    def reset(self) -> None:
        """Forget every entry (buffers stay allocated)."""
        self.valid.zero_()
        self.length = self.ring_start = 0
        self._version += 1

    @contextlib.contextmanager
    def frozen(self) -> Iterator[KVCache]:
        """Within the block `append` raises: the VDM reuses clean-frame K/V on every denoising step."""
        previous, self._frozen = self._frozen, True
        try:
            yield self
        finally:
            self._frozen = previous

    # ---- reading -------------------------------------------------------------------------------------------
    def fetch(self) -> CacheView:
        """`(k, v, positions, valid)` of the held entries, oldest first.

        `window` mode re-bases positions to `0..S-1`; `store="pre_rope"` rotates keys at the returned positions.
        Pass `positions` as `attend`'s `kv_pos`; when padding was appended, add `& key_padding(valid)` to the mask.
        The tensors may be views of the cache's buffers (no copy while the ring has not wrapped): use them
        before the next `append`, or clone them, since an append can overwrite those slots in place.
        """
        return self._present(self._held())

    def fetch_with(self, k: Tensor, v: Tensor, positions: Tensor, valid: Tensor | None = None) -> CacheView:
        """The held entries, oldest first, followed by `k (B, Hkv, L, D)`, `v (B, Hkv, L, Dv)`, not stored.

        Equals `fetch()` concatenated with the new entries, given as `append` takes them (`positions (L,)` or
        `(B, L)`, `valid (B, L)`; `pre_rope` keys unrotated). `window` mode numbers the result `0..S+L-1`.
        Nothing is evicted and the cache is unchanged, so it works inside `frozen()`. Without autograd the
        result views a staging buffer that the next `fetch_with` overwrites: use it before then (an `append`
        does not touch it). With a gradient to the new entries, it concatenates instead.
        """
        positions, valid = self._check_entries(k, v, positions, valid)
        held, total = self.length, self.length + k.shape[2]
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            entries = zip(self._held(), (k, v, positions, valid), (2, 2, 1, 1))
            return self._present(CacheView(*(torch.cat((old, new), dim) for old, new, dim in entries)))
        stage = self._staging(total)
        stage.k[:, :, held:total] = k
        stage.v[:, :, held:total] = v
        stage.positions[:, held:total] = positions
        stage.valid[:, held:total] = valid
        return self._present(
            CacheView(
                stage.k[:, :, :total],
                stage.v[:, :, :total],
                stage.positions[:, :total],
                stage.valid[:, :total],
            )
        )

    def _held(self) -> CacheView:
        """The held entries as stored (no re-basing, no rotation), oldest first."""
        slots = self._ordered_slots()
        if isinstance(slots, slice):
            return CacheView(
                self.k[:, :, slots], self.v[:, :, slots], self.positions[:, slots], self.valid[:, slots]
            )
        return CacheView(
            self.k.index_select(2, slots),
            self.v.index_select(2, slots),
            self.positions.index_select(1, slots),
            self.valid.index_select(1, slots),
        )

    def _present(self, view: CacheView) -> CacheView:
        """Stored entries as attention reads them: `window` mode re-bases positions, `pre_rope` rotates keys."""
        k, v, positions, valid = view
        if self.position_mode == "window":
            positions = torch.arange(positions.shape[1], device=positions.device).expand_as(positions)
        if self.store == "pre_rope":
            k = self.rotate(k, positions)
        return CacheView(k, v, positions, valid)

    def _staging(self, total: int) -> CacheView:
        """Buffers with room for ``total`` entries whose first `length` hold the entries of this version."""
        stage = self._stage
        if stage is None or stage.k.shape[2] < total:
            batch, heads, _, dim = self.k.shape
            stage = CacheView(
                self.k.new_empty(batch, heads, total, dim),
                self.v.new_empty(batch, heads, total, self.v.shape[3]),
                self.positions.new_empty(batch, total),
                self.valid.new_empty(batch, total),
            )
            self._stage, self._staged_version = stage, -1
        if self._staged_version != self._version:
            held = self._held()
            stage.k[:, :, : self.length] = held.k
            stage.v[:, :, : self.length] = held.v
            stage.positions[:, : self.length] = held.positions
            stage.valid[:, : self.length] = held.valid
            self._staged_version = self._version
        return stage

    def next_positions(self, count: int) -> Tensor:
        """Positions `(B, count)` for `count` new tokens right after the cache, in this cache's position mode.

        `window`: `S..S+count-1`. `absolute`: the newest position + 1 onwards (unit steps; models with other
        steps, such as TAD-RoPE's `1 + gamma`, compute their own).
        """
        batch = self.positions.shape[0]
        offsets = torch.arange(count, device=self.positions.device).expand(batch, -1)
        if self.position_mode == "window":
            return self.length + offsets
        if self.length == 0:
            return offsets
        return self.positions[:, self._newest_slot(), None] + 1 + offsets

    # ---- persistence ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Buffers and counters, so streaming evaluation can resume (tensors are cloned)."""
        return {
            "k": self.k.clone(),
            "v": self.v.clone(),
            "positions": self.positions.clone(),
            "valid": self.valid.clone(),
            "length": self.length,
            "ring_start": self.ring_start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a `state_dict()` taken from a cache of the same shape, dtype and settings."""
        for name in ("k", "v", "positions", "valid"):
            current, given = getattr(self, name), state[name]
            if given.shape != current.shape or given.dtype != current.dtype:
                raise ValueError(
                    f"state {name} is {tuple(given.shape)} {given.dtype}, "
                    f"this cache holds {tuple(current.shape)} {current.dtype}"
                )
            current.copy_(given)
        self.length, self.ring_start = int(state["length"]), int(state["ring_start"])
        self._version += 1


class KVCacheStack:
    """One `KVCache` per layer, built with the same settings; index it by layer."""

    def __init__(self, num_layers: int, *args: Any, **kwargs: Any) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be positive, got {num_layers}")
        self.layers = [KVCache(*args, **kwargs) for _ in range(num_layers)]

    def __getitem__(self, layer: int) -> KVCache:
        return self.layers[layer]

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[KVCache]:
        return iter(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(cache.nbytes for cache in self.layers)

    def reset(self) -> None:
        for cache in self.layers:
            cache.reset()

    @contextlib.contextmanager
    def frozen(self) -> Iterator[KVCacheStack]:
        """Freeze every layer's cache for the duration of the block."""
        with contextlib.ExitStack() as stack:
            for cache in self.layers:
                stack.enter_context(cache.frozen())
            yield self

    def state_dict(self) -> dict[str, Any]:
        return {
            f"layers.{i}.{name}": value
            for i, cache in enumerate(self.layers)
            for name, value in cache.state_dict().items()
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for i, cache in enumerate(self.layers):
            prefix = f"layers.{i}."
            layer_state = {
                name[len(prefix) :]: value for name, value in state.items() if name.startswith(prefix)
            }
            if not layer_state:
                raise ValueError(f"state has no entries for layer {i} (keys start with {prefix!r})")
            cache.load_state_dict(layer_state)
