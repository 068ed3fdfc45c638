"""RoPE (1-D, axial), TC-LLaVA TAD-RoPE ids and CCA concentric ids."""

import pytest
import torch
from timeloom_kernels.positions import (
    apply_rope,
    apply_rotary,
    axial_rope_angles,
    concentric_positions,
    concentric_rings,
    default_axial_split,
    grid_coords,
    num_rings,
    rope_2d_angles,
    rope_3d_angles,
    rope_angles,
    tad_positions,
    temporal_index,
)


def _half_split_group(x: torch.Tensor, first_pair: int, num_pairs: int) -> torch.Tensor:
    """Dims of pairs [first_pair, first_pair + num_pairs) of a half-split head, in half-split order."""
    half = x.shape[-1] // 2
    pairs = slice(first_pair, first_pair + num_pairs)
    return torch.cat((x[..., pairs], x[..., half:][..., pairs]), dim=-1)


def test_rope_scores_depend_only_on_relative_position():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 1, 16, generator=gen, dtype=torch.float64)
    k = torch.randn(1, 2, 1, 16, generator=gen, dtype=torch.float64)

    def score(p: float, s: float) -> torch.Tensor:
        rq = apply_rope(q, torch.tensor([p], dtype=torch.float64))
        rk = apply_rope(k, torch.tensor([s], dtype=torch.float64))
        return (rq * rk).sum(-1)

    reference = score(3.0, 1.0)
    for p, s in [(2.0, 0.0), (103.0, 101.0), (7.5, 5.5), (-4.0, -6.0)]:
        torch.testing.assert_close(score(p, s), reference, rtol=0, atol=1e-12)
    assert not torch.allclose(score(3.0, 0.0), reference)


def test_rope_position_zero_is_identity_and_norm_is_preserved():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(apply_rope(x, torch.zeros(5)), x, rtol=0, atol=0)
    rotated = apply_rope(x, torch.arange(5) * 17)
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=0)


def test_interleaved_is_a_permutation_of_half_split():
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    positions = torch.randn(2, 6, dtype=torch.float64) * 10
    half_to_interleaved = torch.arange(8).reshape(2, 4).t().reshape(-1)  # [0, 4, 1, 5, 2, 6, 3, 7]
    interleaved = apply_rope(x[..., half_to_interleaved], positions, interleaved=True)
    torch.testing.assert_close(
        interleaved, apply_rope(x, positions)[..., half_to_interleaved], rtol=0, atol=0
    )


def test_rope_runs_in_fp32_for_low_precision_inputs():
    x = torch.randn(1, 1, 4, 8).to(torch.bfloat16)
    positions = torch.arange(4) * 1000
    expected = apply_rope(x.float(), positions).to(torch.bfloat16)
    rotated = apply_rope(x, positions)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated, expected, rtol=0, atol=0)


def test_axial_3d_equals_1d_rope_per_group():
    frames, height, width, dim = 3, 4, 5, 22  # 11 pairs -> default split (5, 3, 3)
    assert default_axial_split(11, 3) == (5, 3, 3)
    x = torch.randn(2, 2, frames * height * width, dim, dtype=torch.float64)
    coords = grid_coords(frames, height, width)
    torch.testing.assert_close(
        rope_3d_angles(frames, height, width, dim // 2), axial_rope_angles(coords, dim // 2)
    )
    rotated = apply_rotary(x, axial_rope_angles(coords.double(), dim // 2))
    first = 0
    for axis, pairs in enumerate((5, 3, 3)):
        expected = apply_rope(_half_split_group(x, first, pairs), coords[:, axis])
        torch.testing.assert_close(_half_split_group(rotated, first, pairs), expected, rtol=0, atol=1e-12)
        first += pairs


def test_axial_custom_split_and_2d_follows_omnitokenizer():
    angles = rope_2d_angles(3, 4, num_pairs=6)  # column on pairs 0-2, row on pairs 3-5
    columns = grid_coords(3, 4)[:, 1]
    rows = grid_coords(3, 4)[:, 0]
    torch.testing.assert_close(angles[:, :3], rope_angles(columns, 3))
    torch.testing.assert_close(angles[:, 3:], rope_angles(rows, 3))
    custom = rope_3d_angles(2, 2, 2, num_pairs=8, split=(2, 3, 3))
    torch.testing.assert_close(custom[:, :2], rope_angles(grid_coords(2, 2, 2)[:, 0], 2))
    with pytest.raises(ValueError, match="sum to 8"):
        axial_rope_angles(grid_coords(2, 2, 2), 8, split=(2, 2, 2))


def test_rope_rejects_bad_shapes():
    with pytest.raises(ValueError, match="even head dimension"):
        apply_rope(torch.randn(1, 1, 3, 5), torch.arange(3))
    with pytest.raises(ValueError, match="positions of shape"):
        apply_rope(torch.randn(1, 1, 3, 4), torch.arange(4))
    with pytest.raises(ValueError, match="angles of shape"):
        apply_rotary(torch.randn(1, 1, 3, 4), torch.zeros(3, 3))


def test_tad_worked_example():
    # 3 text, 2 frames x 2 tokens, 2 text
    frame_ids = torch.tensor([-1, -1, -1, 0, 0, 1, 1, -1, -1])
    assert temporal_index(frame_ids).tolist() == [0, 1, 2, 3, 3, 4, 4, 5, 6]
    positions = tad_positions(frame_ids, gamma=1.0)
    assert positions.tolist() == [0, 2, 4, 6, 7, 9, 10, 12, 14]
    assert tad_positions(frame_ids, gamma=0.0).tolist() == list(range(9))
    # the next decoded token advances p by 1 + gamma
    decoded = tad_positions(torch.cat((frame_ids, torch.tensor([-1]))), gamma=1.0)
    assert decoded[-1] == 16


def test_tad_matches_closed_form_and_batches_media():
    text_before, frames, per_frame, text_after = 4, 3, 5, 2
    frame_ids = torch.cat(
        (
            torch.full((text_before,), -1),
            torch.arange(frames).repeat_interleave(per_frame),
            torch.full((text_after,), -1),
        )
    )
    n = torch.arange(frame_ids.numel())
    v_s, v_e = text_before, text_before + frames * per_frame - 1
    closed_form = torch.where(
        n < v_s, n, torch.where(n <= v_e, v_s + (n - v_s) // per_frame, n - (v_e - v_s + 1) + frames)
    )
    # two one-frame videos back to back share frame id 0: media ids keep them apart
    two_videos = torch.tensor([-1, 0, 0, 0, 0, -1])
    media = torch.tensor([-1, 0, 0, 1, 1, -1])
    batch = torch.stack((frame_ids[:6], two_videos))
    taus = temporal_index(batch, torch.stack((torch.zeros(6, dtype=torch.long), media)))
    assert torch.equal(temporal_index(frame_ids), closed_form)
    assert taus[1].tolist() == [0, 1, 1, 2, 2, 3]


def test_concentric_ring_ids():
    rows, cols = grid_coords(24, 24).unbind(-1)
    rings = concentric_rings(rows, cols, 24, 24)
    assert num_rings(24, 24) == 12 and rings.unique().numel() == 12
    assert rings.reshape(24, 24)[0].eq(0).all() and rings.reshape(24, 24)[11, 11] == 11
    assert num_rings(5, 8) == 3 and num_rings(1, 1) == 1


def test_concentric_positions_image_then_text():
    start_text, height, width = 3, 4, 4
    rows, cols = grid_coords(height, width).unbind(-1)
    frame_ids = torch.cat(
        (torch.full((start_text,), -1), torch.zeros(16, dtype=torch.long), torch.full((2,), -1))
    )
    pad = torch.zeros(start_text, dtype=torch.long)
    tail = torch.zeros(2, dtype=torch.long)
    positions = concentric_positions(
        frame_ids, torch.cat((pad, rows, tail)), torch.cat((pad, cols, tail)), (height, width)
    )
    image = positions[start_text : start_text + 16]
    s = start_text
    assert positions[:start_text].tolist() == [0, 1, 2]
    assert (image == s).sum() == 12 and (image == s + 1).sum() == 4  # 12 border tokens, 4 centre tokens
    assert positions[-2:].tolist() == [s + 2, s + 3]  # text resumes at s + R


def test_concentric_positions_video_frames_and_batch():
    height, width, frames = 24, 24, 2
    rows, cols = grid_coords(height, width).unbind(-1)
    frame_ids = torch.cat(
        (torch.full((1,), -1), torch.arange(frames).repeat_interleave(576), torch.full((1,), -1))
    )
    grid_rows = torch.cat(
        (torch.zeros(1, dtype=torch.long), rows.repeat(frames), torch.zeros(1, dtype=torch.long))
    )
    grid_cols = torch.cat(
        (torch.zeros(1, dtype=torch.long), cols.repeat(frames), torch.zeros(1, dtype=torch.long))
    )
    batch = concentric_positions(
        frame_ids.expand(2, -1), grid_rows.expand(2, -1), grid_cols.expand(2, -1), (height, width), start=5
    )
    positions = batch[0]
    assert torch.equal(batch[0], batch[1])
    assert positions[1:577].unique().tolist() == list(range(6, 18))  # frame 0 at s = 6
    assert positions[577:1153].unique().tolist() == list(range(18, 30))  # frame 1 at s + R
    assert positions[-1] == 30
    with pytest.raises(ValueError, match="outside"):
        concentric_positions(frame_ids, grid_rows + 24, grid_cols, (height, width))
