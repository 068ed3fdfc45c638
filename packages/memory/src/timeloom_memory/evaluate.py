"""`timeloom evaluate memory`: recall accuracy of a trained memory LM by sequence length and needle depth.

    timeloom evaluate memory --checkpoint CKPT --task sniah --lengths 1024,2048,4096,8192 \
        --depths 0,0.25,0.5,0.75,1

``CKPT`` is a `timeloom fit` checkpoint (``.ckpt``) or a `timeloom export` folder of a `MemoryLMModule`.
Each (length, depth) cell draws ``--samples`` test items of the task (MQAR, S-NIAH, selective copying) at that
length; depth (a fraction of the haystack) applies to S-NIAH only. Task options (vocabulary, pairs, kind …)
come from the checkpoint's data module when it saved them, else from the flags. Lengths beyond training run
as a stream: pieces of ``--piece`` tokens with the memory, window caches and positions carried (outputs do not
depend on the cuts); a model with full causal attention, which keeps no cache, reads each sequence at once.

Scores at the labelled positions: ``accuracy`` (per token) and ``exact_match`` (every labelled token of a
sequence right; S-NIAH's metric, the whole answer). Writes ``memory-<task>.json``, ``.md`` (a length × depth
table) and ``.png`` (the heat-map of the main metric) under ``--out``; ``--wandb`` logs them too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from timeloom.module import TimeloomModule
from timeloom_memory.module import MemoryLMModule
from timeloom_memory.tasks import IGNORE, MQAR, SNIAH, SelectiveCopying
from timeloom_memory.titans import TitansLM

__all__ = ["build_dataset", "hidden_states", "main", "score"]

TASKS = {"mqar": MQAR, "sniah": SNIAH, "selective_copy": SelectiveCopying}
MAIN_METRIC = {"mqar": "accuracy", "sniah": "exact_match", "selective_copy": "accuracy"}
# Options of each task that do not depend on the length (lengths and depths come from the grid).
TASK_OPTIONS = {
    "mqar": ("vocab_size", "num_pairs", "power_a", "random_non_queries"),
    "sniah": ("kind", "vocab_size", "random_phase"),
    "selective_copy": ("num_tokens", "alphabet"),
}


# --------------------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------------------
def score(predictions: Tensor, labels: Tensor) -> dict[str, float]:
    """Accuracy over labelled positions and exact match over sequences (``labels == -100`` is ignored).

    ``predictions`` and ``labels`` are ``(N, L)`` token ids; a sequence without any label is an error.
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ")
    labelled = labels != IGNORE
    if not labelled.any(1).all():
        raise ValueError("every scored sequence needs at least one labelled position")
    right = (predictions == labels) & labelled
    return {
        "accuracy": int(right.sum()) / int(labelled.sum()),
        "exact_match": int((right.sum(1) == labelled.sum(1)).sum()) / len(labels),
        "sequences": len(labels),
        "labelled": int(labelled.sum()),
    }


# --------------------------------------------------------------------------------------------------------
# Data and model
# --------------------------------------------------------------------------------------------------------
def build_dataset(task: str, length: int, depth: float | None, samples: int, seed: int, **options) -> Dataset:
    """``samples`` test items of ``task`` with input length ``length`` (S-NIAH: needle at ``depth`` ∈ [0, 1])."""
    common = dict(length=samples, seed=seed, split="test")
    if task == "mqar":
        return MQAR(seq_len=length, **common, **options)
    if task == "sniah":
        return SNIAH(seq_len=length, depths=(100 * depth,), **common, **options)
    num_tokens = options.get("num_tokens", 8)
    if length <= 2 * num_tokens:
        raise ValueError(f"selective_copy length {length} must exceed 2·num_tokens = {2 * num_tokens}")
    return SelectiveCopying(noise_len=length - 2 * num_tokens, **common, **options)


def load_model(path: Path) -> MemoryLMModule:
    """A `MemoryLMModule` from a ``.ckpt`` file or an exported folder, in eval mode."""
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    module = TimeloomModule.from_pretrained(path) if path.is_dir() else TimeloomModule.from_checkpoint(path)
    if not isinstance(module, MemoryLMModule):
        raise ValueError(f"{path} holds a {type(module).__name__}; `evaluate memory` needs a MemoryLMModule")
    return module.eval()


def saved_task_options(path: Path, task: str) -> dict:
    """The task options the checkpoint's data module saved, when it is this task's data module."""
    if path.is_dir():
        return {}
    saved = torch.load(path, map_location="cpu", weights_only=True).get("datamodule_hyper_parameters", {})
    names = {"mqar": "MQAR", "sniah": "SNIAH", "selective_copy": "SelectiveCopying"}
    if not str(saved.get("_class_path", "")).endswith(f"{names[task]}DataModule"):
        return {}
    return {k: v for k, v in saved.items() if k in TASK_OPTIONS[task]}


def hidden_states(model: TitansLM, input_ids: Tensor, piece: int) -> Tensor:
    """Final hidden states ``(B, L, dim)``, read as a stream of ``piece``-token calls with carried state.

    MAC continues only at segment boundaries, so its pieces are whole segments. Full causal attention keeps
    no cache: such a model reads the sequence in one call.
    """
    blocks = list(model.blocks)
    if any(block.kind == "attention" for block in blocks) or input_ids.shape[1] <= piece:
        return model.features(input_ids)[0]
    segment = model.config.segment
    if any(block.kind == "mac" for block in blocks):
        piece = max(segment, piece // segment * segment)
    states, outputs = None, []
    for start in range(0, input_ids.shape[1], piece):
        hidden, states = model.features(input_ids[:, start : start + piece], states)
        outputs.append(hidden)
    return torch.cat(outputs, 1)


@torch.no_grad()
def predict(model: TitansLM, input_ids: Tensor, labels: Tensor, piece: int) -> Tensor:
    """Arg-max predictions at the labelled positions, ``IGNORE`` elsewhere (logits only where scored)."""
    labelled = labels != IGNORE
    hidden = hidden_states(model, input_ids, piece)
    predictions = torch.full_like(labels, IGNORE)
    predictions[labelled] = model.logits(hidden[labelled]).argmax(-1)
    return predictions


# --------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------
def markdown(report: dict) -> str:
    metric, lengths = report["main_metric"], report["lengths"]
    lines = [
        f"# `timeloom evaluate memory`: {report['task']} ({metric} by length and depth)",
        "",
        f"Checkpoint `{report['checkpoint']}` ({report['model']['block']}, "
        f"{report['model']['parameters']:,} parameters); task options `{json.dumps(report['task_options'])}`; "
        f"{report['samples']} samples per cell, stream pieces of {report['piece']} tokens.",
        "",
        "| depth \\ length | " + " | ".join(str(n) for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for depth in report["depths"]:
        row = {c["length"]: c for c in report["cells"] if c["depth"] == depth}
        label = "all" if depth is None else f"{depth:g}"
        lines.append(f"| {label} | " + " | ".join(f"{row[n][metric]:.3f}" for n in lengths) + " |")
    lines += ["", "Per length, all depths: " + ", ".join(
        f"{n}: accuracy {report['by_length'][str(n)]['accuracy']:.3f}, exact match "
        f"{report['by_length'][str(n)]['exact_match']:.3f}" for n in lengths
    )]  # fmt: skip
    return "\n".join(lines) + "\n"


def heat_map(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, lengths, depths = report["main_metric"], report["lengths"], report["depths"]
    grid = [[next(c[metric] for c in report["cells"] if c["length"] == n and c["depth"] == d) for n in lengths]
            for d in depths]  # fmt: skip
    figure, axes = plt.subplots(figsize=(1.1 * len(lengths) + 2, 0.55 * len(depths) + 1.6))
    image = axes.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            axes.text(j, i, f"{value:.2f}", ha="center", va="center", color="w" if value < 0.6 else "k")
    axes.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    axes.set_yticks(range(len(depths)), ["all" if d is None else f"{d:g}" for d in depths])
    axes.set_xlabel("sequence length")
    axes.set_ylabel("needle depth" if report["task"] == "sniah" else "")
    axes.set_title(f"{report['task']}: {metric}")
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"{flag} takes comma-separated numbers; got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeloom evaluate memory", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .ckpt file or an exported folder")
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--lengths", default="1024,2048,4096,8192")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1", help="needle depths in [0, 1] (sniah)")
    parser.add_argument("--samples", type=int, default=32, help="test sequences per cell")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--piece", type=int, default=1024, help="tokens per streamed call")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--vocab-size", type=int, help="mqar, sniah (default: the checkpoint's data, else model)"
    )
    parser.add_argument("--num-pairs", type=int, help="mqar")
    parser.add_argument("--kind", choices=["passkey", "number", "uuid"], help="sniah")
    parser.add_argument("--random-phase", action=argparse.BooleanOptionalAction,
                        help="sniah passkey: a random filler phase per sequence (default: as the checkpoint trained)")  # fmt: skip
    parser.add_argument("--num-tokens", type=int, help="selective_copy")
    parser.add_argument("--alphabet", type=int, help="selective_copy")
    parser.add_argument("--out", type=Path, default=Path("outputs/evaluate"))
    parser.add_argument("--wandb", action="store_true", help="log the table and heat-map to W&B")
    args = parser.parse_args(argv)

    lengths = _numbers(args.lengths, int, "--lengths")
    depths = _numbers(args.depths, float, "--depths")
    if not lengths or any(n < 2 for n in lengths):
        raise SystemExit(f"--lengths must be integers ≥ 2; got {args.lengths!r}")
    if args.task == "sniah":
        bad = [d for d in depths if not 0 <= d <= 1]
        if not depths or bad:
            raise SystemExit(f"--depths must be fractions in [0, 1]; got {bad or args.depths!r}")
    else:
        depths = [None]  # depth is S-NIAH's axis; the other tasks get one row over all positions
    for name in ("samples", "batch_size", "piece"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be ≥ 1; got {getattr(args, name)}")

    module = load_model(args.checkpoint)
    model = module.model
    options = saved_task_options(args.checkpoint, args.task)
    options.update(
        {k: getattr(args, k) for k in TASK_OPTIONS[args.task] if getattr(args, k, None) is not None}
    )
    if "vocab_size" in TASK_OPTIONS[args.task]:
        options.setdefault("vocab_size", model.config.vocab_size)
    needed = options.get("vocab_size", options.get("alphabet", 16))
    if needed > model.config.vocab_size:
        raise SystemExit(
            f"the task needs {needed} tokens but the model's vocab_size is {model.config.vocab_size}"
        )

    cells = []
    progress = tqdm(total=len(lengths) * len(depths) * args.samples, desc=f"evaluate {args.task}", unit="seq")
    for length in lengths:
        for depth in depths:
            data = build_dataset(args.task, length, depth, args.samples, args.seed, **options)
            predictions, labels = [], []
            for start in range(0, len(data), args.batch_size):
                items = [data[i] for i in range(start, min(start + args.batch_size, len(data)))]
                ids = torch.stack([item["input_ids"] for item in items])
                target = torch.stack([item["labels"] for item in items])
                predictions.append(predict(model, ids, target, args.piece))
                labels.append(target)
                progress.update(len(items))
            cells.append(
                {"length": length, "depth": depth, **score(torch.cat(predictions), torch.cat(labels))}
            )
    progress.close()

    by_length = {}
    for length in lengths:
        row = [c for c in cells if c["length"] == length]
        labelled, sequences = sum(c["labelled"] for c in row), sum(c["sequences"] for c in row)
        by_length[str(length)] = {
            "accuracy": sum(c["accuracy"] * c["labelled"] for c in row) / labelled,
            "exact_match": sum(c["exact_match"] * c["sequences"] for c in row) / sequences,
        }
    report = {
        "task": args.task, "checkpoint": str(args.checkpoint), "task_options": options,
        "model": {"block": model.config.block, "parameters": model.num_parameters(),
                  "vocab_size": model.config.vocab_size},
        "lengths": lengths, "depths": depths, "samples": args.samples, "piece": args.piece, "seed": args.seed,
        "main_metric": MAIN_METRIC[args.task], "cells": cells, "by_length": by_length,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"memory-{args.task}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(markdown(report))
    picture = heat_map(report, stem.with_suffix(".png"))
    print(markdown(report))
    print(f"wrote {stem}.json, .md and .png")
    if args.wandb:
        from timeloom.logging import WandbLogger

        logger = WandbLogger(save_dir=str(args.out), name=f"evaluate-memory-{args.task}")
        logger.log_metrics(
            {f"evaluate/{args.task}/{n}/{k}": v for n, m in by_length.items() for k, v in m.items()}
        )
        logger.log_image(f"evaluate/{args.task}/heat_map", [str(picture)])
        logger.experiment.finish()
    return 0
