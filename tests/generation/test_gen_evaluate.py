"""`timeloom evaluate generation` end to end on a micro VDM, and its errors on bad input."""

import json
from importlib.metadata import entry_points

import pytest
import torch
from timeloom_generation import CausalSTDiTConfig, CausalVDM
from timeloom_generation.broadway import broadway_arguments
from timeloom_generation.evaluate import main
from timeloom_generation.judge import DigitsJudge, JudgeConfig

MICRO_VDM = dict(patch=4, width=32, depth=4, heads=2, text_tokens=4)


def save_vdm(path, channels: int = 1):
    torch.manual_seed(0)
    module = CausalVDM(
        CausalSTDiTConfig(in_channels=channels, **MICRO_VDM), text_encoder="vocab", sample_steps=1
    )
    module.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def untrained_judge(tmp_path_factory):
    """Scores need not be good here: these tests check the plumbing, not the model."""
    torch.manual_seed(0)
    return DigitsJudge(JudgeConfig()).save(tmp_path_factory.mktemp("judge"))


def test_the_suite_is_registered():
    assert "generation" in {entry.name for entry in entry_points(group="timeloom.evaluate")}


def test_evaluate_writes_every_setting_side_by_side(tmp_path, untrained_judge):
    out = tmp_path / "out"
    status = main(
        [
            "--checkpoint", str(save_vdm(tmp_path / "vdm")),
            "--judge", str(untrained_judge),
            "--count", "2",
            "--length-factor", "1",
            "--broadway",
            "--broadway-with", "beta0=10,active_fraction=0.4,clamp_negative=1,fme_keys=cached,tau=2",
            "--vstar", "the digit 3 moves left; the digit 3 moves up",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    report = json.loads((out / "results.json").read_text())
    assert list(report["settings"]) == [
        "real (judge ceiling)",
        "real, codec round trip",
        "plain",
        "broadway",
        "broadway beta0=10, active_fraction=0.4, clamp_negative=1, fme_keys=cached, tau=2",
    ]
    # a setting's name gives back its arguments (scripts/generation_broadway_select.py relies on it)
    assert broadway_arguments(
        "beta0=10,active_fraction=0.4,clamp_negative=1,fme_keys=cached,tau=2"
    ) == broadway_arguments(list(report["settings"])[-1].removeprefix("broadway ").replace(", ", ","))
    plain = report["settings"]["plain"]
    assert plain["videos"] == 2 and plain["frames"] == report["frames"] == 9
    assert len(plain["identity_vs_prompt"]["curve"]) == 9 and len(plain["motion_curve"]) == 8
    # the real clips against themselves: 0 up to scipy's sqrtm of a 256x256 product (~1e-6)
    assert report["settings"]["real (judge ceiling)"]["frechet"] == pytest.approx(0.0, abs=1e-5)
    study = report["two_part"]["settings"]
    assert list(study) == ["plain, one caption", "VSTAR synopsis", "VSTAR synopsis + TAR"]
    assert set(study["VSTAR synopsis"]["first_half"]) == {"digit", "direction", "axis", "joint"}
    for name in ("results.md", "identity.png", "two_part.png", "samples.png"):
        assert (out / name).stat().st_size > 0
    assert "| broadway |" in (out / "results.md").read_text()


def test_a_missing_checkpoint_is_named(tmp_path, untrained_judge):
    with pytest.raises(FileNotFoundError, match="nowhere.ckpt"):
        main(["--checkpoint", str(tmp_path / "nowhere.ckpt"), "--judge", str(untrained_judge)])


def test_a_missing_judge_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no trained judge"):
        main(["--checkpoint", str(save_vdm(tmp_path / "vdm")), "--judge", str(tmp_path / "no-judge")])


def test_a_judge_of_another_frame_size_is_refused_before_sampling(tmp_path, untrained_judge):
    with pytest.raises(ValueError, match=r"\(1, 32, 32\).*\(2, 32, 32\)"):
        main(["--checkpoint", str(save_vdm(tmp_path / "vdm", channels=2)), "--judge", str(untrained_judge)])


def test_a_bad_two_part_prompt_is_named(tmp_path, untrained_judge):
    with pytest.raises(ValueError, match="two sub-prompts"):
        main(["--checkpoint", "x", "--judge", str(untrained_judge), "--vstar", "the digit 3 moves left"])
    with pytest.raises(ValueError, match="a dog"):
        main(
            ["--checkpoint", "x", "--judge", str(untrained_judge), "--vstar", "the digit 3 moves left; a dog"]
        )


def test_the_demo_writes_long_videos_a_filmstrip_and_the_evaluation(tmp_path, untrained_judge, capsys):
    from timeloom_generation.demo import main as demo

    out = tmp_path / "demo"
    demo(
        ["--checkpoint", str(save_vdm(tmp_path / "vdm")), "--judge", str(untrained_judge)]
        + ["--count", "2", "--length-factor", "1", "--prompt", "the digit 1 moves up", "--out", str(out)]
    )
    for name in (
        "long_videos.mp4",
        "long_videos.gif",
        "video_0.mp4",
        "filmstrip.png",
        "evaluation/results.json",
    ):
        assert (out / name).stat().st_size > 0
    assert "the generation demo wrote" in capsys.readouterr().out
