"""`timeloom evaluate understanding`: a trained video-LLM on the built-in temporal QA or a benchmark's local copy.

    timeloom evaluate understanding --checkpoint CKPT --benchmark {temporal_qa,mvbench,tempcompass,ovobench,
        tomato,temporalbench} [--root DIR] [--frames N] [--out DIR] [--limit N]
        [--method generate|likelihood|pine]

Each question is answered with the benchmark's prompt and frame sampling, either by greedy decoding read
by the benchmark's rule (``generate``, the default) or by ranking the candidate letters (or yes/no) by
their summed log-probability in one batched forward pass (``likelihood``), optionally with PINE's
position-invariant reading of the option lines (``pine``: option order cannot sway the choice). Missing videos are listed
before any compute. Writes ``report.json`` (accuracy per task/aspect/format, the benchmark's overall rule,
``n``, ``n_unparsed``, ``n_unscored_judge``, ``n_missing``), ``report.md`` and ``predictions.jsonl`` (id,
prompt hash, raw output, parsed answer, correct) under ``--out``, and logs them to W&B (offline without
an API key; nothing when ``WANDB_MODE=disabled``).

``temporal_qa`` rebuilds the checkpoint's own held-out test split (the data module's settings saved in the
checkpoint) and adds chance; ``--control`` (`TemporalQA`'s controls: one frame, shuffled frames, …) shows
the same questions otherwise, and ``--controls`` reports every control beside the full video. Evaluation is deterministic (a
fixed item order, greedy choices) and batch-invariant (left padding, positions from the layout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from timeloom_understanding.benchmarks import BENCHMARKS, PROMPT_VERSIONS, load_benchmark, missing_videos
from timeloom_understanding.benchmarks.base import EvalItem, load_clip, option_lines, shown_duration
from timeloom_understanding.benchmarks.temporal_qa import items_from_conversations
from timeloom_understanding.data import CONTROLS, ConversationCollator, TemporalQADataModule, flatten_groups
from timeloom_understanding.module import VideoLLMModule
from timeloom_understanding.pine import option_segments
from timeloom_understanding.scoring import Scored, score, summarize
from timeloom_understanding.text import IGNORE_INDEX

__all__ = [
    "answer_items",
    "continuation_logprobs",
    "evaluate_items",
    "generate_replies",
    "load_module",
    "main",
    "media_settings",
    "rank_candidates",
    "temporal_qa_items",
]

CHOICES = ("temporal_qa", *BENCHMARKS)
METHODS = ("generate", "likelihood", "pine")


# -- the model ---------------------------------------------------------------------------------------------------
def load_module(checkpoint: str | Path, device: str = "cpu") -> VideoLLMModule:
    """A trained video-LLM in eval mode: a `timeloom fit` checkpoint or a `timeloom export` folder."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    module = VideoLLMModule.from_pretrained(path) if path.is_dir() else VideoLLMModule.from_checkpoint(path)
    return module.to(device).eval()


def media_settings(module: VideoLLMModule) -> dict[str, int]:
    """The frames, size and channels the model was trained on."""
    hparams = module.hparams
    channels = int(module.model.config.encoder.get("in_chans", 3))
    return {
        "frames": hparams["frames"],
        "height": hparams["height"],
        "width": hparams["width"],
        "channels": channels,
    }


def _conversation(item: EvalItem, video: Tensor | None, reply: str) -> dict[str, Any]:
    """The item as a LLaVA-style conversation whose assistant turn starts with ``reply`` (left open)."""
    question = item.prompt if video is None else f"<video>\n{item.prompt}"
    conversation = {
        "id": item.id,
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": reply}],
    }
    if video is not None:
        conversation["video"] = video
    return conversation | ({"system": item.system} if item.system else {})


def _collate(module: VideoLLMModule, conversations: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokenised batch whose replies stay open: each sample's closing ``<|end|>`` is cut off."""
    model = module.model
    shapes = [c["video"].shape[-3:] for c in conversations if "video" in c]
    per_media = model.visual_tokens_per_media(*shapes[0]) if shapes else 0
    collate = ConversationCollator(model.tokenizer, per_media, model.config.max_length)
    batch = collate(conversations)
    rows = torch.arange(len(conversations))
    batch["lengths"] = batch["lengths"] - 1
    for key, fill in (
        ("input_ids", model.tokenizer.pad_id),
        ("labels", IGNORE_INDEX),
        ("role", -1),
        ("turn", -1),
    ):
        batch[key][rows, batch["lengths"]] = fill
    return {k: v.to(module.device) if isinstance(v, Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def generate_replies(
    module: VideoLLMModule,
    items: list[EvalItem],
    videos: list[Tensor | None],
    max_new_tokens: int = 16,
    durations: list[float | None] | None = None,
) -> list[str]:
    """Greedy replies after each item's prefill.

    LITA time tokens become seconds where the duration (seconds) of the video shown is known, and stay raw
    (``<t17>``) where it is not; no token is dropped silently.
    """
    batch = _collate(module, [_conversation(i, v, i.prefill) for i, v in zip(items, videos)])
    replies = module.model.generate(batch, max_new_tokens=max_new_tokens)
    durations = durations or [None] * len(items)
    answers = module.model.render_replies(replies, [d or 1.0 for d in durations])
    return [(a.text if d else a.raw).strip() for a, d in zip(answers, durations)]


@torch.no_grad()
def continuation_logprobs(
    module: VideoLLMModule,
    items: list[EvalItem],
    videos: list[Tensor | None],
    continuations: list[str],
    pine: bool = False,
) -> list[tuple[float, bool]]:
    """``(Σ log p(continuation | prompt, prefill), whether greedy decoding would write it)`` per item.

    One forward pass for the whole list; only the continuation's tokens count, not the prefill's. With
    ``pine`` the option lines of each prompt are read position-invariantly (PINE), so their order cannot
    sway the answer.
    """
    tokenizer = module.model.tokenizer
    batch = _collate(
        module, [_conversation(i, v, i.prefill + c) for i, v, c in zip(items, videos, continuations)]
    )
    segments = None
    if pine:
        options = [option_lines(item.prompt) for item in items]
        segments = option_segments(tokenizer, batch["input_ids"], batch["lengths"], options)
    logits, targets, samples = module.model.supervised_logits(batch, segments)
    token_logprob = F.log_softmax(logits.float(), dim=-1).gather(1, targets[:, None])[:, 0]
    greedy = logits.argmax(-1) == targets
    results = []
    for b, item in enumerate(items):
        rows = torch.nonzero(samples == b).flatten()[
            len(tokenizer.encode(item.prefill)) if item.prefill else 0 :
        ]
        results.append((float(token_logprob[rows].sum()), bool(greedy[rows].all())))
    return results


def rank_candidates(
    module: VideoLLMModule, items: list[EvalItem], videos: list[Tensor], pine: bool = False
) -> list[str]:
    """Each item's candidate (option letter or yes/no) with the highest summed log-probability."""
    expanded = [(i, v, c) for i, v in zip(items, videos) for c in i.candidates]
    scores = continuation_logprobs(module, *map(list, zip(*expanded)), pine=pine)
    chosen, start = [], 0
    for item in items:
        values = [s for s, _ in scores[start : start + len(item.candidates)]]
        chosen.append(item.candidates[max(range(len(values)), key=values.__getitem__)])
        start += len(item.candidates)
    return chosen


def answer_items(
    module: VideoLLMModule,
    items: list[EvalItem],
    videos: list[Tensor],
    method: str,
    max_new_tokens: int,
    durations: list[float | None] | None = None,
) -> list[str]:
    """Responses to a batch: likelihood ranking (plain or PINE) where the item has candidates and it is asked
    for, else greedy."""
    responses: list[str | None] = [None] * len(items)
    if method in ("likelihood", "pine"):
        # PINE reads the option lines, the same number in every sample of a pass; items without them are
        # ranked plainly (as is a lone option)
        groups: dict[int, list[int]] = {}
        for k, item in enumerate(items):
            if item.candidates:
                lines = len(option_lines(item.prompt)) if method == "pine" else 0
                groups.setdefault(lines, []).append(k)
        for lines, ranked in groups.items():
            chosen = rank_candidates(
                module, [items[k] for k in ranked], [videos[k] for k in ranked], pine=lines > 1
            )
            for k, choice in zip(ranked, chosen):
                responses[k] = choice
    rest = [k for k, r in enumerate(responses) if r is None]
    if rest:
        durations = durations or [None] * len(items)
        replies = generate_replies(
            module,
            [items[k] for k in rest],
            [videos[k] for k in rest],
            max_new_tokens,
            [durations[k] for k in rest],
        )
        for k, reply in zip(rest, replies):
            responses[k] = reply
    return responses  # type: ignore[return-value]


# -- items ---------------------------------------------------------------------------------------------------
def temporal_qa_items(
    checkpoint: str | Path, module: VideoLLMModule, frames: int | None, control: str, limit: int | None = None
) -> list[EvalItem]:
    """The checkpoint's held-out `TemporalQA` test split: its data module rebuilt from the saved settings.

    Always questions (no caption groups, whatever share training used); ``frames`` and ``control`` override
    the saved settings; ``limit`` keeps the first questions only (whole conflict groups are rendered, then
    cut). A `timeloom export` folder saves no data settings: the model's frames, size and channels are used.
    """
    saved: dict[str, Any] = {}
    if Path(checkpoint).is_file():
        checkpoint_data = torch.load(checkpoint, map_location="cpu", weights_only=True)
        saved = dict(checkpoint_data.get("datamodule_hyper_parameters", {}))
    media = media_settings(module)
    settings = {"size": media["height"], "frames": media["frames"], "channels": media["channels"]}
    settings |= {key: value for key, value in saved.items() if not key.startswith("_")}
    settings |= {"task": "qa", "control": control} | ({"frames": frames} if frames else {})
    if "caption_share" in settings:
        settings["caption_share"] = 0.0
    dataset = TemporalQADataModule(**settings).build_dataset("test")
    groups = len(dataset) if limit is None else min(len(dataset), -(-limit // 2))
    return items_from_conversations(flatten_groups([dataset[k] for k in range(groups)]))[:limit]


def _batches(items: list[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def evaluate_items(
    module: VideoLLMModule,
    items: list[EvalItem],
    frames: int,
    method: str = "generate",
    batch_size: int = 8,
    max_new_tokens: int = 16,
    progress: bool = True,
) -> tuple[list[str | None], list[Scored | None], list[tuple[str, str]]]:
    """Responses and scores per item (None for a video that cannot be decoded) and the undecodable ones."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    media = media_settings(module)
    responses: list[str | None] = []
    scored: list[Scored | None] = []
    unreadable: list[tuple[str, str]] = []
    bar = tqdm(
        total=len(items),
        desc=f"evaluate {items[0].benchmark if items else ''}",
        unit="q",
        disable=not progress,
    )
    for chunk in _batches(items, batch_size):
        ready, videos, durations = [], [], []
        for item in chunk:
            if isinstance(item.video, Tensor):
                video, duration = item.video, None
            else:
                try:
                    video = _clip(item, frames, media)
                except (FileNotFoundError, ValueError) as error:
                    unreadable.append((item.id, str(error)))
                    continue
                duration = shown_duration(item.video, item.bounds, item.cut_at)
            ready.append(item)
            videos.append(video)
            durations.append(duration)
        replies = answer_items(module, ready, videos, method, max_new_tokens, durations) if ready else []
        answers = dict(zip((i.id for i in ready), replies))
        for item in chunk:
            response = answers.get(item.id)
            responses.append(response)
            scored.append(None if response is None else score(item, response))
        bar.update(len(chunk))
    bar.close()
    return responses, scored, unreadable


def _clip(item: EvalItem, frames: int, media: dict[str, int]) -> Tensor:
    return load_clip(
        item.video,
        frames,
        media["height"],
        media["width"],
        media["channels"],
        item.sampler,
        item.bounds,
        item.cut_at,
    )


def _frames_shown(items: list[EvalItem], frames: int) -> int:
    """Frames per question: the built-in videos come decoded (one frame under the middle-frame control)."""
    return items[0].video.shape[1] if items and isinstance(items[0].video, Tensor) else frames


# -- reports ------------------------------------------------------------------------------------------------------
def _prompt_hash(item: EvalItem) -> str:
    return hashlib.sha1(f"{item.system}\n{item.prompt}\n{item.prefill}".encode()).hexdigest()[:12]


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def report_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown page: the headline numbers, then one table per breakdown."""
    meta = report["meta"]
    lines = [
        f"# {report['benchmark']}: {meta['checkpoint']}",
        "",
        f"- overall: **{_percent(report['overall'])}%** ({report['overall_rule']})",
        f"- n = {report['n']} (scored {report['n_scored']}, unparsed {report['n_unparsed']}, empty "
        f"{report['n_empty']}, judge-only unscored {report['n_unscored_judge']}, missing {report['n_missing']}, "
        f"unreadable {report['n_unreadable']})",
        f"- method {meta['method']}, {meta['frames']} frames, prompt {meta['prompt_version']}, "
        f"{meta['seconds']:.1f} s",
    ]
    for key in (
        "chance",
        "group_accuracy",
        "task_mean",
        "match_rate",
        "backward_mean",
        "realtime_mean",
        "forward_mean",
    ):
        if report.get(key) is not None:
            lines.append(f"- {key.replace('_', ' ')}: {_percent(report[key])}%")
    if "mba" in report:
        lines.append("- MBA: " + ", ".join(f"{task} {_percent(v)}%" for task, v in report["mba"].items()))
        for name, values in report["mba_by"].items():
            lines.append(f"- MBA by {name}: " + ", ".join(f"{k} {_percent(v)}%" for k, v in values.items()))
    if "unscored_message" in report:
        lines.append(f"- {report['unscored_message']}")
    if "controls" in report:
        tasks = list(report["by"]["task"])
        rows = {
            "full video": {"overall": report["overall"]}
            | {t: g["accuracy"] for t, g in report["by"]["task"].items()}
        }
        rows |= {name: {"overall": c["overall"]} | c["task"] for name, c in report["controls"].items()}
        lines += ["", "| shown | overall % | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 2) + "|"]
        for name, values in rows.items():
            cells = " | ".join(_percent(values.get(t)) for t in tasks)
            lines.append(f"| {name} | {_percent(values['overall'])} | {cells} |")
    for name, groups in report["by"].items():
        lines += ["", f"| {name} | n | accuracy % |", "|---|---|---|"]
        lines += [f"| {value} | {g['n']} | {_percent(g['accuracy'])} |" for value, g in groups.items()]
    return "\n".join(lines) + "\n"


def write_outputs(
    out: Path,
    report: dict[str, Any],
    items: list[EvalItem],
    responses: list[str | None],
    scored: list[Scored | None],
) -> list[dict[str, Any]]:
    """``report.json``, ``report.md`` and ``predictions.jsonl`` under ``out``; returns the prediction rows."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "id": item.id,
            "prompt_hash": _prompt_hash(item),
            "output": response,
            "parsed": result.parsed if result else None,
            "answer": item.answer,
            "correct": result.correct if result else None,
        }
        for item, response, result in zip(items, responses, scored)
    ]
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(report_markdown(report))
    (out / "predictions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return rows


def log_to_wandb(out: Path, report: dict[str, Any], rows: list[dict[str, Any]]) -> Path | None:
    """The summary and the predictions table as one W&B run under ``out`` (offline without an API key)."""
    if os.environ.get("WANDB_MODE") == "disabled":
        return None
    from timeloom.logging import WandbLogger

    name = f"evaluate-{report['benchmark']}"
    logger = WandbLogger(project="timeloom", save_dir=str(out), name=name)
    logger.log_hyperparams(report["meta"])
    metrics = {f"{name}/overall": report["overall"] or 0.0, f"{name}/n": report["n"]}
    for group, values in report["by"].items():
        metrics |= {f"{name}/{group}/{value}": g["accuracy"] or 0.0 for value, g in values.items()}
    logger.log_metrics(metrics)
    columns = list(rows[0]) if rows else ["id"]
    logger.log_table(
        f"{name}/predictions", columns=columns, data=[[str(r[c]) for c in columns] for r in rows]
    )
    run = logger.experiment
    run_dir = Path(run.dir).parent if getattr(run, "dir", None) else None
    run.finish()
    return run_dir


def _control_summary(module: VideoLLMModule, args: argparse.Namespace, frames: int, control: str) -> dict:
    """Overall and per-aspect accuracy on the same temporal questions under a control."""
    items = temporal_qa_items(args.checkpoint, module, args.frames, control, args.limit)
    _, scored, _ = evaluate_items(module, items, frames, args.method, args.batch_size, args.max_new_tokens)
    report = summarize("temporal_qa", items, scored)
    by_task = {task: g["accuracy"] for task, g in report["by"]["task"].items()}
    return {"n": report["n"], "overall": report["overall"], "task": by_task}


# -- the command ------------------------------------------------------------------------------------------------
def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="timeloom evaluate understanding", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="a timeloom fit checkpoint or a timeloom export folder"
    )
    parser.add_argument("--benchmark", required=True, choices=CHOICES)
    parser.add_argument("--root", type=Path, help="the benchmark's local copy (not for temporal_qa)")
    parser.add_argument(
        "--frames", type=int, help="frames per question (default: as the checkpoint was trained)"
    )
    parser.add_argument(
        "--out", type=Path, help="where the reports go (default outputs/evaluate/<benchmark>)"
    )
    parser.add_argument("--limit", type=int, help="only the first N questions")
    parser.add_argument("--method", choices=METHODS, default="generate")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the model runs, e.g. cuda")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument(
        "--control", choices=CONTROLS, default="none", help="temporal_qa only: what the model is shown"
    )
    parser.add_argument(
        "--controls",
        action="store_true",
        help="temporal_qa: also ask the same questions with only the middle frame and with shuffled frames",
    )
    parser.add_argument(
        "--allow-missing", action="store_true", help="skip (and count) questions whose video is missing"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(list(argv) if argv is not None else [])
    if args.benchmark != "temporal_qa" and args.root is None:
        raise SystemExit(
            f"evaluate understanding: --root DIR (the local copy of {args.benchmark}) is required"
        )
    if args.controls and (args.benchmark != "temporal_qa" or args.control != "none"):
        raise SystemExit(
            "evaluate understanding: --controls is for temporal_qa on the full video (--control none)"
        )
    try:
        module = load_module(args.checkpoint, args.device)
    except FileNotFoundError as error:
        raise SystemExit(f"evaluate understanding: {error}") from error
    frames = args.frames or media_settings(module)["frames"]
    if args.benchmark == "temporal_qa":
        items = temporal_qa_items(args.checkpoint, module, args.frames, args.control, args.limit)
    else:
        items = load_benchmark(args.benchmark, args.root)
    items = items[: args.limit] if args.limit else items
    missing = missing_videos(items)
    if missing and not args.allow_missing:
        listing = "\n".join(f"  {item_id}: {path}" for item_id, path in missing[:20])
        more = f"\n  … and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise SystemExit(
            f"evaluate understanding: {len(missing)} of {len(items)} videos are missing under {args.root} "
            f"(nothing was run; --allow-missing skips them):\n{listing}{more}"
        )
    absent = {item_id for item_id, _ in missing}
    items = [item for item in items if item.id not in absent]
    started = time.perf_counter()
    responses, scored, unreadable = evaluate_items(
        module, items, frames, args.method, args.batch_size, args.max_new_tokens
    )
    seconds = time.perf_counter() - started
    answered = [(i, s) for i, s in zip(items, scored) if s is not None]
    report = summarize(args.benchmark, [i for i, _ in answered], [s for _, s in answered])
    report |= {
        "n_missing": len(missing),
        "n_unreadable": len(unreadable),
        "unreadable": unreadable,
        "meta": {
            "checkpoint": str(args.checkpoint),
            "benchmark": args.benchmark,
            "root": str(args.root) if args.root else None,
            "frames": _frames_shown(items, frames),
            "method": args.method,
            "control": args.control,
            "limit": args.limit,
            "prompt_version": PROMPT_VERSIONS[args.benchmark],
            "seconds": seconds,
            "questions_per_second": len(items) / seconds if seconds else None,
        },
    }
    if args.controls:
        report["controls"] = {
            control: _control_summary(module, args, frames, control)
            for control in CONTROLS
            if control != "none"
        }
    out = args.out or Path("outputs/evaluate") / args.benchmark
    rows = write_outputs(out, report, items, responses, scored)
    run_dir = log_to_wandb(out, report, rows)
    print(report_markdown(report))
    print(f"wrote {out / 'report.json'}, {out / 'report.md'}, {out / 'predictions.jsonl'}")
    if run_dir:
        print(f"W&B run {run_dir} (offline runs upload with `wandb sync {run_dir}`)")
    return 0
