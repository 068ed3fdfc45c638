"""TemporalBench (mu-cai/TemporalBench, arXiv 2410.10818): fine-grained temporal binary QA.

Local layout::

    ROOT/temporalbench_{short,long}_qa.json        [{"idx", "video_name", "question", "GT", "category", "dataset"}]
    ROOT/temporalbench_{short,long}_caption.json   the same without "GT" (captioning: judge-only)
    ROOT/<video_name>

The question lists its two options (``A. …``, ``B. …``); ``GT`` is a letter. Binary accuracy reads the
response's first character; multiple binary accuracy (MBA) counts a ``video_name`` group correct only when
all of its questions are.
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

__all__ = ["PROMPT_VERSION", "load"]

PROMPT_VERSION = "temporalbench-2024.10"
LAYOUT = 'temporalbench_{short,long}_qa.json: a list of {"idx", "video_name", "question", "GT"[, "category", "dataset"]}'


def load(root: Path) -> list[EvalItem]:
    """Every question of ``temporalbench_{short,long}_{qa,caption}.json`` present under ``root``."""
    files = [
        root / f"temporalbench_{length}_{kind}.json"
        for length in ("short", "long")
        for kind in ("qa", "caption")
    ]
    if not any(path.is_file() for path in files):
        raise BenchmarkLayoutError(
            f"{root}: no temporalbench_*_qa.json; expected the TemporalBench layout {LAYOUT}"
        )
    items = []
    for path in (p for p in files if p.is_file()):
        length, kind = path.stem.split("_")[1:3]
        for k, record in enumerate(read_json(path, list, LAYOUT)):
            keys = ("idx", "video_name", "question") + (("GT",) if kind == "qa" else ())
            require_keys(record, keys, path, k, LAYOUT)
            question = str(record["question"])
            items.append(
                EvalItem(
                    id=f"temporalbench/{length}_{kind}/{record['idx']}",
                    benchmark="temporalbench",
                    task=f"{length}_{kind}",
                    video=root / str(record["video_name"]),
                    question=question,
                    options=[text for _, text in listed_options(question)] if kind == "qa" else [],
                    answer=str(record.get("GT", "")).strip().upper(),
                    prompt=question,  # as upstream asks it: the question lists the options
                    format="multi_choice" if kind == "qa" else "captioning",
                    extra={
                        "group": str(record["video_name"]),
                        "category": str(record.get("category", "")),
                        "dataset": str(record.get("dataset", "")),
                    },
                )
            )
    return items
