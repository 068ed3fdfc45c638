"""The memory projector (issue #7 item 6 in the video-LLM): a window of recent frames plus memory tokens, from a
Titans neural memory or HCAM over frames (``memory_kind``).

For both memories: frames before the window reach the LLM only through the memory; writing a stream piece by
piece equals writing it whole; a stream keeps the memory's state across questions and still answers like the
offline protocol; a grid that does not match the memory's chunk is named."""

import pytest
import torch
from timeloom_understanding.data import ConversationCollator, TemporalQA
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import QUERY, VISUAL
from timeloom_understanding.memory_projector import MemoryProjector
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.streaming import OnlineStream

pytest.importorskip("timeloom_memory")

WINDOW, READOUT, GRID, POOL = 3, 4, (8, 8), 2  # an 8 x 8 grid pooled by 2: 16 tokens per frame
PER_FRAME = (GRID[0] // POOL) * (GRID[1] // POOL)
LLM_PER_FRAME = 4  # vit_options() on 32 px frames: a 4 x 4 grid, pooled by 2
MEMORY = {  # each kind's options
    "titans": {"heads": 2, "head_dim": 16},
    "hcam": {"heads": 2, "top_k": 8, "detach_memory": False},  # reads train the frame MLP, as in recall
}
KINDS = list(MEMORY)
QUESTION = "Which way does the 4 move?\n(A) left\n(B) right"


def projector(kind: str = "titans") -> MemoryProjector:
    torch.manual_seed(0)
    return MemoryProjector(
        24, 32, PER_FRAME, window_frames=WINDOW, readout_tokens=READOUT, pool=POOL, memory_kind=kind,
        memory=MEMORY[kind],
    )  # fmt: skip


def features(frames: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, frames, GRID[0] * GRID[1], 24, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("frames", [1, 3, 7, 20])
def test_token_count_is_the_readout_plus_the_window_at_any_length(frames, kind):
    model = projector(kind)
    tokens, visual = model(features(frames), GRID)
    shown = min(frames, WINDOW)
    assert tokens.shape == (2, READOUT + shown * PER_FRAME, 32) == (2, model.num_tokens(frames, GRID), 32)
    assert visual.kind.tolist() == [QUERY] * READOUT + [VISUAL] * shown * PER_FRAME
    assert visual.frame.tolist() == [0] * READOUT + [f + 1 for f in range(shown) for _ in range(PER_FRAME)]


@pytest.mark.parametrize("frames", [1, 3, 7])
def test_no_readout_tokens_leaves_the_window_alone_also_before_the_memory_holds_a_frame(frames):
    """``readout_tokens=0`` with HCAM: the window-only baseline of the same projector (no queries read nothing,
    also from an empty memory)."""
    torch.manual_seed(0)
    model = MemoryProjector(24, 32, PER_FRAME, window_frames=WINDOW, readout_tokens=0, pool=POOL,
                            memory_kind="hcam", memory=MEMORY["hcam"])  # fmt: skip
    tokens, visual = model(features(frames), GRID)
    assert tokens.shape == (2, min(frames, WINDOW) * PER_FRAME, 32)
    assert visual.kind.tolist() == [VISUAL] * min(frames, WINDOW) * PER_FRAME


@pytest.mark.parametrize("kind", KINDS)
def test_frames_before_the_window_reach_the_llm_only_through_the_memory(kind):
    model = projector(kind)
    video = features(7)
    changed = video.clone()
    changed[:, 0] = features(1, seed=5)[:, 0]  # frame 0 lies before the 3-frame window
    (before, _), (after, _) = model(video, GRID), model(changed, GRID)
    torch.testing.assert_close(
        before[:, READOUT:], after[:, READOUT:], rtol=0, atol=0
    )  # the window: untouched
    assert (before[:, :READOUT] - after[:, :READOUT]).abs().amax() > 1e-4  # the memory saw it


@pytest.mark.parametrize("kind", KINDS)
def test_writing_the_past_in_pieces_equals_writing_it_whole(kind):
    model = projector(kind)
    video = features(9)
    stream = None
    for start, stop in ((0, 2), (2, 3), (3, 6)):  # the 6 frames before the window, in three pieces
        stream = model.write_past(video[:, start:stop], GRID, stream)
    assert stream.written == 6
    torch.testing.assert_close(model(video, GRID, stream)[0], model(video, GRID)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="holds 6 frames; 4 precede"):
        model(video[:, :7], GRID, stream)


@pytest.mark.parametrize("kind", KINDS)
def test_a_grid_that_does_not_match_the_memory_chunk_is_named(kind):
    with pytest.raises(ValueError, match="gives 4 tokens per frame; this memory was built for 16"):
        projector(kind)(torch.randn(1, 5, 16, 24), (4, 4))


def test_an_unknown_memory_kind_is_named():
    with pytest.raises(ValueError, match="memory_kind must be titans or hcam; got 'lstm'"):
        MemoryProjector(24, 32, PER_FRAME, memory_kind="lstm")


def tiny_llm(structure: str = "causal", kind: str = "titans") -> VideoLLM:
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=vit_options(),
        projector="memory",
        projector_options={
            "tokens_per_frame": LLM_PER_FRAME,
            "window_frames": WINDOW,
            "readout_tokens": READOUT,
            "pool": POOL,
            "memory_kind": kind,
            "memory": MEMORY[kind],
        },  # fmt: skip
        llm=LLMConfig(hidden_size=32, layers=2, heads=4, kv_heads=2),
        structure=structure,
        max_length=256,
    )
    return VideoLLM(config).eval()


def clip(seed: int = 5) -> torch.Tensor:
    return TemporalQA(length=1, frames=8, seed=seed)[0][0]["video"]  # (1, 8, 32, 32), MovingDigits


def conversation_batch(model: VideoLLM, video: torch.Tensor, for_generation: bool) -> dict:
    item = {"id": "q", "video": video, "conversations": [{"from": "human", "value": "<video>\n" + QUESTION}]}
    if not for_generation:
        item["conversations"].append({"from": "gpt", "value": "(B) right"})
    tokens = model.visual_tokens_per_media(video.shape[1], 32, 32)
    collate = ConversationCollator(
        model.tokenizer, tokens, model.config.max_length, for_generation=for_generation
    )
    return collate([item])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("structure", ["causal", "tc_llava"])
def test_the_video_llm_trains_through_the_memory(structure, kind):
    model = tiny_llm(structure, kind).train()
    loss, _ = model.loss(conversation_batch(model, clip(), for_generation=False))
    loss.backward()
    reads = [model.projector.memory.parameters(), [getattr(model.projector, "readout_queries", None)]]
    memory_grads = [p.grad for group in reads for p in group if p is not None and p.requires_grad]
    assert torch.isfinite(loss) and all(g is not None for g in memory_grads)
    assert sum(g.abs().sum() for g in memory_grads) > 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_stream_writes_each_frame_once_and_answers_like_the_offline_protocol(kind):
    model, video = tiny_llm("tc_llava", kind), clip()
    stream = OnlineStream(model, fps=2.0)
    assert not stream.reuse_cache  # the window moves: the LLM prefix is rebuilt, the memory is carried
    for pushed in (2, 5, 8):
        stream.push(video[:, stream.frames : pushed])
        reply, logits = stream.ask(QUESTION, max_new_tokens=4, return_logits=True)
        assert stream.memory.written == max(pushed - WINDOW, 0)
        if kind == "hcam":  # HCAM stores every frame that left the window, once
            assert stream.memory.memory.tokens.shape[1] == stream.memory.written * LLM_PER_FRAME
        batch = conversation_batch(model, video[:, :pushed], for_generation=True)
        expected, expected_logits = model.generate(batch, 4, use_cache=False, return_logits=True)
        assert reply == expected[0]
        torch.testing.assert_close(logits, expected_logits[0], rtol=1e-4, atol=1e-5)
    # A question about an earlier time starts its memory over and leaves the stream's state as it was.
    early, _ = stream.ask(QUESTION, t=1.5, max_new_tokens=4, return_logits=True)
    assert stream.memory.written == 8 - WINDOW
    assert early == model.generate(conversation_batch(model, video[:, :4], True), 4, use_cache=False)[0]
