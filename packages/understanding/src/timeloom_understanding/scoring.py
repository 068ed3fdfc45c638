"""Rule-based scoring (spec §5.3): each benchmark's own rule, never an LLM.

`score` reads one response by its benchmark's rule and says what it parsed and whether that is right; an
item only an LLM judge can score (captioning) comes back unscored, never wrong, unless a ``judge`` callable
is plugged in. `summarize` aggregates by the benchmark's own overall rule and per task/aspect/format.

Responses are compared case-insensitively: the bundled WordPiece tokenizer lower-cases, and its decoder
puts spaces around brackets (``( b )``), which `normalize` undoes. Where an upstream rule is known to be
wrong, ours differs on purpose:

- MVBench: an empty reply is wrong (upstream's ``"" in gt_option`` test counts it right); ``n_empty``.
- TOMATO: upstream's ``^Answer is:?[(]?([A-Fa-f])[)]?$`` allows no space, so
  ``Answer is: (A)`` never matches; its exact-choice test compares an upper-cased reply with mixed-case
  choices, so it never matches either; and what stays unparsed gets a *random* letter. Ours: the same
  anchored pattern with spaces allowed, a bare letter, or exactly one option (``A: text`` or its text); the
  letter must name an option; anything else is unparsed, hence wrong.
- OVO-Bench: upstream counts a reply right when the right letter occurs in it. On lower-cased text a
  substring test would find ``a`` in almost any word, so the letter must stand alone; the strict rule (the
  first letter read) is reported beside it.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from timeloom_understanding.benchmarks.base import LETTERS, EvalItem
from timeloom_understanding.benchmarks.ovobench import CATEGORIES

__all__ = ["JUDGE_MESSAGE", "Scored", "normalize", "read_letter", "read_yes_no", "score", "summarize"]

JUDGE_MESSAGE = (
    "{n} item(s) need an LLM judge (free-text captioning); they are reported as unscored, not wrong. "
    "Plug in a judge callable to score them."
)
Judge = Callable[[EvalItem, str], bool]


@dataclass(frozen=True)
class Scored:
    """What the rule read from a response (None: nothing it can read) and whether it is right.

    ``correct`` is None for an item only a judge can score. ``strict`` is OVO-Bench's first-letter reading.
    """

    response: str
    parsed: str | None
    correct: bool | None
    strict: bool | None = None

    @property
    def empty(self) -> bool:
        return not self.response.strip()


def normalize(text: str) -> str:
    """Lower case, single spaces, no space inside brackets: ``" ( B ) up "`` → ``"(b) up"``."""
    text = " ".join(text.lower().split())
    return re.sub(r"\s*\)", ")", re.sub(r"\(\s*", "(", text))


_LEADING_LETTER = re.compile(r"^(?:caption\s+)?(?:\(([a-j])\)|([a-j])(?:\s*[.):]|$))")
_TRAILING_LETTER = re.compile(r"^(.+?)\s*,\s*option\s+([a-j])\.?$")


def read_letter(response: str, options: list[str]) -> str | None:
    """An option letter from a reply: the exact text of an option, a bare letter, ``X.``, ``X)``, ``(X)``,
    or an option's exact text followed by a letter, ``the 4, option C.`` (`TemporalQA`'s ``letter_last``).

    The letter must name one of the options; anything else is None (unparsed). As with ``X. text``, the
    letter decides, not the text beside it.
    """
    text = normalize(response).strip(" \"'")
    texts = [normalize(option).rstrip(".") for option in options]
    if text.rstrip(".") in texts:
        return LETTERS[texts.index(text.rstrip("."))]
    match = _LEADING_LETTER.match(text)
    trailing = _TRAILING_LETTER.match(text)
    if match:
        letter = (match.group(1) or match.group(2)).upper()
    elif trailing and trailing.group(1).rstrip(".") in texts:
        letter = trailing.group(2).upper()
    else:
        return None
    return letter if LETTERS.index(letter) < len(options) else None


def read_yes_no(response: str, short: bool = False) -> str | None:
    """``yes`` or ``no`` from the reply's leading word (``y``/``n`` too when ``short``), else None."""
    words = re.findall(r"[a-z]+", normalize(response))
    if not words:
        return None
    accepted = {"yes": "yes", "no": "no"} | ({"y": "yes", "n": "no"} if short else {})
    return accepted.get(words[0])


# -- each benchmark's rule ---------------------------------------------------------------------------------------
def _scored(response: str, parsed: str | None, answer: str, strict: bool | None = None) -> Scored:
    return Scored(response, parsed, parsed is not None and parsed == answer, strict)


def _mvbench(item: EvalItem, response: str) -> Scored:
    """Strip the answer prefix; the first token without ``( ) .`` must be the letter. Empty = wrong."""
    text = normalize(response)
    text = re.sub(r"^(?:best option\s*:?\s*|answer\s*:?\s*)", "", text)
    first = re.sub(r"[().]", "", text.split(" ")[0]) if text else ""
    parsed = first.upper() if len(first) == 1 and first.upper() in LETTERS[: len(item.options)] else None
    return _scored(response, parsed, item.answer)


def _tempcompass(item: EvalItem, response: str) -> Scored:
    """Multiple choice and caption matching by letter or exact option text; yes/no by the leading word."""
    if item.format == "yes_no":
        return _scored(response, read_yes_no(response), item.answer)
    return _scored(response, read_letter(response, item.options), item.answer)


def _ovobench(item: EvalItem, response: str) -> Scored:
    """Options: the right letter standing alone anywhere (strict: read first); REC: the reply's digits; SSR
    and CRR: the leading yes/no (or Y/N); upstream also takes a case-sensitive ``No``/``Yes`` anywhere, which
    reads "Not sure" as no."""
    if item.format == "count":  # upstream joins every digit of the reply: "2 of 3" reads 23
        digits = "".join(re.findall(r"\d", response))
        return _scored(response, str(int(digits)) if digits else None, item.answer)
    if item.format == "yes_no":
        return _scored(response, read_yes_no(response, short=True), item.answer)
    parsed = read_letter(response, item.options)
    contains = re.search(rf"(?<![a-z]){item.answer.lower()}(?![a-z])", normalize(response)) is not None
    return Scored(response, parsed, contains, strict=parsed == item.answer)


_TOMATO_ANSWER = re.compile(r"^answer is\s*:?\s*\(?([a-f])\)?\.?$")
_BARE_LETTER = re.compile(r"^\(?([a-f])\)?\.?$")


def _tomato(item: EvalItem, response: str) -> Scored:
    """``Answer is: (X)`` (anchored), a bare letter, or exactly one option; the letter must name an option."""
    text = normalize(response).strip()
    match = _TOMATO_ANSWER.match(text) or _BARE_LETTER.match(text)
    parsed = match.group(1).upper() if match else None
    for k, option in enumerate(item.options):
        if text.rstrip(".") in (
            normalize(option).rstrip("."),
            normalize(f"{LETTERS[k]}: {option}").rstrip("."),
        ):
            parsed = LETTERS[k]
    if parsed is not None and LETTERS.index(parsed) >= len(item.options):
        parsed = None
    return _scored(response, parsed, item.answer)


def _temporalbench(item: EvalItem, response: str) -> Scored:
    """Binary accuracy: the reply's first character (after an opening bracket) against GT."""
    text = normalize(response).lstrip("( ")
    return _scored(response, text[0].upper() if text else None, item.answer)


RULES: dict[str, Callable[[EvalItem, str], Scored]] = {
    "mvbench": _mvbench,
    "tempcompass": _tempcompass,
    "temporal_qa": _tempcompass,  # the generator's formats are TempCompass's
    "ovobench": _ovobench,
    "tomato": _tomato,
    "temporalbench": _temporalbench,
}


def score(item: EvalItem, response: str, judge: Judge | None = None) -> Scored:
    """Read ``response`` by the rule of ``item.benchmark``; captioning is unscored unless a ``judge`` is given."""
    if item.format == "captioning":
        return Scored(response, None, judge(item, response) if judge else None)
    return RULES[item.benchmark](item, response)


# -- aggregation ------------------------------------------------------------------------------------------------
#: what each benchmark's report breaks accuracy down by (``task`` or a key of ``EvalItem.extra``)
GROUPS = {
    "mvbench": ("task",),
    "tempcompass": ("task", "format"),
    "temporal_qa": ("task", "format", "reversed"),
    "ovobench": ("task", "category"),
    "tomato": ("task", "demonstration_type", "motion_type"),
    "temporalbench": ("task", "dataset", "category"),
}


def _key(item: EvalItem, name: str) -> str:
    if name in ("benchmark", "task", "format"):
        return getattr(item, name)
    return str(item.extra.get(name, ""))


def _accuracy(values: list[bool]) -> float | None:
    return sum(values) / len(values) if values else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _multiple_binary(pairs: list[tuple[EvalItem, Scored]], name: str) -> dict[str, float | None]:
    """Per value of ``name``: each ``group`` (a TemporalBench video, a TemporalQA conflict group) counts once,
    right only if all its questions are (TemporalBench's multiple binary accuracy)."""
    videos: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for item, result in pairs:
        videos[(_key(item, name), str(item.extra.get("group")))].append(bool(result.correct))
    values = sorted({value for value, _ in videos})
    return {value: _accuracy([all(v) for (k, _), v in videos.items() if k == value]) for value in values}


def _ovobench_overall(items: list[EvalItem], scored: list[Scored], strict: bool) -> dict[str, float | None]:
    """Mean of the three category means (each the mean of its task accuracies), and the 12-task mean."""
    per_task: dict[str, list[bool]] = defaultdict(list)
    for item, result in zip(items, scored):
        right = result.strict if strict and result.strict is not None else result.correct
        per_task[item.task].append(bool(right))
    task_accuracy = {task: _accuracy(values) for task, values in per_task.items()}
    categories = {
        name: _mean([task_accuracy.get(task) for task in tasks]) for name, tasks in CATEGORIES.items()
    }
    return {"overall": _mean(list(categories.values())), "task_mean": _mean(list(task_accuracy.values()))} | {
        f"{name}_mean": value for name, value in categories.items()
    }


def summarize(benchmark: str, items: list[EvalItem], scored: list[Scored]) -> dict:
    """Accuracy by the benchmark's overall rule and per group, with every count the spec asks for."""
    pairs = [(i, s) for i, s in zip(items, scored) if s.correct is not None]
    correct = [bool(s.correct) for _, s in pairs]
    unscored = sum(s.correct is None for s in scored)
    report: dict = {
        "benchmark": benchmark,
        "n": len(items),
        "n_scored": len(pairs),
        "n_correct": sum(correct),
        "accuracy": _accuracy(correct),
        "n_unparsed": sum(s.parsed is None for _, s in pairs),
        "n_empty": sum(s.empty for s in scored),
        "n_unscored_judge": unscored,
        "by": {},
    }
    if unscored:
        report["unscored_message"] = JUDGE_MESSAGE.format(n=unscored)
    for name in GROUPS[benchmark]:
        groups: dict[str, list[bool]] = defaultdict(list)
        for item, result in pairs:
            groups[_key(item, name)].append(bool(result.correct))
        report["by"][name] = {
            value: {"n": len(values), "accuracy": _accuracy(values)}
            for value, values in sorted(groups.items())
        }
    report["overall"], report["overall_rule"] = report["accuracy"], "micro average over scored items"
    if benchmark == "mvbench":
        report["task_mean"] = _mean([g["accuracy"] for g in report["by"]["task"].values()])
    elif benchmark == "tempcompass":
        report["match_rate"] = 1 - report["n_unparsed"] / len(pairs) if pairs else None
    elif benchmark == "ovobench":
        scored_items, scored_results = [i for i, _ in pairs], [s for _, s in pairs]
        official = _ovobench_overall(scored_items, scored_results, strict=False)
        report |= official | {"strict": _ovobench_overall(scored_items, scored_results, strict=True)}
        report["overall_rule"] = (
            "mean of the backward, real-time and forward means (each a mean of task accuracies)"
        )
    elif benchmark == "temporalbench":
        report["mba"] = _multiple_binary(pairs, "task")
        report["mba_by"] = {name: _multiple_binary(pairs, name) for name in ("dataset", "category")}
        report["overall_rule"] = (
            "binary accuracy (micro); MBA: a video's group right only if all its questions are"
        )
    elif benchmark == "temporal_qa":
        chance = [1 / len(item.candidates) for item, _ in pairs if item.candidates]
        report["chance"] = _mean(chance)
        # both videos of a conflict group right: a model blind to what differs between them cannot be
        report["group_accuracy"] = _multiple_binary(pairs, "benchmark")["temporal_qa"]
        report["group_accuracy_by_task"] = _multiple_binary(pairs, "task")
    return report
