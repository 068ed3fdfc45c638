"""Structures (spec §3): every mask and position scheme equals a hand-written loop over its definition."""

import random

import pytest
import torch
from timeloom_kernels import masks
from timeloom_understanding.layouts import (
    ASSISTANT,
    SYSTEM,
    TEXT,
    USER,
    Causal,
    Concentric,
    FrameBlockCausal,
    LayoutBuilder,
    ModalityMutual,
    TadRope,
    TCLLaVA,
    TokenLayout,
    VisualTokens,
    ccam_blocks,
    ccam_cross_mask,
    ccam_query_mask,
    make_structure,
)


# ---- hand-written definitions ----------------------------------------------------------------------------
def rows_of(layout: TokenLayout, b: int) -> list[dict]:
    fields = ("kind", "media", "frame", "row", "col", "role", "turn", "pad")
    return [{f: getattr(layout, f)[b, n].item() for f in fields} | {"n": n} for n in range(layout.shape[1])]


def is_vis(row: dict) -> bool:
    return row["kind"] != TEXT and not row["pad"]


def ring(row: dict, height: int, width: int) -> int:
    r, c = row["row"], row["col"]
    return min(r, c, height - 1 - r, width - 1 - c)


def causal_rule(rows, i, j):
    return j <= i


def fbcam_rule(rows, i, j):
    a, b = rows[i], rows[j]
    same_frame = is_vis(a) and is_vis(b) and a["media"] == b["media"] and a["frame"] == b["frame"]
    return j <= i or same_frame


def mma_rule(rows, i, j):
    if j <= i:
        return True
    if not is_vis(rows[i]):
        return False
    end = max(n for n, r in enumerate(rows) if r["media"] == rows[i]["media"])  # last token of i's media
    answer = next((n for n in range(end + 1, len(rows)) if rows[n]["role"] == ASSISTANT), len(rows))
    b = rows[j]
    return b["kind"] == TEXT and b["role"] == USER and not b["pad"] and i < j < answer


def cca_rule(height, width):
    def rule(rows, i, j):
        a, b = rows[i], rows[j]
        if is_vis(a) and is_vis(b) and a["media"] == b["media"]:
            return b["frame"] < a["frame"] or (
                b["frame"] == a["frame"] and ring(b, height, width) <= ring(a, height, width)
            )
        return j <= i

    return rule


def expected_allowed(layout: TokenLayout, rule) -> torch.Tensor:
    """Structure rule on real tokens, pad keys hidden, a pad query keeps only its diagonal."""
    batch, length = layout.shape
    out = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        rows = rows_of(layout, b)
        for i in range(length):
            for j in range(length):
                out[b, 0, i, j] = i == j or (not rows[j]["pad"] and rule(rows, i, j))
    return out


def tau_by_walking(rows: list[dict]) -> list[int]:
    tau, steps, previous = [], 0, None
    for r in rows:
        opens = r["kind"] == TEXT or previous is None or (r["media"], r["frame"]) != previous
        steps += opens
        tau.append(steps - 1)
        previous = (r["media"], r["frame"]) if r["kind"] != TEXT else None
    return tau


def cca_positions_by_walking(rows: list[dict], height: int, width: int) -> list[int]:
    rings = (min(height, width) + 1) // 2
    out, start, n = [], 0, 0
    while n < len(rows):
        r = rows[n]
        if r["kind"] == TEXT:
            out.append(start)
            start, n = start + 1, n + 1
            continue
        frame = [
            m for m in range(n, len(rows)) if (rows[m]["media"], rows[m]["frame"]) == (r["media"], r["frame"])
        ]
        out += [start + ring(rows[m], height, width) for m in frame]
        start, n = start + rings, frame[-1] + 1
    return out


# ---- random layouts: several media, turns, grids, pads ------------------------------------------------------
def random_sample(rng: random.Random, grid: tuple[int, int], max_frames: int = 3) -> TokenLayout:
    builder = LayoutBuilder().text(rng.randint(0, 2), SYSTEM)
    for turn in range(rng.randint(1, 2)):
        builder.text(rng.randint(1, 2), USER, turn)  # the user header
        for _ in range(rng.randint(0, 2)):
            builder.media(VisualTokens.grid(rng.randint(1, max_frames), *grid), USER, turn)
            builder.text(rng.randint(0, 2), USER, turn)
        builder.text(rng.randint(1, 3), USER, turn)
        builder.text(rng.randint(1, 3), ASSISTANT, turn)
    return builder.build()


def random_batch(seed: int, grid=(2, 2), side="right") -> TokenLayout:
    rng = random.Random(seed)
    return TokenLayout.stack([random_sample(rng, grid) for _ in range(3)], side=side)


CASES = [(seed, side) for seed in range(4) for side in ("right", "left")]


@pytest.mark.parametrize("seed, side", CASES)
@pytest.mark.parametrize(
    "structure, rule",
    [
        (Causal(), causal_rule),
        (FrameBlockCausal(), fbcam_rule),
        (TCLLaVA(), fbcam_rule),
        (ModalityMutual(), mma_rule),
    ],
    ids=["causal", "fbcam", "tc_llava", "mma"],
)
def test_masks_equal_their_definitions(structure, rule, seed, side):
    layout = random_batch(seed, side=side)
    torch.testing.assert_close(structure.allowed(layout), expected_allowed(layout, rule), rtol=0, atol=0)


@pytest.mark.parametrize("seed, side", CASES)
@pytest.mark.parametrize("grid", [(2, 2), (3, 4)])
def test_concentric_mask_and_positions_equal_their_definitions(seed, side, grid):
    layout = random_batch(seed, grid=grid, side=side)
    structure = Concentric()
    torch.testing.assert_close(
        structure.allowed(layout), expected_allowed(layout, cca_rule(*grid)), rtol=0, atol=0
    )
    positions = structure.position_ids(layout)
    for b in range(layout.shape[0]):
        real = rows_of(layout, b)
        real = [r for r in real if not r["pad"]]
        assert positions[b, ~layout.pad[b]].tolist() == cca_positions_by_walking(real, *grid)


@pytest.mark.parametrize("seed, side", CASES)
@pytest.mark.parametrize("gamma", [0.0, 1.0, 0.5, 2.0])
def test_tad_positions_equal_their_definition_and_ignore_padding(seed, side, gamma):
    layout = random_batch(seed, side=side)
    positions = TadRope(gamma).position_ids(layout)
    for b in range(layout.shape[0]):
        real = [r for r in rows_of(layout, b) if not r["pad"]]
        expected = [n + gamma * t for n, t in enumerate(tau_by_walking(real))]
        assert positions[b, ~layout.pad[b]].tolist() == pytest.approx(expected)
        alone = TadRope(gamma).position_ids(layout.sample(b))[0]
        torch.testing.assert_close(positions[b, ~layout.pad[b]], alone)
    if gamma == 0.0:
        torch.testing.assert_close(positions, Causal().position_ids(layout), check_dtype=False)


def worked_example() -> TokenLayout:
    """3 text, a video of 2 frames × 2 tokens, 2 text (spec §3.2)."""
    return LayoutBuilder().text(3, USER).media(VisualTokens.grid(2, 1, 2)).text(2, USER).build()


def test_tad_rope_worked_example():
    layout = worked_example()
    tc = TCLLaVA(gamma=1.0)
    assert tc.position_ids(layout)[0].tolist() == [0, 2, 4, 6, 7, 9, 10, 12, 14]
    assert 14 + tc.decode_step() == 16
    assert TadRope(gamma=0.0).position_ids(layout)[0].tolist() == list(range(9))


def test_tad_rope_two_videos_get_separate_time_steps():
    # frame ids restart at 0 in the second video; τ must still open a new step there
    layout = LayoutBuilder().media(VisualTokens.grid(1, 1, 2)).media(VisualTokens.grid(1, 1, 2)).build()
    assert TadRope(1.0).position_ids(layout)[0].tolist() == [0, 1, 3, 4]


def test_fbcam_contains_causal_and_mma_never_shows_answers_to_visual_tokens():
    layout = random_batch(7)
    causal = Causal().allowed(layout)
    fbcam, mma = FrameBlockCausal().allowed(layout), ModalityMutual().allowed(layout)
    assert (fbcam | causal).equal(fbcam) and (mma | causal).equal(mma)
    assert not fbcam.equal(causal) and not mma.equal(causal)  # the example really has visual tokens
    for b in range(layout.shape[0]):
        rows = rows_of(layout, b)
        for i, r in enumerate(rows):
            if not is_vis(r):
                continue
            for j in range(i + 1, len(rows)):
                if rows[j]["role"] == ASSISTANT or rows[j]["turn"] > r["turn"]:
                    assert not mma[b, 0, i, j], (b, i, j)


def test_mma_single_video_equals_the_kernels_constructor():
    layout = (
        LayoutBuilder()
        .text(2, SYSTEM)
        .text(1, USER)
        .media(VisualTokens.grid(2, 2, 2))
        .text(4, USER)
        .text(3, ASSISTANT)
        .build()
    )
    length = layout.shape[1]
    kernels = masks.modality_mutual(3, 11, 15).dense(1, 1, length, length)
    torch.testing.assert_close(ModalityMutual().allowed(layout), kernels, rtol=0, atol=0)


def test_concentric_ring_positions():
    # 4×4 grid: 12 border tokens share s, the 4 centre ones s+1, text resumes at s+2
    layout = LayoutBuilder().text(1, USER).media(VisualTokens.grid(1, 4, 4)).text(1, USER).build()
    positions = Concentric().position_ids(layout)[0]
    frame = positions[1:17]
    assert (frame == 1).sum() == 12 and (frame == 2).sum() == 4 and positions[17] == 3
    # 24×24: 576 tokens share 12 positions
    big = LayoutBuilder().media(VisualTokens.grid(1, 24, 24)).build()
    assert torch.unique(Concentric().position_ids(big)).numel() == 12


def test_attention_mask_is_additive_in_the_model_dtype():
    layout = random_batch(1, side="left")
    allowed = TCLLaVA().allowed(layout)
    for dtype in (torch.float32, torch.bfloat16):
        additive = TCLLaVA().attention_mask(layout, dtype)
        assert additive.dtype == dtype and additive.shape == allowed.shape
        assert (additive[allowed] == 0).all() and (additive[~allowed] == torch.finfo(dtype).min).all()


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="unknown structure 'fbcam'"):
        make_structure("fbcam")
    queries = LayoutBuilder().media(VisualTokens.queries(torch.tensor([0, 0, 1, 1]))).build()
    with pytest.raises(ValueError, match="CCAM queries"):
        Concentric().position_ids(queries)
    with pytest.raises(ValueError, match="more than length"):
        TokenLayout.stack([worked_example()], length=4)
    assert make_structure("tc_llava", gamma=2.0).decode_step() == 3.0


def test_ccam_blocks_and_masks_equal_their_definitions():
    assert ccam_blocks(8, 4).tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for queries, frames, tokens in [(8, 4, 3), (7, 3, 2), (5, 1, 4), (6, 6, 1)]:
        blocks = [i * frames // queries for i in range(queries)]
        self_mask = ccam_query_mask(queries, frames).dense(1, 1, queries, queries)[0, 0]
        expected = torch.tensor([[blocks[j] <= blocks[i] for j in range(queries)] for i in range(queries)])
        assert self_mask.equal(expected)
        cross = ccam_cross_mask(queries, frames, tokens).dense(1, 1, queries, frames * tokens)[0, 0]
        expected = torch.tensor(
            [[p // tokens <= blocks[i] for p in range(frames * tokens)] for i in range(queries)]
        )
        assert cross.equal(expected)
    with pytest.raises(ValueError, match="5 frames > 4 queries"):
        ccam_blocks(4, 5)


def test_time_steps_give_a_denser_clip_the_positions_and_blocks_of_training():
    # CCAM's 32 queries over 8 frames (blocks of 4) vs over 32 frames (blocks of 1), between text
    def layout(frames: int) -> TokenLayout:
        blocks = ccam_blocks(32, frames)
        return LayoutBuilder().text(3, USER).media(VisualTokens.queries(blocks)).text(4, USER).build()

    sparse, dense = layout(8), layout(32)
    stepped = TCLLaVA(gamma=1.0, time_steps=8)
    paper = TCLLaVA(gamma=1.0)
    assert torch.equal(stepped.position_ids(dense), paper.position_ids(sparse))
    torch.testing.assert_close(stepped.allowed(dense), paper.allowed(sparse), rtol=0, atol=0)
    assert not torch.equal(paper.position_ids(dense), paper.position_ids(sparse))  # one step per block
    # no more frames than steps: nothing changes (4 frames keep 4 steps, not spread to 8)
    assert torch.equal(stepped.position_ids(layout(4)), paper.position_ids(layout(4)))
    with pytest.raises(ValueError, match="time_steps"):
        TadRope(time_steps=0)
