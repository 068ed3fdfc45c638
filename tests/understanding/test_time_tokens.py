"""LITA (spec §3.5, §11.8): time tokens ↔ seconds, rendered answers, and the SlowFast projector."""

import random

import pytest
import torch
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import LayoutBuilder, make_structure
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.projectors import SlowFastProjector
from timeloom_understanding.time_tokens import NUM_TIME_TOKENS, event, render, time_of_token, time_token


def test_time_tokens_round_trip_within_half_a_step():
    rng = random.Random(0)
    for _ in range(2000):
        duration = rng.uniform(0.5, 600)
        count = rng.choice([2, 10, NUM_TIME_TOKENS])
        t = rng.uniform(0, duration)
        back = time_of_token(time_token(t, duration, count), duration, count)
        assert abs(back - t) <= duration / (2 * (count - 1)) + 1e-9
    assert time_token(0, 10) == "<t0>" and time_token(10, 10) == "<t99>"
    assert time_token(-3, 10) == "<t0>" and time_token(12, 10) == "<t99>"  # clipped to the video
    assert time_of_token("<t99>", 10) == 10 and time_of_token("<t33>", 9.9) == pytest.approx(3.3)


def test_time_token_errors_name_the_value():
    with pytest.raises(ValueError, match="duration must be positive; got 0"):
        time_token(1, 0)
    with pytest.raises(ValueError, match="'<x3>' is not a time token"):
        time_of_token("<x3>", 10)
    with pytest.raises(ValueError, match="only 10 time tokens"):
        time_of_token("<t10>", 10, count=10)
    with pytest.raises(ValueError, match="ends"):
        event(5, 4, "a digit appears", 10)


def test_rendered_answers_come_back_in_seconds():
    answer = render("the 7 appears at <t33> and leaves at <t99> .", duration=9.9)
    assert answer.text == "the 7 appears at 3.3s and leaves at 9.9s ." and "<t" not in answer.text
    assert answer.timestamps == pytest.approx([3.3, 9.9]) and answer.raw.count("<t") == 2
    assert event(1.0, 3.0, "the 4 moves left", duration=9.9) == "<t10> <t30> the 4 moves left"


ENCODER = vit_options()


def test_video_llm_replies_render_time_tokens():
    torch.manual_seed(0)
    model = VideoLLM(VideoLLMConfig(encoder=ENCODER, llm=LLMConfig(hidden_size=32, layers=1, heads=2)))
    ids = model.tokenizer.encode("from <t0> to <t50>") + [model.tokenizer.eos_id]
    (answer,) = model.render_replies([ids], durations=[4.95])
    assert answer.text == "from 0.0s to 2.5s" and answer.timestamps == pytest.approx([0.0, 2.5])
    assert "<t50>" in answer.raw
    with pytest.raises(ValueError, match="reply 0 holds time tokens"):
        model.render_replies([ids])
    plain = model.tokenizer.encode("left") + [model.tokenizer.eos_id]
    assert model.render_replies([plain])[0].text == "left"


def slowfast_by_loops(projector: SlowFastProjector, features: torch.Tensor, grid) -> torch.Tensor:
    """The definition, token by token: frame means, then s linspace frames average-pooled 2x2."""
    batch, frames, _, channels = features.shape
    height, width = grid
    slow_count = min(projector.slow_frames, frames)
    slow_frames = [
        round(k * (frames - 1) / (slow_count - 1)) if slow_count > 1 else 0 for k in range(slow_count)
    ]
    out = []
    for b in range(batch):
        rows = [features[b, f].mean(0) for f in range(frames)]
        for f in slow_frames:
            frame = features[b, f].reshape(height, width, channels)
            for r in range(0, height, 2):
                for c in range(0, width, 2):
                    rows.append(frame[r : r + 2, c : c + 2].reshape(-1, channels).mean(0))
        out.append(torch.stack(rows))
    return projector.net(torch.stack(out))


@pytest.mark.parametrize("frames, grid", [(1, (2, 2)), (3, (4, 4)), (8, (4, 6)), (13, (2, 4))])
def test_slowfast_tokens_equal_their_definition(frames, grid):
    torch.manual_seed(0)
    projector = SlowFastProjector(in_dim=8, out_dim=12)
    features = torch.randn(2, frames, grid[0] * grid[1], 8)
    tokens, visual = projector(features, grid)
    expected = slowfast_by_loops(projector, features, grid)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)
    assert tokens.shape[1] == projector.num_tokens(frames, grid) == len(visual)
    assert visual.frame[:frames].tolist() == list(range(frames)) and (visual.row[:frames] == -1).all()
    slow = visual.frame[frames:].unique().tolist()
    assert slow == torch.linspace(0, frames - 1, min(4, frames)).round().long().tolist()


def test_slowfast_lita_token_count_and_structures():
    assert SlowFastProjector(8, 8).num_tokens(100, (16, 16)) == 100 + 256  # LITA: 356 tokens
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER,
        projector="slowfast",
        llm=LLMConfig(hidden_size=32, layers=1, heads=2),
        structure="tc_llava",
    )
    model = VideoLLM(config).eval()
    video = torch.rand(1, 1, 6, 32, 32) * 2 - 1
    tokens, visual = model.encode_media(video)
    assert tokens.shape == (1, 6 + 4 * 4, 32) == (1, model.visual_tokens_per_media(6, 32, 32), 32)
    model.structure = make_structure("concentric")
    assert (visual.row < 0).sum() == 6  # the fast tokens have no grid
    layout = LayoutBuilder().text(2, 1).media(visual).text(3, 1).build()
    with pytest.raises(ValueError, match="SlowFast's fast tokens have none"):
        model.structure.position_ids(layout)
