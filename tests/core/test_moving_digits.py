"""MovingDigits: determinism, pixels that match the metadata, bounce/wrap, appearance order, splits, captions."""

from __future__ import annotations

import pytest
import torch

from timeloom.data.moving_digits import (
    SPLITS,
    MovingDigits,
    digit_glyphs,
    direction_name,
    render_digits,
    split_glyph_indices,
)


def _centroid(ink: torch.Tensor) -> torch.Tensor:
    """Intensity centroid (x, y) of every frame of ink (T, H, W)."""
    rows = torch.arange(ink.shape[1], dtype=torch.float32)
    cols = torch.arange(ink.shape[2], dtype=torch.float32)
    mass = ink.sum(dim=(1, 2))
    return torch.stack([(ink.sum(1) * cols).sum(1) / mass, (ink.sum(2) * rows).sum(1) / mass], dim=-1)


def test_items_are_deterministic_per_seed_split_and_index():
    first = MovingDigits(size=24, frames=6, num_digits=(1, 3), length=10, seed=3)
    again = MovingDigits(size=24, frames=6, num_digits=(1, 3), length=10, seed=3)
    for index in (0, 7):
        a, b = first[index], again[index]
        assert torch.equal(a["video"], b["video"]) and a["caption"] == b["caption"]
        assert torch.equal(a["meta"]["trajectory"], b["meta"]["trajectory"])
    assert not torch.equal(first[0]["video"], first[1]["video"])
    assert not torch.equal(first[0]["video"], MovingDigits(size=24, frames=6, length=10, seed=4)[0]["video"])


def test_shapes_range_and_images():
    item = MovingDigits(size=32, frames=5, num_digits=2, channels=3, length=4)[2]
    video, meta = item["video"], item["meta"]
    assert video.shape == (3, 5, 32, 32) and video.dtype == torch.float32
    assert video.min() == -1 and video.max() <= 1 and video.max() > 0.5
    assert torch.equal(video[0], video[2])  # grey replicated to RGB
    assert meta["trajectory"].shape == (5, 2, 2) and meta["visible"].shape == (5, 2)
    assert meta["labels"].unique().numel() == 2  # distinct digits
    image = MovingDigits(size=16, frames=1, length=2)[0]
    assert image["video"].shape == (1, 1, 16, 16) and "moves" not in image["caption"]


def test_rendered_centroid_follows_the_trajectory():
    dataset = MovingDigits(size=32, frames=12, num_digits=1, speed=(1.5, 3.0), length=5, seed=1)
    for index in range(5):
        item = dataset[index]
        ink = (item["video"][0] + 1) / 2
        moved = _centroid(ink) - _centroid(ink)[:1]
        expected = item["meta"]["trajectory"][:, 0] - item["meta"]["trajectory"][:1, 0]
        torch.testing.assert_close(moved, expected, atol=2e-3, rtol=0)


def test_velocity_speed_and_direction_metadata():
    dataset = MovingDigits(size=32, frames=4, directions="cardinal", speed=2.0, bounce=False, length=20)
    for index in range(20):
        meta = dataset[index]["meta"]
        assert meta["direction"][0] in {"left", "right", "up", "down"}
        assert meta["direction"][0] == direction_name(float(meta["angle"][0]))
        torch.testing.assert_close(meta["velocity"].norm(dim=-1), torch.tensor([2.0]))
        step = torch.remainder(meta["trajectory"][1] - meta["trajectory"][0] + 16, 32) - 16  # undo the wrap
        torch.testing.assert_close(step, meta["velocity"], atol=1e-4, rtol=0)
    assert direction_name(100.0) == "up" and direction_name(-40.0) == "down-right"
    custom = MovingDigits(directions=["left", 30.0], length=30)
    assert {round(float(custom[i]["meta"]["angle"][0])) for i in range(30)} == {180, 30}


def test_bounce_keeps_digits_inside_and_wrap_crosses_borders():
    bouncing = MovingDigits(size=24, frames=40, num_digits=2, speed=(3.0, 4.0), length=6)
    half = (bouncing.glyph_size - 1) / 2
    for index in range(6):
        item = bouncing[index]
        trajectory = item["meta"]["trajectory"]
        assert trajectory.min() >= half - 1e-4 and trajectory.max() <= 24 - 1 - half + 1e-4
        ink = (item["video"][0] + 1) / 2
        border = torch.cat([ink[:, 0], ink[:, -1], ink[:, :, 0], ink[:, :, -1]], dim=-1)
        assert border.max() < 0.05  # only the glyph's faint blank margin can touch the border
    wrapping = MovingDigits(size=24, frames=40, speed=(3.0, 4.0), bounce=False, length=6)
    trajectories = torch.stack([wrapping[i]["meta"]["trajectory"] for i in range(6)])
    assert trajectories.min() >= 0 and trajectories.max() < 24
    # steps of 3-4 px that jump by ~20 px are wraps around the border
    assert (trajectories.diff(dim=1).abs() > 12).any()


def test_staggered_digits_are_absent_before_they_appear():
    dataset = MovingDigits(size=32, frames=9, num_digits=3, appearance="staggered", length=3, seed=2)
    item = dataset[1]
    meta = item["meta"]
    assert meta["appear_frame"].tolist() == [0, 3, 6]
    assert meta["visible"].tolist() == [[t >= 0, t >= 3, t >= 6] for t in range(9)]
    glyphs = digit_glyphs(dataset.glyph_size)[0][meta["glyph_index"]]
    only_first = render_digits(glyphs[:1], meta["trajectory"][:, :1], meta["visible"][:, :1], 32)
    ink = (item["video"][0] + 1) / 2
    torch.testing.assert_close(ink[:3], only_first[:3])  # frames 0-2 hold the first digit alone
    assert (ink[3:] - only_first[3:]).abs().amax(dim=(1, 2)).min() > 0.3  # later digits add ink
    assert f"{meta['labels'][0].item()} appears first, then" in item["caption"]
    with pytest.raises(ValueError, match="never appear"):
        MovingDigits(frames=4, num_digits=3, appearance="staggered", appearance_gap=2)


def test_splits_use_disjoint_glyphs_and_every_class():
    pools = {split: set(split_glyph_indices(split).tolist()) for split in SPLITS}
    assert not (
        pools["train"] & pools["val"] or pools["train"] & pools["test"] or pools["val"] & pools["test"]
    )
    assert sum(len(p) for p in pools.values()) == 1797
    labels = digit_glyphs(8)[1]
    for split in SPLITS:
        dataset = MovingDigits(size=16, frames=1, num_digits=3, length=50, split=split, seed=0)
        used = {g for i in range(50) for g in dataset[i]["meta"]["glyph_index"].tolist()}
        assert used <= pools[split]
        assert labels[sorted(pools[split])].unique().numel() == 10


def test_captions_name_every_digit_and_its_direction():
    dataset = MovingDigits(
        size=32, frames=8, num_digits=2, directions="compass", appearance="staggered", length=8
    )
    for index in range(8):
        item = dataset[index]
        labels, directions = item["meta"]["labels"].tolist(), item["meta"]["direction"]
        for label, direction in zip(labels, directions):
            assert f"the digit {label} moves {direction}" in item["caption"]
        assert item["caption"].endswith(f"{labels[1]} appears after {labels[0]}")


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="split"):
        MovingDigits(split="holdout")
    with pytest.raises(ValueError, match="direction"):
        MovingDigits(directions=["sideways"])
    with pytest.raises(ValueError, match="num_digits"):
        MovingDigits(num_digits=11)
    with pytest.raises(ValueError, match="glyph_size"):
        MovingDigits(size=16, glyph_size=20)
    with pytest.raises(IndexError):
        MovingDigits(length=3)[3]
