"""MVBench (OpenGVLab, arXiv 2311.17005): 20 temporal tasks × 200 multiple-choice questions.

Local layout (the Hugging Face dataset ``OpenGVLab/MVBench``)::

    ROOT/json/<task>.json        [{"video", "question", "candidates", "answer", optional "start", "end"}]
    ROOT/video/<source>/<video>  each task's videos under its source folder (TASK_SOURCES)

``answer`` is the text of one candidate. Frames are segment midpoints (``uniform_mid``) within
``[start, end]`` seconds where given. The prompt is the official one: a system prompt, the user text
``Question: …\\nOptions:\\n(A) …\\nOnly give the best option.`` and the reply prefilled ``Best option:(``.
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

__all__ = ["PROMPT_VERSION", "SYSTEM", "TASK_SOURCES", "load"]

PROMPT_VERSION = "mvbench-official-2023.12"
SYSTEM = (
    "Carefully watch the video and pay attention to the cause and sequence of events, the detail and "
    "movement of objects, and the action and pose of persons. Based on your observations, select the best "
    "option that accurately addresses the question."
)
PREFILL = "Best option:("
LAYOUT = 'json/<task>.json: a list of {"video", "question", "candidates", "answer"[, "start", "end"]}'

#: task file stem → the folder under ROOT/video that holds its videos (or frame folders).
TASK_SOURCES = {
    "action_sequence": "star/Charades_v1_480",
    "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video",
    "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test",
    "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480",
    "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation",
    "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video",
    "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation",
    "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos",
    "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos",
    "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq",
    "counterfactual_inference": "clevrer/video_validation",
}


VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".webm")


def _video(folder: Path, name: str) -> Path:
    """``folder/name``; some annotations leave the suffix out, so the first existing suffixed file if not."""
    path = folder / name
    if path.exists():
        return path
    return next((p for p in (folder / f"{name}{s}" for s in VIDEO_SUFFIXES) if p.exists()), path)


def load(root: Path) -> list[EvalItem]:
    """Every question of every ``json/<task>.json`` under ``root``."""
    files = sorted((root / "json").glob("*.json"))
    if not files:
        raise BenchmarkLayoutError(f"{root}: no json/<task>.json files; expected the MVBench layout {LAYOUT}")
    items = []
    for path in files:
        task = path.stem
        folder = root / "video" / TASK_SOURCES.get(task, task)
        for k, record in enumerate(read_json(path, list, LAYOUT)):
            require_keys(record, ("video", "question", "candidates", "answer"), path, k, LAYOUT)
            candidates = [str(c) for c in record["candidates"]]
            if str(record["answer"]) not in candidates:
                raise BenchmarkLayoutError(
                    f"{path}: item {k}: answer {record['answer']!r} is not one of its candidates {candidates}"
                )
            bounds = None
            if "start" in record and "end" in record:
                bounds = (float(record["start"]), float(record["end"]))
            prompt = (
                f"Question: {record['question']}\nOptions:\n{option_listing(candidates, 'paren')}\n"
                "Only give the best option."
            )
            items.append(
                EvalItem(
                    id=f"mvbench/{task}/{k}",
                    benchmark="mvbench",
                    task=task,
                    video=_video(folder, str(record["video"])),
                    question=record["question"],
                    options=candidates,
                    answer=LETTERS[candidates.index(str(record["answer"]))],
                    prompt=prompt,
                    bounds=bounds,
                    sampler="uniform_mid",
                    system=SYSTEM,
                    prefill=PREFILL,
                )
            )
    return items
