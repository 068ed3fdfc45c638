"""`DigitsJudge`: the held-out MovingDigits classifier that scores generated videos (spec §9).

A per-frame CNN gives features ``φ`` (the Fréchet features); on them sit an identity head (which digit), a
centre head (where the glyph centre is, in pixels) and a motion head on consecutive frame pairs
``[φ_t, φ_{t+1} − φ_t]`` (which cardinal way the digit moved, or "still"). It is trained by the project on
MovingDigits clips of its own seed, disjoint from the generator's, with noise, blur and contrast changes so
blurry generated frames are still judged; its accuracy on clips of another seed and the test glyphs is stored
beside it as the ceiling of every score.

    python -m timeloom_generation.judge --out runs/judge            # trains in about 3 minutes on one core
    judge = DigitsJudge.load("runs/judge")
    verdict = judge.judge(videos)                                 # videos (B, C, T, H, W) in [-1, 1]
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from timeloom.data import MovingDigits
from timeloom.data.moving_digits import COMPASS

__all__ = ["DigitsJudge", "JudgeConfig", "parse_caption", "train_judge"]

STILL = "still"
# The judge's own data seed: the generator's configs use small seeds (0), so these clips are never its own.
JUDGE_SEED = 90_210
_CAPTION = re.compile(r"the digit (\d) moves ([a-z-]+)")


def parse_caption(caption: str) -> tuple[int, str]:
    """``"the digit 3 moves left"`` -> ``(3, "left")``; anything else is an error naming the caption."""
    match = _CAPTION.search(caption)
    if match is None or match.group(2) not in COMPASS:
        raise ValueError(f"cannot read a digit and a direction from the caption {caption!r}")
    return int(match.group(1)), match.group(2)


@dataclass
class JudgeConfig:
    """Sizes of the judge and of the frames it judges."""

    size: int = 32
    channels: int = 1
    width: int = 16  # channels of the first convolution; doubled at each of the three stride-2 stages
    features: int = 128
    directions: tuple[str, ...] = ("right", "up", "left", "down")
    # The training data: MovingDigits speeds (px/frame); the generator's configs use the default (1, 3).
    speed: tuple[float, float] = (1.0, 3.0)
    accuracy: dict = field(default_factory=dict)  # held-out accuracy, filled in after training

    @property
    def motions(self) -> tuple[str, ...]:
        return (*self.directions, STILL)


class DigitsJudge(nn.Module):
    """Per-frame digit identity and centre, per frame pair the direction of motion."""

    def __init__(self, config: JudgeConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or JudgeConfig()
        if config.size % 8:
            raise ValueError(f"the judge's frame size must be a multiple of 8; got {config.size}")
        w = config.width

        def stage(inputs: int, outputs: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(inputs, outputs, 3, stride, 1), nn.GroupNorm(8, outputs), nn.SiLU()]

        def trunk() -> nn.Sequential:  # flattening (not pooling) keeps the glyph's layout
            return nn.Sequential(
                *stage(config.channels, w, 1),
                *stage(w, w, 2),
                *stage(w, 2 * w, 2),
                *stage(2 * w, 4 * w, 2),
                nn.Flatten(),
                nn.Linear(4 * w * (config.size // 8) ** 2, config.features),
                nn.SiLU(),
            )

        # Two trunks, each read by its own heads: with one, the centre regression kept the identity at chance.
        self.what, self.where = trunk(), trunk()
        self.identity = nn.Linear(config.features, 10)
        self.centre = nn.Linear(config.features, 2)  # (x, y) / size
        self.motion = nn.Sequential(
            nn.Linear(2 * config.features, config.features),
            nn.SiLU(),
            nn.Linear(config.features, len(config.motions)),
        )

    def check_frames(self, videos: Tensor) -> None:
        expected = (self.config.channels, self.config.size, self.config.size)
        if videos.dim() != 5 or (videos.shape[1], *videos.shape[3:]) != expected:
            raise ValueError(
                f"the judge scores videos (B, C, T, H, W) with C, H, W = {expected}; got {tuple(videos.shape)}"
            )

    def frame_features(self, videos: Tensor) -> Tensor:
        """``φ`` per frame: ``(B, C, T, H, W) -> (B, T, 2·features)`` (where, what)."""
        self.check_frames(videos)
        batch, _, frames = videos.shape[:3]
        flat = videos.transpose(1, 2).flatten(0, 1)
        return torch.cat((self.where(flat), self.what(flat)), dim=-1).view(batch, frames, -1)

    def heads(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Identity logits ``(B, T, 10)``, centres ``(B, T, 2)`` in pixels, motion logits ``(B, T−1, M)``."""
        where, what = features.split(
            (self.config.features, features.shape[-1] - self.config.features), dim=-1
        )
        pairs = torch.cat((where[:, :-1], where[:, 1:] - where[:, :-1]), dim=-1)
        return self.identity(what), self.centre(where) * self.config.size, self.motion(pairs)

    @torch.no_grad()
    def judge(self, videos: Tensor, batch_size: int = 64) -> dict[str, Tensor]:
        """The verdict on ``videos (B, C, T, H, W)`` in [-1, 1], computed ``batch_size`` videos at a time:
        ``digit (B, T)``, ``centre (B, T, 2)`` px, ``motion (B, T−1)`` (index into ``config.motions``),
        ``motion_probs (B, T−1, M)`` and ``features (B, T, features)``."""
        parts = []
        for chunk in videos.split(batch_size):
            features = self.frame_features(chunk.to(next(self.parameters()).device, torch.float32))
            identity, centre, motion = self.heads(features)
            parts.append(
                {
                    "digit": identity.argmax(-1),
                    "centre": centre,
                    "motion": motion.argmax(-1),
                    "motion_probs": motion.softmax(-1),
                    "features": features,
                }
            )
        return {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}

    # -- persistence ----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.state_dict(), directory / "judge.safetensors")
        (directory / "judge.json").write_text(json.dumps(asdict(self.config), indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DigitsJudge:
        directory = Path(directory)
        if not (directory / "judge.safetensors").is_file() or not (directory / "judge.json").is_file():
            raise FileNotFoundError(
                f"no trained judge at {directory} (expected judge.safetensors and judge.json): "
                "train one with `python -m timeloom_generation.judge --out DIR`"
            )
        values = json.loads((directory / "judge.json").read_text())
        values["directions"] = tuple(values["directions"])
        values["speed"] = tuple(values["speed"])
        judge = cls(JudgeConfig(**values))
        judge.load_state_dict(load_file(directory / "judge.safetensors"))
        return judge.eval()


# -- metrics (spec §9) ---------------------------------------------------------------------------------------
def axis_of(direction: str) -> str:
    return (
        "horizontal"
        if direction in ("left", "right")
        else "vertical"
        if direction in ("up", "down")
        else direction
    )


def prompt_scores(
    verdict: dict[str, Tensor],
    prompts: list[tuple[int, str]],
    motions: tuple[str, ...],
    frames: slice = slice(None),
) -> dict[str, Tensor]:
    """Per video (``(B,)`` floats) over ``frames``, against the prompted ``(digit, direction)``:

    - ``digit``: the majority judged digit is the prompted one;
    - ``direction``: the first pair's judged motion is the prompted direction (MovingDigits bounces, so later
      pairs may rightly run the other way);
    - ``axis``: the share of pairs moving along the prompted axis, either way (bounces allowed);
    - ``joint``: digit and direction both right.
    """
    digits = verdict["digit"][:, frames]
    moves = verdict["motion"][:, frames][:, : max(digits.shape[1] - 1, 1)]
    wanted_digit = torch.tensor([digit for digit, _ in prompts])
    wanted_axis = [axis_of(direction) for _, direction in prompts]
    digit = (digits.mode(dim=1).values == wanted_digit).float()
    direction = torch.tensor([motions[int(m)] == d for m, (_, d) in zip(moves[:, 0], prompts)]).float()
    axis = (
        torch.tensor([[axis_of(motions[int(m)]) == a for m in row] for row, a in zip(moves, wanted_axis)])
        .float()
        .mean(1)
    )
    return {"digit": digit, "direction": direction, "axis": axis, "joint": digit * direction}


def identity_curves(verdict: dict[str, Tensor], digits: list[int]) -> dict[str, Tensor]:
    """Per frame index ``(T,)``: the share of videos whose judged digit is the prompted one (``prompt``) and
    the one judged on frame 0 (``first``)."""
    judged = verdict["digit"]
    return {
        "prompt": (judged == torch.tensor(digits)[:, None]).float().mean(0),
        "first": (judged == judged[:, :1]).float().mean(0),
    }


def motion_magnitude(verdict: dict[str, Tensor]) -> Tensor:
    """Mean displacement of the judged digit centre between consecutive frames, px/frame, per video ``(B,)``."""
    centre = verdict["centre"]
    return (centre[:, 1:] - centre[:, :-1]).norm(dim=-1).mean(1)


def subject_consistency(features: Tensor) -> Tensor:
    """VBench's form per video: mean over frames f > 0 of ½[cos(φ₀, φ_f) + cos(φ_{f−1}, φ_f)]."""
    first = F.cosine_similarity(features[:, :1], features[:, 1:], dim=-1)
    previous = F.cosine_similarity(features[:, :-1], features[:, 1:], dim=-1)
    return ((first + previous) / 2).mean(1)


def frechet_distance(real: Tensor, generated: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (float64)."""
    from scipy import linalg

    if real.dim() != 2 or generated.dim() != 2 or real.shape[1] != generated.shape[1]:
        raise ValueError(
            f"need two feature sets (N, D) of one width; got {tuple(real.shape)}, {tuple(generated.shape)}"
        )
    if min(len(real), len(generated)) < 2:
        raise ValueError("the Fréchet distance needs at least 2 feature vectors per set")
    a, b = real.double().numpy(), generated.double().numpy()
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


class FeatureExtractor(Protocol):
    """What the Fréchet distance compares: ``(B, C, T, H, W)`` videos in [-1, 1] -> ``(N, D)`` features."""

    name: str

    def __call__(self, videos: Tensor) -> Tensor: ...


class JudgeFeatures:
    """The judge's penultimate features ``φ``, one vector per frame (the default extractor)."""

    name = "judge-frame-features"

    def __init__(self, judge: DigitsJudge) -> None:
        self.judge = judge

    def __call__(self, videos: Tensor) -> Tensor:
        return self.judge.judge(videos)["features"].flatten(0, 1)


class PixelFeatures:
    """Frames average-pooled to 8x8 and flattened: a judge-free extractor."""

    name = "pixels-8x8"

    def __call__(self, videos: Tensor) -> Tensor:
        frames = videos.transpose(1, 2).flatten(0, 1).float()
        return F.adaptive_avg_pool2d(frames, 8).flatten(1)


# -- data and training --------------------------------------------------------------------------------------
def digit_clips(config: JudgeConfig, count: int, frames: int, seed: int, split: str) -> dict[str, Tensor]:
    """``count`` one-digit MovingDigits clips and their labels: ``video (N, C, T, H, W)``, ``digit (N,)``,
    ``centre (N, T, 2)`` px and ``motion (N, T−1)`` (index into ``config.motions``; −1 where a bounce
    leaves the net displacement under half a pixel, which no direction describes)."""
    data = MovingDigits(
        size=config.size,
        frames=frames,
        num_digits=1,
        directions=list(config.directions),
        speed=config.speed,
        length=count,
        seed=seed,
        split=split,
        channels=config.channels,
    )
    items = [data[i] for i in tqdm(range(count), desc=f"render {split} clips", leave=False)]
    centre = torch.stack([item["meta"]["trajectory"][:, 0] for item in items])
    return {
        "video": torch.stack([item["video"] for item in items]),
        "digit": torch.stack([item["meta"]["labels"][0] for item in items]),
        "centre": centre,
        "motion": motion_labels(centre[:, 1:] - centre[:, :-1], config),
        "direction": torch.tensor([config.directions.index(item["meta"]["direction"][0]) for item in items]),
    }


def motion_labels(displacement: Tensor, config: JudgeConfig, still_below: float = 0.5) -> Tensor:
    """The direction (index into ``config.motions``) nearest each displacement ``(..., 2)``; −1 when it is
    shorter than ``still_below`` pixels (a bounce can cancel a step: ambiguous, not "still")."""
    angles = torch.tensor([COMPASS[d] for d in config.directions]).deg2rad()
    ways = torch.stack((angles.cos(), -angles.sin()), dim=-1)  # y grows downwards
    labels = (displacement @ ways.T).argmax(-1)
    return torch.where(displacement.norm(dim=-1) < still_below, -1, labels)


def augment(videos: Tensor, generator: torch.Generator) -> Tensor:
    """Per clip: a contrast/background change, a blur and pixel noise, so generated frames stay in range."""
    batch = len(videos)

    def draw(low: float, high: float) -> Tensor:
        return (low + (high - low) * torch.rand(batch, generator=generator)).view(-1, 1, 1, 1, 1)

    ink = (videos + 1) / 2
    ink = draw(0.0, 0.25) + draw(0.6, 1.0) * ink  # grey background, fainter ink
    blurred = F.avg_pool3d(F.pad(ink, (1, 1, 1, 1, 0, 0), mode="replicate"), (1, 3, 3), stride=1)
    ink = torch.lerp(ink, blurred, draw(0.0, 1.0))
    ink = ink + draw(0.0, 0.15) * torch.randn(ink.shape, generator=generator)
    return ink.clamp(0, 1) * 2 - 1


def judge_loss(judge: DigitsJudge, batch: dict[str, Tensor], still_pairs: Tensor) -> tuple[Tensor, dict]:
    """Identity CE + centre MSE (in canvas units) + motion CE; ``still_pairs (B,)`` marks clips whose every
    frame is replaced by its first (a static clip: every pair is "still")."""
    video = batch["video"]
    still = still_pairs.view(-1, 1, 1, 1, 1)
    video = torch.where(still, video[:, :, :1].expand_as(video), video)
    centre = torch.where(
        still.view(-1, 1, 1), batch["centre"][:, :1].expand_as(batch["centre"]), batch["centre"]
    )
    motion = torch.where(still_pairs[:, None], len(judge.config.directions), batch["motion"])
    identity, predicted_centre, motion_logits = judge.heads(judge.frame_features(video))
    losses = {
        "identity": F.cross_entropy(identity.flatten(0, 1), batch["digit"].repeat_interleave(video.shape[2])),
        "centre": F.mse_loss(predicted_centre, centre) / judge.config.size**2 * 100,
        "motion": F.cross_entropy(motion_logits.flatten(0, 1), motion.flatten(), ignore_index=-1),
    }
    return sum(losses.values()), losses


@torch.no_grad()
def held_out_accuracy(judge: DigitsJudge, clips: dict[str, Tensor]) -> dict[str, float]:
    """Per-frame identity accuracy, per-pair motion accuracy (unambiguous pairs), mean centre error (px) and
    the clip-level scores of `timeloom_generation.evaluate` on real clips (the ceiling of generated ones)."""
    verdict = judge.eval().judge(clips["video"])
    known = clips["motion"] >= 0
    prompts = [(int(d), judge.config.directions[int(w)]) for d, w in zip(clips["digit"], clips["direction"])]
    clip_scores = prompt_scores(verdict, prompts, judge.config.motions)
    true_motion = (clips["centre"][:, 1:] - clips["centre"][:, :-1]).norm(dim=-1).mean()
    return {
        "identity": (verdict["digit"] == clips["digit"][:, None]).float().mean().item(),
        "motion_pairs": (verdict["motion"] == clips["motion"])[known].float().mean().item(),
        "centre_error_px": (verdict["centre"] - clips["centre"]).norm(dim=-1).mean().item(),
        "motion_px": motion_magnitude(verdict).mean().item(),
        "true_motion_px": true_motion.item(),
        **{f"clip_{name}": value.mean().item() for name, value in clip_scores.items()},
    }


def train_judge(
    config: JudgeConfig | None = None,
    *,
    clips: int = 2048,
    frames: int = 9,
    steps: int = 1000,
    batch_size: int = 32,
    window: int = 4,
    lr: float = 2e-3,
    seed: int = JUDGE_SEED,
    test_clips: int = 256,
    progress: bool = True,
) -> DigitsJudge:
    """Train a judge on ``window``-frame pieces of ``clips`` clips of MovingDigits seed ``seed`` (train glyphs)
    and measure it on
    ``test_clips`` clips of seed ``seed + 1`` (test glyphs, never seen); the result is in ``config.accuracy``."""
    config = config or JudgeConfig()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = digit_clips(config, clips, frames, seed, "train")
    judge = DigitsJudge(config)
    optimizer = torch.optim.AdamW(judge.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    bar = tqdm(range(steps), desc="train judge", disable=not progress)
    start = time.perf_counter()
    for _ in bar:
        chosen = torch.randint(clips, (batch_size,), generator=generator)
        first = int(torch.randint(frames - window + 1, (1,), generator=generator))
        batch = {
            "video": data["video"][chosen, :, first : first + window],
            "centre": data["centre"][chosen, first : first + window],
            "motion": data["motion"][chosen, first : first + window - 1],
            "digit": data["digit"][chosen],
        }
        batch["video"] = augment(batch["video"], generator)
        loss, parts = judge_loss(judge, batch, torch.rand(batch_size, generator=generator) < 0.15)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix({name: f"{value.item():.3f}" for name, value in parts.items()})
    test = digit_clips(config, test_clips, frames, seed + 1, "test")
    config.accuracy = {
        **held_out_accuracy(judge, test),
        "train_seconds": round(time.perf_counter() - start, 1),
        "train_clips": clips,
        "test_clips": test_clips,
        "seeds": {"train": seed, "test": seed + 1},
    }
    return judge.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m timeloom_generation.judge", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("runs/judge"), help="where the judge is saved")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--clips", type=int, default=2048)
    args = parser.parse_args(argv)
    config = JudgeConfig(size=args.size, channels=args.channels)
    judge = train_judge(config, steps=args.steps, clips=args.clips)
    judge.save(args.out)
    print(f"judge saved to {args.out}; held-out accuracy: {json.dumps(config.accuracy)}")


if __name__ == "__main__":
    main()
