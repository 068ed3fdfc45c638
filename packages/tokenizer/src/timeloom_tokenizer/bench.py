"""`timeloom bench tokenizer`: OmniTokenizer training throughput, MFU and encode/decode latency, in one run.

At two widths: `tiny` (the model of `configs/tokenizer/omnitokenizer-tiny-kl.yaml`) and `base` (the paper-size
`OmniTokenizerConfig` defaults, ≈51 M parameters; small inputs on CPU so the run finishes).

1. Training: one full step of `OmniTokenizerModule` under a Lightning `Trainer` (forward, loss, backward,
   clipped optimiser step; with a discriminator also its own step), on images and on clips, without and with
   the discriminator (2-D on images as in stage 1, 3-D on clips as in stage 2). Reported: ms per step,
   clips/s, latent tokens/s, FLOPs per step and MFU = FLOPs / step time / this machine's measured matmul peak.
2. Latency: `encode` and `decode` at batch 1 under `inference_mode` for an image, a clip and a longer clip,
   in ms and ms per frame (the long clip shows how the per-frame cost grows with the causal temporal stacks).

FLOPs are those executed, counted by `FlopCounterMode` on the first step (matmuls, convolutions, attention),
with two corrections to its table: the CPU attention kernel (`_scaled_dot_product_flash_attention_for_cpu`
and its backward) is counted like the CUDA ones, and a grouped convolution's weight gradient is divided by
its groups (torch counts the PEG's depth-wise conv as a dense one). Timing reuses the kernels suite: warm-up,
then the mean inside the inter-quartile range. Output: `tokenizer.json` and `tokenizer.md` under `--out`.
Compare runs only from the same device, and mind the machine's load (recorded in both files).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf
from timeloom_kernels.bench import iqr_mean, measure, parse_suite_arguments, synchronize, write_report
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.flop_counter import (
    FlopCounterMode,
)

from timeloom.data import MovingDigits
from timeloom.throughput import flop_counter, measure_matmul_peak
from timeloom_tokenizer.model import OmniTokenizer, OmniTokenizerConfig
from timeloom_tokenizer.module import OmniTokenizerModule, TokenizerLossConfig

TINY_CONFIG = Path(__file__).resolve().parents[4] / "configs" / "tokenizer" / "omnitokenizer-tiny-kl.yaml"
# Discriminator width and depth per model width (spec section 9): ndf 16 with 2 layers in tiny, 64 with 3 in base.
DISCRIMINATORS = {"tiny": (16, 2), "base": (64, 3)}
GAN_WEIGHT = 0.01  # the paper's adversarial weight: 2-D on images (stage 1), 3-D on clips (stage 2)


@dataclass(frozen=True)
class Inputs:
    """The inputs of one width: training batch and pixel size, and the frames of the clips."""

    batch: int
    size: int
    clip_frames: int
    long_frames: int


@dataclass(frozen=True)
class Preset:
    """How big and how long: `full` (a few minutes on 2 CPU cores), `quick` (about a minute), `tiny` (seconds).

    The timing fields are the kernels suite's (`TimingBudget`); a training measurement counts one step,
    warms up with `warmup_steps` more, then times at least `min_runs`.
    """

    widths: dict[str, Inputs] = field(hash=False)
    warmup_steps: int
    warmup_s: float
    budget_s: float
    min_runs: int
    max_runs: int
    max_call_s: float  # a call slower than this after warming up is timed once


_TINY_TRAINING = Inputs(batch=8, size=32, clip_frames=9, long_frames=33)  # the tiny config's training batch
CPU_PRESETS = {
    "full": Preset(
        widths={"tiny": _TINY_TRAINING, "base": Inputs(batch=1, size=64, clip_frames=17, long_frames=65)},
        warmup_steps=1,
        warmup_s=0.2,
        budget_s=2.0,
        min_runs=3,
        max_runs=50,
        max_call_s=3.0,
    ),
    "quick": Preset(
        widths={"tiny": _TINY_TRAINING, "base": Inputs(batch=1, size=64, clip_frames=5, long_frames=17)},
        warmup_steps=1,
        warmup_s=0.05,
        budget_s=0.5,
        min_runs=2,
        max_runs=20,
        max_call_s=1.0,
    ),
    "tiny": Preset(
        widths={"tiny": Inputs(batch=2, size=16, clip_frames=5, long_frames=9)},
        warmup_steps=1,
        warmup_s=0.0,
        budget_s=0.0,
        min_runs=1,
        max_runs=1,
        max_call_s=0.5,
    ),
}
CUDA_PRESETS = {
    "full": Preset(
        widths={"tiny": _TINY_TRAINING, "base": Inputs(batch=4, size=256, clip_frames=17, long_frames=65)},
        warmup_steps=3,
        warmup_s=0.1,
        budget_s=1.0,
        min_runs=5,
        max_runs=100,
        max_call_s=10.0,
    ),
    "quick": Preset(
        widths={"tiny": _TINY_TRAINING, "base": Inputs(batch=2, size=128, clip_frames=17, long_frames=33)},
        warmup_steps=2,
        warmup_s=0.05,
        budget_s=0.3,
        min_runs=5,
        max_runs=50,
        max_call_s=2.0,
    ),
    "tiny": CPU_PRESETS["tiny"],
}


# ------------------------------------------------------------------------------------------------ models


def tiny_config(path: Path = TINY_CONFIG) -> OmniTokenizerConfig:
    """The model of the tiny KL config (its `${data...}` channels resolved)."""
    if not path.is_file():
        raise FileNotFoundError(f"tiny tokenizer config not found at {path}; run from a source checkout")
    resolved = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return OmniTokenizerConfig(**resolved["model"]["init_args"]["config"])


def width_configs(widths: list[str]) -> dict[str, OmniTokenizerConfig]:
    known = {"tiny": tiny_config, "base": OmniTokenizerConfig}
    return {name: known[name]() for name in widths}


def clip(config: OmniTokenizerConfig, batch: int, frames: int, size: int) -> Tensor:
    """`batch` MovingDigits clips ``(B, C, frames, size, size)`` (one frame: images ``(B, C, size, size)``)."""
    data = MovingDigits(size=size, frames=frames, num_digits=2, channels=config.channels, length=batch)
    videos = torch.stack([data[i]["video"] for i in range(batch)])
    return videos[:, :, 0] if frames == 1 else videos


# ------------------------------------------------------------------------------------------------ cells


@dataclass
class TrainCell:
    """One training measurement: a width, an input and a discriminator choice."""

    width: str
    input: str  # "image" or "clip"
    discriminator: str  # "none", "2d" or "3d"
    params: int  # generator parameters
    discriminator_params: int
    batch: int
    frames: int
    size: int
    tokens: int  # latent tokens per step: B · T' · h · w
    flops: int  # per step, counted
    step_ms: float
    runs: int
    clips_per_s: float
    tokens_per_s: float
    flops_per_s: float
    mfu: float


@dataclass
class LatencyCell:
    """`encode` and `decode` at batch 1, inference."""

    width: str
    input: str  # "image", "clip" or "long_clip"
    frames: int
    size: int
    latent_frames: int
    latent_height: int
    latent_width: int
    encode_ms: float
    decode_ms: float
    encode_ms_per_frame: float
    decode_ms_per_frame: float
    encode_flops: int
    decode_flops: int


class StepTimer(pl.Callback):
    """Counts the FLOPs of the first training batch, warms up, then times whole batches until the budget.

    A batch here is the module's full step: forward, loss, backward and the optimiser step(s).
    """

    def __init__(self, preset: Preset, device: torch.device) -> None:
        self.preset, self.device = preset, device
        self.flops = 0
        self.samples: list[float] = []
        self._counter: FlopCounterMode | None = None
        self._batches = 0
        self._start = self._deadline = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            self._counter = flop_counter()
            self._counter.__enter__()
        synchronize(self.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        if self._counter is not None:  # the counted batch runs slower than the rest: never timed
            self._counter.__exit__(None, None, None)
            self.flops, self._counter = self._counter.get_total_flops(), None
            return
        if batch_idx <= self.preset.warmup_steps:
            self._deadline = time.perf_counter() + self.preset.budget_s
            if batch_idx == self.preset.warmup_steps and seconds > self.preset.max_call_s:
                self.samples.append(seconds)  # slow: time this one and stop, as `measure` does
                trainer.should_stop = True
            return
        self.samples.append(seconds)
        enough = len(self.samples) >= self.preset.min_runs and time.perf_counter() >= self._deadline
        if enough or len(self.samples) >= self.preset.max_runs:
            trainer.should_stop = True


def _precision(dtype: torch.dtype) -> str:
    return {torch.float32: "32-true", torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}[dtype]


def train_cell(
    width: str,
    config: OmniTokenizerConfig,
    inputs: Inputs,
    input_kind: str,
    discriminator: str,
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
    peak: float,
) -> TrainCell:
    """Fit `OmniTokenizerModule` on one repeated batch and time its steps."""
    channels, layers = DISCRIMINATORS[width]
    loss = TokenizerLossConfig(
        image_gan_weight=GAN_WEIGHT if discriminator == "2d" else 0.0,
        video_gan_weight=GAN_WEIGHT if discriminator == "3d" else 0.0,
        disc_channels=channels,
        disc_layers=layers,
    )
    module = OmniTokenizerModule(
        config, loss, optimizer=partial(torch.optim.Adam, lr=1e-4, betas=(0.5, 0.9)), scheduler=None
    )
    frames = 1 if input_kind == "image" else inputs.clip_frames
    video = clip(config, inputs.batch, frames, inputs.size)
    batch = {"video": video[:, :, None] if frames == 1 else video}  # the module trains on 5-D batches
    timer = StepTimer(preset, device)
    steps = 1 + preset.warmup_steps + preset.max_runs
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        precision=_precision(dtype),
        max_epochs=1,
        limit_train_batches=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader([batch] * steps, batch_size=None))
    step_s = iqr_mean(timer.samples)
    tokens = module.count_tokens(batch)
    return TrainCell(
        width=width,
        input=input_kind,
        discriminator=discriminator,
        params=sum(p.numel() for p in module.model.parameters()),
        discriminator_params=sum(p.numel() for p in module.discriminator_parameters()),
        batch=inputs.batch,
        frames=frames,
        size=inputs.size,
        tokens=tokens,
        flops=timer.flops,
        step_ms=step_s * 1e3,
        runs=len(timer.samples),
        clips_per_s=inputs.batch / step_s,
        tokens_per_s=tokens / step_s,
        flops_per_s=timer.flops / step_s,
        mfu=timer.flops / step_s / peak,
    )


def latency_cell(
    width: str,
    model: OmniTokenizer,
    inputs: Inputs,
    input_kind: str,
    preset: Preset,
    device: torch.device,
    dtype: torch.dtype,
) -> LatencyCell:
    """Time `encode` and `decode` of one image or clip (batch 1) under `inference_mode` (and autocast)."""
    frames = {"image": 1, "clip": inputs.clip_frames, "long_clip": inputs.long_frames}[input_kind]
    pixels = clip(model.config, 1, frames, inputs.size).to(device)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        latent = model.encode(pixels)[0]
        with flop_counter() as encode_counter:
            model.encode(pixels)
        with flop_counter() as decode_counter:
            model.decode(latent)
        _, encode_ms = measure(lambda: model.encode(pixels), device, preset)
        _, decode_ms = measure(lambda: model.decode(latent), device, preset)
    latent_frames, latent_height, latent_width = model.latent_shape(frames, inputs.size, inputs.size)
    return LatencyCell(
        width=width,
        input=input_kind,
        frames=frames,
        size=inputs.size,
        latent_frames=latent_frames,
        latent_height=latent_height,
        latent_width=latent_width,
        encode_ms=encode_ms,
        decode_ms=decode_ms,
        encode_ms_per_frame=encode_ms / frames,
        decode_ms_per_frame=decode_ms / frames,
        encode_flops=encode_counter.get_total_flops(),
        decode_flops=decode_counter.get_total_flops(),
    )


# ------------------------------------------------------------------------------------------------ report


def summarise(train: list[TrainCell], latency: list[LatencyCell]) -> dict[str, dict[str, float]]:
    """Per width: what the discriminator costs (step time with it / without) and how the per-frame
    encode/decode cost of a clip and of the long clip compares with an image's."""
    summary: dict[str, dict[str, float]] = {}
    for width in dict.fromkeys(c.width for c in train):
        steps = {(c.input, c.discriminator): c.step_ms for c in train if c.width == width}
        per_frame = {c.input: c for c in latency if c.width == width}
        image = per_frame["image"]
        summary[width] = {
            "discriminator_cost_image": steps["image", "2d"] / steps["image", "none"],
            "discriminator_cost_clip": steps["clip", "3d"] / steps["clip", "none"],
            **{
                f"{stage}_per_frame_{kind}_vs_image": getattr(per_frame[kind], f"{stage}_ms_per_frame")
                / getattr(image, f"{stage}_ms_per_frame")
                for stage in ("encode", "decode")
                for kind in ("clip", "long_clip")
            },
        }
    return summary


def _si(value: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.2f} "


def markdown(result: dict[str, Any]) -> str:
    """A readable report of the same numbers."""
    env = result["environment"]
    load = result["load_average"]
    lines = [
        "# timeloom tokenizer benchmark",
        "",
        ", ".join(f"{k} {v}" for k, v in env.items()),
        "",
        f"Machine load (1-minute average over {load['cpus']} CPUs): {load['start']:.2f} at the start, "
        f"{load['end']:.2f} at the end. Measured {env['dtype']} matmul peak: "
        f"{_si(result['peak_flops'])}FLOP/s. Run took {result['wall_s']:.0f} s.",
        "",
        "## Training step (forward, loss, backward, clipped optimiser step)",
        "",
        "MFU = counted FLOPs per step / step time / the measured matmul peak. Tokens are latent tokens "
        "B · T' · h · w. With a discriminator the step also runs the discriminator's forward on the "
        "reconstruction (generator loss) and its own step. FLOPs are the executed ones.",
        "",
        "| width | params | input | D | batch × frames × size² | ms / step | clips/s | tokens/s "
        "| FLOP / step | FLOP/s | MFU | timed steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["train"]:
        params = _si(c["params"]) + (
            f" + D {_si(c['discriminator_params'])}" if c["discriminator_params"] else ""
        )
        lines.append(
            f"| {c['width']} | {params} | {c['input']} | {c['discriminator']} | "
            f"{c['batch']} × {c['frames']} × {c['size']}² | {c['step_ms']:.1f} | {c['clips_per_s']:.2f} | "
            f"{c['tokens_per_s']:.0f} | {_si(c['flops'])} | {_si(c['flops_per_s'])} | {100 * c['mfu']:.1f} % | {c['runs']} |"
        )
    lines += [
        "",
        "## Encode / decode latency (batch 1, inference)",
        "",
        "| width | input | frames × size² | latent T' × h × w | encode ms | per frame | decode ms | per frame "
        "| encode FLOP | decode FLOP |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["latency"]:
        latent = f"{c['latent_frames']} × {c['latent_height']} × {c['latent_width']}"
        lines.append(
            f"| {c['width']} | {c['input']} | {c['frames']} × {c['size']}² | {latent} | "
            f"{c['encode_ms']:.2f} | {c['encode_ms_per_frame']:.3f} | {c['decode_ms']:.2f} | "
            f"{c['decode_ms_per_frame']:.3f} | {_si(c['encode_flops'])} | {_si(c['decode_flops'])} |"
        )
    lines += ["", "## Summary", ""]
    for width, numbers in result["summary"].items():
        lines.append(
            f"- **{width}**: the discriminator makes a step {numbers['discriminator_cost_image']:.3g}x as long on "
            f"images (2-D) and {numbers['discriminator_cost_clip']:.3g}x on clips (3-D). Per frame, a clip "
            f"encodes in {numbers['encode_per_frame_clip_vs_image']:.3g}x and the long clip in "
            f"{numbers['encode_per_frame_long_clip_vs_image']:.3g}x an image's time (decode "
            f"{numbers['decode_per_frame_clip_vs_image']:.3g}x and {numbers['decode_per_frame_long_clip_vs_image']:.3g}x): "
            "tubelets carry t frames per token, and only the temporal attention grows with the clip."
        )
    lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point


def main(argv: list[str] | None = None) -> int:
    """`timeloom bench tokenizer [--out DIR] [--quick | --tiny] [--device cpu|cuda] [--dtype ...]`."""
    run = parse_suite_arguments(
        "tokenizer",
        __doc__.split("\n")[0],
        argv,
        CPU_PRESETS,
        CUDA_PRESETS,
        quick_help="smaller inputs (about a minute on 2 CPU cores)",
        tiny_help="smoke test of the harness, tiny width only (seconds)",
    )
    device, dtype, preset, environment = run.device, run.dtype, run.preset, run.environment

    started = time.perf_counter()
    load_start = os.getloadavg()[0]
    peak = measure_matmul_peak(str(device), dtype)
    print(f"matmul peak {_si(peak)}FLOP/s", flush=True)
    train: list[TrainCell] = []
    latency: list[LatencyCell] = []
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module="lightning")  # e.g. "no workers in the dataloader"
        for width, config in width_configs(list(preset.widths)).items():
            inputs = preset.widths[width]
            for input_kind, discriminator in (
                ("image", "none"),
                ("image", "2d"),
                ("clip", "none"),
                ("clip", "3d"),
            ):
                torch.manual_seed(0)
                cell = train_cell(
                    width, config, inputs, input_kind, discriminator, preset, device, dtype, peak
                )
                train.append(cell)
                print(
                    f"[train   ] {width:<5} {input_kind:<5} D={discriminator:<4} {cell.step_ms:9.1f} ms/step "
                    f"{cell.clips_per_s:8.2f} clips/s {cell.tokens_per_s:9.0f} tokens/s MFU {100 * cell.mfu:5.1f} %",
                    flush=True,
                )
            torch.manual_seed(0)
            model = OmniTokenizer(config).to(device).eval()
            for input_kind in ("image", "clip", "long_clip"):
                cell = latency_cell(width, model, inputs, input_kind, preset, device, dtype)
                latency.append(cell)
                print(
                    f"[latency ] {width:<5} {input_kind:<9} {cell.frames:3d} frames: encode {cell.encode_ms:8.2f} ms "
                    f"({cell.encode_ms_per_frame:.3f}/frame), decode {cell.decode_ms:8.2f} ms "
                    f"({cell.decode_ms_per_frame:.3f}/frame)",
                    flush=True,
                )
    result = {
        "environment": environment,
        "load_average": {"cpus": os.cpu_count(), "start": load_start, "end": os.getloadavg()[0]},
        "peak_flops": peak,
        "train": [asdict(c) for c in train],
        "latency": [asdict(c) for c in latency],
        "summary": summarise(train, latency),
        "wall_s": time.perf_counter() - started,
    }
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "tokenizer.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(run.out / "tokenizer.md", markdown(result))
    print(f"wrote {run.out / 'tokenizer.json'} and tokenizer.md in {result['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
