"""Mask algebra: one predicate per attention structure, materialised for every backend.

A `Mask` answers "may query ``i`` attend to key ``j``?" with one vectorised predicate
``mask_mod(b, h, i, j)`` over broadcast int64 tensors. ``i`` and ``j`` are *absolute positions*
(``i = q_pos[q_idx]``, ``j = kv_pos[kv_idx]``), so a KV cache or a chunked prefill only changes the
positions, never the mask. Cross-attention masks whose two sides live in different coordinate systems
(Video-CCAM queries vs. frames, per-slot key padding) read slot indices instead; each leaf says which.

The same predicate becomes a dense bool tensor (`reference`, `sdpa`), a flex ``BlockMask`` (`flex`) and,
where one exists exactly, an xformers ``attn_bias`` object (`xformers`). Masks compose with ``&``, ``|``
and ``~``. Per-sample metadata (spans, segment ids, padding) is stored as batched tensors indexed by
``b``: nothing is hard-coded per sample and nothing loops in Python.

Default positions: keys are ``0..Lk-1`` and queries are the *last* ``Lq`` of them (bottom-right aligned),
which is what causal attention over a cache needs.

Layout notation (spec §4): a video segment starts at ``s`` with ``n = H'·W'`` tokens per frame in raster
order, so frame ``f(i) = ⌊(i−s)/n⌋``, row ``r(i) = ⌊((i−s) mod n)/W'⌋``, column ``c(i) = (i−s) mod W'``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from timeloom_kernels.positions import concentric_rings

__all__ = [
    "ALiBi",
    "RelativePositionBias",
    "Mask",
    "ScoreMod",
    "block_causal",
    "causal",
    "ccam",
    "ccam_queries",
    "chunk",
    "chunk_window",
    "completed_chunks",
    "concentric",
    "default_positions",
    "frame_index",
    "frame_window",
    "full",
    "key_padding",
    "modality_mutual",
    "modality_mutual_tables",
    "prefix",
    "ring_map",
    "same_frame",
    "same_sequence",
    "segment_bidirectional",
    "sliding_window",
    "spatial_window",
]

Coord = Literal["position", "slot"]
"""What a leaf predicate reads as ``i``/``j``: absolute positions or raw slot indices."""

_CACHE_ENTRIES = 32
_CACHE_BYTES = 1 << 30  # dense masks of long videos are large; keep at most ~1 GiB of them alive
_cache: OrderedDict[tuple, tuple[Any, tuple, int]] = OrderedDict()


def _cached(key: tuple, pins: tuple, build: Callable[[], Any]) -> Any:
    """Small LRU keyed by tensor identities; ``pins`` keeps those tensors alive so storages are never reused."""
    if key in _cache:
        _cache.move_to_end(key)
        return _cache[key][0]
    value = build()
    size = value.untyped_storage().nbytes() if isinstance(value, Tensor) else 0
    _cache[key] = (value, pins, size)
    while len(_cache) > 1 and (
        len(_cache) > _CACHE_ENTRIES or sum(entry[2] for entry in _cache.values()) > _CACHE_BYTES
    ):
        _cache.popitem(last=False)
    return value


_CONTENT_KEY_MAX_ELEMENTS = 4096


def _tensor_key(t: Tensor | None) -> tuple | None:
    """Identity of a tensor's contents: its storage, view and version (views of one tensor agree).

    A small CPU tensor is keyed by its values instead, so a model that builds ``torch.arange`` positions on
    every call still hits the cache (reading them is cheaper than rebuilding a mask; on CUDA it would sync).
    """
    if t is None:
        return None
    if t.device.type == "cpu" and t.numel() <= _CONTENT_KEY_MAX_ELEMENTS:
        return ("values", tuple(t.shape), t.dtype, t.detach().contiguous().numpy().tobytes())
    storage = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.stride()))
    # Inference tensors keep no version counter; they also cannot be written outside inference mode.
    version = -1 if t.is_inference() else t._version
    return (storage, tuple(t.shape), t.dtype, str(t.device), version)


# --------------------------------------------------------------------------------------------------------
# Layout helpers: readable index arithmetic shared by the predicates and the positions module.
# --------------------------------------------------------------------------------------------------------
def frame_index(pos: Tensor, start: Tensor | int, tokens_per_frame: int) -> Tensor:
    """Frame ``f(i) = ⌊(i − s)/n⌋`` of position ``pos`` in a video segment starting at ``start``."""
    return torch.div(pos - start, tokens_per_frame, rounding_mode="floor")


def _row_col(pos: Tensor, start: Tensor | int, width: int, tokens_per_frame: int) -> tuple[Tensor, Tensor]:
    offset = torch.remainder(pos - start, tokens_per_frame)
    return torch.div(offset, width, rounding_mode="floor"), torch.remainder(offset, width)


def ring_map(height: int, width: int) -> Tensor:
    """The ``(height, width)`` grid of ring indices (24×24: border 0, 2×2 centre 11)."""
    rows = torch.arange(height).view(-1, 1)
    cols = torch.arange(width).view(1, -1)
    return concentric_rings(rows, cols, height, width)


def default_positions(
    q_len: int, kv_len: int, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Keys at ``0..Lk-1``; queries are the last ``Lq`` of them (bottom-right aligned)."""
    return torch.arange(kv_len - q_len, kv_len, device=device), torch.arange(kv_len, device=device)


def _as_positions(pos: Tensor | None, length: int, default: Tensor, what: str, batch: int) -> Tensor:
    """Validate ``pos`` and return it as ``(B|1, L)`` int64."""
    if pos is None:
        return default.view(1, -1)
    if not isinstance(pos, Tensor) or pos.dtype.is_floating_point or pos.dtype == torch.bool:
        raise ValueError(f"{what} must be an integer tensor of shape (L,) or (B, L); got {pos!r:.80}")
    if pos.dim() == 1:
        pos = pos.view(1, -1)
    if pos.dim() != 2 or pos.shape[-1] != length or pos.shape[0] not in (1, batch):
        raise ValueError(
            f"{what} must have shape ({length},) or ({batch}|1, {length}); got {tuple(pos.shape)}"
        )
    return pos.to(device=default.device, dtype=torch.int64)


def resolve_positions(
    q_pos: Tensor | None,
    kv_pos: Tensor | None,
    batch: int,
    q_len: int,
    kv_len: int,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Positions as ``(B|1, L)`` int64 tensors on ``device``, filling in the defaults."""
    q_default, kv_default = default_positions(q_len, kv_len, device)
    return (
        _as_positions(q_pos, q_len, q_default, "q_pos", batch),
        _as_positions(kv_pos, kv_len, kv_default, "kv_pos", batch),
    )


def _row(table: Tensor, b: Tensor) -> Tensor:
    """Per-sample row of a batched table; a batch-1 table is shared by every sample."""
    return table[b] if table.shape[0] > 1 else table[0]


def _lookup(table: Tensor, b: Tensor, index: Tensor) -> Tensor:
    """``table[b, index]`` for a ``(B|1, N)`` table; works on broadcast tensors and under flex's vmap."""
    return table[b, index] if table.shape[0] > 1 else table[0, index]


# --------------------------------------------------------------------------------------------------------
# The Mask object
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False, repr=False)
class Mask:
    """An attention mask: True means "may attend".

    A leaf holds a ``predicate(b, h, i, j, **tables)``; ``&``, ``|`` and ``~`` build ``and``/``or``/``not``
    nodes over ``children``. ``params`` (hashable) plus the identities of ``tables`` form `key`, the cache
    key for materialisations. ``tables`` are batched per-sample metadata: tensors whose first dim is the
    batch (1 = shared). ``table_extent`` says what their second dim indexes, so bad positions raise instead
    of silently wrapping: ``"position"`` (tables indexed by ``i``/``j``) or ``"kv_slot"`` (indexed by key slot).

    A new mask is one leaf, ``Mask("my_mask", params, predicate)``: ``name`` and ``params`` must identify the
    predicate (they are its cache key), and ``per_head=True`` is needed when the predicate reads ``h``.
    Masks are immutable; build them once per forward and share them across layers.
    """

    name: str
    params: tuple = ()
    predicate: Callable[..., Tensor] | None = None
    tables: tuple[tuple[str, Tensor], ...] = ()
    coords: tuple[Coord, Coord] = ("position", "position")
    table_extent: Literal["position", "kv_slot"] | None = None
    per_head: bool = False
    children: tuple[Mask, ...] = field(default=())

    # ---- algebra -----------------------------------------------------------------------------------------
    def __and__(self, other: Mask) -> Mask:
        return Mask("and", children=(self, _check_mask(other)), per_head=self.per_head or other.per_head)

    def __or__(self, other: Mask) -> Mask:
        return Mask("or", children=(self, _check_mask(other)), per_head=self.per_head or other.per_head)

    def __invert__(self) -> Mask:
        return Mask("not", children=(self,), per_head=self.per_head)

    def __repr__(self) -> str:
        if self.name in ("and", "or"):
            return "(" + f" {'&' if self.name == 'and' else '|'} ".join(map(repr, self.children)) + ")"
        if self.name == "not":
            return f"~{self.children[0]!r}"
        args = [repr(p) for p in self.params] + [f"{n}=<{tuple(t.shape)}>" for n, t in self.tables]
        return f"{self.name}({', '.join(args)})"

    # ---- identity ----------------------------------------------------------------------------------------
    @property
    def key(self) -> tuple:
        """Hashable identity: constructor, parameters, metadata tensors (see `_tensor_key`) and children."""
        tables = tuple((n, _tensor_key(t)) for n, t in self.tables)
        return (self.name, self.params, self.coords, tables, tuple(c.key for c in self.children))

    def _leaves(self) -> list[Mask]:
        return [self] if not self.children else [leaf for c in self.children for leaf in c._leaves()]

    @property
    def batch_size(self) -> int:
        """1 when the mask is the same for every sample, else the batch size of its metadata."""
        return max([t.shape[0] for leaf in self._leaves() for _, t in leaf.tables] + [1])

    def is_plain(self, name: str) -> bool:
        """True for an unmodified leaf built by the constructor ``name`` (e.g. ``"causal"``)."""
        return self.name == name and not self.children

    # ---- evaluation --------------------------------------------------------------------------------------
    def mask_mod(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        """Evaluate at positions ``i``, ``j`` (slot-coordinate leaves read them as slots)."""
        return self._evaluate(b, h, i, j, i, j)

    def _evaluate(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if self.name == "and":
            return self.children[0]._evaluate(b, h, i, j, q_idx, kv_idx) & self.children[1]._evaluate(
                b, h, i, j, q_idx, kv_idx
            )
        if self.name == "or":
            return self.children[0]._evaluate(b, h, i, j, q_idx, kv_idx) | self.children[1]._evaluate(
                b, h, i, j, q_idx, kv_idx
            )
        if self.name == "not":
            return ~self.children[0]._evaluate(b, h, i, j, q_idx, kv_idx)
        qi = i if self.coords[0] == "position" else q_idx
        kj = j if self.coords[1] == "position" else kv_idx
        return self.predicate(b, h, qi, kj, **dict(self.tables))

    def index_mod(self, q_pos: Tensor, kv_pos: Tensor) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
        """The predicate over *indices* ``(b, h, q_idx, kv_idx)``, as flex's ``mask_mod`` expects.

        ``q_pos``/``kv_pos`` are ``(B|1, L)`` int64 on the target device (see `resolve_positions`).
        """
        mask = self.to(q_pos.device)

        def mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            i, j = _lookup(q_pos, b, q_idx), _lookup(kv_pos, b, kv_idx)
            return mask._evaluate(b, h, i, j, q_idx, kv_idx)

        return mod

    def to(self, device: torch.device | str) -> Mask:
        """The same mask with its metadata on ``device`` (self when already there)."""
        device = torch.device(device)
        tables = tuple((n, t.to(device)) for n, t in self.tables)
        children = tuple(c.to(device) for c in self.children)
        same = all(a is b for (_, a), (_, b) in zip(tables, self.tables)) and all(
            a is b for a, b in zip(children, self.children)
        )
        return self if same else dataclasses.replace(self, tables=tables, children=children)

    def _check_layout(self, batch: int, q_len: int, kv_len: int, q_pos: Tensor, kv_pos: Tensor) -> None:
        for leaf in self._leaves():
            for name, table in leaf.tables:
                if table.shape[0] not in (1, batch):
                    raise ValueError(f"{leaf!r}: {name} has batch {table.shape[0]}, expected 1 or {batch}")
                if leaf.table_extent == "kv_slot" and table.shape[1] != kv_len:
                    raise ValueError(f"{leaf!r}: {name} covers {table.shape[1]} key slots, expected {kv_len}")
                if leaf.table_extent == "position":
                    low = min(int(q_pos.min()), int(kv_pos.min()))
                    high = max(int(q_pos.max()), int(kv_pos.max()))
                    if low < 0 or high >= table.shape[1]:
                        raise ValueError(
                            f"{leaf!r}: {name} covers positions 0..{table.shape[1] - 1}, "
                            f"but the call uses positions {low}..{high}"
                        )

    # ---- materialisations --------------------------------------------------------------------------------
    def dense(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Bool tensor ``(B|1, H|1, Lq, Lk)``: a size-1 dim means the mask does not depend on it.

        Cached and shared between calls: never modify it in place.
        """
        device = torch.device(device) if device is not None else _default_device(q_pos, kv_pos)

        def build() -> Tensor:
            qp, kp = self._positions(batch, q_len, kv_len, q_pos, kv_pos, device)
            b, h = _batch_head_grid(batch, heads, device)
            q_idx = torch.arange(q_len, device=device).view(1, 1, -1, 1)
            kv_idx = torch.arange(kv_len, device=device).view(1, 1, 1, -1)
            allowed = self.index_mod(qp, kp)(b, h, q_idx, kv_idx)
            return allowed.expand(torch.broadcast_shapes(allowed.shape, (1, 1, q_len, kv_len)))

        key = self._layout_key("dense", batch, heads, q_len, kv_len, q_pos, kv_pos, device)
        return _cached(key, (self, q_pos, kv_pos), build)

    def _layout_key(self, kind: str, *layout: Any) -> tuple:
        """Cache key of a materialisation: the mask, the layout, and the positions' contents."""
        return (
            kind,
            self.key,
            *(_tensor_key(x) if isinstance(x, Tensor) or x is None else x for x in layout),
        )

    def _positions(
        self,
        batch: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None,
        kv_pos: Tensor | None,
        device: torch.device,
    ) -> tuple[Tensor, Tensor]:
        """Resolved positions, checked against the mask's batched metadata."""
        qp, kp = resolve_positions(q_pos, kv_pos, batch, q_len, kv_len, device)
        self._check_layout(batch, q_len, kv_len, qp, kp)
        return qp, kp

    def block_mask(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
        device: torch.device | str | None = None,
        block_size: int = 128,
    ):
        """A flex ``BlockMask``, cached by ``(key, B, H, Lq, Lk, positions, device, block_size)``."""
        from torch.nn.attention.flex_attention import create_block_mask

        device = torch.device(device) if device is not None else _default_device(q_pos, kv_pos)

        def build():
            qp, kp = self._positions(batch, q_len, kv_len, q_pos, kv_pos, device)
            per_sample = self.batch_size > 1 or qp.shape[0] > 1 or kp.shape[0] > 1
            return create_block_mask(
                self.index_mod(qp, kp),
                batch if per_sample else None,
                heads if self.per_head else None,
                q_len,
                kv_len,
                device=device,
                BLOCK_SIZE=block_size,
            )

        key = self._layout_key("block", batch, heads, q_len, kv_len, q_pos, kv_pos, device, block_size)
        return _cached(key, (self, q_pos, kv_pos), build)

    def sparsity(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
        device: torch.device | str | None = None,
        block_size: int = 128,
    ) -> float:
        """Fraction of ``block_size × block_size`` tiles with nothing allowed: the work flex can skip.

        Counted on the (cached) ``BlockMask``, which flex reuses when it is chosen. Not its ``sparsity()``:
        torch 2.11 divides by the area in tiles rather than their count, which goes negative on ragged edges.
        """
        block_mask = self.block_mask(batch, heads, q_len, kv_len, q_pos, kv_pos, device, block_size)
        visited = block_mask.kv_num_blocks.sum()
        if block_mask.full_kv_num_blocks is not None:
            visited = visited + block_mask.full_kv_num_blocks.sum()
        *leading, q_tiles = block_mask.kv_num_blocks.shape
        tiles = math.prod(leading) * q_tiles * math.ceil(kv_len / block_size)
        return 1.0 - visited.item() / tiles

    def xformers_bias(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
    ):
        """The xformers ``attn_bias`` object that is *exactly* this mask, or None where none exists.

        Only default positions map, and only layouts without fully masked rows (xformers' behaviour on empty
        rows is not pinned). ``BlockDiagonal*`` biases describe the batch folded into one sequence
        ``(1, B·L)``; the xformers backend folds the batch to match. `full` needs no bias and returns None.
        """
        if q_pos is not None or kv_pos is not None or self.children:
            return None
        try:
            from xformers.ops.fmha import attn_bias
        except ImportError:
            return None
        if self.name == "causal" and q_len <= kv_len:
            if q_len == kv_len:
                return attn_bias.LowerTriangularMask()
            return attn_bias.LowerTriangularFromBottomRightMask()
        if self.name == "sliding_window" and q_len <= kv_len:
            window, symmetric = self.params
            if symmetric:
                return attn_bias.LocalAttentionFromBottomRightMask(
                    window_left=window - 1, window_right=window - 1
                )
            return attn_bias.LowerTriangularFromBottomRightLocalAttentionMask(window)
        if self.name == "chunk" and q_len == kv_len:
            size, causal_within = self.params
            lengths = [size] * (q_len // size) + ([q_len % size] if q_len % size else [])
            cls = attn_bias.BlockDiagonalCausalMask if causal_within else attn_bias.BlockDiagonalMask
            return cls.from_seqlens(lengths * batch)
        if self.name == "same_sequence" and q_len == kv_len:
            lengths = _contiguous_run_lengths(dict(self.tables)["ids"], batch, q_len)
            return None if lengths is None else attn_bias.BlockDiagonalMask.from_seqlens(lengths)
        return None


def _batch_head_grid(batch: int, heads: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """Sample and head indices shaped ``(B, 1, 1, 1)`` and ``(1, H, 1, 1)`` to broadcast over scores."""
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
    )


def _check_mask(other: object) -> Mask:
    if not isinstance(other, Mask):
        raise ValueError(f"masks compose only with masks; got {type(other).__name__}")
    return other


def _default_device(*tensors: Tensor | None) -> torch.device:
    for t in tensors:
        if t is not None:
            return t.device
    return torch.device("cpu")


def _contiguous_run_lengths(ids: Tensor, batch: int, length: int) -> list[int] | None:
    """Run lengths of each sample's ids, batch-major; None when an id comes back after a gap."""
    if ids.shape[1] != length:
        return None
    lengths: list[int] = []
    for row in ids.expand(batch, -1).cpu():
        values, counts = torch.unique_consecutive(row, return_counts=True)
        if len(values) != len(torch.unique(values)):
            return None
        lengths += counts.tolist()
    return lengths


def _batched(table: Tensor | Sequence, what: str, trailing: int, dtype: torch.dtype = torch.int64) -> Tensor:
    """Metadata as a tensor with a leading batch dim (1 = shared by every sample)."""
    # A copy for anything but a tensor: an array shared with NumPy changes without a version bump, and the
    # mask cache would then keep serving the old contents.
    t = torch.tensor(table) if not isinstance(table, Tensor) else table
    if t.dim() == trailing:
        t = t.unsqueeze(0)
    if t.dim() != trailing + 1:
        raise ValueError(
            f"{what} must have {trailing} or {trailing + 1} dims (batch first); got {tuple(t.shape)}"
        )
    return t.to(dtype)


def _positive(value: int, what: str) -> int:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{what} must be a positive int; got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------------
# Constructors (spec §4 table)
# --------------------------------------------------------------------------------------------------------
def full() -> Mask:
    """Every query sees every key (spatial attention). `attend` treats it as no mask at all."""
    return Mask("full", predicate=lambda b, h, i, j: torch.ones_like(i - j, dtype=torch.bool))


def causal() -> Mask:
    """``j ≤ i``."""
    return Mask("causal", predicate=lambda b, h, i, j: j <= i)


def block_causal(tokens_per_frame: int, start: int = 0) -> Mask:
    """Frame-causal: ``f(j) ≤ f(i)`` (ViD-GPT; OmniTokenizer temporal layers as 3-D attention)."""
    n = _positive(tokens_per_frame, "tokens_per_frame")
    return Mask(
        "block_causal",
        (n, start),
        lambda b, h, i, j: frame_index(j, start, n) <= frame_index(i, start, n),
    )


def frame_window(tokens_per_frame: int, frames: int, start: int = 0) -> Mask:
    """The current frame and the ``frames − 1`` before it: ``f(i) − W < f(j) ≤ f(i)`` (FIFO-cached VDM)."""
    n, w = _positive(tokens_per_frame, "tokens_per_frame"), _positive(frames, "frames")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        fi, fj = frame_index(i, start, n), frame_index(j, start, n)
        return (fj <= fi) & (fj > fi - w)

    return Mask("frame_window", (n, w, start), predicate)


def sliding_window(window: int, symmetric: bool = False) -> Mask:
    """``i − w < j ≤ i`` (the query itself plus ``w − 1`` keys back); ``symmetric``: ``|i − j| < w``."""
    w = _positive(window, "window")
    if symmetric:
        return Mask("sliding_window", (w, True), lambda b, h, i, j: (i - j).abs() < w)
    return Mask("sliding_window", (w, False), lambda b, h, i, j: (j <= i) & (j > i - w))


def spatial_window(height: int, width: int, window_h: int, window_w: int, start: int = 0) -> Mask:
    """Swin W-MSA on raster-order frames: same frame and same ``window_h × window_w`` window.

    Models should partition window-major before `attend`; then the mask is ``chunk(window_h·window_w)``,
    which is exact on every backend. This raster-order predicate is the definition the tests check against.
    """
    n = _positive(height, "height") * _positive(width, "width")
    _positive(window_h, "window_h")
    _positive(window_w, "window_w")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        ri, ci = _row_col(i, start, width, n)
        rj, cj = _row_col(j, start, width, n)
        same_frame = frame_index(i, start, n) == frame_index(j, start, n)
        return same_frame & (ri // window_h == rj // window_h) & (ci // window_w == cj // window_w)

    return Mask("spatial_window", (height, width, window_h, window_w, start), predicate)


def _query_before(length: int) -> Mask:
    return Mask("query_before", (length,), lambda b, h, i, j: i < length)


def _key_before(length: int) -> Mask:
    return Mask("key_before", (length,), lambda b, h, i, j: j < length)


def prefix(length: int, inner: Mask, outer: Mask) -> Mask:
    """Prefix/frame prompt: ``(i<P ∧ j<P ∧ inner) ∨ (i≥P ∧ (j<P ∨ outer))``.

    ``prefix(P, full(), causal())`` is a prefix-LM; ``prefix(P·n, block_causal(n), full())`` is ViD-GPT's
    "partial" frame-prompt ablation.
    """
    q_in, k_in = _query_before(length), _key_before(length)
    return (q_in & k_in & inner) | (~q_in & (k_in | outer))


def _span_table(spans: Tensor | Sequence) -> Tensor:
    return _batched(spans, "spans (S, 2) of [start, end)", 2)


def _span_membership(spans: Tensor, b: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
    """``(inside, start)`` per span, with a trailing span dim: is ``pos`` in span s, and where s starts."""
    bounds = _row(spans, b)
    start, end = bounds[..., 0], bounds[..., 1]
    pos = pos.unsqueeze(-1)
    return (pos >= start) & (pos < end), start


def same_frame(spans: Tensor | Sequence, tokens_per_frame: int) -> Mask:
    """``vis(i) ∧ vis(j) ∧ f(i) = f(j)``: tokens of one frame see each other (TC-LLaVA FBCAM with causal).

    ``spans``: ``(S, 2)`` or ``(B, S, 2)`` ``[start, end)`` visual spans; empty spans (end ≤ start) pad
    samples with fewer videos.
    """
    n = _positive(tokens_per_frame, "tokens_per_frame")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, spans: Tensor) -> Tensor:
        in_i, start = _span_membership(spans, b, i)
        in_j, _ = _span_membership(spans, b, j)
        same = frame_index(i.unsqueeze(-1), start, n) == frame_index(j.unsqueeze(-1), start, n)
        return (in_i & in_j & same).any(-1)

    return Mask("same_frame", (n,), predicate, tables=(("spans", _span_table(spans)),))


def concentric(spans: Tensor | Sequence, height: int, width: int) -> Mask:
    """CCA: inside an image span, ``ρ(j) ≤ ρ(i)`` (inner rings see outer ones; a ring sees itself);
    everywhere else causal, so text after the image sees all of it.

    ``spans`` are ``[start, end)`` image/video spans, ``(S, 2)`` or ``(B, S, 2)``, each a whole number of
    ``height × width`` frames. Videos (our extension) are frame-causal between frames:
    ``f(j) < f(i) ∨ (f(j) = f(i) ∧ ρ(j) ≤ ρ(i))``.
    """
    n = _positive(height, "height") * _positive(width, "width")
    table = _span_table(spans)
    lengths = table[..., 1] - table[..., 0]
    if ((lengths > 0) & (lengths % n != 0)).any():
        raise ValueError(
            f"concentric spans must hold whole {height}x{width} frames; span lengths {lengths.tolist()}"
        )

    def ring(pos: Tensor, start: Tensor) -> Tensor:
        return concentric_rings(*_row_col(pos, start, width, n), height, width)

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, spans: Tensor) -> Tensor:
        in_i, start = _span_membership(spans, b, i)
        in_j, _ = _span_membership(spans, b, j)
        si, sj = i.unsqueeze(-1), j.unsqueeze(-1)  # against every span
        fi, fj = frame_index(si, start, n), frame_index(sj, start, n)
        ring_rule = (fj < fi) | ((fj == fi) & (ring(sj, start) <= ring(si, start)))
        both_inside = in_i & in_j
        return (both_inside & ring_rule).any(-1) | (~both_inside.any(-1) & (j <= i))

    return Mask("concentric", (height, width), predicate, tables=(("spans", table),))


def modality_mutual(visual_start: int | Tensor, visual_end: int | Tensor, question_end: int | Tensor) -> Mask:
    """AKI: causal, plus visual tokens ``[vs, ve)`` see the question ``[ve, qe)`` (never the answer).

    Each bound is an int or a ``(B,)`` tensor.
    """
    bounds = torch.stack(
        torch.broadcast_tensors(
            *(torch.as_tensor(x).reshape(-1) for x in (visual_start, visual_end, question_end))
        ),
        dim=-1,
    )

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, bounds: Tensor) -> Tensor:
        vs, ve, qe = _row(bounds, b).unbind(-1)
        return (j <= i) | ((vs <= i) & (i < ve) & (ve <= j) & (j < qe))

    return Mask("modality_mutual", (), predicate, tables=(("bounds", bounds.to(torch.int64)),))


def segment_bidirectional(segment_ids: Tensor | Sequence) -> Mask:
    """PINE: causal, plus tokens of *different* segments (ids > 0) see each other in both directions.

    ``segment_ids``: ``(L,)`` or ``(B, L)`` per position; 0 marks tokens outside any segment.
    """

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, segments: Tensor) -> Tensor:
        si, sj = _lookup(segments, b, i), _lookup(segments, b, j)
        return (j <= i) | ((si > 0) & (sj > 0) & (si != sj))

    table = _batched(segment_ids, "segment_ids", 1)
    return Mask(
        "segment_bidirectional", (), predicate, tables=(("segments", table),), table_extent="position"
    )


def chunk(size: int, causal_within: bool = False) -> Mask:
    """Blocks of ``size`` consecutive positions: ``⌊i/C⌋ = ⌊j/C⌋`` (and ``j ≤ i`` if ``causal_within``)."""
    c = _positive(size, "size")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        same = torch.div(i, c, rounding_mode="floor") == torch.div(j, c, rounding_mode="floor")
        return same & (j <= i) if causal_within else same

    return Mask("chunk", (c, causal_within), predicate)


def chunk_window(chunk_starts: Tensor | Sequence, window: int) -> Mask:
    """Chunk-wise autoregression with a bounded past (ViD-GPT's cached sampler): position ``i`` sees ``j`` iff
    ``j ≤ i`` and ``j ≥ s(i) − window``, where ``s(i)`` is the first position of ``i``'s chunk.

    ``chunk_starts``: ``(L,)`` or ``(B, L)``, ``s(i)`` per position; ``window`` counts the positions before
    the chunk that stay visible (a FIFO cache of that many frames gives exactly this).
    """
    w = int(window)
    if w < 0:
        raise ValueError(f"window must be >= 0, got {window}")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, starts: Tensor) -> Tensor:
        return (j <= i) & (j >= _lookup(starts, b, i) - w)

    table = _batched(chunk_starts, "chunk_starts", 1)
    return Mask("chunk_window", (w,), predicate, tables=(("starts", table),), table_extent="position")


def completed_chunks(size: int) -> Mask:
    """HCAM summaries: key slot ``m`` summarises chunk ``m``; query position ``i`` sees it once complete,
    ``(m+1)·C ≤ i``. Pass the queries' token positions as ``q_pos``."""
    c = _positive(size, "size")
    return Mask("completed_chunks", (c,), lambda b, h, i, m: (m + 1) * c <= i, coords=("position", "slot"))


def ccam(
    num_queries: int,
    num_frames: int,
    tokens_per_frame: int,
    query_frame: Literal["start", "end"] = "start",
) -> Mask:
    """Video-CCAM causal cross-attention from ``Q`` learned queries to ``T`` frames of ``n_kv`` tokens.

    Query slot ``i`` sees frames up to ``g(i)``: ``"start"`` uses ``⌊i·T/Q⌋`` (the spec's rule), ``"end"``
    uses ``⌈(i+1)·T/Q⌉ − 1`` (the last query always sees every frame, also when ``T > Q``). With ``T = 1``
    every query sees everything. Reads slots, not positions. A per-sample ``T_b``: ``& key_padding(...)``.
    """
    q, t, n = _positive(num_queries, "num_queries"), _positive(num_frames, "num_frames"), tokens_per_frame
    _positive(n, "tokens_per_frame")
    if query_frame not in ("start", "end"):
        raise ValueError(f"query_frame must be 'start' or 'end'; got {query_frame!r}")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        if query_frame == "start":
            last_frame = torch.div(i * t, q, rounding_mode="floor")
        else:
            last_frame = torch.div((i + 1) * t - 1, q, rounding_mode="floor")
        return (torch.div(j, n, rounding_mode="floor") <= last_frame) & (i < q) & (j < t * n)

    return Mask("ccam", (q, t, n, query_frame), predicate, coords=("slot", "slot"))


def ccam_queries(num_queries: int, num_frames: int, query_frame: Literal["start", "end"] = "start") -> Mask:
    """Video-CCAM query self-attention, block-causal: query slot ``i`` sees query slot ``j`` iff
    ``g(j) ≤ g(i)``, with ``g`` the last frame a query reads (`ccam`'s rule). Without it, block ``t`` would
    read frame ``t+1`` through the queries of block ``t+1``. Reads slots; ``T = 1`` is full attention.
    """
    q, t = _positive(num_queries, "num_queries"), _positive(num_frames, "num_frames")
    if query_frame not in ("start", "end"):
        raise ValueError(f"query_frame must be 'start' or 'end'; got {query_frame!r}")

    def last_frame(slot: Tensor) -> Tensor:
        if query_frame == "start":
            return torch.div(slot * t, q, rounding_mode="floor")
        return torch.div((slot + 1) * t - 1, q, rounding_mode="floor")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        return (last_frame(j) <= last_frame(i)) & (i < q) & (j < q)

    return Mask("ccam_queries", (q, t, query_frame), predicate, coords=("slot", "slot"))


def modality_mutual_tables(limit: Tensor | Sequence, question: Tensor | Sequence) -> Mask:
    """AKI with several media items and turns: causal, plus ``i`` sees ``j`` when ``question(j)`` and
    ``i < j < limit(i)``.

    ``limit``: ``(L,)`` or ``(B, L)`` per position: for a visual token, the first answer token after its
    media item (so it sees the question that follows it, never the answer or a later turn); 0 for tokens
    that see nothing ahead. ``question``: ``(L,)`` or ``(B, L)`` bool, the user's text. `modality_mutual`
    is the one-span special case.
    """
    limits = _batched(limit, "limit", 1)
    questions = _batched(question, "question", 1, dtype=torch.bool)
    if limits.shape[1] != questions.shape[1]:
        raise ValueError(f"limit covers {limits.shape[1]} positions but question {questions.shape[1]}")

    def predicate(b: Tensor, h: Tensor, i: Tensor, j: Tensor, limit: Tensor, question: Tensor) -> Tensor:
        return (j <= i) | (_lookup(question, b, j) & (i < j) & (j < _lookup(limit, b, i)))

    return Mask(
        "modality_mutual_tables",
        (),
        predicate,
        tables=(("limit", limits), ("question", questions)),
        table_extent="position",
    )


def key_padding(valid: Tensor) -> Mask:
    """``valid[b, j]``: per key *slot* (a padded batch, or a KV cache's valid slots), ``(Lk,)`` or ``(B, Lk)``."""
    table = _batched(valid, "valid", 1, dtype=torch.bool)
    return Mask(
        "key_padding",
        (),
        lambda b, h, i, j, valid: _lookup(valid, b, j),
        tables=(("valid", table),),
        coords=("slot", "slot"),
        table_extent="kv_slot",
    )


def same_sequence(ids: Tensor | Sequence) -> Mask:
    """Packing: ``id(i) = id(j)`` for sequence ids per position, ``(L,)`` or ``(B, L)``."""
    table = _batched(ids, "ids", 1)
    return Mask(
        "same_sequence",
        (),
        lambda b, h, i, j, ids: _lookup(ids, b, i) == _lookup(ids, b, j),
        tables=(("ids", table),),
        table_extent="position",
    )


# --------------------------------------------------------------------------------------------------------
# Score mods: additive biases defined by positions, usable densely and as flex score_mods
# --------------------------------------------------------------------------------------------------------
class ScoreMod:
    """An additive score bias ``bias(b, h, i, j)`` over broadcast positions (like a mask predicate).

    Subclasses implement `bias`; `dense` materialises it for `reference`/`sdpa`/`xformers` and
    `flex_score_mod` adapts it to flex's ``score_mod(score, b, h, q_idx, kv_idx)``. ``num_heads`` is the
    head count the bias is defined for (None: any).
    """

    num_heads: int | None = None

    def bias(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        raise NotImplementedError

    def dense(
        self,
        batch: int,
        heads: int,
        q_len: int,
        kv_len: int,
        q_pos: Tensor | None = None,
        kv_pos: Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Float tensor ``(B|1, H|1, Lq, Lk)``."""
        qp, kp = resolve_positions(q_pos, kv_pos, batch, q_len, kv_len, device)
        b, h = _batch_head_grid(batch, heads, qp.device)
        i, j = qp.view(qp.shape[0], 1, -1, 1), kp.view(kp.shape[0], 1, 1, -1)
        bias = self.bias(b, h, i, j).to(dtype)
        return bias.expand(torch.broadcast_shapes(bias.shape, (1, 1, q_len, kv_len)))

    def flex_score_mod(self, q_pos: Tensor, kv_pos: Tensor) -> Callable[..., Tensor]:
        """flex ``score_mod`` for ``(B|1, L)`` positions from `resolve_positions`."""

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            return score + self.bias(b, h, _lookup(q_pos, b, q_idx), _lookup(kv_pos, b, kv_idx)).to(
                score.dtype
            )

        return score_mod


class ALiBi(ScoreMod):
    """ALiBi: ``−m_h·(i − j)`` with slopes ``m_h = 2^{−8(h+1)/H}`` (Press et al.)."""

    def __init__(self, num_heads: int) -> None:
        self.num_heads = _positive(num_heads, "num_heads")

    def slopes(self) -> Tensor:
        return torch.exp2(-8.0 * torch.arange(1, self.num_heads + 1) / self.num_heads)

    def bias(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        # The slope is arithmetic in h, so nothing has to be captured or moved between devices.
        slope = torch.exp2(-8.0 * (h + 1) / self.num_heads)
        return -slope * (i - j)

    def __repr__(self) -> str:
        return f"ALiBi({self.num_heads})"


class RelativePositionBias(nn.Module, ScoreMod):
    """Swin's learned relative position bias for window attention: one value per (Δrow, Δcol, head).

    Tokens are window-major, ``window_h × window_w`` per window in raster order (models partition into
    windows before `attend`: one sequence per window, or a longer sequence paired with
    ``chunk(window_h * window_w)``), so a token's place in its window is its position modulo the window size. The table has ``(2·wh − 1)(2·ww − 1)`` rows, one per
    offset, and ``num_heads`` columns; it trains with the model (``sdpa``/``tiled``/``reference`` carry its
    gradient).
    """

    def __init__(self, window_h: int, window_w: int, num_heads: int) -> None:
        super().__init__()
        self.window_h = _positive(window_h, "window_h")
        self.window_w = _positive(window_w, "window_w")
        self.num_heads = _positive(num_heads, "num_heads")
        offsets = (2 * window_h - 1) * (2 * window_w - 1)
        self.table = nn.Parameter(torch.empty(offsets, num_heads))
        nn.init.trunc_normal_(self.table, std=0.02)

    def bias(self, b: Tensor, h: Tensor, i: Tensor, j: Tensor) -> Tensor:
        area = self.window_h * self.window_w
        (ri, ci), (rj, cj) = (divmod_tensor(p % area, self.window_w) for p in (i, j))
        offset = (ri - rj + self.window_h - 1) * (2 * self.window_w - 1) + (ci - cj + self.window_w - 1)
        return self.table[offset, h]

    def __repr__(self) -> str:
        return f"RelativePositionBias({self.window_h}, {self.window_w}, heads={self.num_heads})"


def divmod_tensor(x: Tensor, divisor: int) -> tuple[Tensor, Tensor]:
    """``(x // divisor, x % divisor)`` for integer tensors."""
    return torch.div(x, divisor, rounding_mode="floor"), torch.remainder(x, divisor)
