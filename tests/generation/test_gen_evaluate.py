"""`timeloom evaluate generation` end to end on a micro VDM, and its errors on bad input."""

import importlib.util
import json
from importlib.metadata import entry_points
from pathlib import Path

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


def test_the_selection_script_pools_a_setting_over_the_runs_that_made_it(tmp_path):
    """Two runs of one setting, each paired with its own plain: pooled motion is the ratio of the pooled means
    and identity the mean per-video change, over all videos together."""
    spec = importlib.util.spec_from_file_location(
        "select", Path(__file__).parents[2] / "scripts" / "generation_broadway_select.py"
    )
    select = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(select)
    runs = [  # (plain motion, setting motion, plain identity, setting identity) per video
        [(2.0, 2.5, 0.5, 0.4), (2.0, 2.3, 0.3, 0.3)],
        [(1.0, 1.3, 0.2, 0.25), (3.0, 3.3, 0.6, 0.5), (2.0, 2.6, 0.4, 0.4)],
    ]
    paths = []
    for index, videos in enumerate(runs):
        plain = {"motion_px": [v[0] for v in videos], "identity_vs_prompt": [v[2] for v in videos]}
        entry = {"motion_px": [v[1] for v in videos], "identity_vs_prompt": [v[3] for v in videos]}
        settings = {"plain": {"per_video": plain}, "broadway x=1": {"per_video": entry}}
        if index:
            settings["broadway once"] = {"per_video": entry}  # in one run only: not pooled
        paths.append(tmp_path / f"run{index}.json")
        paths[-1].write_text(json.dumps({"settings": settings}))
    pooled = select.pooled(paths)
    assert list(pooled) == ["broadway x=1"]
    everything = [v for videos in runs for v in videos]
    assert pooled["broadway x=1"]["videos"] == 5
    motion = sum(v[1] for v in everything) / sum(v[0] for v in everything)
    assert pooled["broadway x=1"]["motion"] == pytest.approx(motion)
    identity = 100 * sum(v[3] - v[2] for v in everything) / 5
    assert pooled["broadway x=1"]["identity"] == pytest.approx(identity)
