"""TOMATO (yale-nlp/TOMATO, arXiv 2410.23266): visual temporal reasoning, up to six options.

Local layout::

    ROOT/data/<reasoning_type>.json   {id: {"question", "options", "answer": int, "key", "motion_type",
                                            "variation": {name: 0|1}, "demonstration_type"}}
    ROOT/videos/<demonstration_type>/<key>.mp4

Frames are ``linspace`` samples (16 upstream). The prompt is ours (`PROMPT_VERSION`), shorter than the
official one, and asks for ``Answer is: (X)``; the scorer reads that with an anchored regex, a bare letter
or one option's text, and counts anything else as unparsed (wrong).
"""

from __future__ import annotations

from pathlib import Path

from timeloom_understanding.benchmarks.base import (
    LETTERS,
    BenchmarkLayoutError,
    EvalItem,
    option_listing,
    read_json,
    require_keys,
)

__all__ = ["PROMPT_VERSION", "load"]

PROMPT_VERSION = "timeloom-tomato-1"
SYSTEM = "You are an expert in understanding dynamics of objects."
LAYOUT = (
    'data/<reasoning_type>.json: {id: {"question", "options", "answer": int, "motion_type", "variation", '
    '"demonstration_type"}}'
)
KEYS = ("question", "options", "answer", "motion_type", "demonstration_type")


def _variation(variation: object) -> str:
    """The variations applied to a video (``zoom+first_person``), ``none`` if none; a string as it is."""
    if isinstance(variation, dict):
        return "+".join(name for name, on in variation.items() if on) or "none"
    return str(variation or "none")


def load(root: Path) -> list[EvalItem]:
    """Every question of every ``data/<reasoning_type>.json`` under ``root``."""
    files = sorted((root / "data").glob("*.json"))
    if not files:
        raise BenchmarkLayoutError(
            f"{root}: no data/<reasoning_type>.json; expected the TOMATO layout {LAYOUT}"
        )
    items = []
    for path in files:
        for key, record in read_json(path, dict, LAYOUT).items():
            require_keys(record, KEYS, path, key, LAYOUT)
            options = [str(o) for o in record["options"]]
            if not 0 <= int(record["answer"]) < len(options) <= len("ABCDEF"):
                raise BenchmarkLayoutError(
                    f"{path}: item {key!r}: answer {record['answer']} must index its {len(options)} options "
                    "(at most 6)"
                )
            prompt = (
                f"Question: {record['question']}\nOptions:\n{option_listing(options, 'paren')}\n"
                'Even if you are unsure, choose one option. Reply only with "Answer is: (X)", X being its letter.'
            )
            demonstration = str(record["demonstration_type"])
            items.append(
                EvalItem(
                    id=f"tomato/{path.stem}/{key}",
                    benchmark="tomato",
                    task=path.stem,
                    video=root / "videos" / demonstration / f"{record.get('key', key)}.mp4",
                    question=str(record["question"]),
                    options=options,
                    answer=LETTERS[int(record["answer"])],
                    prompt=prompt,
                    system=SYSTEM,
                    extra={
                        "demonstration_type": demonstration,
                        "motion_type": str(record["motion_type"]),
                        "variation": _variation(record.get("variation")),
                    },
                )
            )
    return items
