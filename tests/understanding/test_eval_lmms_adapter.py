"""The lmms-eval adapter (spec §7) on fake requests shaped like lmms-eval's `Instance`s (lmms-eval not installed)."""

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from timeloom_understanding.benchmarks.base import EvalItem, load_clip
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.evaluate import continuation_logprobs, generate_replies
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.lmms_eval_model import TimeloomVideoLLM
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule

from timeloom.video_io import write_video

ENCODER = vit_options()


@dataclass
class FakeInstance:
    args: tuple


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER, llm=LLMConfig(hidden_size=32, layers=2, heads=4, tie_embeddings=False)
    )
    folder = tmp_path_factory.mktemp("videollm")
    VideoLLMModule(config).save_pretrained(folder)
    videos = tmp_path_factory.mktemp("videos")
    docs = []
    for k in range(3):
        path = write_video(videos / f"{k}.mp4", torch.rand(1, 12, 32, 32) * 2 - 1, fps=6)
        docs.append({"video": str(path), "question": f"Question {k}: which way?", "answer": "up"})
    model = TimeloomVideoLLM(pretrained=str(folder), max_frames_num=4, batch_size=2)
    model.task_dict = {"fake": {"test": docs}}
    model.pretrained_path = str(folder)
    return model


def to_visual(doc):
    return [doc["video"]]


def item_for(adapter, doc, k):
    video = load_clip(doc["video"], 4, 32, 32, 1)
    return EvalItem(
        id=str(k),
        benchmark="x",
        task="x",
        video=video,
        question="",
        options=[],
        answer="",
        prompt=doc["question"],
        format="captioning",
    ), video


def test_generate_until_greedy_with_budget_and_stop_strings(adapter):
    docs = adapter.task_dict["fake"]["test"]
    requests = [
        FakeInstance(
            (
                doc["question"],
                {"max_new_tokens": budget, "until": ["zzz"], "temperature": 0},
                to_visual,
                k,
                "fake",
                "test",
            )
        )
        for k, (doc, budget) in enumerate(zip(docs, (3, 5, 3)))
    ]
    replies = adapter.generate_until(requests)
    for k, (doc, budget) in enumerate(zip(docs, (3, 5, 3))):
        item, video = item_for(adapter, doc, k)
        assert replies[k] == generate_replies(adapter.module, [item], [video], budget)[0]
    stop = replies[1].split(" ")[-1]  # the untied random model writes a few words
    assert stop and stop in replies[1]
    (cut,) = adapter.generate_until(
        [
            FakeInstance(
                (docs[1]["question"], {"max_new_tokens": 5, "until": stop}, to_visual, 1, "fake", "test")
            )
        ]
    )
    assert cut == replies[1].split(stop)[0]
    with pytest.raises(ValueError, match="temperature > 0"):
        adapter.generate_until([FakeInstance(("q", {"temperature": 0.7}, to_visual, 0, "fake", "test"))])


def test_loglikelihood_sums_the_continuation(adapter):
    docs = adapter.task_dict["fake"]["test"]
    requests = [
        FakeInstance((doc["question"], lambda d: d["answer"], to_visual, k, "fake", "test"))
        for k, doc in enumerate(docs)
    ]
    requests.append(FakeInstance((docs[0]["question"], " down", to_visual, 0, "fake", "test")))
    results = adapter.loglikelihood(requests)
    assert len(results) == 4 and all(isinstance(g, bool) and s < 0 for s, g in results)
    item, video = item_for(adapter, docs[0], 0)
    assert results[0] == pytest.approx(continuation_logprobs(adapter.module, [item], [video], ["up"])[0])
    assert results[3][0] != pytest.approx(results[0][0])


def test_model_arguments(adapter):
    assert type(adapter.module.model.structure).__name__ == "Causal"
    path = adapter.pretrained_path  # the same export, run under another structure
    assert (
        type(TimeloomVideoLLM(pretrained=path, structure="tc_llava").module.model.structure).__name__
        == "TCLLaVA"
    )
    with pytest.raises(TypeError, match="unexpected keyword argument 'conv_template'"):
        TimeloomVideoLLM(pretrained=path, conv_template="vicuna")


def test_images_are_one_frame_videos_and_context_placeholders_are_dropped(adapter):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8))
    (reply,) = adapter.generate_until(
        [
            FakeInstance(
                ("<image>\nWhat is shown?", {"max_new_tokens": 3}, lambda d: [image], 0, "fake", "test")
            )
        ]
    )
    video = adapter._video([image])
    assert video.shape == (1, 1, 32, 32)
    item = EvalItem(
        id="i",
        benchmark="x",
        task="x",
        video=video,
        question="",
        options=[],
        answer="",
        prompt="What is shown?",
        format="captioning",
    )
    assert reply == generate_replies(adapter.module, [item], [video], 3)[0]


def test_text_only_requests_and_unsupported_calls(adapter):
    (reply,) = adapter.generate_until(
        [FakeInstance(("Say something.", {"max_new_tokens": 2}, lambda d: [], 0, "fake", "test"))]
    )
    assert isinstance(reply, str)
    with pytest.raises(NotImplementedError, match="multi-round"):
        adapter.generate_until_multi_round([])
