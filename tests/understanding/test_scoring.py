"""Rule-based scoring (spec §5.3, §11.7): every benchmark's rule on hand-made replies, and the aggregates."""

import pytest
from timeloom_understanding.benchmarks.base import EvalItem
from timeloom_understanding.scoring import normalize, read_letter, read_yes_no, score, summarize


def item(benchmark, answer, options=("a", "b", "c"), fmt="multi_choice", task="t", **extra):
    return EvalItem(
        id=f"{benchmark}/{task}/{len(extra)}",
        benchmark=benchmark,
        task=task,
        video=None,
        question="q",
        options=list(options) if fmt in ("multi_choice", "caption_matching") else [],
        answer=answer,
        prompt="q",
        format=fmt,
        extra=extra,
    )


def test_normalize_undoes_the_wordpiece_decoder_spacing():
    assert normalize("  ( B )  Up ") == "(b) up"


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("B", "B"),
        ("b.", "B"),
        ("b. up", "B"),
        ("( b ) up", "B"),
        ("B)", "B"),
        ("down", "B"),
        ("Caption B: x", "B"),
        ("up", "A"),
        ("d", None),
        ("maybe b", None),
        ("", None),
        ("bee", None),
    ],
)
def test_read_letter(reply, letter):
    assert read_letter(reply, ["up", "down"]) == letter


@pytest.mark.parametrize(
    ("reply", "letter"),
    [
        ("down, option B.", "B"),
        ("up, option b", "B"),  # the letter decides, as in "b. up"
        ("up , option A.", "A"),
        ("down., option a.", "A"),
        ("up, option c", None),  # no such option
        ("option b", None),
        ("maybe, option b", None),  # only an option's exact text may come before the letter
        ("up or down, option b", None),
        ("up, option b because", None),
        ("up option b", None),
        ("up, b", None),
        ("up, option (b)", None),
    ],
)
def test_read_letter_after_an_options_text(reply, letter):
    assert read_letter(reply, ["up", "down"]) == letter


def test_read_yes_no():
    assert [read_yes_no(r) for r in ("Yes.", " no, it does not", "y", "maybe", "")] == [
        "yes",
        "no",
        None,
        None,
        None,
    ]
    assert [read_yes_no(r, short=True) for r in ("Y", "n.")] == ["yes", "no"]


def test_mvbench_first_token_after_the_prefix_and_empty_is_wrong():
    question = item("mvbench", "B")
    assert score(question, "B) run").correct and score(question, "(B) run").correct
    assert score(question, "Best option: (B) run").correct and score(question, "b").correct
    assert not score(question, "A) sit").correct
    empty = score(question, "")  # upstream's `"" in gt_option` would count this right
    assert empty.correct is False and empty.parsed is None and empty.empty
    assert score(question, "run, I think").parsed is None


def test_tempcompass_formats_and_captioning_unscored():
    mc = item("tempcompass", "B", options=["left", "right"])
    assert [score(mc, r).correct for r in ("B", "B.", "(B)", "B)", "right", "A", "left or right")] == [
        True,
        True,
        True,
        True,
        True,
        False,
        False,
    ]
    assert score(mc, "left or right").parsed is None  # unmatched: wrong, counted in the match rate
    yn = item("tempcompass", "no", fmt="yes_no")
    assert score(yn, "No, it is slow.").correct and not score(yn, "Yes").correct
    caption = score(item("tempcompass", "x then y", fmt="captioning"), "x then y")
    assert caption.correct is None
    judged = score(item("tempcompass", "x", fmt="captioning"), "x", judge=lambda i, r: r == i.answer)
    assert judged.correct is True


def test_tomato_regex_is_anchored_and_bounded_by_the_options():
    question = item("tomato", "B", options=["cw", "ccw", "none"])
    # upstream's pattern allows no space, so its own prompted form "Answer is: (B)" fell through to a judge
    accepted = [
        "Answer is: (B)",
        "answer is (b)",
        "Answer is B",
        "( b )",
        "B.",
        "answer is : ( b )",
        "ccw",
        "B: ccw",
    ]
    assert all(score(question, r).correct for r in accepted)
    assert score(question, "Answer is: (A)").correct is False
    # the letter must be alone: no answer hidden in a sentence, no letter beyond the options
    for reply in ("The Answer is: (B) because", "I think B", "Answer is: (E)", "Answer is: (B)(C)"):
        assert score(question, reply).parsed is None, reply


def test_ovobench_rules():
    backward = item("ovobench", "C", options=["cup", "pen", "key"], task="EPM", category="backward")
    lenient = score(backward, "I saw it: c, the key")
    assert lenient.correct and lenient.strict is False  # the letter stands alone somewhere, but is not first
    assert (
        score(backward, "C").strict and not score(backward, "a cat").correct
    )  # 'c' inside 'cat' does not count
    rec = item("ovobench", "2", fmt="count", task="REC")
    assert score(rec, "They did it 2 times").correct and score(rec, "twice").parsed is None
    assert score(rec, "2 of 3 people").parsed == "23"  # upstream joins every digit of the reply
    ssr = item("ovobench", "yes", fmt="yes_no", task="SSR")
    assert score(ssr, "Y").correct and score(ssr, "yes").correct and not score(ssr, "N").correct


def test_temporalbench_first_character():
    question = item("temporalbench", "A", options=["one", "two"])
    assert score(question, "A. one").correct and score(question, "(a)").correct
    assert not score(question, "B").correct and not score(question, "").correct


def test_ovobench_overall_is_the_mean_of_category_means():
    items = [
        item("ovobench", "A", options=["x", "y"], task="EPM", category="backward"),
        item("ovobench", "A", options=["x", "y"], task="EPM", category="backward"),
        item("ovobench", "A", options=["x", "y"], task="OCR", category="realtime"),
        item("ovobench", "A", options=["x", "y"], task="ACR", category="realtime"),
        item("ovobench", "yes", fmt="yes_no", task="SSR", category="forward"),
        item("ovobench", "3", fmt="count", task="REC", category="forward"),
        item("ovobench", "3", fmt="count", task="REC", category="forward"),
    ]
    replies = ["A", "B", "A", "B", "yes", "3", "4"]
    report = summarize("ovobench", items, [score(i, r) for i, r in zip(items, replies)])
    # backward: EPM 1/2; real-time: (OCR 1 + ACR 0)/2; forward: (SSR 1 + REC 1/2)/2
    assert (
        report["backward_mean"] == 0.5 and report["realtime_mean"] == 0.5 and report["forward_mean"] == 0.75
    )
    assert report["overall"] == pytest.approx((0.5 + 0.5 + 0.75) / 3)
    assert report["task_mean"] == pytest.approx(
        (0.5 + 1 + 0 + 1 + 0.5) / 5
    )  # the 12-task mean, disputed upstream
    assert report["accuracy"] == pytest.approx(4 / 7)


def test_temporalbench_multiple_binary_accuracy():
    items = [
        item("temporalbench", gt, options=["one", "two"], task="short_qa", group=g, dataset="d", category="c")
        for gt, g in (("A", "x"), ("B", "x"), ("A", "y"), ("B", "z"))
    ]
    report = summarize("temporalbench", items, [score(i, r) for i, r in zip(items, ["A", "A", "A", "B"])])
    assert report["accuracy"] == 0.75
    assert report["mba"] == {"short_qa": pytest.approx(2 / 3)}  # x has a wrong answer; y and z are right
    assert report["mba_by"]["dataset"] == {"d": pytest.approx(2 / 3)}


def test_counts_of_unparsed_empty_and_judge_only_items():
    items = [
        item("tempcompass", "A", options=["l", "r"]),
        item("tempcompass", "A", options=["l", "r"]),
        item("tempcompass", "x", fmt="captioning"),
        item("tempcompass", "yes", fmt="yes_no"),
    ]
    report = summarize(
        "tempcompass", items, [score(i, r) for i, r in zip(items, ["A", "", "something", "hmm"])]
    )
    assert (report["n"], report["n_scored"], report["n_correct"]) == (4, 3, 1)
    assert report["n_unparsed"] == 2 and report["n_empty"] == 1 and report["n_unscored_judge"] == 1
    assert report["accuracy"] == pytest.approx(
        1 / 3
    )  # unparsed replies are wrong; judge-only ones are left out
    assert "need an LLM judge" in report["unscored_message"]
    assert report["match_rate"] == pytest.approx(1 / 3)
    assert report["by"]["format"]["multi_choice"] == {"n": 2, "accuracy": 0.5}


def test_mvbench_task_mean_and_temporal_qa_chance():
    items = [
        item("mvbench", "A", task="t1"),
        item("mvbench", "A", task="t2"),
        item("mvbench", "A", task="t2"),
    ]
    report = summarize("mvbench", items, [score(i, r) for i, r in zip(items, ["A", "A", "B"])])
    assert report["task_mean"] == pytest.approx((1 + 0.5) / 2) and report["overall"] == pytest.approx(2 / 3)
    qa = [
        item("temporal_qa", "A", options=["x", "y"]),
        item("temporal_qa", "yes", fmt="yes_no"),
        item("temporal_qa", "A", options=["x", "y", "z", "w"]),
    ]
    chance = summarize("temporal_qa", qa, [score(i, "A") for i in qa])["chance"]
    assert chance == pytest.approx((1 / 2 + 1 / 2 + 1 / 4) / 3)
    twins = [
        item("temporal_qa", a, options=["x", "y"], task=t, group=g)
        for a, t, g in (("A", "order", 0), ("B", "order", 0), ("A", "when", 1), ("B", "when", 1))
    ]
    report = summarize("temporal_qa", twins, [score(i, r) for i, r in zip(twins, ["A", "B", "A", "A"])])
    assert report["accuracy"] == 0.75 and report["group_accuracy"] == 0.5  # the 'when' twins got one answer
    assert report["group_accuracy_by_task"] == {"order": 1.0, "when": 0.0}
