"""Mask algebra: every constructor against its paper definition, the algebra laws, and every backend form."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from timeloom_kernels import masks as M
from torch.nn.attention.flex_attention import create_mask


def rows(*lines: str) -> torch.Tensor:
    """A hand-written (Lq, Lk) bool matrix: one string of 0/1 per query."""
    return torch.tensor([[c == "1" for c in line] for line in lines])


# --------------------------------------------------------------------------------------------------------
# Brute-force definitions: plain Python on ints, straight from the spec table. Each takes
# (b, i, j, q_idx, kv_idx) with absolute positions i, j and slot indices q_idx, kv_idx.
# --------------------------------------------------------------------------------------------------------
def frame(p: int, start: int, n: int) -> int:
    return (p - start) // n


def spans_brute(spans: list[list[tuple[int, int]]], b: int, p: int) -> tuple[int, int] | None:
    table = spans[b] if len(spans) > 1 else spans[0]
    return next(((s, e) for s, e in table if s <= p < e), None)


def same_frame_brute(spans, n):
    def allowed(b, i, j, qi, kj):
        si, sj = spans_brute(spans, b, i), spans_brute(spans, b, j)
        return si is not None and si == sj and frame(i, si[0], n) == frame(j, si[0], n)

    return allowed


def spatial_window_brute(height, width, wh, ww):
    n = height * width

    def allowed(b, i, j, qi, kj):
        ri, ci = (i % n) // width, i % width
        rj, cj = (j % n) // width, j % width
        return i // n == j // n and ri // wh == rj // wh and ci // ww == cj // ww

    return allowed


def concentric_brute(spans, height, width):
    n = height * width

    def ring(p: int, start: int) -> int:
        r, c = ((p - start) % n) // width, (p - start) % width
        return min(r, c, height - 1 - r, width - 1 - c)

    def allowed(b, i, j, qi, kj):
        si, sj = spans_brute(spans, b, i), spans_brute(spans, b, j)
        if si is not None and si == sj:
            fi, fj = frame(i, si[0], n), frame(j, si[0], n)
            return fj < fi or (fj == fi and ring(j, si[0]) <= ring(i, si[0]))
        return j <= i

    return allowed


def ccam_brute(q, t, n, rule):
    def allowed(b, i, j, qi, kj):
        last = (qi * t) // q if rule == "start" else -(-((qi + 1) * t) // q) - 1
        return kj // n <= last and qi < q and kj < t * n

    return allowed


def ccam_queries_brute(q, t, rule):
    def last(slot: int) -> int:
        return (slot * t) // q if rule == "start" else -(-((slot + 1) * t) // q) - 1

    def allowed(b, i, j, qi, kj):
        return last(kj) <= last(qi) and qi < q and kj < q

    return allowed


def prefix_brute(p, inner, outer):
    def allowed(b, i, j, qi, kj):
        return (i < p and j < p and inner(i, j)) or (i >= p and (j < p or outer(i, j)))

    return allowed


@dataclass
class Case:
    id: str
    mask: Callable[[], M.Mask]
    brute: Callable[[int, int, int, int, int], bool]
    batch: int = 1
    q_len: int = 12
    kv_len: int = 12
    q_pos: list | None = None
    kv_pos: list | None = None


SEG = [[0, 1, 1, 1, 2, 2, 0, 3, 3, 0, 0, 0], [0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0]]
IDS = [[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [7, 7, 7, 7, 7, 7, 1, 1, 1, 1, 1, 1]]
VALID = [[True] * 9 + [False] * 3, [True] * 5 + [False] * 7]
VIDEO_SPANS = [[(1, 9), (10, 12)], [(3, 11), (0, 0)]]
CCA_SPANS = [[(2, 11), (13, 22)], [(1, 19), (0, 0)]]
BOUNDS = ([2, 1], [6, 4], [8, 9])
# AKI with two media items and two turns (sample 0) and one item and one turn (sample 1): each visual token's
# limit is the first answer token after its item, 0 elsewhere; QUESTION marks the user's text.
LIMIT = [[0, 6, 6, 0, 0, 0, 0, 0, 11, 11, 0, 0], [0, 0, 9, 9, 9, 0, 0, 0, 0, 0, 0, 0]]
QUESTION = [[False, False, False, True, True, False, False, True, False, False, True, False]] + [
    [False] * 5 + [True] * 4 + [False] * 3
]

CASES = [
    Case("full", M.full, lambda b, i, j, qi, kj: True),
    Case("causal", M.causal, lambda b, i, j, qi, kj: j <= i),
    Case("causal_cache", M.causal, lambda b, i, j, qi, kj: j <= i, q_len=5),
    Case("causal_more_q", M.causal, lambda b, i, j, qi, kj: j <= i, q_len=12, kv_len=7),
    Case(
        "causal_positions",
        M.causal,
        lambda b, i, j, qi, kj: j <= i,
        batch=2,
        q_len=3,
        kv_len=5,
        q_pos=[[20, 21, 22], [7, 9, 11]],
        kv_pos=[[3, 20, 5, 21, 30], [0, 8, 9, 12, 2]],
    ),
    Case("block_causal", lambda: M.block_causal(3), lambda b, i, j, qi, kj: j // 3 <= i // 3),
    Case(
        "block_causal_start",
        lambda: M.block_causal(4, start=2),
        lambda b, i, j, qi, kj: frame(j, 2, 4) <= frame(i, 2, 4),
    ),
    Case("same_frame", lambda: M.same_frame(VIDEO_SPANS, 2), same_frame_brute(VIDEO_SPANS, 2), batch=2),
    Case(
        "fbcam",
        lambda: M.causal() | M.same_frame(VIDEO_SPANS[:1], 4),
        lambda b, i, j, qi, kj: j <= i or same_frame_brute(VIDEO_SPANS[:1], 4)(b, i, j, qi, kj),
    ),
    Case("sliding_window", lambda: M.sliding_window(3), lambda b, i, j, qi, kj: i - 3 < j <= i, q_len=7),
    Case(
        "sliding_symmetric",
        lambda: M.sliding_window(3, symmetric=True),
        lambda b, i, j, qi, kj: abs(i - j) < 3,
    ),
    Case(
        "frame_window",
        lambda: M.frame_window(2, 3),
        lambda b, i, j, qi, kj: i // 2 - 3 < j // 2 <= i // 2,
    ),
    Case(
        "spatial_window",
        lambda: M.spatial_window(2, 4, 1, 2),
        spatial_window_brute(2, 4, 1, 2),
        q_len=16,
        kv_len=16,
    ),
    Case(
        "prefix_lm",
        lambda: M.prefix(4, M.full(), M.causal()),
        prefix_brute(4, lambda i, j: True, lambda i, j: j <= i),
    ),
    Case(
        "frame_prompt_partial",
        lambda: M.prefix(2 * 3, M.block_causal(3), M.full()),
        prefix_brute(6, lambda i, j: j // 3 <= i // 3, lambda i, j: True),
    ),
    Case("ccam", lambda: M.ccam(4, 3, 2), ccam_brute(4, 3, 2, "start"), q_len=5, kv_len=6),
    Case("ccam_one_frame", lambda: M.ccam(4, 1, 3), ccam_brute(4, 1, 3, "start"), q_len=4, kv_len=3),
    Case(
        "ccam_end_rule",
        lambda: M.ccam(2, 4, 1, query_frame="end"),
        ccam_brute(2, 4, 1, "end"),
        q_len=2,
        kv_len=4,
    ),
    Case(
        "concentric",
        lambda: M.concentric(CCA_SPANS, 3, 3),
        concentric_brute(CCA_SPANS, 3, 3),
        batch=2,
        q_len=24,
        kv_len=24,
    ),
    Case(
        "modality_mutual",
        lambda: M.modality_mutual(*(torch.tensor(x) for x in BOUNDS)),
        lambda b, i, j, qi, kj: (
            j <= i or (BOUNDS[0][b] <= i < BOUNDS[1][b] and BOUNDS[1][b] <= j < BOUNDS[2][b])
        ),
        batch=2,
    ),
    Case(
        "segment_bidirectional",
        lambda: M.segment_bidirectional(torch.tensor(SEG)),
        lambda b, i, j, qi, kj: j <= i or (SEG[b][i] > 0 and SEG[b][j] > 0 and SEG[b][i] != SEG[b][j]),
        batch=2,
    ),
    Case("chunk", lambda: M.chunk(5), lambda b, i, j, qi, kj: i // 5 == j // 5),
    Case(
        "chunk_causal",
        lambda: M.chunk(5, causal_within=True),
        lambda b, i, j, qi, kj: i // 5 == j // 5 and j <= i,
    ),
    Case(
        "completed_chunks",
        lambda: M.completed_chunks(3),
        lambda b, i, j, qi, kj: (kj + 1) * 3 <= i,
        q_len=9,
        kv_len=4,
        q_pos=list(range(4, 13)),
    ),
    Case(
        "key_padding",
        lambda: M.key_padding(torch.tensor(VALID)),
        lambda b, i, j, qi, kj: VALID[b][kj],
        batch=2,
        q_len=4,
    ),
    Case(
        "same_sequence",
        lambda: M.same_sequence(torch.tensor(IDS)),
        lambda b, i, j, qi, kj: IDS[b][i] == IDS[b][j],
        batch=2,
    ),
    Case("ccam_queries", lambda: M.ccam_queries(8, 3), ccam_queries_brute(8, 3, "start"), q_len=8, kv_len=8),
    Case(
        "ccam_queries_one_frame",
        lambda: M.ccam_queries(4, 1),
        lambda b, i, j, qi, kj: True,
        q_len=4,
        kv_len=4,
    ),
    Case(
        "ccam_queries_end_rule",
        lambda: M.ccam_queries(4, 6, query_frame="end"),
        ccam_queries_brute(4, 6, "end"),
        q_len=5,
        kv_len=5,
    ),
    Case(
        "modality_mutual_tables",
        lambda: M.modality_mutual_tables(torch.tensor(LIMIT), torch.tensor(QUESTION)),
        lambda b, i, j, qi, kj: j <= i or (QUESTION[b][j] and i < j < LIMIT[b][i]),
        batch=2,
    ),
    Case(
        "modality_mutual_tables_cache",
        lambda: M.modality_mutual_tables(torch.tensor(LIMIT[:1]), torch.tensor(QUESTION[:1])),
        lambda b, i, j, qi, kj: j <= i or (QUESTION[0][j] and i < j < LIMIT[0][i]),
        q_len=5,
    ),
]


def positions(case: Case) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    as_tensor = lambda p: None if p is None else torch.tensor(p)
    return as_tensor(case.q_pos), as_tensor(case.kv_pos)


def brute_force(case: Case) -> torch.Tensor:
    """(B, 1, Lq, Lk) by a double loop over the paper definition."""
    q_pos = case.q_pos or list(range(case.kv_len - case.q_len, case.kv_len))
    kv_pos = case.kv_pos or list(range(case.kv_len))
    out = torch.zeros(case.batch, 1, case.q_len, case.kv_len, dtype=torch.bool)
    for b in range(case.batch):
        qp = q_pos[b] if isinstance(q_pos[0], list) else q_pos
        kp = kv_pos[b] if isinstance(kv_pos[0], list) else kv_pos
        for qi in range(case.q_len):
            for kj in range(case.kv_len):
                out[b, 0, qi, kj] = bool(case.brute(b, qp[qi], kp[kj], qi, kj))
    return out


def dense(case: Case, mask: M.Mask | None = None) -> torch.Tensor:
    mask = mask or case.mask()
    allowed = mask.dense(case.batch, 1, case.q_len, case.kv_len, *positions(case))
    return allowed.expand(case.batch, 1, case.q_len, case.kv_len)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_dense_equals_brute_force(case):
    assert torch.equal(dense(case), brute_force(case))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flex_create_mask_equals_dense(case):
    mask = case.mask()
    q_pos, kv_pos = M.resolve_positions(*positions(case), case.batch, case.q_len, case.kv_len)
    flex = create_mask(mask.index_mod(q_pos, kv_pos), case.batch, 1, case.q_len, case.kv_len, device="cpu")
    assert torch.equal(flex, dense(case, mask))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_block_mask_covers_dense_and_is_cached(case):
    mask = case.mask()
    q_pos, kv_pos = positions(case)
    block = 4
    bm = mask.block_mask(case.batch, 1, case.q_len, case.kv_len, q_pos, kv_pos, block_size=block)
    assert mask.block_mask(case.batch, 1, case.q_len, case.kv_len, q_pos, kv_pos, block_size=block) is bm
    allowed = dense(case, mask)
    tiles = bm.to_dense().bool().repeat_interleave(block, 2).repeat_interleave(block, 3)
    tiles = tiles[..., : case.q_len, : case.kv_len].expand_as(allowed)
    assert not (allowed & ~tiles).any(), "an allowed entry falls in a block the BlockMask skips"
    # Every block flex visits holds at least one allowed entry: no wasted work, nothing missed.
    padded = torch.nn.functional.pad(allowed, (0, -case.kv_len % block, 0, -case.q_len % block))
    used = padded.unflatten(2, (-1, block)).unflatten(4, (-1, block)).any(5).any(3)
    assert torch.equal(bm.to_dense().bool().expand_as(used), used)


# --------------------------------------------------------------------------------------------------------
# Hand-written layouts: the definitions read off small matrices.
# --------------------------------------------------------------------------------------------------------
def test_hand_written_layouts():
    assert torch.equal(M.causal().dense(1, 1, 3, 5)[0, 0], rows("11100", "11110", "11111"))
    assert torch.equal(M.causal().dense(1, 1, 4, 2)[0, 0], rows("00", "00", "10", "11"))
    assert torch.equal(
        M.block_causal(2).dense(1, 1, 5, 5)[0, 0], rows("11000", "11000", "11110", "11110", "11111")
    )
    assert torch.equal(M.sliding_window(2).dense(1, 1, 4, 4)[0, 0], rows("1000", "1100", "0110", "0011"))
    assert torch.equal(
        M.frame_window(1, 2).dense(1, 1, 4, 4)[0, 0], M.sliding_window(2).dense(1, 1, 4, 4)[0, 0]
    )
    assert torch.equal(M.chunk(2, True).dense(1, 1, 4, 4)[0, 0], rows("1000", "1100", "0010", "0011"))
    assert torch.equal(M.ccam(4, 2, 2).dense(1, 1, 4, 4)[0, 0], rows("1100", "1100", "1111", "1111"))
    assert torch.equal(
        M.completed_chunks(2).dense(1, 1, 3, 3, q_pos=torch.tensor([1, 2, 5]))[0, 0],
        rows("000", "100", "110"),
    )
    # AKI: text 0-1, image 2-3, question 4, answer 5: the image sees the question, never the answer.
    aki = rows("100000", "110000", "111010", "111110", "111110", "111111")
    assert torch.equal(M.modality_mutual(2, 4, 5).dense(1, 1, 6, 6)[0, 0], aki)
    # PINE: two documents (1 and 2) see each other both ways; each is causal inside; 0s are plain causal.
    pine = rows("10000", "11011", "11111", "11110", "11111")
    assert torch.equal(M.segment_bidirectional([0, 1, 1, 2, 2]).dense(1, 1, 5, 5)[0, 0], pine)
    # CCA on a 3x3 image after one text token: the centre (ring 1, position 5) sees the whole image.
    cca = M.concentric([(1, 10)], 3, 3).dense(1, 1, 11, 11)[0, 0]
    assert torch.equal(cca[5], torch.tensor([True] * 10 + [False]))
    assert torch.equal(cca[1], rows("11111011110")[0]), "a border token sees the text before and its ring"
    assert cca[10].all(), "text after the image sees every image token"


def test_cca_ring_map():
    ring = M.ring_map(24, 24)
    assert ring[0].eq(0).all() and ring[:, -1].eq(0).all()
    assert ring[11:13, 11:13].eq(11).all()
    assert ring.max() == 11 and ring.unique().numel() == 12


def test_sparsity():
    # Spec §3: frame-causal, 16 tokens/frame, L = 128 -> 43.75 % of 16x16 tiles skipped.
    assert M.block_causal(16).sparsity(1, 1, 128, 128, block_size=16) == pytest.approx(0.4375)
    # Ragged edges: 10 queries x 12 keys in 4x4 tiles, causal -> tiles (r, c) with c > r are empty.
    tiles = torch.ones(3, 3, dtype=torch.bool).tril()
    assert M.causal().sparsity(1, 1, 12, 12, block_size=4) == pytest.approx(1 - tiles.float().mean().item())
    assert M.full().sparsity(2, 2, 10, 7, block_size=4) == 0.0


# --------------------------------------------------------------------------------------------------------
# Algebra laws
# --------------------------------------------------------------------------------------------------------
ALGEBRA = [M.causal(), M.block_causal(3), M.sliding_window(4), M.same_frame([(2, 10)], 4), M.chunk(5)]


def d(mask: M.Mask) -> torch.Tensor:
    return mask.dense(1, 1, 12, 12).expand(1, 1, 12, 12)


@pytest.mark.parametrize("a", ALGEBRA, ids=repr)
@pytest.mark.parametrize("b", ALGEBRA[1:3], ids=repr)
def test_algebra_laws(a, b):
    assert torch.equal(d(a & b), d(a) & d(b))
    assert torch.equal(d(a | b), d(a) | d(b))
    assert torch.equal(d(~a), ~d(a))
    assert torch.equal(d(~(a | b)), d(~a & ~b))  # De Morgan
    assert torch.equal(d(~~a), d(a))
    assert torch.equal(d(a & M.full()), d(a)) and torch.equal(d(a | M.full()), d(M.full()))
    assert not d(a & ~a).any() and d(a | ~a).all()


def test_prefix_identities():
    n = 3
    frame_prompt = M.prefix(2 * n, M.block_causal(n), M.block_causal(n))
    assert torch.equal(d(frame_prompt), d(M.block_causal(n)))
    assert torch.equal(d(M.prefix(0, M.full(), M.causal())), d(M.causal()))


def test_keys_and_repr():
    a, b = M.causal(), M.causal()
    assert a.key == b.key and hash(a.key) == hash(b.key)
    assert M.block_causal(2).key != M.block_causal(3).key
    ids = torch.tensor([0, 0, 1])
    assert M.same_sequence(ids).key == M.same_sequence(ids).key
    assert M.same_sequence(ids).key == M.same_sequence(ids.clone()).key  # small CPU tables: keyed by value
    assert M.same_sequence(ids).key != M.same_sequence(torch.tensor([0, 1, 1])).key
    assert repr(M.causal() | M.chunk(4)) == "(causal() | chunk(4, False))"


def test_moving_metadata_keeps_identity_when_already_there():
    mask = M.same_sequence([0, 0, 1])
    assert mask.to("cpu") is mask


# --------------------------------------------------------------------------------------------------------
# xformers: every exact mapping materialises to exactly the dense mask, on CPU
# --------------------------------------------------------------------------------------------------------
XFORMERS_MAPPINGS = [
    ("causal_square", M.causal(), 1, 7, 7, "LowerTriangularMask"),
    ("causal_cache", M.causal(), 1, 3, 7, "LowerTriangularFromBottomRightMask"),
    ("sliding_square", M.sliding_window(3), 1, 9, 9, "LowerTriangularFromBottomRightLocalAttentionMask"),
    ("sliding_cache", M.sliding_window(3), 1, 4, 9, "LowerTriangularFromBottomRightLocalAttentionMask"),
    ("sliding_symmetric", M.sliding_window(3, True), 1, 5, 9, "LocalAttentionFromBottomRightMask"),
    ("chunk", M.chunk(3), 2, 8, 8, "BlockDiagonalMask"),
    ("chunk_causal", M.chunk(3, True), 2, 8, 8, "BlockDiagonalCausalMask"),
    (
        "same_sequence",
        M.same_sequence(torch.tensor([[0, 0, 1, 1, 1, 2], [5, 5, 5, 6, 6, 6]])),
        2,
        6,
        6,
        "BlockDiagonalMask",
    ),
]


@pytest.mark.parametrize(
    "name,mask,batch,q_len,kv_len,cls", XFORMERS_MAPPINGS, ids=[m[0] for m in XFORMERS_MAPPINGS]
)
def test_xformers_bias_materialises_to_dense(name, mask, batch, q_len, kv_len, cls):
    pytest.importorskip("xformers.ops.fmha.attn_bias")
    bias = mask.xformers_bias(batch, 1, q_len, kv_len)
    assert type(bias).__name__ == cls
    allowed = mask.dense(batch, 1, q_len, kv_len).expand(batch, 1, q_len, kv_len)[:, 0]
    if cls.startswith("BlockDiagonal"):  # describes the batch folded into one sequence
        expected = torch.block_diag(*allowed)
        got = bias.materialize((batch * q_len, batch * kv_len), dtype=torch.float32, device="cpu")
    else:
        expected = allowed[0]
        got = bias.materialize((q_len, kv_len), dtype=torch.float32, device="cpu")
    assert torch.equal(got.isfinite(), expected)


@pytest.mark.parametrize(
    "mask,q_len,kv_len,q_pos",
    [
        (M.causal(), 7, 3, None),  # rows with no key: not pinned on xformers
        (M.causal(), 4, 4, torch.arange(4)),  # explicit positions
        (M.block_causal(2), 4, 4, None),
        (M.causal() & M.chunk(2), 4, 4, None),
        (M.same_sequence([0, 1, 0, 0]), 4, 4, None),  # id 0 comes back: not block diagonal
        (M.full(), 4, 4, None),  # needs no bias at all
    ],
    ids=repr,
)
def test_xformers_bias_none_where_not_exact(mask, q_len, kv_len, q_pos):
    pytest.importorskip("xformers.ops.fmha.attn_bias")
    assert mask.xformers_bias(1, 1, q_len, kv_len, q_pos=q_pos) is None


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------
def test_bad_input_raises():
    with pytest.raises(ValueError, match="q_pos"):
        M.causal().dense(1, 1, 3, 5, q_pos=torch.arange(4))
    with pytest.raises(ValueError, match="kv_pos"):
        M.causal().dense(2, 1, 3, 5, kv_pos=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        M.causal().dense(1, 1, 3, 3, q_pos=torch.zeros(3))
    with pytest.raises(ValueError, match="batch 3"):
        M.same_sequence(torch.zeros(3, 4)).dense(2, 1, 4, 4)
    with pytest.raises(ValueError, match="positions 0..3"):
        M.segment_bidirectional([0, 1, 1, 2]).dense(1, 1, 3, 6)
    with pytest.raises(ValueError, match="key slots"):
        M.key_padding(torch.ones(5, dtype=torch.bool)).dense(1, 1, 3, 6)
    with pytest.raises(ValueError, match="whole 3x3 frames"):
        M.concentric([(0, 10)], 3, 3)
    with pytest.raises(ValueError, match="positive"):
        M.block_causal(0)
    with pytest.raises(ValueError, match="query_frame"):
        M.ccam(4, 2, 2, query_frame="middle")
    with pytest.raises(ValueError, match="compose only with masks"):
        M.causal() & torch.ones(3)


def test_metadata_from_numpy_is_copied():
    """An array shared with NumPy changes without a version bump, so masks keep their own copy."""
    import numpy as np

    segments = np.array([[0, 1, 1, 2, 2, 0]])
    mask = M.segment_bidirectional(segments)
    before = mask.dense(1, 1, 6, 6).clone()
    segments[:] = 0
    assert torch.equal(mask.dense(1, 1, 6, 6), before)


def test_chunk_window_sees_its_chunk_causally_and_a_bounded_past():
    starts = torch.tensor([0, 0, 0, 3, 3, 5, 5])  # chunks [0,3) [3,5) [5,7)
    allowed = M.chunk_window(starts, 3).dense(1, 1, 7, 7)[0, 0]
    for i in range(7):
        for j in range(7):
            assert bool(allowed[i, j]) == (j <= i and j >= int(starts[i]) - 3), (i, j)
    batched = M.chunk_window(torch.stack([starts, torch.zeros(7, dtype=torch.long)]), 0).dense(2, 1, 7, 7)
    assert torch.equal(batched[1, 0], torch.ones(7, 7, dtype=torch.bool).tril())  # one chunk: plain causal
    with pytest.raises(ValueError, match="window must be >= 0"):
        M.chunk_window(starts, -1)


def test_cache_keys_small_cpu_positions_by_value():
    # Models build `torch.arange` positions on every call: equal values must hit the cache, new values must not.
    mask = M.sliding_window(3)
    first = mask.dense(1, 1, 6, 6, torch.arange(6), torch.arange(6))
    assert mask.dense(1, 1, 6, 6, torch.arange(6), torch.arange(6)) is first
    shifted = mask.dense(1, 1, 6, 6, torch.arange(6) + 2, torch.arange(6))
    assert shifted is not first and not torch.equal(shifted, first)
    positions = torch.arange(6)
    before = mask.dense(1, 1, 6, 6, positions, positions)
    positions.mul_(2)  # the same tensor, edited in place: a new entry, never the stale one
    assert torch.equal(
        mask.dense(1, 1, 6, 6, positions, positions),
        M.sliding_window(3).dense(1, 1, 6, 6, 2 * torch.arange(6), 2 * torch.arange(6)),
    )
    assert not torch.equal(mask.dense(1, 1, 6, 6, positions, positions), before)
