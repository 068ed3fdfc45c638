"""Benchmark loaders (spec §5.3): each local layout in a tiny fake copy, the manifest check, bad layouts, sampling."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timeloom_understanding.benchmarks import (
    BenchmarkLayoutError,
    frame_indices,
    load_benchmark,
    load_clip,
    missing_videos,
)
from timeloom_understanding.benchmarks.base import listed_options, shown_duration
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.evaluate import main as evaluate_main
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule

from timeloom.video_io import write_video

FPS = 4


def ramp_video(path: Path, frames: int = 20) -> Path:
    """A grey clip whose frame k has brightness 8·k, so a decoded frame says which one it was."""
    values = (np.arange(frames, dtype=np.uint8) * 8)[:, None, None, None]
    return write_video(path, np.broadcast_to(values, (frames, 16, 16, 3)).copy(), fps=FPS, crf=0)


def write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


# -- fake copies of each benchmark ------------------------------------------------------------------------
def fake_mvbench(root: Path) -> Path:
    write_json(
        root / "json/action_sequence.json",
        [
            {
                "video": "a.mp4",
                "question": "What did he do first?",
                "candidates": ["sit", "run", "jump"],
                "answer": "run",
                "start": 1.0,
                "end": 3.0,
            },
        ],
    )
    write_json(  # some annotations name a video without its suffix
        root / "json/moving_direction.json",
        [{"video": "b", "question": "Where?", "candidates": ["up", "down"], "answer": "up"}],
    )
    ramp_video(root / "video/star/Charades_v1_480/a.mp4")
    ramp_video(root / "video/clevrer/video_validation/b.mp4")
    return root


def fake_tempcompass(root: Path) -> Path:
    write_json(
        root / "questions/multi-choice.json",
        {"v1": {"direction": [{"question": "Which way?\nA. left\nB. right", "answer": "B. right"}]}},
    )
    write_json(
        root / "questions/yes_no.json", {"v1": {"speed": [{"question": "Is it fast?", "answer": "no"}]}}
    )
    write_json(
        root / "questions/caption_matching.json",
        {
            "v1": {
                "order": [
                    {
                        "question": "Which caption?\nCaption A: x then y\nCaption B: y then x",
                        "answer": "Caption A: x then y",
                    }
                ]
            }
        },
    )
    write_json(
        root / "questions/captioning.json",
        {"v1": {"order": [{"question": "Describe.", "answer": "x then y"}]}},
    )
    ramp_video(root / "videos/v1.mp4")
    return root


def fake_ovobench(root: Path) -> Path:
    write_json(
        root / "ovo_bench_new.json",
        [
            {
                "id": 1,
                "task": "EPM",
                "video": "e.mp4",
                "realtime": 2.0,
                "question": "What was held?",
                "options": ["cup", "pen", "key"],
                "gt": 2,
            },
            {
                "id": 2,
                "task": "OCR",
                "video": "e.mp4",
                "realtime": 4.0,
                "question": "What is written?",
                "options": ["stop", "go"],
                "gt": 0,
            },
            {
                "id": 3,
                "task": "REC",
                "video": "e.mp4",
                "activity": "jumping",
                "test_info": [{"realtime": 1.0, "count": 0}, {"realtime": 3.0, "count": 2}],
            },
            {
                "id": 4,
                "task": "SSR",
                "video": "e.mp4",
                "test_info": [{"realtime": 2.0, "step": "cut", "type": 1}],
            },
            {
                "id": 5,
                "task": "CRR",
                "video": "e.mp4",
                "question": "Who wins?",
                "test_info": [{"realtime": 2.0, "type": 0}],
            },
        ],
    )
    ramp_video(root / "src_videos/e.mp4")
    return root


def fake_tomato(root: Path) -> Path:
    write_json(
        root / "data/rotation.json",
        {
            "q1": {
                "question": "Which way does it turn?",
                "options": ["cw", "ccw", "none"],
                "answer": 1,
                "motion_type": "object",
                "variation": {"zoom": 1, "first_person": 0},
                "demonstration_type": "human",
                "key": "clip1",
            }
        },
    )
    ramp_video(root / "videos/human/clip1.mp4")
    return root


def fake_temporalbench(root: Path) -> Path:
    rows = [
        {
            "idx": k,
            "video_name": f"clips/{name}.mp4",
            "question": "Which?\nA. one\nB. two",
            "GT": gt,
            "category": "action",
            "dataset": "ego",
        }
        for k, (name, gt) in enumerate([("x", "A"), ("x", "B"), ("y", "A")])
    ]
    write_json(root / "temporalbench_short_qa.json", rows)
    ramp_video(root / "clips/x.mp4")
    ramp_video(root / "clips/y.mp4")
    return root


FAKES = {
    "mvbench": fake_mvbench,
    "tempcompass": fake_tempcompass,
    "ovobench": fake_ovobench,
    "tomato": fake_tomato,
    "temporalbench": fake_temporalbench,
}


# -- loaders --------------------------------------------------------------------------------------------------
def test_mvbench_items_carry_the_official_prompt_letters_and_bounds(tmp_path):
    items = load_benchmark("mvbench", fake_mvbench(tmp_path))
    first = next(i for i in items if i.task == "action_sequence")
    assert first.answer == "B" and first.options == ["sit", "run", "jump"]
    assert (
        first.prompt
        == "Question: What did he do first?\nOptions:\n(A) sit\n(B) run\n(C) jump\nOnly give the best option."
    )
    assert first.prefill == "Best option:(" and first.system.startswith("Carefully watch the video")
    assert first.bounds == (1.0, 3.0) and first.sampler == "uniform_mid"
    assert first.video == tmp_path / "video/star/Charades_v1_480/a.mp4"
    assert items[1].video == tmp_path / "video/clevrer/video_validation/b.mp4"
    assert not missing_videos(items)


def test_tempcompass_reads_each_format_and_its_suffix(tmp_path):
    items = {i.format: i for i in load_benchmark("tempcompass", fake_tempcompass(tmp_path))}
    assert set(items) == {"multi_choice", "yes_no", "caption_matching", "captioning"}
    mc = items["multi_choice"]
    assert (mc.answer, mc.options, mc.task) == ("B", ["left", "right"], "direction")
    assert mc.prompt.endswith("\nPlease directly give the best option:")
    assert items["yes_no"].answer == "no" and items["yes_no"].prompt.endswith("\nPlease answer yes or no:")
    assert items["caption_matching"].answer == "A" and items["caption_matching"].options == [
        "x then y",
        "y then x",
    ]
    assert items["captioning"].candidates == []


def test_ovobench_backward_realtime_and_forward_probes_are_cut_at_their_time(tmp_path):
    items = {i.id: i for i in load_benchmark("ovobench", fake_ovobench(tmp_path))}
    assert items["ovobench/EPM/1"].answer == "C" and items["ovobench/EPM/1"].cut_at == 2.0
    assert items["ovobench/OCR/2"].extra["category"] == "realtime"
    rec = [items["ovobench/REC/3/0"], items["ovobench/REC/3/1"]]
    assert [(r.format, r.answer, r.cut_at) for r in rec] == [("count", "0", 1.0), ("count", "2", 3.0)]
    assert items["ovobench/SSR/4/0"].answer == "yes" and items["ovobench/CRR/5/0"].answer == "no"
    assert items["ovobench/SSR/4/0"].video == tmp_path / "src_videos/e.mp4"


def test_tomato_and_temporalbench_items(tmp_path):
    (tomato,) = load_benchmark("tomato", fake_tomato(tmp_path / "t"))
    assert (tomato.answer, tomato.task, tomato.extra["demonstration_type"]) == ("B", "rotation", "human")
    assert tomato.extra["variation"] == "zoom"
    assert tomato.video == tmp_path / "t/videos/human/clip1.mp4"
    bench = load_benchmark("temporalbench", fake_temporalbench(tmp_path / "b"))
    assert [i.answer for i in bench] == ["A", "B", "A"] and bench[0].options == ["one", "two"]
    assert [i.extra["group"] for i in bench] == ["clips/x.mp4", "clips/x.mp4", "clips/y.mp4"]


@pytest.mark.parametrize("name", sorted(FAKES))
def test_the_manifest_lists_every_missing_video(tmp_path, name):
    root = FAKES[name](tmp_path)
    for video in root.rglob("*.mp4"):
        video.unlink()
    items = load_benchmark(name, root)
    missing = missing_videos(items)
    assert [item_id for item_id, _ in missing] == [i.id for i in items]


@pytest.mark.parametrize("name", sorted(FAKES))
def test_an_empty_folder_is_an_error_naming_the_expected_layout(tmp_path, name):
    with pytest.raises(BenchmarkLayoutError, match="expected the .* layout"):
        load_benchmark(name, tmp_path)


def test_a_file_in_another_layout_is_an_error_naming_it(tmp_path):
    write_json(tmp_path / "json/action_sequence.json", {"not": "a list"})
    with pytest.raises(BenchmarkLayoutError, match=r"action_sequence\.json: holds a JSON dict; expected"):
        load_benchmark("mvbench", tmp_path)
    write_json(tmp_path / "json/action_sequence.json", [{"video": "a.mp4", "question": "?"}])
    with pytest.raises(BenchmarkLayoutError, match=r"item 0 lacks \['candidates', 'answer'\]"):
        load_benchmark("mvbench", tmp_path)
    write_json(
        tmp_path / "json/action_sequence.json",
        [{"video": "a", "question": "?", "candidates": ["x"], "answer": "y"}],
    )
    with pytest.raises(BenchmarkLayoutError, match="is not one of its candidates"):
        load_benchmark("mvbench", tmp_path)
    with pytest.raises(ValueError, match="unknown benchmark 'videomme'"):
        load_benchmark("videomme", tmp_path)


def test_option_lines_in_every_style():
    text = "Which?\nA. up\n(B) down\nC) left\nCaption D: the 3 moves\nI think so"
    assert listed_options(text) == [("A", "up"), ("B", "down"), ("C", "left"), ("D", "the 3 moves")]


# -- sampling ---------------------------------------------------------------------------------------------------
def test_frame_indices_follow_each_sampler():
    # MVBench: frames 0..99 in 8 segments of 99/8, index = int(first + seg/2 + round(seg·k))
    assert frame_indices("uniform_mid", 100, 10.0, 8) == [6, 18, 31, 43, 56, 68, 80, 93]
    assert frame_indices("linspace", 100, 10.0, 5) == [0, 25, 50, 74, 99]
    # bounds 2 s .. 4 s at 10 fps: frames 20..40
    assert frame_indices("linspace", 100, 10.0, 3, bounds=(2.0, 4.0)) == [20, 30, 40]
    # nothing after the cut: 3 s at 10 fps is frame 30
    assert max(frame_indices("uniform_mid", 100, 10.0, 4, cut_at=3.0)) <= 30
    assert frame_indices("linspace", 100, 10.0, 4, cut_at=3.0) == [0, 10, 20, 30]


def test_load_clip_shows_the_sampled_frames_and_nothing_after_the_cut(tmp_path):
    path = ramp_video(tmp_path / "ramp.mp4")
    clip = load_clip(path, 5, 8, 8, 1, "linspace", cut_at=2.0)  # 2 s at 4 fps: frames 0..8
    assert clip.shape == (1, 5, 8, 8)
    brightness = ((clip.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist()
    assert brightness == pytest.approx([0, 16, 32, 48, 64], abs=2)
    bounded = load_clip(path, 2, 8, 8, 1, "linspace", bounds=(1.0, 3.0))  # frames 4 and 12
    assert ((bounded.mean(dim=(0, 2, 3)) + 1) * 127.5).tolist() == pytest.approx([32, 96], abs=2)


def test_load_clip_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mp4 does not exist"):
        load_clip(tmp_path / "nothing.mp4", 4, 8, 8, 1)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"not a video at all")
    with pytest.raises(ValueError, match="broken.mp4 cannot be decoded"):
        load_clip(broken, 4, 8, 8, 1)


def test_shown_duration_follows_bounds_and_cut(tmp_path):
    path = ramp_video(tmp_path / "ramp.mp4")  # 20 frames at 4 fps: 5 s
    assert shown_duration(path) == pytest.approx(5.0)
    assert shown_duration(path, bounds=(1.0, 3.0)) == pytest.approx(2.0)
    assert shown_duration(path, cut_at=2.5) == pytest.approx(2.5)
    assert shown_duration(path, bounds=(1.0, 9.0), cut_at=4.0) == pytest.approx(3.0)


def test_a_cut_before_the_bounds_shows_nothing_rather_than_the_future():
    with pytest.raises(ValueError, match="nothing to show"):
        frame_indices("linspace", 100, 10.0, 4, bounds=(5.0, 8.0), cut_at=2.0)
    assert frame_indices("linspace", 10, 10.0, 2, bounds=(30.0, 40.0)) == [9, 9]  # bounds past the end


# -- every layout end to end -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny video-LLM (grey 32 px) saved as a `timeloom export` folder."""
    torch.manual_seed(0)
    encoder = vit_options()
    config = VideoLLMConfig(encoder=encoder, llm=LLMConfig(hidden_size=32, layers=1, heads=4), max_length=512)
    folder = tmp_path_factory.mktemp("videollm")
    VideoLLMModule(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", sorted(FAKES))
def test_evaluate_runs_every_layout_and_reports_its_rule(exported, tmp_path, name):
    root, out = FAKES[name](tmp_path / "data"), tmp_path / "out"
    items = load_benchmark(name, root)
    status = evaluate_main(
        [
            "--checkpoint",
            str(exported),
            "--benchmark",
            name,
            "--root",
            str(root),
            "--frames",
            "2",
            "--out",
            str(out),
            "--max-new-tokens",
            "2",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert status == 0 and report["n"] == len(items) and report["n_missing"] == 0
    assert report["n_unscored_judge"] == sum(i.format == "captioning" for i in items)
    assert report["n_scored"] + report["n_unscored_judge"] == len(items)
    expected = {
        "ovobench": "backward_mean",
        "temporalbench": "mba",
        "mvbench": "task_mean",
        "tempcompass": "match_rate",
    }
    assert name not in expected or expected[name] in report
