"""Stage 0 (`vision_pretraining`): the dense per-patch digit targets (a video-LLM starting from the stage's
encoder: test_videollm_module.py)."""

import numpy as np
import pytest
import torch
from timeloom_understanding.data import TemporalQA
from timeloom_understanding.vision_pretraining import (
    BACKGROUND,
    DigitPatches,
    DigitPatchModule,
    grid_positions,
    patch_digit_targets,
)

from timeloom.data.moving_digits import digit_glyphs, split_glyph_indices


def test_targets_of_a_hand_made_scene():
    # 10-px glyphs have a blank 1-px rim; a centre at 11.5 puts the inked 8x8 core on pixels 8..15, exactly
    # patch (1, 1) of an 8-px grid, and a centre at 19.5 on pixels 16..23, patch (2, 2)
    labels = digit_glyphs(10)[1].numpy()
    pool = split_glyph_indices("train")
    three, seven = pool[labels[pool] == 3][0], pool[labels[pool] == 7][0]
    meta = {
        "labels": np.array([3, 7]),
        "glyph_index": np.array([three, seven]),
        "trajectory": np.array([[[11.5, 11.5], [19.5, 19.5]]] * 3),
        "visible": np.array([[True, False], [False, True], [True, True]]),
    }
    targets = patch_digit_targets(meta, size=32, glyph_size=10, patch=8).view(3, 4, 4)
    expected = torch.full((3, 4, 4), BACKGROUND)
    expected[0, 1, 1] = expected[2, 1, 1] = 3  # (frame, row, col)
    expected[1, 2, 2] = expected[2, 2, 2] = 7
    assert torch.equal(targets, expected)
    with pytest.raises(ValueError, match="patch 5"):
        patch_digit_targets(meta, size=32, glyph_size=10, patch=5)


@pytest.mark.parametrize("patch", [4, 8])
def test_targets_agree_with_the_generators_metadata(patch):
    dataset = DigitPatches("val", length=24, patch=patch)
    scenes = TemporalQA("val", length=24)
    for index in range(len(dataset)):
        item, scene = dataset[index], scenes[index][index % 2]
        frame, meta = item["frame"], scene["meta"]
        assert torch.equal(item["video"], scene["video"][:, frame : frame + 1])
        assert item["targets"].shape == (1, (32 // patch) ** 2)
        shown = {int(label) for label, seen in zip(meta["labels"], meta["visible"][frame]) if seen}
        named = set(item["targets"][0].tolist()) - {BACKGROUND}
        assert shown and named == shown, index  # a frame with a digit; each visible digit names a patch


def test_grid_positions_are_row_major_and_span_the_grid():
    positions = grid_positions(2, 3, torch.device("cpu"))
    expected = [[-1, -1], [-1, 0], [-1, 1], [1, -1], [1, 0], [1, 1]]
    assert torch.equal(positions, torch.tensor(expected, dtype=torch.float32))


def test_region_and_position_trains_both_heads_and_region_alone_ignores_position():
    batch = {
        key: torch.stack([DigitPatches("train", length=8, patch=8)[i][key] for i in range(8)])
        for key in ("video", "targets")
    }
    torch.manual_seed(0)
    both = DigitPatchModule(objective="region_and_position")
    torch.manual_seed(0)
    region = DigitPatchModule(objective="region")
    out = both.model(batch["video"], batch["targets"])
    assert out["position"].shape == out["position_targets"].shape == (8 * 16, 2)
    region_loss = region._loss(region.model(batch["video"], batch["targets"]))
    position_error = torch.nn.functional.mse_loss(out["position"], out["position_targets"])
    torch.testing.assert_close(both._loss(out), region_loss + position_error)
    both._loss(out).backward()
    assert both.model.position.weight.grad.abs().sum() > 0
