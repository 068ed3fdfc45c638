"""Video memory (issue #7 item 6): state persists across clips and questions, pieces == whole, the long-video
recall task's answers match its construction, and a plain window cannot see the answer."""

import pytest
import torch
from timeloom_memory.neural_memory import NeuralMemoryConfig
from timeloom_memory.video import (
    HCAMVideoMemory,
    VideoMemory,
    VideoMemoryConfig,
    VideoRecallConfig,
    VideoRecallModel,
    frame_time_code,
)
from timeloom_memory.video_tasks import QUESTIONS, LongVideoRecall, LongVideoRecallDataModule

from timeloom.data.moving_digits import MovingDigits


def tiny_memory(**overrides) -> VideoMemory:
    torch.manual_seed(0)
    memory = NeuralMemoryConfig(heads=2, head_dim=8, depth=2, expansion=2, surprise_clip=1.0)
    config = VideoMemoryConfig(dim=16, tokens_per_frame=4, readout_tokens=3, memory=memory, **overrides)
    return VideoMemory(config).double()


def frames(batch=2, count=6, seed=1) -> torch.Tensor:
    return torch.randn(
        batch, count, 4, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64
    )


def assert_same_state(a, b):
    for name, tensor in a.tensors().items():
        torch.testing.assert_close(tensor, b.tensors()[name], rtol=0, atol=1e-10, msg=name)
    assert a.position == b.position


def test_writing_clip_by_clip_equals_writing_the_whole_stream():
    memory, video = tiny_memory(), frames(count=7)
    whole = memory.write(video, memory.init_state(2, dtype=torch.float64))
    state = memory.init_state(2, dtype=torch.float64)
    for start, end in [(0, 1), (1, 4), (4, 5), (5, 7)]:  # uneven clips, one of a single frame
        state = memory.write(video[:, start:end], state)
    assert_same_state(state, whole)
    torch.testing.assert_close(memory.read(state), memory.read(whole), rtol=0, atol=1e-10)


def test_state_persists_across_clips_and_reading_does_not_change_it():
    memory, video = tiny_memory(), frames()
    questions = torch.randn(2, 2, 16, dtype=torch.float64)
    state = memory.write(video[:, :3])
    before = {name: t.clone() for name, t in state.tensors().items()}
    first = memory.read(state, questions)
    again = memory.read(state, questions)
    for name, tensor in state.tensors().items():
        assert torch.equal(tensor, before[name]), f"read changed {name}"
    torch.testing.assert_close(first, again, rtol=0, atol=0)  # asking twice gives the same answer
    assert first.shape == (2, 3 + 2, 16)
    later = memory.write(video[:, 3:], state)
    assert later.position == 6 * 4
    assert not torch.allclose(memory.read(later, questions), first)  # the new clip is remembered


def test_forward_reads_the_past_before_writing_the_clip():
    memory, video = tiny_memory(), frames()
    past = memory.write(video[:, :3])
    tokens, state = memory(video[:, 3:], past)
    torch.testing.assert_close(tokens, memory.read(past), rtol=0, atol=0)
    assert_same_state(state, memory.write(video[:, 3:], past))


def test_time_code_is_the_frame_index_in_the_stream():
    coded, video = tiny_memory(), frames(count=5)
    plain = tiny_memory(time_code=False)
    plain.load_state_dict(coded.state_dict())
    state = coded.write(video[:, 2:], coded.write(video[:, :2]))  # frames 2..4 coded as 2..4, not 0..2
    expected = plain.write(video + frame_time_code(torch.arange(5), 16).double()[:, None])
    assert_same_state(state, expected)
    codes = frame_time_code(torch.arange(64), 16)
    assert torch.cdist(codes, codes).add(torch.eye(64)).min() > 0.01  # every frame index keyed apart


def test_reset_restarts_chosen_streams_and_save_load_round_trips(tmp_path):
    memory, video = tiny_memory(), frames(count=5)
    state = memory.write(video)
    restarted = memory.reset(state, torch.tensor([True, False]))
    fresh = memory.write(video[:1, 2:], memory.init_state(1, dtype=torch.float64))
    carried = memory.write(video[:, 2:], restarted)
    # sample 0 forgot its first 5 frames; sample 1 kept them
    torch.testing.assert_close(memory.read(carried)[1:], memory.read(memory.write(video[:, 2:], state))[1:])
    assert not torch.allclose(memory.read(carried)[:1], memory.read(memory.write(video[:, 2:], state))[:1])
    assert fresh.position == 3 * 4
    path = memory.save(state, tmp_path / "video-memory.safetensors")
    loaded = memory.load(path)
    assert_same_state(loaded, state)
    torch.testing.assert_close(memory.read(loaded), memory.read(state), rtol=0, atol=0)


def test_bad_frames_name_the_expected_shape():
    memory = tiny_memory()
    with pytest.raises(ValueError, match=r"frames \(B, T, 4, 16\)"):
        memory.write(torch.zeros(2, 3, 5, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="even dim"):
        VideoMemoryConfig(dim=15)


# ---- HCAM over frames ---------------------------------------------------------------------------------------
def test_hcam_video_memory_keeps_every_frame_and_reading_leaves_it_unchanged():
    torch.manual_seed(0)
    memory, video = HCAMVideoMemory(dim=16, tokens_per_frame=4, heads=2, top_k=6).double(), frames(count=6)
    whole = memory.write(video)
    pieces = memory.write(video[:, 3:], memory.write(video[:, :3]))  # frames 3..5 coded as 3..5
    torch.testing.assert_close(pieces.tokens, whole.tokens, rtol=0, atol=0)
    coded = video + frame_time_code(torch.arange(6), 16).double()[:, None]
    torch.testing.assert_close(whole.tokens, coded.flatten(1, 2), rtol=0, atol=0)  # nothing forgotten
    questions = torch.randn(2, 2, 16, dtype=torch.float64)
    before = whole.tokens.clone()
    first = memory.read(whole, questions)
    assert first.shape == (2, 2, 16) and torch.equal(whole.tokens, before)
    # a read reaches the first frame of the stream (top_k covers every frame here)
    changed = video.clone()
    changed[:, 0] += 1.0
    assert not torch.allclose(memory.read(memory.write(changed), questions), memory.read(whole, questions))
    with pytest.raises(ValueError, match=r"frames \(B, T, 4, 16\)"):
        memory.write(torch.zeros(2, 3, 5, 16, dtype=torch.float64))
    # more queries than a frame's tokens: each query reads alone, as if asked by itself
    many = torch.randn(2, 9, 16, dtype=torch.float64)
    alone = torch.cat([memory.read(whole, many[:, i : i + 1]) for i in range(9)], dim=1)
    torch.testing.assert_close(memory.read(whole, many), alone, rtol=0, atol=1e-12)


# ---- the long-video recall task ---------------------------------------------------------------------------
def test_answers_are_the_digits_of_the_first_and_last_clips():
    data = LongVideoRecall(clips=5, frames_per_clip=3, size=16, length=12, seed=4, split="val")
    digits = MovingDigits(size=16, frames=3, num_digits=1, speed=(0.5, 1.5), length=60, seed=4, split="val")
    for i in range(len(data)):
        item = data[i]
        assert item["video"].shape == (1, 15, 16, 16)
        for c in range(5):  # every clip is the MovingDigits item it is built from, in order
            clip = digits[i * 5 + c]
            assert torch.equal(item["video"][:, 3 * c : 3 * c + 3], clip["video"])
            assert item["clip_labels"][c] == clip["meta"]["labels"][0]
        first, last = item["answers"].tolist()
        assert item["questions"].tolist() == [0, 1]
        assert first == item["clip_labels"][0] and last == item["clip_labels"][-1]
        assert item["caption"] == f"which digit appeared first? {first}. which digit appeared last? {last}."


def test_datamodule_batches_and_rejects_bad_tasks():
    module = LongVideoRecallDataModule(clips=4, frames_per_clip=2, size=16, train_length=8, batch_size=4)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["video"].shape == (4, 1, 8, 16, 16) and batch["answers"].shape == (4, 2)
    with pytest.raises(ValueError, match="clips ≥ 2"):
        LongVideoRecall(clips=1)
    with pytest.raises(ValueError, match="questions"):
        LongVideoRecall(questions=("middle",))
    assert list(QUESTIONS) == ["first", "last"]


def test_cached_videos_are_the_videos_drawn_without_the_cache():
    drawn = LongVideoRecall(clips=3, length=5, seed=2)
    cached = LongVideoRecall(clips=3, length=5, seed=2, cache=True)
    for i in (0, 3, 0):  # the second visit of 0 comes from the cache
        assert (
            torch.equal(cached[i]["video"], drawn[i]["video"]) and cached[i]["caption"] == drawn[i]["caption"]
        )
    assert sorted(cached.cached) == [0, 3] and drawn.cached is None
    module = LongVideoRecallDataModule(clips=3, train_length=8, batch_size=4)
    assert module.dataset("train").cached == {}  # the data module caches by default


# the memories of the recall model: Titans read by learned readout tokens or by the questions, and HCAM
MEMORIES = {
    "titans": {"memory_kind": "titans"},
    "titans-question": {"memory_kind": "titans", "question_read": True, "readout_tokens": 0},
    "hcam": {"memory_kind": "hcam"},
}


def recall_model(
    use_memory: bool, memory_kind: str = "titans", readout_tokens: int = 2, **overrides
) -> VideoRecallModel:
    torch.manual_seed(0)
    memory = VideoMemoryConfig(readout_tokens=readout_tokens, memory=NeuralMemoryConfig(heads=2, head_dim=8))
    config = VideoRecallConfig(size=16, patch=8, frames_per_clip=2, dim=16, window_clips=2, use_memory=use_memory,
                               memory_kind=memory_kind, memory=memory, **{"hcam_top_k": 2, **overrides})  # fmt: skip
    return VideoRecallModel(config).eval()


@pytest.mark.parametrize("detach", [True, False])
def test_hcam_stop_gradient_decides_whether_the_first_question_trains_the_frame_encoder(detach):
    # The first clip is outside the window: only the HCAM read reaches it. With HCAM's stop-gradient the
    # "first" question's loss leaves the first clip's pixels (and so the encoder's view of them) untouched.
    data = LongVideoRecall(clips=6, frames_per_clip=2, size=16, length=2)
    video = torch.stack([data[i]["video"] for i in range(2)]).requires_grad_(True)
    questions = torch.stack([data[i]["questions"] for i in range(2)])
    model = recall_model(use_memory=True, memory_kind="hcam", hcam_top_k=12, hcam_detach_memory=detach)
    logits = model(video, questions)
    first = questions[0].tolist().index(list(QUESTIONS).index("first"))
    logits[:, first].square().sum().backward()
    reached_first_clip = video.grad[:, :, :2].abs().sum() > 0
    assert reached_first_clip == (not detach)
    assert video.grad[:, :, -4:].abs().sum() > 0  # the window's frames always get a gradient


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_a_plain_window_cannot_see_the_first_clip_and_the_memory_does(memory):
    data = LongVideoRecall(clips=6, frames_per_clip=2, size=16, length=40)
    item = data[0]
    other = next(data[i] for i in range(1, 40) if data[i]["clip_labels"][0] != item["clip_labels"][0])
    swapped = item["video"].clone()
    swapped[:, :2] = other["video"][:, :2]  # another first clip: the answer to "first" changes
    videos, questions = torch.stack([item["video"], swapped]), torch.stack([item["questions"]] * 2)
    window, memory = recall_model(use_memory=False), recall_model(use_memory=True, **MEMORIES[memory])
    with torch.no_grad():
        seen_by_window, seen_by_memory = window(videos, questions), memory(videos, questions)
    torch.testing.assert_close(seen_by_window[0], seen_by_window[1], rtol=0, atol=0)
    assert not torch.allclose(seen_by_memory[0], seen_by_memory[1])


@pytest.mark.parametrize("memory", list(MEMORIES))
def test_recall_model_streams_its_memory_across_calls_and_trains_it(memory):
    data = LongVideoRecall(clips=6, frames_per_clip=2, size=16, length=4)
    videos = torch.stack([data[i]["video"] for i in range(4)])
    questions = torch.stack([data[i]["questions"] for i in range(4)])
    model = recall_model(use_memory=True, **MEMORIES[memory])
    _, state = model.stream(videos[:, :, :6], questions)  # the first three clips, then the rest
    logits, _ = model.stream(videos[:, :, 6:], questions, state)
    torch.testing.assert_close(logits, model(videos, questions), rtol=1e-5, atol=1e-6)
    torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), torch.stack([data[i]["answers"] for i in range(4)]).flatten()
    ).backward()
    for name, parameter in model.memory.named_parameters():
        if parameter.numel():  # readout_tokens=0 leaves no learned queries
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_a_titans_memory_that_nothing_reads_is_named():
    with pytest.raises(ValueError, match="readout_tokens=0 needs question_read"):
        recall_model(use_memory=True, readout_tokens=0)
