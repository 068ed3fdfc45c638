"""`attend`: every mask × every backend agrees with `reference`; ineligible cells are refused, never skipped."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from timeloom_kernels import masks as M
from timeloom_kernels.attention import ENV_BACKEND, Problem, attend, describe, ineligibility, select_backend
from timeloom_kernels.backends import tiled

OUT_TOL = dict(atol=2e-5, rtol=1e-4)
GRAD_TOL = dict(atol=1e-4, rtol=1e-3)
HAS_CUDA = torch.cuda.is_available()
B, HQ, HKV, LK = 2, 4, 2, 13  # GQA; a length that is no multiple of 128


@dataclass
class Case:
    id: str
    mask: M.Mask | None
    q_len: int = LK
    kv_len: int = LK
    q_pos: torch.Tensor | None = None
    kv_pos: torch.Tensor | None = None


SEG = torch.tensor([[0, 1, 1, 1, 2, 2, 0, 3, 3, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1, 2, 2, 0, 0, 0, 0, 0]])
IDS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3], [7] * 6 + [1] * 7])
VALID = torch.tensor([[True] * 9 + [False] * 4, [False] * 13])  # sample 1 is padding only: empty rows

CASES = [
    Case("none", None),
    Case("none_cross", None, q_len=5),
    Case("full", M.full()),
    Case("causal", M.causal()),
    Case("causal_cache", M.causal(), q_len=5),
    Case("causal_more_q", M.causal(), q_len=LK, kv_len=7),  # the first 6 rows see nothing
    Case(
        "causal_positions",
        M.causal(),
        q_len=3,
        q_pos=torch.tensor([[20, 21, 22], [7, 9, 11]]),
        kv_pos=torch.tensor([3, 20, 5, 21, 30, 0, 8, 9, 12, 2, 1, 4, 6]),
    ),
    Case("block_causal", M.block_causal(3)),
    Case("fbcam", M.causal() | M.same_frame([[(1, 9)], [(3, 11)]], 4)),
    Case("sliding_window", M.sliding_window(4), q_len=6),
    Case("sliding_symmetric", M.sliding_window(3, symmetric=True)),
    Case("frame_window", M.frame_window(2, 3)),
    Case("spatial_window", M.spatial_window(2, 3, 1, 2)),
    Case("prefix_lm", M.prefix(4, M.full(), M.causal())),
    Case("ccam", M.ccam(5, 3, 4), q_len=5, kv_len=12),
    Case("concentric", M.concentric([[(2, 11)], [(1, 10)]], 3, 3)),
    Case(
        "modality_mutual", M.modality_mutual(torch.tensor([2, 1]), torch.tensor([6, 4]), torch.tensor([8, 9]))
    ),
    Case("segment_bidirectional", M.segment_bidirectional(SEG)),
    Case("chunk", M.chunk(4)),
    Case("chunk_causal", M.chunk(4, causal_within=True)),
    Case("completed_chunks", M.completed_chunks(3), q_len=9, kv_len=4, q_pos=torch.arange(4, 13)),
    Case("key_padding", M.key_padding(VALID), q_len=5),
    Case("same_sequence", M.same_sequence(IDS)),
]


def inputs(case: Case, head_dim: int = 16, device: str = "cpu", dtype=torch.float32, grad: bool = True):
    g = torch.Generator().manual_seed(0)
    shapes = ((B, HQ, case.q_len, head_dim), (B, HKV, case.kv_len, head_dim), (B, HKV, case.kv_len, head_dim))
    return [torch.randn(s, generator=g, dtype=dtype).to(device).requires_grad_(grad) for s in shapes]


def run(case: Case, backend: str, tensors, **kwargs):
    q, k, v = tensors
    return attend(q, k, v, case.mask, backend=backend, q_pos=case.q_pos, kv_pos=case.kv_pos, **kwargs)


def grads(out: torch.Tensor, tensors) -> list[torch.Tensor]:
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return torch.autograd.grad(out, tensors, cotangent)


def device_or_skip(device: str) -> None:
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("needs CUDA: GPU cells run where a GPU exists")


def assert_matches_reference(case: Case, backend: str, device: str, head_dim: int, with_grad: bool) -> None:
    tensors = inputs(case, head_dim, device, grad=with_grad)
    expected = run(case, "reference", tensors)
    got = run(case, backend, tensors)
    torch.testing.assert_close(got, expected, **OUT_TOL)
    if with_grad:
        for g_got, g_ref in zip(grads(got, tensors), grads(expected, tensors)):
            torch.testing.assert_close(g_got, g_ref, **GRAD_TOL)


def assert_refused(case: Case, backend: str, tensors, match: str) -> None:
    """Ineligible: ``auto`` does not pick it and an explicit request raises, saying why."""
    q, k, v = tensors
    problem = describe(q, k, v, case.mask, q_pos=case.q_pos, kv_pos=case.kv_pos, probe_xformers=True)
    assert ineligibility(backend, problem) is not None
    assert select_backend(problem) != backend
    with pytest.raises(ValueError, match=match):
        run(case, backend, tensors)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_sdpa_matches_reference(case, device):
    device_or_skip(device)
    assert_matches_reference(case, "sdpa", device, head_dim=16, with_grad=True)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of 4 query rows, so the 13-token cases span several tiles with different key spans."""
    monkeypatch.setattr(tiled, "TILE_ROWS", 4)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_tiled_matches_reference_or_is_refused(case, device, small_tiles):
    device_or_skip(device)
    if case.mask is None or case.mask.is_plain("full"):
        assert_refused(case, "tiled", inputs(case, device=device), match="no mask")
    else:
        assert_matches_reference(case, "tiled", device, head_dim=16, with_grad=True)


def test_tiled_key_spans():
    allowed = M.block_causal(3).dense(1, 1, 7, 7)
    assert tiled.key_spans(allowed, tile_rows=3) == [
        (slice(0, 3), slice(0, 3), True),  # frame 0 sees itself only, no mask needed
        (slice(3, 6), slice(0, 6), True),
        (slice(6, 7), slice(0, 7), True),
    ]
    window = M.sliding_window(2).dense(1, 1, 6, 6)  # row i sees i-1 and i
    assert tiled.key_spans(window, tile_rows=3) == [
        (slice(0, 3), slice(0, 3), False),
        (slice(3, 6), slice(2, 6), False),
    ]
    nothing = M.key_padding(torch.zeros(1, 4, dtype=torch.bool)).dense(1, 1, 4, 4)
    assert tiled.key_spans(nothing, tile_rows=2) == [(slice(0, 4), slice(0, 0), False)]  # merged
    frames = M.block_causal(4).dense(1, 1, 8, 8)  # two tiles per frame share the frame's key prefix
    assert tiled.key_spans(frames, tile_rows=2) == [
        (slice(0, 4), slice(0, 4), True),
        (slice(4, 8), slice(0, 8), True),
    ]
    assert tiled.skipped_fraction(window, tile_rows=3) == pytest.approx(1 - (3 * 3 + 3 * 4) / 36)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_flex_matches_reference(case, device):
    device_or_skip(device)
    if device == "cpu":
        with torch.no_grad():  # flex's CPU path is forward-only
            assert_matches_reference(case, "flex", device, head_dim=16, with_grad=False)
        assert_refused(case, "flex", inputs(case), match="no backward pass on CPU")
    else:
        assert_matches_reference(case, "flex", device, head_dim=16, with_grad=True)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_xformers_matches_reference_or_is_refused(case, device):
    device_or_skip(device)
    tensors = inputs(case, device=device)
    q, k, v = tensors
    problem = describe(q, k, v, case.mask, q_pos=case.q_pos, kv_pos=case.kv_pos, probe_xformers=True)
    if device == "cpu" or "xformers" not in problem.available or not problem.xformers_exact:
        assert_refused(case, "xformers", tensors, match="xformers")
    else:
        assert_matches_reference(case, "xformers", device, head_dim=16, with_grad=True)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("head_dim", [16, 64])
@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[7]], ids=lambda c: c.id)
def test_head_dims(case, head_dim, backend):
    with torch.set_grad_enabled(backend == "sdpa"):
        assert_matches_reference(case, backend, "cpu", head_dim, with_grad=backend == "sdpa")


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("backend", ["reference", "sdpa", "tiled", "flex"])
def test_fully_masked_rows_are_zero_with_zero_grad(backend, device, small_tiles):
    device_or_skip(device)
    with_grad = backend != "flex" or device == "cuda"
    for case in (
        next(c for c in CASES if c.id == "key_padding"),
        next(c for c in CASES if c.id == "causal_more_q"),
    ):
        tensors = inputs(case, device=device, grad=with_grad)
        with torch.set_grad_enabled(with_grad):
            out = run(case, backend, tensors)
        empty = ~case.mask.dense(B, 1, case.q_len, case.kv_len, device=device).any(-1)  # (B|1, 1, Lq)
        empty = empty.expand(B, HQ, case.q_len)
        assert empty.any() and out[empty].eq(0).all()
        if with_grad:
            dq, dk, dv = grads(out, tensors)
            assert all(g.isfinite().all() for g in (dq, dk, dv))
            assert dq[empty].eq(0).all()


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_causal_self_equals_truncated_input(backend):
    q, k, v = inputs(Case("x", None), grad=False)
    full = attend(q, k, v, M.causal(), backend=backend)
    for i in (0, 5, LK - 1):
        prefix = attend(q[:, :, : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], M.causal(), backend=backend)
        torch.testing.assert_close(prefix, full[:, :, : i + 1], **OUT_TOL)
    # Cached decoding: the last 3 queries against all keys are the last 3 rows (bottom-right alignment).
    torch.testing.assert_close(
        attend(q[:, :, -3:], k, v, M.causal(), backend=backend), full[:, :, -3:], **OUT_TOL
    )


def test_gqa_reads_kv_head_h_over_groups():
    q, k, v = inputs(Case("x", None), grad=False)
    grouped = attend(q, k, v, M.causal(), backend="reference")
    repeated = attend(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), M.causal(), backend="reference"
    )
    torch.testing.assert_close(grouped, repeated, atol=0, rtol=0)


def test_value_dim_may_differ_and_fp64_stays_fp64():
    g = torch.Generator().manual_seed(0)
    q, k = (
        torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64),
        torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64),
    )
    v = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64)
    ref = attend(q, k, v, M.causal(), backend="reference")
    assert ref.shape == (1, 2, 6, 3) and ref.dtype == torch.float64
    torch.testing.assert_close(attend(q, k, v, M.causal(), backend="sdpa"), ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", ["sdpa", "tiled", "flex"])
def test_alibi_and_tensor_bias(backend, small_tiles):
    case = Case("causal", M.causal(), q_len=6)
    with_grad = backend != "flex"
    tensors = inputs(case, grad=with_grad)
    with torch.set_grad_enabled(with_grad):
        for bias in (M.ALiBi(HQ), torch.randn(1, HQ, 6, LK, requires_grad=with_grad)):
            expected = run(case, "reference", tensors, bias=bias)
            got = run(case, backend, tensors, bias=bias)
            torch.testing.assert_close(got, expected, **OUT_TOL)
            if with_grad:
                wrt = [*tensors, bias] if isinstance(bias, torch.Tensor) else tensors
                for g_got, g_ref in zip(grads(got, wrt), grads(expected, wrt)):
                    torch.testing.assert_close(g_got, g_ref, **GRAD_TOL)


def test_alibi_definition():
    bias = M.ALiBi(4).dense(1, 4, 3, 5)
    slopes = torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8])
    distance = torch.tensor([[2, 1, 0, -1, -2], [3, 2, 1, 0, -1], [4, 3, 2, 1, 0]], dtype=torch.float32)
    torch.testing.assert_close(bias[0], -slopes.view(4, 1, 1) * distance)
    torch.testing.assert_close(M.ALiBi(4).slopes(), slopes)


def test_return_probs_and_scale():
    q, k, v = inputs(Case("x", None, q_len=5), grad=False)
    out, probs = attend(q, k, v, M.causal(), return_probs=True, scale=0.3)
    assert probs.shape == (B, HQ, 5, LK)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, HQ, 5))
    torch.testing.assert_close(out, attend(q, k, v, M.causal(), scale=0.3, backend="sdpa"), **OUT_TOL)
    assert probs[..., -1, :].gt(0).all() and probs[..., 0, -4:].eq(0).all()  # bottom-right causal


def test_dropout_is_unbiased_and_flex_refuses_it():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g) for _ in range(3))
    clean = attend(q, k, v, M.causal(), backend="reference")
    draws = 4000
    for backend in ("reference", "sdpa"):
        torch.manual_seed(0)
        noisy = attend(
            *(x.expand(draws, -1, -1, -1) for x in (q, k, v)), M.causal(), dropout_p=0.5, backend=backend
        )
        assert not torch.equal(noisy[0], clean[0])
        torch.testing.assert_close(noisy.mean(0, keepdim=True), clean, atol=0.1, rtol=0)
    with pytest.raises(ValueError, match="no dropout"):
        attend(q, k, v, M.causal(), dropout_p=0.1, backend="flex")


def test_env_var_overrides_auto(monkeypatch):
    q, k, v = inputs(Case("x", None), grad=True)
    expected = attend(q, k, v, M.block_causal(3), backend="reference")
    monkeypatch.setenv(ENV_BACKEND, "reference")
    assert torch.equal(attend(q, k, v, M.block_causal(3)), expected)
    monkeypatch.setenv(ENV_BACKEND, "flex")  # a preference: where flex cannot serve, auto's choice runs
    with pytest.warns(UserWarning, match="no backward pass on CPU"):
        fallback = attend(q, k, v, M.block_causal(3))
    torch.testing.assert_close(fallback, expected, **OUT_TOL)
    monkeypatch.setenv(ENV_BACKEND, "nonsense")
    with pytest.raises(ValueError, match=f"unknown {ENV_BACKEND} 'nonsense'"):
        attend(q, k, v, M.block_causal(3))


def test_bad_input_raises():
    q, k, v = inputs(Case("x", None, q_len=5), grad=False)
    bad = [
        (lambda: attend(q[0], k, v), "4-D"),
        (lambda: attend(q, k[..., :8], v), "head dim"),
        (lambda: attend(q[:, :3], k, v), "multiple of kv heads"),
        (lambda: attend(q, k, v[:, :, :4]), r"\(B, Hkv, Lk\)"),
        (lambda: attend(q, k.double(), v), "dtype"),
        (lambda: attend(q, k, v, bias=torch.zeros(5, 5)), "does not broadcast"),
        (lambda: attend(q, k, v, bias=M.ALiBi(3)), "3 heads"),
        (lambda: attend(q, k, v, bias="alibi"), "ScoreMod"),
        (lambda: attend(q, k, v, mask=torch.ones(5, LK, dtype=torch.bool)), "Mask"),
        (lambda: attend(q, k, v, dropout_p=1.0), "dropout_p"),
        (lambda: attend(q, k, v, backend="triton"), "unknown backend"),
        (lambda: attend(q, k, v, M.causal(), q_pos=torch.arange(4)), "q_pos"),
        (lambda: attend(q, k, v, return_probs=True, backend="sdpa"), "probabilities"),
        (lambda: attend(q, k, v, M.segment_bidirectional(SEG[:, :5])), "covers positions"),
    ]
    for call, match in bad:
        with pytest.raises(ValueError, match=match):
            call()


# --------------------------------------------------------------------------------------------------------
# select_backend: the rules of spec §3 as a table
# --------------------------------------------------------------------------------------------------------
def problem(**overrides) -> Problem:
    base = dict(
        device_type="cuda", dtype=torch.bfloat16, batch=1, q_heads=8, kv_heads=8, q_len=256, kv_len=256
    )
    return Problem(**{**base, **overrides})


CAUSAL, BLOCK = M.causal(), M.block_causal(16)
BIG = dict(q_len=2048, kv_len=2048)
WITH_XF = frozenset({"reference", "sdpa", "flex", "xformers"})
NO_FLEX = frozenset({"reference", "sdpa", "xformers"})
TABLE = [
    ("probs first", problem(needs_probs=True, mask=CAUSAL), "reference"),
    (
        "cpu sparse big",
        problem(device_type="cpu", dtype=torch.float32, mask=BLOCK, **BIG, block_sparsity=0.5),
        "tiled",
    ),
    ("cpu dense-ish big", problem(device_type="cpu", mask=BLOCK, **BIG, block_sparsity=0.1), "sdpa"),
    ("cpu small (sparsity not measured)", problem(device_type="cpu", mask=BLOCK, needs_grad=False), "sdpa"),
    ("cpu causal", problem(device_type="cpu", mask=CAUSAL, **BIG, block_sparsity=0.44), "sdpa"),
    ("cpu no mask", problem(device_type="cpu", **BIG), "sdpa"),
    ("cuda no mask", problem(), "sdpa"),
    ("cuda causal", problem(mask=CAUSAL, **BIG), "sdpa"),
    ("cuda causal cache", problem(mask=CAUSAL, q_len=16, kv_len=4096), "sdpa"),
    ("cuda causal positions", problem(mask=CAUSAL, default_positions=False), "sdpa"),
    ("cuda sparse big", problem(mask=BLOCK, **BIG, block_sparsity=0.4375, needs_grad=True), "flex"),
    ("cuda sparse small", problem(mask=BLOCK, block_sparsity=0.4375), "sdpa"),
    ("cuda dense-ish big", problem(mask=BLOCK, **BIG, block_sparsity=0.1), "sdpa"),
    ("cuda sparse big dropout", problem(mask=BLOCK, **BIG, block_sparsity=0.5, dropout_p=0.1), "sdpa"),
    (
        "cuda sparse big grad bias",
        problem(mask=BLOCK, **BIG, block_sparsity=0.5, bias="tensor", bias_requires_grad=True),
        "sdpa",
    ),
    (
        "cuda sparse big learned score mod",
        problem(mask=BLOCK, **BIG, block_sparsity=0.5, bias="score_mod", bias_requires_grad=True),
        "sdpa",
    ),
    (
        "xformers only without flex",
        problem(mask=M.chunk(64), available=NO_FLEX, xformers_exact=True),
        "xformers",
    ),
    ("xformers not over flex", problem(mask=M.chunk(64), available=WITH_XF, xformers_exact=True), "sdpa"),
    (
        "xformers fp32",
        problem(mask=M.chunk(64), dtype=torch.float32, available=NO_FLEX, xformers_exact=True),
        "sdpa",
    ),
    ("xformers inexact", problem(mask=BLOCK, available=NO_FLEX, xformers_exact=False), "sdpa"),
]


@pytest.mark.parametrize("name,problem,expected", TABLE, ids=[row[0] for row in TABLE])
def test_select_backend_table(name, problem, expected):
    assert select_backend(problem) == expected
    assert ineligibility(expected, problem) is None


@pytest.mark.parametrize("backend", ["sdpa", "tiled"])
def test_low_rank_bias_broadcasts(backend, small_tiles):
    """A bias of shape (Lk,) or a scalar broadcasts like any other (tiled slices it per tile)."""
    case = Case("block_causal", M.block_causal(3))
    tensors = inputs(case, grad=False)
    for bias in (torch.randn(LK), torch.tensor(0.5)):
        expected = run(case, "reference", tensors, bias=bias)
        torch.testing.assert_close(run(case, backend, tensors, bias=bias), expected, **OUT_TOL)


def test_masks_with_metadata_work_in_inference_mode():
    """Lightning validates and predicts under inference mode, whose tensors have no version counter."""
    with torch.inference_mode():
        q, k, v = inputs(Case("x", None), grad=False)
        for case in CASES:
            if case.mask is not None and case.q_len == case.kv_len == LK:
                expected = run(case, "reference", (q, k, v))
                torch.testing.assert_close(run(case, "sdpa", (q, k, v)), expected, **OUT_TOL)
        positions = torch.arange(LK)
        attend(q, k, v, M.causal(), q_pos=positions, kv_pos=positions)


def test_relative_position_bias_is_swin_table_and_learns():
    """Window-major tokens of 2x3 windows: the bias of (i, j) is table[offset(Δrow, Δcol), h], and the
    table gets a gradient through sdpa and tiled alike, equal to reference's."""
    bias = M.RelativePositionBias(2, 3, num_heads=HQ)
    dense = bias.dense(1, HQ, 12, 12)
    for i, j in [(0, 0), (0, 5), (4, 2), (7, 10)]:  # tokens 6..11 are the second window
        (ri, ci), (rj, cj) = divmod(i % 6, 3), divmod(j % 6, 3)
        row = (ri - rj + 1) * 5 + (ci - cj + 2)
        torch.testing.assert_close(dense[0, :, i, j], bias.table[row].detach())
    windows = M.chunk(6)
    q, k, v = (torch.randn(B, HQ, 12, 16) for _ in range(3))
    gradients = {}
    for backend in ("reference", "sdpa", "tiled"):
        bias.zero_grad()
        attend(q, k, v, windows, bias=bias, backend=backend).square().sum().backward()
        gradients[backend] = bias.table.grad.clone()
    assert gradients["reference"].abs().sum() > 0
    for backend in ("sdpa", "tiled"):
        torch.testing.assert_close(gradients[backend], gradients["reference"], **GRAD_TOL)
    with pytest.raises(ValueError, match="flex"):
        attend(q, k, v, windows, bias=bias, backend="flex")
