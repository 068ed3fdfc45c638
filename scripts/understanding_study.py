"""Understanding study (issue #6): score trained tiny video-LLMs on held-out built-in temporal QA, side by side.

Each run is a `timeloom fit` checkpoint of a `VideoLLMModule`. A reply is right when its deciding first token
(option letter or yes/no) is the greedy choice, as in the module's ``val/accuracy``; on top of the module's
per-aspect numbers this reports reversed-playback twins, per-format accuracy, *both twins of a conflict group
right* (a frame-order-blind model cannot do better than chance there) and each row's chance level (1 / number
of options, averaged over the items). The test split's glyphs are disjoint from training's.

    python scripts/understanding_study.py score NAME=CKPT[@frames=32][@control=middle_frame] ... \
        --groups 256 --out benchmarks/understanding-quality.json
    python scripts/understanding_study.py figure benchmarks/understanding-quality.json \
        --out docs/understanding-accuracy.png
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path

import torch
from timeloom_understanding.data import ASPECTS, TemporalQA, flatten_groups
from timeloom_understanding.module import VideoLLMModule
from tqdm import tqdm

from timeloom.module import TimeloomModule


def first_token_correct(module: VideoLLMModule, items: list[dict]) -> torch.Tensor:
    """Per item: is the first supervised token (the deciding one) the greedy choice?"""
    batch = module.collate(items)
    logits, targets, samples = module.model.supervised_logits(batch)
    first = torch.ones_like(samples, dtype=torch.bool)
    first[1:] = samples[1:] != samples[:-1]
    if len(samples[first]) != len(items):
        raise ValueError("an item has no supervised answer token")
    return logits[first].argmax(-1) == targets[first]


def score_run(checkpoint: str, frames: int | None, control: str, groups: int, batch_groups: int) -> dict:
    """Accuracy table of one checkpoint on the test split (optionally at another frame count or control)."""
    overrides = {"frames": frames} if frames else {}
    module = TimeloomModule.from_checkpoint(checkpoint, **overrides).eval()
    hp = module.hparams
    dataset = TemporalQA(
        "test",
        length=groups,
        size=hp["height"],
        frames=hp["frames"],
        control=control,
        channels=module.model.config.encoder.get("in_chans", 1),
    )
    tallies: dict[str, list[float]] = defaultdict(list)
    pairs: dict[str, list[float]] = defaultdict(list)
    started = time.perf_counter()
    with torch.no_grad():
        for start in tqdm(range(0, groups, batch_groups), desc=Path(checkpoint).parts[-3], leave=False):
            chunk = [dataset[i] for i in range(start, min(start + batch_groups, groups))]
            items = flatten_groups(chunk)
            correct = first_token_correct(module, items).tolist()
            for item, right in zip(items, correct):
                chance = 1 / len(item["options"])
                keys = ["all", f"aspect/{item['aspect']}", f"format/{item['format']}"]
                if item["reversed"]:
                    keys.append("reversed")
                for key in keys:
                    tallies[key].append(right)
                    tallies[f"chance:{key}"].append(chance)
            for g in range(len(chunk)):
                both = correct[2 * g] and correct[2 * g + 1]
                pairs["pair/all"].append(both)
                pairs[f"pair/{chunk[g][0]['aspect']}"].append(both)
    table = {key: sum(v) / len(v) for key, v in {**tallies, **pairs}.items()}
    table["count:all"] = len(tallies["all"])
    table["seconds"] = time.perf_counter() - started
    return table


def parse_run(text: str) -> tuple[str, str, dict]:
    name, _, rest = text.partition("=")
    checkpoint, *options = rest.split("@")
    settings = dict(option.split("=", 1) for option in options)
    unknown = set(settings) - {"frames", "control"}
    if not name or not checkpoint or unknown:
        raise SystemExit(f"bad run {text!r}: use NAME=CKPT[@frames=N][@control=middle_frame]")
    return name, checkpoint, settings


def score(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for text in args.runs:
        name, checkpoint, settings = parse_run(text)
        frames = int(settings["frames"]) if "frames" in settings else None
        table = score_run(checkpoint, frames, settings.get("control", "none"), args.groups, args.batch_groups)
        results[name] = {"checkpoint": checkpoint, **settings, **table}
        shown = {k: round(v, 3) for k, v in table.items() if not k.startswith("chance")}
        print(name, json.dumps(shown))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def figure(args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(args.results).read_text())
    names = args.names or list(results)
    columns = [f"aspect/{a}" for a in ASPECTS] + ["reversed", "all"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(1.2 * len(columns) + 2, 4))
    for k, name in enumerate(names):
        values = [results[name].get(c, float("nan")) for c in columns]
        ax.bar([i + k * width for i in range(len(columns))], values, width, label=name)
    chance = [results[names[0]].get(f"chance:{c}", float("nan")) for c in columns]
    for i, level in enumerate(chance):
        ax.hlines(level, i - width / 2, i + 0.8 - width / 2, colors="black", linestyles="dashed")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(columns))])
    ax.set_xticklabels([c.removeprefix("aspect/") for c in columns])
    ax.set_ylim(0, 1)
    ax.set_ylabel("held-out accuracy (first token)")
    ax.set_title("Tiny video-LLMs on built-in temporal QA (dashed: chance)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print("wrote", args.out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(required=True)
    scoring = commands.add_parser("score", help="score checkpoints on the test split")
    scoring.add_argument("runs", nargs="+", help="NAME=CKPT[@frames=N][@control=middle_frame]")
    scoring.add_argument("--groups", type=int, default=256, help="conflict groups (twice as many items)")
    scoring.add_argument("--batch-groups", type=int, default=32)
    scoring.add_argument("--out", default="benchmarks/understanding-quality.json")
    scoring.set_defaults(handler=score)
    plotting = commands.add_parser("figure", help="accuracy per aspect per run")
    plotting.add_argument("results")
    plotting.add_argument("--names", nargs="*")
    plotting.add_argument("--out", default="docs/understanding-accuracy.png")
    plotting.set_defaults(handler=figure)
    args = parser.parse_args()
    args.handler(args)


if __name__ == "__main__":
    main()
