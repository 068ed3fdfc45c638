"""`timeloom ask` (issue #6): one question about one video file, and its errors on bad input."""

import pytest
import torch
from timeloom_understanding.benchmarks.base import EvalItem, shown_duration
from timeloom_understanding.commands import ask
from timeloom_understanding.data import TemporalQA
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.evaluate import generate_replies, load_module
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule

from timeloom.cli import main as timeloom_main
from timeloom.video_io import write_video

ENCODER = vit_options()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER,
        llm=LLMConfig(hidden_size=32, layers=2, heads=4, tie_embeddings=False),
        max_length=160,
    )
    folder = tmp_path_factory.mktemp("videollm")
    VideoLLMModule(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A TemporalQA video as a lossless MP4, and the tensor it was written from."""
    video = TemporalQA("test", length=1)[0][0]["video"]
    path = tmp_path_factory.mktemp("clips") / "digit.mp4"
    write_video(path, video, fps=8, crf=0)
    return path, video


def test_ask_answers_as_the_model_does_on_the_decoded_frames(exported, clip, capsys):
    path, video = clip
    answer = ask(exported, path, "Which way does the digit move?", max_new_tokens=6)
    # the same question on the tensor the file was written from: the decoded frames are the same frames
    module = load_module(exported)
    item = EvalItem(
        id="x",
        benchmark="ask",
        task="ask",
        video=video,
        question="q",
        options=[],
        answer="",
        prompt="Which way does the digit move?",
        format="captioning",
    )
    assert answer == generate_replies(module, [item], [video], 6, [shown_duration(path)])[0]
    timeloom_main(
        [
            "ask",
            "--checkpoint",
            str(exported),
            "--video",
            str(path),
            "--question",
            "Which way does the digit move?",
            "--max-new-tokens",
            "6",
        ]
    )
    assert capsys.readouterr().out.strip() == answer


def test_ask_names_a_missing_or_undecodable_video(exported, tmp_path):
    command = ["ask", "--checkpoint", str(exported), "--question", "Which way?"]
    with pytest.raises(SystemExit, match=r"ask: video .*missing\.mp4 does not exist"):
        timeloom_main([*command, "--video", str(tmp_path / "missing.mp4")])
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match=r"ask: video .*broken\.mp4 cannot be decoded"):
        timeloom_main([*command, "--video", str(broken)])


def test_a_question_longer_than_the_context_is_an_error_naming_the_video(exported, clip):
    path, _ = clip
    with pytest.raises(
        SystemExit, match=r"ask: item '.*digit\.mp4': \d+ tokens .* do not fit in the context of 160"
    ):
        timeloom_main(
            ["ask", "--checkpoint", str(exported), "--video", str(path), "--question", "why " * 200]
        )
    with pytest.raises(SystemExit, match="ask: the question is empty"):
        timeloom_main(["ask", "--checkpoint", str(exported), "--video", str(path), "--question", "  "])
