"""Streaming mode (spec §7, §11.4): answers at time t use frames ≤ t only; the cached stream equals the offline
protocol (a fresh `generate` on video[0, t]); structures that forbid cache reuse rebuild and say why."""

import functools

import pytest
import torch
from timeloom_understanding.data import ConversationCollator, TemporalQA
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import make_structure
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.streaming import OnlineStream, why_no_cache_reuse

ENCODER = vit_options()
QUESTION = "Which way does the 4 move?\n(A) left\n(B) right"
FPS = 2.0


@functools.cache
def model_with(projector: str) -> VideoLLM:
    torch.manual_seed(0)
    options = {"num_queries": 8, "width": 32} if projector == "ccam" else {}
    config = VideoLLMConfig(
        encoder=ENCODER,
        projector=projector,
        projector_options=options,
        llm=LLMConfig(hidden_size=32, layers=2, heads=4, kv_heads=2),
        max_length=256,
    )
    return VideoLLM(config).eval()


def tiny(projector: str, structure: str) -> VideoLLM:
    model = model_with(projector)
    model.structure = make_structure(structure)
    return model


def clip(seed: int = 5) -> torch.Tensor:
    return TemporalQA(length=1, frames=8, seed=seed)[0][0]["video"]  # (1, 8, 32, 32), MovingDigits


def offline(model: VideoLLM, video: torch.Tensor, question: str, system=None, steps=5):
    """The offline cut protocol: one conversation about video[0, t], collated and decoded from scratch."""
    item = {"id": "q", "video": video, "conversations": [{"from": "human", "value": "<video>\n" + question}]}
    if system:
        item["system"] = system
    tokens = model.visual_tokens_per_media(video.shape[1], 32, 32)
    batch = ConversationCollator(model.tokenizer, tokens, model.config.max_length, for_generation=True)(
        [item]
    )
    replies, logits = model.generate(batch, steps, use_cache=False, return_logits=True)
    return replies[0], logits[0]


@pytest.mark.parametrize("structure", ["causal", "tc_llava", "concentric"])
def test_cached_stream_equals_a_fresh_run_on_the_cut_video(structure):
    model, video = tiny("mlp", structure), clip()
    stream = OnlineStream(model, fps=FPS, system="You watch a video.")
    assert stream.reuse_cache
    for pushed, chunk in ((2, video[:, :2]), (3, video[:, 2:3]), (8, video[:, 3:])):
        stream.push(chunk)
        prefix = stream.layout.shape[1]
        for question in (QUESTION, "How many times does the 6 appear?"):
            reply, logits = stream.ask(question, max_new_tokens=5, return_logits=True)
            expected, expected_logits = offline(model, video[:, :pushed], question, "You watch a video.")
            assert reply == expected
            torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
            assert stream.layout.shape[1] == prefix  # rolled back to the video prefix


def test_the_answer_at_t_ignores_later_frames():
    model = tiny("mlp", "tc_llava")
    video = clip()
    other = video.clone()
    other[:, 4:] = clip(seed=9)[:, 4:]  # equal up to frame 3 (t = 1.5 s at 2 fps), different after
    streams = [OnlineStream(model, fps=FPS), OnlineStream(model, fps=FPS)]
    answers: dict[int, list] = {0: [], 1: []}
    for frame in range(8):
        for number, source in enumerate((video, other)):
            streams[number].push(source[:, frame : frame + 1])
            answers[number].append(streams[number].ask(QUESTION, max_new_tokens=3, return_logits=True)[1])
    for frame in range(4):
        torch.testing.assert_close(answers[0][frame], answers[1][frame], rtol=0, atol=1e-5)
    for frame in range(4, 8):
        assert (answers[0][frame] - answers[1][frame]).abs().amax() > 1e-4


@pytest.mark.parametrize("projector, structure", [("ccam", "tc_llava"), ("mlp", "modality_mutual")])
def test_structures_that_forbid_reuse_rebuild_from_the_cut_video(projector, structure):
    model, video = tiny(projector, structure), clip()
    reason = why_no_cache_reuse(model)
    assert reason and (structure in reason or projector in reason)
    with pytest.raises(ValueError, match="cannot reuse its cache"):
        OnlineStream(model, fps=FPS, reuse_cache=True)
    stream = OnlineStream(model, fps=FPS)
    assert not stream.reuse_cache
    stream.push(video)
    for t, visible in ((0.0, 1), (1.4, 3), (3.5, 8)):  # frame k is at k / fps
        reply, logits = stream.ask(QUESTION, t=t, max_new_tokens=4, return_logits=True)
        expected, expected_logits = offline(model, video[:, :visible], QUESTION, steps=4)
        assert reply == expected
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


def test_forced_rebuild_equals_the_cached_stream():
    model, video = tiny("mlp", "causal"), clip()
    cached, rebuilt = OnlineStream(model, fps=FPS), OnlineStream(model, fps=FPS, reuse_cache=False)
    for stream in (cached, rebuilt):
        stream.push(video[:, :6])
    assert cached.ask(QUESTION, max_new_tokens=4) == rebuilt.ask(QUESTION, max_new_tokens=4)


def test_stream_errors_name_the_problem():
    model, video = tiny("mlp", "causal"), clip()
    stream = OnlineStream(model, fps=FPS, max_frames=4)
    with pytest.raises(ValueError, match="before any frame"):
        stream.ask(QUESTION)
    stream.push(video[:, :4])
    with pytest.raises(ValueError, match="already in the cache"):
        stream.ask(QUESTION, t=0.5)  # frames up to 1.5 s are cached: the cut needs reuse_cache=False
    with pytest.raises(ValueError, match="at most 4 frames"):
        stream.push(video[:, 4:5])
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        stream.push(video[0])


def test_a_stream_longer_than_the_context_raises_and_stays_usable():
    model, video = tiny("mlp", "causal"), clip()
    stream = OnlineStream(model, fps=FPS, max_frames=64)
    stream.push(video[:, :2])
    with pytest.raises(ValueError, match="more than the context of 256"):
        stream.push(video.repeat(1, 2, 1, 1))  # 16 frames x 16 tokens
    assert stream.frames == 2 and len(stream.ask(QUESTION, max_new_tokens=2)) == 2
