"""Built-in temporal QA (spec §5.2) and LLaVA-style JSON: answers re-derived from pixels, conflicts by construction."""

import json
from collections import Counter

import numpy as np
import pytest
import torch
from timeloom_understanding.data import (
    ASPECTS,
    FORMATS,
    ConversationCollator,
    ConversationDataset,
    TemporalQA,
    TemporalQADataModule,
    write_llava_json,
)
from timeloom_understanding.text import TextTokenizer

from timeloom.data.moving_digits import digit_glyphs, render_digits, split_glyph_indices

GROUPS_PER_ASPECT = 500  # 1,000 items per aspect


# ---- an independent reading of the pixels -----------------------------------------------------------------
def digit_tracks(item: dict, glyph_size: int, size: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per digit, rendered alone: visibility per frame and the ink centroid (x, y) per frame."""
    glyphs = digit_glyphs(glyph_size)[0]
    meta, tracks = item["meta"], []
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for k in range(len(meta["labels"])):
        ink = render_digits(
            glyphs[[int(meta["glyph_index"][k])]],
            torch.as_tensor(meta["trajectory"][:, k : k + 1], dtype=torch.float32),
            torch.as_tensor(meta["visible"][:, k : k + 1]),
            size,
        )
        mass = ink.sum((1, 2))
        visible = (mass > 0.5).numpy()
        centroid = (
            torch.stack(((ink * xs).sum((1, 2)), (ink * ys).sum((1, 2))), -1) / mass.clamp_min(1e-6)[:, None]
        )
        tracks.append((visible, centroid.numpy()))
    return tracks


def answer_from_pixels(item: dict, glyph_size: int, size: int) -> str:
    tracks, labels = digit_tracks(item, glyph_size, size), [int(x) for x in item["meta"]["labels"]]
    visible, centroid = tracks[0]
    frames = np.flatnonzero(visible)
    aspect = item["aspect"]
    if aspect == "direction":
        dx, dy = centroid[frames[-1]] - centroid[frames[0]]
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if aspect == "speed":
        steps = [np.linalg.norm(np.diff(c, axis=0), axis=-1).mean() for _, c in tracks]
        return str(labels[int(np.argmax(steps))])
    if aspect == "order":
        return str(labels[int(np.argmin([np.flatnonzero(v)[0] for v, _ in tracks]))])
    if aspect == "count":
        blinks = int(visible[0]) + int(np.sum(visible[1:] & ~visible[:-1]))
        return {1: "once", 2: "twice", 3: "three times"}[blinks]
    third = frames.mean() / (len(visible) - 1)
    return "at the start" if third < 1 / 3 else ("at the end" if third > 2 / 3 else "in the middle")


def frame_multiset(video: torch.Tensor) -> list[bytes]:
    return sorted(frame.numpy().tobytes() for frame in video.unbind(1))


@pytest.fixture(scope="module")
def groups_by_aspect():
    return {
        aspect: [
            TemporalQA(length=GROUPS_PER_ASPECT, aspects=[aspect], seed=3)[i]
            for i in range(GROUPS_PER_ASPECT)
        ]
        for aspect in ASPECTS
    }


@pytest.mark.parametrize("aspect", ASPECTS)
def test_answers_agree_with_the_pixels_and_conflict_by_construction(groups_by_aspect, aspect):
    formats = Counter()
    for group in groups_by_aspect[aspect]:
        assert len(group) == 2 and group[0]["conversations"][0] == group[1]["conversations"][0]
        assert group[0]["answer"] != group[1]["answer"]  # same question and static content, other answer
        for item in group:
            assert item["answer"] == answer_from_pixels(item, 10, 32), item["id"]
            reply = item["conversations"][1]["value"]
            formats[item["format"]] += 1
            if item["format"] == "yes_no":
                assert reply in ("yes", "no")
            else:
                letter = "ABCD"[item["options"].index(item["answer"])]
                assert item["answer"] in reply and reply.startswith(f"{letter}. ")
        if group[0]["format"] == "yes_no":  # balanced: one yes, one no per group
            assert {item["conversations"][1]["value"] for item in group} == {"yes", "no"}
        videos = [item["video"] for item in group]
        if group[1]["reversed"]:
            assert torch.equal(videos[1], videos[0].flip(1))
        if aspect in ("direction", "order", "count", "when"):  # a frame-order-blind model sees no difference
            assert frame_multiset(videos[0]) == frame_multiset(videos[1])
    assert set(formats) == {"multi_choice", "yes_no", "caption_matching"}
    if aspect in ("direction", "order"):
        assert all(group[1]["reversed"] for group in groups_by_aspect[aspect])


def test_answers_are_balanced_and_options_shuffled(groups_by_aspect):
    answers = Counter(item["answer"] for group in groups_by_aspect["direction"] for item in group)
    assert set(answers) == {"left", "right", "up", "down"} and min(answers.values()) > 50
    letters = Counter(
        item["conversations"][1]["value"][0]
        for aspect in ASPECTS
        for group in groups_by_aspect[aspect]
        for item in group
        if item["format"] != "yes_no"
    )
    assert min(letters["A"], letters["B"]) > 0.3 * sum(letters.values())


def test_items_are_deterministic_and_splits_disjoint():
    first, again = TemporalQA(length=5, seed=1)[3], TemporalQA(length=5, seed=1)[3]
    assert first[0]["conversations"] == again[0]["conversations"] and torch.equal(
        first[1]["video"], again[1]["video"]
    )
    other = TemporalQA(length=5, seed=2)[3]
    assert not torch.equal(first[0]["video"], other[0]["video"])
    used = {
        split: {
            int(g)
            for i in range(30)
            for item in TemporalQA(split, length=30)[i]
            for g in item["meta"]["glyph_index"]
        }
        for split in ("train", "val", "test")
    }
    for split, glyphs in used.items():
        assert glyphs <= set(split_glyph_indices(split).tolist())
    assert not used["train"] & used["test"] and not used["val"] & used["test"]


def test_caption_task_describes_the_temporal_fact():
    for item in TemporalQA(length=4, task="caption", seed=2)[1]:
        human, gpt = item["conversations"]
        assert human["value"] == "<video>\nDescribe the video." and gpt["value"] == item["caption"]
        assert item["answer"] in item["caption"]


def test_caption_share_mixes_captions_into_training_only():
    data = TemporalQA(length=200, caption_share=0.5, seed=2)
    captioned = [item for i in range(200) for item in data[i] if item["format"] == "caption"]
    assert 150 < len(captioned) < 250  # half of 400 items, in whole groups
    for item in captioned:
        assert item["conversations"][1]["value"] == item["caption"]
    module = TemporalQADataModule(caption_share=0.5, train_length=50, val_length=50, test_length=50)
    assert module.build_dataset("train").caption_share == 0.5
    assert module.build_dataset("test").caption_share == 0.0
    with pytest.raises(ValueError, match="caption_share"):
        TemporalQA(caption_share=1.5)


def test_describe_first_asks_for_the_caption_then_the_same_question():
    plain, described = TemporalQA(length=40, seed=3), TemporalQA(length=40, seed=3, describe_first=0.5)
    two_turn = 0
    for i in range(40):
        for one, two in zip(plain[i], described[i]):
            assert torch.equal(one["video"], two["video"])  # the drawn share does not move the scene
            if len(two["conversations"]) == 4:
                two_turn += 1
                first, caption, question, reply = two["conversations"]
                assert first["value"] == "<video>\nDescribe the video." and caption["value"] == one["caption"]
                assert question["value"] == one["conversations"][0]["value"].removeprefix("<video>\n")
                assert reply == one["conversations"][1]
            else:
                assert two["conversations"] == one["conversations"]
    assert 20 < two_turn < 60  # half of 80 items, in whole groups
    module = TemporalQADataModule(describe_first=0.5, train_length=5, val_length=5, test_length=5)
    assert module.build_dataset("train").describe_first == 0.5
    assert module.build_dataset("test").describe_first == 0.0
    with pytest.raises(ValueError, match="describe_first"):
        TemporalQA(describe_first=-0.1)


def test_controls_show_less_time_but_ask_the_same():
    full = TemporalQA(length=3, seed=8)
    middle, shuffled = (TemporalQA(length=3, seed=8, control=c) for c in ("middle_frame", "shuffled"))
    for i in range(3):
        for a, m, s in zip(full[i], middle[i], shuffled[i]):
            assert a["conversations"] == m["conversations"] == s["conversations"]
            assert torch.equal(m["video"], a["video"][:, 4:5])
            assert frame_multiset(s["video"]) == frame_multiset(a["video"])
    assert any(not torch.equal(s["video"], a["video"]) for a, s in zip(full[0], shuffled[0]))


def test_text_control_writes_the_fact_where_the_video_stood():
    video, text = (
        TemporalQA(length=30, seed=4, caption_share=0.3),
        TemporalQA(length=30, seed=4, caption_share=0.3, control="text"),
    )
    formats = set()
    for i in range(30):
        for v, t in zip(video[i], text[i]):
            assert "video" not in t and "<video>" not in json.dumps(t["conversations"])
            first = v["conversations"][0]["value"]
            assert t["conversations"][0]["value"] == first.replace("<video>", v["caption"])
            assert t["conversations"][1:] == v["conversations"][1:]
            assert {k: t[k] for k in ("answer", "options", "aspect", "format")} == {
                k: v[k] for k in ("answer", "options", "aspect", "format")
            }
            formats.add(t["format"])
    assert formats == {*FORMATS, "caption"}


def shown_indices(shown: torch.Tensor, video: torch.Tensor) -> list[int]:
    """Indices of the frames of ``video`` equal to the single frame ``shown`` (C, 1, H, W)."""
    return [t for t in range(video.shape[1]) if torch.equal(video[:, t], shown[:, 0])]


@pytest.mark.parametrize("aspect", ["direction", "order", "count", "when"])
def test_one_random_frame_cannot_tell_twins_apart(aspect):
    """The single-frame baseline: a frame drawn uniformly says nothing about the answer.

    Twins share their frame multiset, so the chance that the shown frame holds the digit (or, for order, the
    answer's digit) is the same whatever the answer; the shown index covers the whole video.
    """
    groups = 300
    full = TemporalQA(length=groups, aspects=[aspect], seed=5)
    single = TemporalQA(length=groups, aspects=[aspect], seed=5, control="random_frame")
    indices, telling = Counter(), Counter()
    for i in range(groups):
        for whole, one in zip(full[i], single[i]):
            assert one["video"].shape[1] == 1 and one["conversations"] == whole["conversations"]
            candidates = shown_indices(one["video"], whole["video"])
            assert candidates, one["id"]
            t = candidates[0]
            indices[t] += 1
            visible = whole["meta"]["visible"][t]
            labels = [str(int(x)) for x in whole["meta"]["labels"]]
            if aspect == "order":  # does the frame show the digit that comes first?
                telling[("first", bool(visible[labels.index(whole["answer"])]))] += 1
            else:
                telling[(whole["answer"], bool(visible[0]))] += 1
    if aspect == "direction":  # every frame differs there, so the shown index is known
        assert set(indices) == set(range(8))
    answers = {answer for answer, _ in telling}
    rates = {a: telling[(a, True)] / (telling[(a, True)] + telling[(a, False)]) for a in answers}
    if aspect == "direction":
        assert min(rates.values()) == 1.0  # the digit is always in view; its place is tested below
    elif aspect == "order":
        assert abs(rates["first"] - 0.5) < 0.07, telling  # either digit, as often
    else:
        assert max(rates.values()) - min(rates.values()) < 0.12, telling  # visibility ignores the answer


def test_random_frame_position_says_nothing_about_direction():
    """Where a moving digit sits in one random frame is as likely left of centre for 'left' as for 'right'."""
    groups = 400
    full = TemporalQA(length=groups, aspects=["direction"], seed=6)
    single = TemporalQA(length=groups, aspects=["direction"], seed=6, control="random_frame")
    left_half = Counter()
    for i in range(groups):
        for whole, one in zip(full[i], single[i]):
            if whole["answer"] in ("left", "right"):
                t = shown_indices(one["video"], whole["video"])[0]
                x = whole["meta"]["trajectory"][t, 0, 0]
                left_half[(whole["answer"], x < 15.5)] += 1
    share = {
        a: left_half[(a, True)] / (left_half[(a, True)] + left_half[(a, False)]) for a in ("left", "right")
    }
    assert abs(share["left"] - share["right"]) < 0.1, share


def test_the_middle_frame_gives_order_away():
    """Why the baseline is a random frame: the middle frame shows the order scene's *second* digit."""
    data, middle = (
        TemporalQA(length=50, aspects=["order"], seed=7),
        TemporalQA(length=50, aspects=["order"], seed=7, control="middle_frame"),
    )
    for i in range(50):
        for whole, one in zip(data[i], middle[i]):
            labels = [str(int(x)) for x in whole["meta"]["labels"]]
            assert not whole["meta"]["visible"][4][labels.index(whole["answer"])]
            assert torch.equal(one["video"], whole["video"][:, 4:5])


def test_bad_arguments_name_them():
    with pytest.raises(ValueError, match="tempo"):
        TemporalQA(aspects=["tempo"])
    with pytest.raises(ValueError, match="control must be one of"):
        TemporalQA(control="first_frame")
    with pytest.raises(ValueError, match="split must be one of"):
        TemporalQA(split="dev")
    with pytest.raises(IndexError, match="group 5 out of range"):
        TemporalQA(length=5)[5]


def test_llava_json_round_trip(tmp_path):
    items = [item for i in range(3) for item in TemporalQA(length=3, seed=4)[i]]
    path = write_llava_json(items, tmp_path)
    records = json.loads(path.read_text())
    assert records[0]["video"].endswith(".mp4") and records[0]["conversations"] == items[0]["conversations"]
    dataset = ConversationDataset(path, frames=8)
    assert len(dataset) == len(items)
    for item, loaded in zip(items, dataset):
        assert loaded["answer"] == item["answer"] and loaded["video"].shape == item["video"].shape
        assert (loaded["video"] - item["video"]).abs().max() <= 2 / 255 * 2  # lossless luma, 8-bit rounding
    batch = ConversationCollator(TextTokenizer(), visual_tokens_per_media=4, max_length=128)(
        [dataset[0], dataset[1]]
    )
    assert batch["video"].shape == (2, 1, 8, 32, 32) and batch["input_ids"].shape[0] == 2


def test_missing_media_are_listed_before_training(tmp_path):
    items = TemporalQA(length=1)[0]
    path = write_llava_json(items, tmp_path)
    records = json.loads(path.read_text())
    (tmp_path / records[1]["video"]).unlink()
    with pytest.raises(
        FileNotFoundError, match=r"1 media file\(s\) missing:\n  item 'temporal_qa/train/000000/1'"
    ):
        ConversationDataset(path)
    dataset = ConversationDataset(path, allow_missing=True)
    assert len(dataset) == 1 and dataset.missing == 1


def test_more_frames_sample_the_same_scenes_denser():
    # the 8 -> 32 frame test asks the same questions about the same clips, only sampled four times denser
    sparse, dense = TemporalQA("test", length=40, frames=8), TemporalQA("test", length=40, frames=32)
    for index in range(40):
        for few, many in zip(sparse[index], dense[index]):
            assert few["conversations"] == many["conversations"] and few["answer"] == many["answer"]
            if few["aspect"] in ("count", "when", "order"):  # still digits: each frame shown four times
                assert torch.equal(many["video"], few["video"].repeat_interleave(4, 1)), index
            else:  # moving digits: the same path, so the same first and last frames
                torch.testing.assert_close(many["video"][:, [0, 31]], few["video"][:, [0, 7]])
