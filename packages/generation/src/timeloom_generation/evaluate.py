"""`timeloom evaluate generation`: how well a trained `CausalVDM` follows prompts over long rollouts (spec §9).

    timeloom evaluate generation --checkpoint CKPT_OR_EXPORT [--judge runs/judge] [--count 64]
        [--length-factor 4] [--broadway] [--broadway-with "beta0=10,active_fraction=0.4" ...] [--tar]
        [--vstar "the digit 3 moves left; the digit 3 moves up"]
        [--study all|prompts|two-part] [--from-real-frame] [--features judge|pixels] [--steps S]
        [--guidance W] [--seed 0] [--prompt-seed 4242] [--out DIR]

The prompts are the captions of ``--count`` MovingDigits test clips (one digit, the judge's directions) and
every rollout is ``--length-factor`` times the VDM's training length. Each setting (the plain sampler, then
each plug-in asked for) draws the same noise, so their differences are the plug-ins'. A `DigitsJudge`
scores the decoded videos: prompt accuracy (digit, first-step direction, share of steps on the prompted
axis), identity per frame index against the prompt and against frame 0 (drift), motion magnitude (judged
centre, px/frame), subject consistency and a Fréchet distance to the real clips with a pluggable feature
extractor. The real clips are scored too: the judge's ceiling. ``--vstar "p1; p2"`` adds the two-part prompt
study: the plain sampler given one caption ("p1, then p2") against VSTAR's synopsis prompting (p1 anchored at
the first frame, p2 at the last) without and with its attention regularisation, scored per half.

Writes ``results.json``, ``results.md``, ``identity.png``, ``two_part.png`` and ``samples.png`` under ``--out``;
``--wandb`` logs them to an (offline without a key) W&B run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from timeloom_kernels import clear_processors, set_processor  # noqa: E402
from torch import Tensor  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from timeloom.data import MovingDigits  # noqa: E402
from timeloom_generation.broadway import BroadWay, broadway_arguments  # noqa: E402
from timeloom_generation.commands import load_vdm  # noqa: E402
from timeloom_generation.judge import (  # noqa: E402
    DigitsJudge,
    FeatureExtractor,
    JudgeFeatures,
    PixelFeatures,
    axis_of,
    frechet_distance,
    identity_curves,
    motion_magnitude,
    parse_caption,
    prompt_scores,
    subject_consistency,
    train_judge,
)
from timeloom_generation.module import CausalVDM  # noqa: E402
from timeloom_generation.vstar import TemporalAttentionRegularization  # noqa: E402

__all__ = ["Setting", "check_sizes", "main", "rollouts", "score"]

DEFAULT_JUDGE = Path("runs/judge")
# Real clips come from this seed of the test split: the VDM's configs train on seed 0, the judge on 90210/1.
# Another `--prompt-seed` gives a disjoint prompt set (e.g. to choose plug-in settings on one, report on this).
REAL_SEED = 4242


@dataclass
class Setting:
    """One way of sampling: the prompts (a caption or sub-prompts per video) and the plug-ins on."""

    name: str
    prompts: list[str | list[str]]
    broadway: dict[str, float | bool | str | list[int]] | None = (
        None  # `BroadWay` arguments beside the depth; None: off
    )
    tar: bool = False


def check_sizes(module: CausalVDM, judge: DigitsJudge) -> None:
    """The VDM must decode to the frames the judge reads (channels and size): checked on a one-frame probe."""
    size = judge.config.size
    try:
        _, height, width = module.codec.latent_shape(1, size, size)
        probe = module.codec.decode(torch.zeros(1, module.config.in_channels, 1, height, width))
    except Exception as error:
        raise ValueError(
            f"the VDM's codec cannot make {size}x{size} frames for the judge: {error}"
        ) from error
    judged = (judge.config.channels, size, size)
    if (probe.shape[1], *probe.shape[3:]) != judged:
        raise ValueError(
            f"the judge scores frames of (channels, height, width) = {judged}, but the VDM decodes to "
            f"{(probe.shape[1], *probe.shape[3:])}: train a judge of that size (python -m "
            "timeloom_generation.judge --size ... --channels ...)"
        )


def attach(module: CausalVDM, setting: Setting) -> None:
    """Exactly the setting's plug-ins on the denoiser's temporal layers (none left from an earlier setting)."""
    denoiser = module.model["denoiser"]
    clear_processors(denoiser)
    if setting.broadway is not None:
        BroadWay(depth=module.config.depth, **setting.broadway).attach(denoiser)
    if setting.tar:
        set_processor(denoiser, "blocks.*.temporal.attend", TemporalAttentionRegularization())


def rollouts(
    module: CausalVDM,
    setting: Setting,
    *,
    frames: int,
    size: int,
    batch_size: int,
    seed: int,
    given: Tensor | None = None,
    **sampler: float | int,
) -> Tensor:
    """Decoded videos ``(N, C, T, H, W)`` of ``frames`` latent frames, ``batch_size`` at a time; batch ``b``
    uses seed ``seed + b``, so every setting draws the same noise for the same video."""
    attach(module, setting)
    _, height, width = module.codec.latent_shape(1, size, size)
    videos = []
    starts = range(0, len(setting.prompts), batch_size)
    for batch, start in enumerate(tqdm(starts, desc=f"generate {setting.name}")):
        prompts = setting.prompts[start : start + batch_size]
        latents = module.generate(
            prompts,
            frames=frames,
            given=None if given is None else given[start : start + batch_size],
            grid=(height, width),
            seed=seed + batch,
            **sampler,
        )
        videos.append(module.codec.decode(latents).cpu())
    clear_processors(module.model["denoiser"])
    return torch.cat(videos)


def mean_ci(values: Tensor) -> dict[str, float]:
    """Mean and a normal-approximation 95% interval half-width over videos."""
    values = values.double()
    half = 1.96 * values.std().item() / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return {"mean": values.mean().item(), "ci95": half}


def score(
    videos: Tensor,
    prompts: list[tuple[int, str]],
    judge: DigitsJudge,
    window: int,
    extractor: FeatureExtractor,
    real_features: Tensor,
) -> dict:
    """Every metric of one setting; ``window`` is the training length in (decoded) frames."""
    verdict = judge.judge(videos)
    motions = judge.config.motions
    frames = videos.shape[2]
    curves = identity_curves(verdict, [digit for digit, _ in prompts])
    prompted = torch.tensor([digit for digit, _ in prompts])[:, None]
    motion = motion_magnitude(verdict)
    first, last = slice(0, window), slice(frames - window, frames)
    moved = verdict["centre"][:, 1:] - verdict["centre"][:, :-1]
    return {
        "videos": len(videos),
        "frames": frames,
        "prompt_first_window": {
            k: v.mean().item() for k, v in prompt_scores(verdict, prompts, motions, first).items()
        },
        "prompt_whole": {k: v.mean().item() for k, v in prompt_scores(verdict, prompts, motions).items()},
        "identity_vs_prompt": {
            "mean": curves["prompt"].mean().item(),
            "start": curves["prompt"][first].mean().item(),
            "end": curves["prompt"][last].mean().item(),
            "curve": curves["prompt"].tolist(),
        },
        "identity_vs_first_frame": {
            "start": curves["first"][first].mean().item(),
            "end": curves["first"][last].mean().item(),
            "curve": curves["first"].tolist(),
        },
        "motion_px": mean_ci(motion),
        "motion_px_first_window": moved[:, : window - 1].norm(dim=-1).mean().item(),
        "motion_px_last_window": moved[:, -(window - 1) :].norm(dim=-1).mean().item(),
        "motion_curve": moved.norm(dim=-1).mean(0).tolist(),
        "still_share": (verdict["motion"] == motions.index("still")).float().mean().item(),
        "subject_consistency": subject_consistency(verdict["features"]).mean().item(),
        "frechet": frechet_distance(real_features, extractor(videos)),
        # per video, for paired intervals between settings (the same prompts and noise)
        "per_video": {
            "identity_vs_prompt": (verdict["digit"] == prompted).float().mean(1).tolist(),
            "motion_px": motion.tolist(),
        },
    }


def paired_change(entry: dict, baseline: dict, key: str) -> dict[str, float]:
    """Mean per-video difference ``entry − baseline`` of ``per_video[key]`` and its 95% interval half-width."""
    return mean_ci(torch.tensor(entry["per_video"][key]) - torch.tensor(baseline["per_video"][key]))


def two_part_scores(videos: Tensor, parts: list[tuple[int, str]], judge: DigitsJudge) -> dict:
    """Per half of the rollout, the prompt scores against that half's sub-prompt, and the per-pair share of
    motion along each half's axis (a curve over frame pairs)."""
    verdict = judge.judge(videos)
    frames, count = videos.shape[2], len(videos)
    halves = (slice(0, frames // 2), slice(frames // 2, frames))
    result = {}
    for name, half, part in zip(("first_half", "second_half"), halves, parts):
        scores = prompt_scores(verdict, [part] * count, judge.config.motions, half)
        result[name] = {k: mean_ci(v) for k, v in scores.items()}
    axes = [[judge.config.motions[int(m)] for m in row] for row in verdict["motion"]]
    for (_, direction), key in zip(parts, ("axis_curve_first", "axis_curve_second")):
        wanted = axis_of(direction)
        result[key] = (
            torch.tensor([[axis_of(m) == wanted for m in row] for row in axes]).float().mean(0).tolist()
        )
    return result


# -- figures and report -------------------------------------------------------------------------------------
def plot_identity(results: dict, path: Path) -> None:
    figure, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    for name, entry in results.items():
        axes[0].plot(entry["identity_vs_prompt"]["curve"], label=name)
        axes[1].plot(entry["identity_vs_first_frame"]["curve"], label=name)
        axes[2].plot(entry["motion_curve"], label=name)
    titles = ("judged digit = prompted digit", "judged digit = frame 0's", "judged motion (px/frame)")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("frame index")
    axes[0].set_ylim(0, 1.02)
    axes[1].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_two_part(results: dict, parts: list[str], path: Path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for name, entry in results.items():
        axes[0].plot(entry["axis_curve_first"], label=name)
        axes[1].plot(entry["axis_curve_second"], label=name)
    for ax, part in zip(axes, parts):
        ax.set_title(f"share of steps on the axis of\n{part!r}", fontsize=9)
        ax.set_xlabel("frame pair")
        ax.axvline(len(entry["axis_curve_first"]) / 2, color="grey", lw=0.8, ls="--")
    axes[0].set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_samples(samples: dict[str, tuple[Tensor, str]], path: Path, shown: int = 12) -> None:
    """One filmstrip row per setting (its first video), ``shown`` frames spread over the rollout."""
    rows = len(samples)
    figure, axes = plt.subplots(rows, shown, figsize=(0.9 * shown, 1.1 * rows + 0.3), squeeze=False)
    for row, (name, (video, caption)) in zip(axes, samples.items()):
        picks = torch.linspace(0, video.shape[1] - 1, shown).round().long()
        for ax, frame in zip(row, picks.tolist()):
            image = ((video[:, frame].float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).squeeze(-1)
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(str(frame), fontsize=6)
        row[0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
        row[0].set_title(caption, fontsize=7, loc="left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(report: dict) -> str:
    held_out = {k: round(v, 3) for k, v in report["judge_accuracy"].items() if isinstance(v, float)}
    lines = [
        "# Generation evaluation",
        "",
        f"Checkpoint `{report['checkpoint']}`, judge `{report['judge']}` (held-out: {json.dumps(held_out)}).",
        f"{report['count']} rollouts per setting of {report['latent_frames']} latent frames "
        f"({report['length_factor']}x the training length), noise seed {report['seed']}, prompts from test clips "
        f"of seed {report['prompt_seed']}, sampler {report['sampler']}.",
    ]
    if "settings" in report:
        lines += prompted_markdown(report)
    if "two_part" in report:
        lines += two_part_markdown(report["two_part"])
    return "\n".join(lines) + "\n"


def prompted_markdown(report: dict) -> list[str]:
    lines = [
        "",
        f"## Prompted rollouts ({report['frames']} decoded frames; windows of {report['window']}; "
        f"Fréchet features `{report['features']}`)",
        "",
        "| setting | digit | direction | axis | joint | identity start → end (ratio) | vs frame 0 end "
        "| motion px/frame | first → last window | still | subject cons. | FD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in report["settings"].items():
        p, i = e["prompt_first_window"], e["identity_vs_prompt"]
        ratio = i["end"] / i["start"] if i["start"] else float("nan")
        lines.append(
            f"| {name} | {p['digit']:.3f} | {p['direction']:.3f} | {p['axis']:.3f} | {p['joint']:.3f} "
            f"| {i['start']:.3f} → {i['end']:.3f} ({ratio:.2f}) | {e['identity_vs_first_frame']['end']:.3f} "
            f"| {e['motion_px']['mean']:.2f} ± {e['motion_px']['ci95']:.2f} "
            f"| {e['motion_px_first_window']:.2f} → {e['motion_px_last_window']:.2f} | {e['still_share']:.2f} "
            f"| {e['subject_consistency']:.3f} | {e['frechet']:.2f} |"
        )
    lines += [
        "",
        "Prompt scores are over the first training-length window; *direction* is the first judged step, "
        "*axis* the share of steps on the prompted axis (MovingDigits bounces). Changes against plain: ± is the "
        "95% interval of the per-video paired difference (same prompts, same noise).",
    ]
    plain = report["settings"]["plain"]
    for name, entry in report["settings"].items():
        if name == "plain" or name.startswith("real"):
            continue
        scale = max(plain["motion_px"]["mean"], 1e-8)
        motion = paired_change(entry, plain, "motion_px")
        identity = paired_change(entry, plain, "identity_vs_prompt")
        consistency = 100 * (
            entry["identity_vs_first_frame"]["end"] - plain["identity_vs_first_frame"]["end"]
        )
        lines.append(
            f"- {name} vs plain: motion x{entry['motion_px']['mean'] / scale:.2f} "
            f"(± {motion['ci95'] / scale:.2f}), identity vs prompt (whole rollout) {100 * identity['mean']:+.1f} "
            f"± {100 * identity['ci95']:.1f} points, vs frame 0 at the end {consistency:+.1f} points."
        )
    return lines


def two_part_markdown(study: dict) -> list[str]:
    lines = [
        "",
        f"## Two-part prompt: {' → '.join(study['parts'])}",
        "",
        "| setting | 1st half: axis | direction | digit | 2nd half: axis | direction | digit |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in study["settings"].items():
        a, b = e["first_half"], e["second_half"]
        lines.append(
            f"| {name} | {a['axis']['mean']:.3f} ± {a['axis']['ci95']:.3f} | {a['direction']['mean']:.3f} "
            f"| {a['digit']['mean']:.3f} | {b['axis']['mean']:.3f} ± {b['axis']['ci95']:.3f} "
            f"| {b['direction']['mean']:.3f} | {b['digit']['mean']:.3f} |"
        )
    lines += [
        "",
        "Per half of the rollout: *axis* is the share of judged steps on that half's prompted axis, "
        "*direction* the half's first judged step, *digit* the majority judged digit.",
    ]
    return lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timeloom evaluate generation", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a CausalVDM .ckpt or exported folder")
    parser.add_argument("--judge", type=Path, default=DEFAULT_JUDGE, help="a trained DigitsJudge folder")
    parser.add_argument("--count", type=int, default=64, help="rollouts per setting")
    parser.add_argument("--length-factor", type=int, default=4, help="rollout length / training length")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--broadway", action="store_true", help="add a setting with BroadWay's defaults")
    parser.add_argument(
        "--broadway-with",
        action="append",
        default=[],
        type=broadway_arguments,
        help="add a ByTheWay setting with these arguments, e.g. 'beta0=10,active_fraction=0.4' (repeatable)",
    )
    parser.add_argument(
        "--tar", action="store_true", help="add a setting with VSTAR's attention regularisation"
    )
    parser.add_argument("--vstar", help="a two-part prompt 'p1; p2' for the synopsis study")
    parser.add_argument(
        "--study",
        choices=("all", "prompts", "two-part"),
        default="all",
        help="run the prompted rollouts, the two-part study (needs --vstar), or both",
    )
    parser.add_argument(
        "--from-real-frame", action="store_true", help="continue each real clip's first frame"
    )
    parser.add_argument("--features", choices=("judge", "pixels"), default="judge", help="Fréchet features")
    parser.add_argument("--steps", type=int, help="Euler steps per chunk (default: the model's)")
    parser.add_argument("--guidance", type=float, help="CFG scale (default: the model's)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument(
        "--prompt-seed", type=int, default=REAL_SEED, help="seed of the real test clips whose captions prompt"
    )
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluate-generation"))
    parser.add_argument("--wandb", action="store_true", help="log the results to W&B (offline without a key)")
    return parser


def load_judge(path: Path) -> DigitsJudge:
    """The judge at ``path``; the default path is trained (1-2 minutes) and saved when missing."""
    if path == DEFAULT_JUDGE and not (path / "judge.safetensors").exists():
        print(f"no judge at {path}: training one (saved there for later evaluations)")
        judge = train_judge()
        judge.save(path)
        return judge
    return DigitsJudge.load(path)


def prompted_study(
    module: CausalVDM, judge: DigitsJudge, args, extractor: FeatureExtractor, **common
) -> tuple:
    """The plain sampler and each plug-in asked for on the captions of real test clips, and the real clips
    themselves: ``(results per setting, one sample per setting, decoded frames, window)``."""
    real_data = MovingDigits(
        size=judge.config.size,
        frames=2,  # captions do not depend on the length; the real clips are rendered at the decoded length
        num_digits=1,
        directions=list(judge.config.directions),
        speed=judge.config.speed,
        length=args.count,
        seed=args.prompt_seed,
        split="test",
        channels=judge.config.channels,
    )
    captions = [real_data[i]["caption"] for i in range(args.count)]
    prompts = [parse_caption(caption) for caption in captions]
    given = None
    if args.from_real_frame:
        given = module.codec.encode(torch.stack([real_data[i]["video"][:, :1] for i in range(args.count)]))
    settings = [Setting("plain", captions)]
    if args.broadway:
        settings.append(Setting("broadway", captions, broadway={}))
    for arguments in args.broadway_with:
        name = "broadway " + ", ".join(
            f"{key}={'+'.join(map(str, value)) if isinstance(value, list) else value if isinstance(value, str) else f'{value:g}'}"
            for key, value in arguments.items()
        )
        settings.append(Setting(name, captions, broadway=arguments))
    if args.tar:
        settings.append(Setting("tar", captions, tar=True))
    videos = {setting.name: rollouts(module, setting, given=given, **common) for setting in settings}
    frames = videos["plain"].shape[2]
    window = max(2, round(frames / args.length_factor))
    real_data.frames = frames
    real = torch.stack([real_data[i]["video"] for i in tqdm(range(args.count), desc="render real clips")])
    real_features = extractor(real)
    results = {"real (judge ceiling)": score(real, prompts, judge, window, extractor, real_features)}
    # What the codec alone costs: real clips encoded and decoded (the ceiling of decoded generations).
    round_trip = torch.cat(
        [module.codec.decode(module.codec.encode(clips)).cpu() for clips in real.split(args.batch_size)]
    )
    results["real, codec round trip"] = score(round_trip, prompts, judge, window, extractor, real_features)
    for name, video in videos.items():
        results[name] = score(video, prompts, judge, window, extractor, real_features)
    samples = {name: (video[0], captions[0]) for name, video in videos.items()}
    return results, samples, frames, window


def two_part_study(module: CausalVDM, judge: DigitsJudge, parts: list[str], count: int, **common) -> tuple:
    """One caption "p1, then p2" against VSTAR's synopsis without and with TAR: ``(results, samples)``."""
    joined = f"{parts[0]}, then {parts[1]}"
    settings = [
        Setting("plain, one caption", [joined] * count),
        Setting("VSTAR synopsis", [parts] * count),
        Setting("VSTAR synopsis + TAR", [parts] * count, tar=True),
    ]
    parsed = [parse_caption(part) for part in parts]
    results, samples = {}, {}
    for setting in settings:
        video = rollouts(module, setting, **common)
        results[setting.name] = two_part_scores(video, parsed, judge)
        samples[setting.name] = (video[0], joined if setting.name.startswith("plain") else " → ".join(parts))
    return results, samples


@torch.no_grad()
def main(argv: list[str]) -> int:
    """`timeloom evaluate generation`: see the module docstring. Returns the exit status."""
    args = _parser().parse_args(argv)
    parts = None
    if args.vstar is not None:
        parts = [part.strip() for part in args.vstar.split(";")]
        if len(parts) != 2:
            raise ValueError(f"--vstar needs two sub-prompts 'p1; p2'; got {args.vstar!r}")
        for part in parts:
            parse_caption(part)
    if args.study == "two-part" and parts is None:
        raise ValueError("--study two-part needs a two-part prompt: --vstar 'p1; p2'")
    if args.count < 2 or args.length_factor < 1:
        raise ValueError(
            f"need --count >= 2 and --length-factor >= 1; got {args.count}, {args.length_factor}"
        )
    if not args.checkpoint.exists():
        raise FileNotFoundError(f"no VDM checkpoint or exported model at {args.checkpoint}")
    judge = load_judge(args.judge)
    module = load_vdm(args.checkpoint)
    check_sizes(module, judge)
    latent_frames = args.length_factor * module.clip_frames
    sampler = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    common = dict(
        frames=latent_frames, size=judge.config.size, batch_size=args.batch_size, seed=args.seed, **sampler
    )
    extractor: FeatureExtractor = JudgeFeatures(judge) if args.features == "judge" else PixelFeatures()
    report = {
        "checkpoint": str(args.checkpoint),
        "judge": str(args.judge),
        "judge_accuracy": judge.config.accuracy,
        "count": args.count,
        "length_factor": args.length_factor,
        "latent_frames": latent_frames,
        "seed": args.seed,
        "prompt_seed": args.prompt_seed,
        "sampler": sampler,
        "features": extractor.name,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    samples = {}
    if args.study in ("all", "prompts"):
        results, samples, frames, window = prompted_study(module, judge, args, extractor, **common)
        report.update(frames=frames, window=window, settings=results)
        plot_identity(results, args.out / "identity.png")
    if parts is not None and args.study in ("all", "two-part"):
        results, more = two_part_study(module, judge, parts, args.count, **common)
        report["two_part"] = {"parts": parts, "settings": results}
        samples.update(more)
        plot_two_part(results, parts, args.out / "two_part.png")
    plot_samples(samples, args.out / "samples.png")
    (args.out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(report))
    if args.wandb:
        log_to_wandb(report, args.out)
    print(markdown(report))
    print(f"wrote results.json, results.md and figures under {args.out}")
    return 0


def log_to_wandb(report: dict, out: Path) -> None:
    from timeloom.logging import WandbLogger

    offline = False if os.environ.get("WANDB_MODE") == "disabled" else None
    logger = WandbLogger(project="timeloom", save_dir=str(out), name="evaluate-generation", offline=offline)
    for name, entry in report["settings"].items():
        logger.log_metrics(
            {
                f"eval/{name}/digit": entry["prompt_first_window"]["digit"],
                f"eval/{name}/direction": entry["prompt_first_window"]["direction"],
                f"eval/{name}/identity_end": entry["identity_vs_prompt"]["end"],
                f"eval/{name}/motion_px": entry["motion_px"]["mean"],
                f"eval/{name}/frechet": entry["frechet"],
            }
        )
    figures = [
        str(out / name) for name in ("identity.png", "two_part.png", "samples.png") if (out / name).exists()
    ]
    logger.log_image("eval/figures", images=figures)
    logger.experiment.finish()
