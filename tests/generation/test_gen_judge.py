"""The judge and the generation metrics (spec §9, §11.9) on hand-made clips."""

import pytest
import torch
from timeloom_generation.judge import (
    DigitsJudge,
    JudgeConfig,
    JudgeFeatures,
    PixelFeatures,
    digit_clips,
    frechet_distance,
    identity_curves,
    motion_labels,
    motion_magnitude,
    parse_caption,
    prompt_scores,
    train_judge,
)

from timeloom.data import MovingDigits

# A short schedule (the default is 1000 steps on 2048 clips): position and motion are learnt by then,
# identity only in part; the full schedule's bar is the slow test below.
SHORT_STEPS, SHORT_CLIPS = 250, 1024


@pytest.fixture(scope="module")
def judge() -> DigitsJudge:
    return train_judge(steps=SHORT_STEPS, clips=SHORT_CLIPS, test_clips=128, progress=False)


@pytest.fixture(scope="module")
def real_clips() -> dict:
    """Clips of a seed and glyphs neither the judge nor the VDMs train on."""
    return digit_clips(JudgeConfig(), 32, 9, seed=777, split="test")


def prompts_of(clips: dict) -> list[tuple[int, str]]:
    directions = JudgeConfig().directions
    return [(int(d), directions[int(w)]) for d, w in zip(clips["digit"], clips["direction"])]


def test_parse_caption_reads_moving_digits_captions_and_names_bad_ones():
    caption = MovingDigits(frames=3, num_digits=1, directions="cardinal", length=1)[0]["caption"]
    digit, direction = parse_caption(caption)
    assert caption == f"the digit {digit} moves {direction}"
    with pytest.raises(ValueError, match="a cat walks"):
        parse_caption("a cat walks")


def test_motion_labels_follow_the_displacement_and_leave_tiny_steps_unlabelled():
    config = JudgeConfig()  # right, up, left, down; y grows downwards
    steps = torch.tensor([[2.0, 0.1], [0.0, -1.5], [-3.0, 0.0], [0.2, 1.0], [0.1, -0.2]])
    assert motion_labels(steps, config).tolist() == [0, 1, 2, 3, -1]


@pytest.mark.slow
def test_the_judge_is_near_perfect_on_held_out_real_clips():
    accuracy = train_judge(progress=False).config.accuracy  # the default schedule: about 3 minutes
    assert accuracy["identity"] >= 0.95, accuracy
    assert accuracy["motion_pairs"] >= 0.95, accuracy
    assert accuracy["centre_error_px"] < 1.0, accuracy
    # the clip-level scores of `timeloom evaluate generation` on real clips: its ceiling
    assert accuracy["clip_digit"] >= 0.95 and accuracy["clip_axis"] >= 0.95, accuracy


def test_a_short_schedule_already_locates_the_digit_and_its_motion(judge):
    accuracy = judge.config.accuracy
    assert accuracy["motion_pairs"] >= 0.95, accuracy
    assert accuracy["centre_error_px"] < 1.5, accuracy
    assert accuracy["identity"] >= 0.5, accuracy  # 0.1 is chance


def test_real_clips_score_high_and_noise_or_shuffled_pixels_low(judge, real_clips):
    prompts = prompts_of(real_clips)
    real = judge.judge(real_clips["video"])
    scores = {k: v.mean().item() for k, v in prompt_scores(real, prompts, judge.config.motions).items()}
    curves = identity_curves(real, [d for d, _ in prompts])
    assert scores["axis"] >= 0.9 and scores["direction"] >= 0.8 and scores["digit"] >= 0.5, scores
    assert curves["first"].mean() >= 0.6 and curves["prompt"].mean() >= 0.5

    video = real_clips["video"]
    noise = torch.rand_like(video) * 2 - 1
    generator = torch.Generator().manual_seed(0)
    shuffled = video.flatten(3)[..., torch.randperm(32 * 32, generator=generator)].view_as(video)
    for fake in (noise, shuffled):
        verdict = judge.judge(fake)
        fake_scores = prompt_scores(verdict, prompts, judge.config.motions)
        assert fake_scores["digit"].mean() < 0.4
        assert fake_scores["joint"].mean() < 0.2
        assert identity_curves(verdict, [d for d, _ in prompts])["prompt"].mean() < 0.4


def test_motion_magnitude_is_zero_on_a_static_clip_and_matches_the_metadata_on_real_ones(judge, real_clips):
    video = real_clips["video"]
    static = video[:, :, :1].expand_as(video)
    assert motion_magnitude(judge.judge(static)).abs().max().item() == 0.0
    true = (real_clips["centre"][:, 1:] - real_clips["centre"][:, :-1]).norm(dim=-1).mean()
    judged = motion_magnitude(judge.judge(video)).mean()
    assert judged == pytest.approx(true.item(), rel=0.2)


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_corruption(judge):
    features = JudgeFeatures(judge)
    # 96 clips x 9 frames: the estimate's bias between two real sets shrinks with N (256-d features)
    video = digit_clips(JudgeConfig(), 96, 9, seed=777, split="test")["video"]
    real = features(video)
    assert abs(frechet_distance(real, real)) < 1e-6 * real.pow(2).sum(1).mean().item()
    other = features(digit_clips(JudgeConfig(), 96, 9, seed=778, split="test")["video"])
    generator = torch.Generator().manual_seed(0)
    shuffled = features(video.flatten(3)[..., torch.randperm(32 * 32, generator=generator)].view_as(video))
    # per-frame features cannot see a frame order, so the corruption shuffles pixels within frames
    assert frechet_distance(real, other) * 5 < frechet_distance(real, shuffled)
    pixels = PixelFeatures()
    assert frechet_distance(pixels(video), pixels(video)) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(real, pixels(video))


def test_the_judge_saves_loads_and_names_a_wrong_frame_size(judge, tmp_path, real_clips):
    judge.save(tmp_path / "judge")
    loaded = DigitsJudge.load(tmp_path / "judge")
    assert loaded.config == judge.config
    sample = real_clips["video"][:2]
    assert torch.equal(loaded.judge(sample)["centre"], judge.judge(sample)["centre"])
    with pytest.raises(ValueError, match=r"\(1, 32, 32\)"):
        judge.judge(torch.zeros(1, 3, 4, 32, 32))
    with pytest.raises(FileNotFoundError, match="no trained judge"):
        DigitsJudge.load(tmp_path / "missing")
