"""TemporalQA's opt-in `first` aspect (issue #7 item 6): which digit appeared first, asked where the answer lies only
in frames that have left a window over the video's last half, so a window-only model is right at most 1/3 of the time.

Answers are read back from the pixels (each digit rendered alone), not from the generator's metadata."""

import numpy as np
import pytest
import torch
from timeloom_understanding.benchmarks.base import listed_options
from timeloom_understanding.data import (
    ASPECTS,
    OPT_IN_ASPECTS,
    TemporalQA,
    TemporalQADataModule,
)
from timeloom_understanding.scoring import read_letter
from timeloom_understanding.text import TextTokenizer

from timeloom.data.moving_digits import digit_glyphs, render_digits

GROUPS = 300
FIRST = {"aspects": ["first"], "formats": ["multi_choice"]}


def frames_with_ink(item: dict, digit: int, glyph_size: int = 10, size: int = 32) -> np.ndarray:
    """The frames in which digit ``digit`` of the scene leaves ink, rendered alone."""
    meta = item["meta"]
    ink = render_digits(
        digit_glyphs(glyph_size)[0][[int(meta["glyph_index"][digit])]],
        torch.as_tensor(meta["trajectory"][:, digit : digit + 1], dtype=torch.float32),
        torch.as_tensor(meta["visible"][:, digit : digit + 1]),
        size,
    )
    return np.flatnonzero((ink.sum((1, 2)) > 0.5).numpy())


def digits_in_window(item: dict, window: int = 4) -> set[str]:
    """The digits (as option text) with ink in the last ``window`` frames."""
    labels, frames = item["meta"]["labels"], item["meta"]["visible"].shape[0]
    return {
        str(int(labels[k])) for k in range(len(labels)) if (frames_with_ink(item, k) >= frames - window).any()
    }


@pytest.fixture(scope="module")
def groups():
    dataset = TemporalQA("test", length=GROUPS, seed=3, **FIRST)
    return [dataset[i] for i in range(GROUPS)]


def test_first_is_asked_only_when_named():
    assert "first" in OPT_IN_ASPECTS and "first" not in ASPECTS
    assert TemporalQA().aspects == ASPECTS  # the default data does not move
    assert TemporalQADataModule().dataset_args["aspects"] == ASPECTS


def test_the_answer_is_the_digit_whose_ink_comes_first_and_twins_differ_in_it(groups):
    for group in groups:
        assert group[0]["conversations"][0] == group[1]["conversations"][0]  # one prompt, one set of options
        assert group[0]["answer"] != group[1]["answer"]
        for item in group:
            labels = [int(x) for x in item["meta"]["labels"]]
            onsets = [frames_with_ink(item, k)[0] for k in range(len(labels))]
            assert item["answer"] == str(labels[int(np.argmin(onsets))]), item["id"]
            assert sorted(onsets) == [0, 2, 4, 6]  # one after another, two frames each
            letter = "ABCD"[item["options"].index(item["answer"])]
            assert item["conversations"][1]["value"] == f"{letter}. the {item['answer']}"


@pytest.mark.parametrize("frames", [8, 16])
def test_the_answer_is_visible_only_before_a_last_half_window(frames):
    dataset = TemporalQA("test", length=40, frames=frames, seed=5, **FIRST)
    window = frames // 2
    for index in range(len(dataset)):
        group = dataset[index]
        # the window's frames are bit-identical in both twins: a window-only model cannot tell them apart
        assert torch.equal(group[0]["video"][:, -window:], group[1]["video"][:, -window:])
        for item in group:
            answer = [int(x) for x in item["meta"]["labels"]].index(int(item["answer"]))
            seen = frames_with_ink(item, answer)
            assert seen.size and seen.max() < frames - window, item["id"]


def test_the_options_are_both_first_digits_one_window_digit_and_one_never_shown(groups):
    window_seen = answers_seen = never = 0
    for group in groups:
        item = group[0]
        options = item["options"]
        labels = [int(x) for x in item["meta"]["labels"]]
        in_window = digits_in_window(item)
        assert len(options) == len(set(options)) == 4
        assert {group[0]["answer"], group[1]["answer"]} <= set(options)
        assert len(set(options) & in_window) == 1
        assert len([o for o in options if int(o) not in labels]) == 1
        window_seen += options.index(next(iter(set(options) & in_window)))
        answers_seen += options.index(item["answer"])
        never += options.index(next(o for o in options if int(o) not in labels))
    # shuffled: each role's mean letter index is near 1.5 (a position gives nothing away)
    for total in (window_seen, answers_seen, never):
        assert abs(total / len(groups) - 1.5) < 0.25


def test_a_window_only_guess_is_right_a_third_of_the_time(groups):
    """The best a model blind to frames 0-3 can do: rule out the digit it sees, pick among the rest."""
    rng = np.random.default_rng(0)
    right = 0
    for group in groups:
        for item in group:
            unseen = [o for o in item["options"] if o not in digits_in_window(item)]
            assert len(unseen) == 3
            right += unseen[rng.integers(3)] == item["answer"]
    assert abs(right / (2 * len(groups)) - 1 / 3) < 0.05


@pytest.mark.parametrize("letter_last", [False, True])
def test_every_word_of_first_is_in_the_qa_vocabulary(letter_last):
    tokenizer = TextTokenizer("temporal_qa")
    dataset = TemporalQA("train", length=50, caption_share=0.5, letter_last=letter_last, **FIRST)
    words = {
        word
        for index in range(len(dataset))
        for item in dataset[index]
        for turn in item["conversations"]
        for word in turn["value"].replace("<video>", "").lower().split()
    }
    pieces = {p for word in words for p in tokenizer._tokenizer.encode(word, add_special_tokens=False).tokens}
    assert "[UNK]" not in pieces and not any(p.startswith("##") for p in pieces), sorted(pieces)


@pytest.mark.parametrize(
    "arguments",
    [
        {"aspects": ["first"]},  # every format
        {"aspects": ["first", "order"], "formats": ["multi_choice", "yes_no"]},
        {"aspects": ["first"], "formats": ["multi_choice"], "max_options": 3},
    ],
)
def test_first_is_only_asked_as_four_option_multiple_choice(arguments):
    with pytest.raises(ValueError, match="'first' aspect is asked as multiple choice with four options"):
        TemporalQA(length=1, **arguments)


@pytest.mark.parametrize(
    "arguments",
    [FIRST, {"aspects": ASPECTS, "formats": ["multi_choice", "caption_matching"]}],
    ids=["first", "default-aspects"],
)
def test_letter_last_replies_name_the_option_then_the_letter_the_letter_reading_finds(arguments):
    tokenizer = TextTokenizer("temporal_qa")
    default = TemporalQA("test", length=60, seed=5, **arguments)
    letter_last = TemporalQA("test", length=60, seed=5, letter_last=True, **arguments)
    for index in range(len(default)):
        for plain, last in zip(default[index], letter_last[index]):
            assert last["conversations"][0] == plain["conversations"][0]  # the same prompt
            assert (last["answer"], last["options"]) == (plain["answer"], plain["options"])
            letter, text = listed_options(plain["conversations"][1]["value"])[0]
            assert last["conversations"][1]["value"] == f"{text.rstrip('.')}, option {letter}."
            # what the model would write (its tokens decoded) reads back to the same letter
            prompt_options = [option for _, option in listed_options(plain["conversations"][0]["value"])]
            decoded = tokenizer.decode(tokenizer.encode(last["conversations"][1]["value"]))
            assert read_letter(decoded, prompt_options) == letter


def test_letter_last_trains_only_and_held_out_splits_keep_the_reference_replies():
    module = TemporalQADataModule(letter_last=True, train_length=4, val_length=4, test_length=4, **FIRST)
    assert module.build_dataset("train").letter_last
    assert not module.build_dataset("val").letter_last and not module.build_dataset("test").letter_last
    reply = module.build_dataset("test")[0][0]["conversations"][1]["value"]
    assert listed_options(reply)  # the evaluate command reads the answer's letter from it
