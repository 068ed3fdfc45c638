"""TempCompass (llyx97/TempCompass, arXiv 2403.00476): temporal aspects × four task formats.

Local layout::

    ROOT/questions/<format>.json   {video_id: {aspect: [{"question", "answer"}]}}
    ROOT/videos/<video_id>.mp4

with ``<format>`` one of ``multi-choice``, ``yes_no``, ``caption_matching``, ``captioning``. Multiple-choice
questions list their options in the question (``A. …``), caption matching as ``Caption A: …``; the answer
repeats the right line. Prompts add the official suffixes; captioning needs an LLM judge (upstream
gpt-3.5-turbo-1106), so those items are loaded but reported as unscored.
"""

from __future__ import annotations

from pathlib import Path

from timeloom_understanding.benchmarks.base import (
    BenchmarkLayoutError,
    EvalItem,
    listed_options,
    read_json,
    require_keys,
)

__all__ = ["FORMAT_FILES", "PROMPT_VERSION", "load"]

PROMPT_VERSION = "tempcompass-official-2024.03"
#: annotation file stem → (our format name, the official prompt suffix)
FORMAT_FILES = {
    "multi-choice": ("multi_choice", "\nPlease directly give the best option:"),
    "yes_no": ("yes_no", "\nPlease answer yes or no:"),
    "caption_matching": ("caption_matching", "\nPlease directly give the best option:"),
    "captioning": ("captioning", ""),
}
LAYOUT = 'questions/<format>.json: {video_id: {aspect: [{"question", "answer"}]}}'


def _answer(record: dict, fmt: str, options: list[str], path: Path, item: str) -> str:
    answer = str(record["answer"]).strip()
    if fmt == "yes_no":
        if answer.lower() not in ("yes", "no"):
            raise BenchmarkLayoutError(f"{path}: item {item}: a yes/no answer {answer!r}")
        return answer.lower()
    if fmt == "captioning":
        return answer
    named = listed_options(answer)
    if not named or not "A" <= named[0][0] < chr(ord("A") + len(options)):
        raise BenchmarkLayoutError(
            f"{path}: item {item}: answer {answer!r} names none of the {len(options)} options of its question"
        )
    return named[0][0]


def load(root: Path) -> list[EvalItem]:
    """Every question of every ``questions/<format>.json`` present under ``root``."""
    files = [root / "questions" / f"{stem}.json" for stem in FORMAT_FILES]
    if not any(path.is_file() for path in files):
        raise BenchmarkLayoutError(
            f"{root}: none of questions/{{{','.join(FORMAT_FILES)}}}.json; expected the TempCompass layout "
            f"{LAYOUT}"
        )
    items = []
    for path in (p for p in files if p.is_file()):
        fmt, suffix = FORMAT_FILES[path.stem]
        for video_id, aspects in read_json(path, dict, LAYOUT).items():
            if not isinstance(aspects, dict):
                raise BenchmarkLayoutError(
                    f"{path}: video {video_id!r} maps to no aspects; expected {LAYOUT}"
                )
            for aspect, questions in aspects.items():
                for k, record in enumerate(questions):
                    name = f"{video_id}/{aspect}/{k}"
                    require_keys(record, ("question", "answer"), path, name, LAYOUT)
                    question = str(record["question"])
                    listed = fmt in ("multi_choice", "caption_matching")
                    options = [text for _, text in listed_options(question)] if listed else []
                    items.append(
                        EvalItem(
                            id=f"tempcompass/{fmt}/{name}",
                            benchmark="tempcompass",
                            task=aspect,
                            video=root / "videos" / f"{video_id}.mp4",
                            question=question,
                            options=options,
                            answer=_answer(record, fmt, options, path, name),
                            prompt=question + suffix,
                            format=fmt,
                            extra={"aspect": aspect, "reference": str(record["answer"])},
                        )
                    )
    return items
