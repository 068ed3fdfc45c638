"""OVO-Bench (JoeLeelyf/OVO-Bench, arXiv 2501.05510): online video questions asked at a moment of the video.

Local layout::

    ROOT/ovo_bench_new.json      a list of records (below)
    ROOT/src_videos/<video>      the videos (``<video>`` may also be relative to ROOT itself)

- backward tracing (EPM, ASI, HLD) and real-time perception (OCR, ACR, ATR, STU, FPD, OJR):
  ``{"id", "task", "video", "realtime", "question", "options", "gt"}``, ``gt`` the index of the right option;
- forward active responding (REC, SSR, CRR): ``{"id", "task", "video", "test_info": [probe, …]}`` with
  probes ``{"realtime", "count"}`` (REC, with the record's ``activity``), ``{"realtime", "step", "type"}``
  (SSR) or ``{"realtime", "type"}`` (CRR, with the record's ``question``); ``type`` 1 means the answer is yes.

Every question or probe sees only ``video[0, realtime]`` (``cut_at``). The prompts are ours (pinned by
`PROMPT_VERSION`), written after the paper's task descriptions.
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

__all__ = ["CATEGORIES", "PROMPT_VERSION", "load"]

PROMPT_VERSION = "timeloom-ovobench-1"
CATEGORIES = {
    "backward": ("EPM", "ASI", "HLD"),
    "realtime": ("OCR", "ACR", "ATR", "STU", "FPD", "OJR"),
    "forward": ("REC", "SSR", "CRR"),
}
FILE = "ovo_bench_new.json"
LAYOUT = (
    f'{FILE}: a list of {{"id", "task", "video", "realtime", "question", "options", "gt"}} (backward, '
    'real-time) and {"id", "task", "video", "test_info": [...]} (forward REC/SSR/CRR)'
)
_CATEGORY_OF = {task: category for category, tasks in CATEGORIES.items() for task in tasks}


def _video(root: Path, name: str) -> Path:
    direct = root / name
    return direct if direct.exists() else root / "src_videos" / name


def _forward_probe(record: dict, probe: dict, path: Path, name: str) -> tuple[str, str, str]:
    """``(question, prompt, answer)`` of one forward probe."""
    task = record["task"]
    if task == "REC":
        require_keys(probe, ("realtime", "count"), path, name, LAYOUT)
        require_keys(record, ("activity",), path, name, LAYOUT)
        activity = record["activity"]
        question = f"How many times did they {activity}?"
        return question, f"{question}\nAnswer with a single number.", str(int(probe["count"]))
    require_keys(probe, ("realtime", "type"), path, name, LAYOUT)
    if task == "SSR":
        require_keys(probe, ("step",), path, name, LAYOUT)
        question = f"Is the person now doing this step: {probe['step']}?"
    else:
        require_keys(record, ("question",), path, name, LAYOUT)
        question = f"Has the video shown enough to answer this question: {record['question']}?"
    answer = "yes" if int(probe["type"]) == 1 else "no"
    return question, f"{question}\nAnswer yes or no.", answer


def load(root: Path) -> list[EvalItem]:
    """Every backward and real-time question and every forward probe of ``ROOT/ovo_bench_new.json``."""
    path = root / FILE
    if not path.is_file():
        raise BenchmarkLayoutError(f"{root}: no {FILE}; expected the OVO-Bench layout {LAYOUT}")
    items = []
    for k, record in enumerate(read_json(path, list, LAYOUT)):
        require_keys(record, ("id", "task", "video"), path, k, LAYOUT)
        task, name = str(record["task"]), f"{record['task']}/{record['id']}"
        if task not in _CATEGORY_OF:
            raise BenchmarkLayoutError(f"{path}: item {name}: unknown task {task!r}; known: {CATEGORIES}")
        common = dict(benchmark="ovobench", task=task, video=_video(root, str(record["video"])))
        extra = {"category": _CATEGORY_OF[task]}
        if _CATEGORY_OF[task] != "forward":
            require_keys(record, ("realtime", "question", "options", "gt"), path, name, LAYOUT)
            options = [str(o) for o in record["options"]]
            if not 0 <= int(record["gt"]) < len(options):
                raise BenchmarkLayoutError(f"{path}: item {name}: gt {record['gt']} is not an option index")
            prompt = (
                f"Question: {record['question']}\nOptions:\n{option_listing(options, 'dot')}\n"
                "Answer with the option's letter only."
            )
            items.append(
                EvalItem(
                    id=f"ovobench/{name}",
                    question=str(record["question"]),
                    options=options,
                    answer=LETTERS[int(record["gt"])],
                    prompt=prompt,
                    cut_at=float(record["realtime"]),
                    extra=extra,
                    **common,
                )
            )
            continue
        require_keys(record, ("test_info",), path, name, LAYOUT)
        for p, probe in enumerate(record["test_info"]):
            question, prompt, answer = _forward_probe(record, probe, path, f"{name}/{p}")
            items.append(
                EvalItem(
                    id=f"ovobench/{name}/{p}",
                    question=question,
                    options=[],
                    answer=answer,
                    prompt=prompt,
                    format="count" if task == "REC" else "yes_no",
                    cut_at=float(probe["realtime"]),
                    extra=extra | {"record": str(record["id"])},
                    **common,
                )
            )
    return items
