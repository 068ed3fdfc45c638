"""Benchmark loaders (spec §5.3): local copies of MVBench, TempCompass, OVO-Bench, TOMATO and TemporalBench.

``load_benchmark(name, root)`` returns `EvalItem`s with the benchmark's prompt; `missing_videos` lists the
videos that are not there, before any compute. A file in another layout raises a `BenchmarkLayoutError`
that names the file and the layout expected.
"""

from __future__ import annotations

from pathlib import Path

from timeloom_understanding.benchmarks import (
    mvbench,
    ovobench,
    tempcompass,
    temporal_qa,
    temporalbench,
    tomato,
)
from timeloom_understanding.benchmarks.base import (
    BenchmarkLayoutError,
    EvalItem,
    frame_indices,
    load_clip,
    missing_videos,
)

__all__ = [
    "BENCHMARKS",
    "PROMPT_VERSIONS",
    "BenchmarkLayoutError",
    "EvalItem",
    "frame_indices",
    "load_benchmark",
    "load_clip",
    "missing_videos",
]

#: benchmark name → its loader module (each has ``load(root)`` and ``PROMPT_VERSION``).
BENCHMARKS = {
    "mvbench": mvbench,
    "tempcompass": tempcompass,
    "ovobench": ovobench,
    "tomato": tomato,
    "temporalbench": temporalbench,
}
PROMPT_VERSIONS = {name: module.PROMPT_VERSION for name, module in BENCHMARKS.items()} | {
    "temporal_qa": temporal_qa.PROMPT_VERSION
}


def load_benchmark(name: str, root: str | Path) -> list[EvalItem]:
    """All items of benchmark ``name`` from its local copy under ``root``."""
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{name}: data root {root} is not a folder")
    return BENCHMARKS[name].load(root)
