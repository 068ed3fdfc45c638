"""Memory studies on a CPU budget: MQAR scaling and S-NIAH length generalisation (issue #7).

    python scripts/memory_study.py mqar attention s64            # one MQAR run (through /tmp/cpuslot on a shared box)
    python scripts/memory_study.py sniah titans-mac-sniah         # one S-NIAH training run
    python scripts/memory_study.py sniah-curriculum titans-mac    # S-NIAH in stages: 64 tokens, depth 0 → 256
    python scripts/memory_study.py sniah-eval                     # accuracy by test length of the S-NIAH runs
    python scripts/memory_study.py report                         # curves (docs/memory-*.png) + results JSON

Each run is `timeloom fit` on a model config from configs/memory/ with the setting's data flags, a CPU-time
budget (`timeloom.throughput.CpuTimeBudget`, so a shared machine does not shorten it; a wall-clock cap of
three times the budget stops a stuck run), the CSV logger and early stopping once validation accuracy reaches
0.99 (Zoology's stop). A run writes ``runs/memory-study/<task>/<model>-<setting>/summary.json`` (CPU minutes,
wall time, steps, best accuracy) beside its CSV; a new run moves an older one of the same name to
``<task>/superseded/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs/memory-study"
TIMELOOM = str(Path(sys.executable).parent / "timeloom")

# model name -> its config under configs/memory/
MODELS = {
    "attention": "attention-tiny.yaml",
    "swa": "swa-tiny.yaml",
    "titans-mac": "titans-mac-tiny.yaml",
    "titans-mag": "titans-mag-tiny.yaml",
    "titans-mal": "titans-mal-tiny.yaml",
    "titans-lmm": "titans-lmm-tiny.yaml",
    "titans-mag-delta": "titans-mag-delta-tiny.yaml",
    "titans-mac-delta": "titans-mac-delta-tiny.yaml",
    "titans-mal-delta": "titans-mal-delta-tiny.yaml",
}
# MQAR settings, grown from the start (seq 64 / 4 pairs / vocab 256) to Zoology's seq 256 / 16 pairs
# (vocab 512 there: MQAR needs vocab > seq).
MQAR_SETTINGS = {
    "s64": dict(seq_len=64, num_pairs=4, vocab_size=256),
    "s128": dict(seq_len=128, num_pairs=8, vocab_size=256),
    "s256": dict(seq_len=256, num_pairs=16, vocab_size=512),
}
# S-NIAH pass-key: the model configs and the lengths tested (the training length is in the config).
SNIAH_MODELS = {
    "titans-mac": "titans-mac-sniah-tiny.yaml",
    "swa": "swa-sniah-tiny.yaml",
    "attention": "attention-sniah-tiny.yaml",
}
# Trained at 64 tokens with the needle at depth 0 or 25 %: always in an earlier MAC segment (32) than the query, so
# MAC reaches it only through its memory (its attention stays inside a segment). Two stacked windows of 32 reach 62
# tokens back, so at 64 the sliding window sees it too, and beyond that it cannot. With every depth mixed, the needles
# next to the query are copied by attention within ~75 steps and MAC's memory path stays at chance (seq 64, 150
# steps). Tested at every depth, 64 to 8K tokens.
SNIAH_TRAIN_LENGTH, SNIAH_TRAIN_DEPTHS = 64, (0, 25)
SNIAH_TEST_LENGTHS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)
# A length curriculum (`sniah-curriculum`): MAC's memory path learns with the needle always at depth 0 of 64
# tokens, not with depths mixed, so each stage starts from the last one's weights (`init_from`) and widens
# the depths, then the length. Stage: (train length, needle depths in percent, CPU-minutes). Stop 13 ran stages
# 3 and 4 with `--model.init_args.optimizer.init_args.lr=0.001` (at 3e-3 stage 3 collapsed to chance at step
# ~180) and stage 4 with `--data.init_args.batch_size=16` (2 s per step at 1K), all on the fixed haystack that the
# configs had then (`--data.init_args.random_phase=false` reproduces it; the configs now start the filler anywhere).
SNIAH_CURRICULUM = (
    (64, (0,), 3.0),
    (64, (0, 25), 3.0),
    (256, (0, 25, 50, 75), 8.0),
    (1024, (0, 25, 50, 75), 8.0),
)
# Tagged S-NIAH runs (`sniah --tag`, each rule in benchmarks/memory-quality.md §2.0) that `sniah-eval` scores and
# `report` plots: stop 17's runs trained at 1K.
SNIAH_TAGGED_RUNS = (
    "swa-1k",
    "titans-mac-1k-phase",
    "titans-mac-mix-phase",
    "titans-mac-mix-phase-all-depths",
)
# What each plotted S-NIAH run was trained on (the figure's legend).
SNIAH_TRAINED_ON = {
    "titans-mac": "64",
    "swa": "64",
    "titans-mac-curriculum-stage2": "64",
    "titans-mac-curriculum-stage3": "256",
    "titans-mac-curriculum": "1K (stage 4)",
    "swa-1k": "1K",
    "titans-mac-1k-phase": "stage 4 + 1K, random phase",
    "titans-mac-mix-phase": "stage 4 + 64-1K mixed, random phase",
    "titans-mac-mix-phase-all-depths": "the same + depth 100 %",
}
# Long-video recall: Titans memory + window against the window alone.
# name -> (config, flags); "memory-keep" starts the memory's forgetting at α ≈ 3e-4 instead of 0.018 per token
# (0.018 leaves (1 − 0.018)^224 ≈ 2 % of the first clip's write after the 7 clips that follow it).
VIDEO_MODELS = {
    "window": ("video-recall-window-tiny.yaml", []),
    "memory": ("video-recall-tiny.yaml", []),
    "memory-keep": ("video-recall-tiny.yaml", ["--model.init_args.config.memory.memory.alpha_bias=-8"]),
    # HCAM over frames: every frame read (k = M = 16), nothing forgotten, the reads train the frame encoder
    "hcam": ("video-recall-hcam-tiny.yaml", []),
    "hcam-seed1": ("video-recall-hcam-tiny.yaml", ["--seed_everything=1"]),  # another initialisation
    # the same with a top 4 of the 16 frames
    "hcam-top4-grad": ("video-recall-hcam-tiny.yaml", ["--model.init_args.config.hcam_top_k=4"]),
    # every frame, with HCAM's stop-gradient on stored frames: only the window's "last" question trains the encoder
    "hcam-all": ("video-recall-hcam-tiny.yaml", ["--model.init_args.config.hcam_detach_memory=true"]),
    # Titans, matrix memory (depth 1), forgetting nearly off, read by each question (benchmarks/memory-quality.md §3)
    "titans-question": ("video-recall-titans-question-tiny.yaml", []),
    # the same memory read by 4 learned readout tokens in front of the window instead of the questions
    "titans-question-tokens": (
        "video-recall-titans-question-tiny.yaml",
        ["--model.init_args.config.question_read=false", "--model.init_args.config.memory.readout_tokens=4"],
    ),
    # the same with weight decay 0: wd 0.1 pulls the forgetting gate's bias from -8 to -5.2 in 2,178 steps (§3)
    "titans-question-wd0": (
        "video-recall-titans-question-tiny.yaml",
        ["--model.init_args.optimizer.init_args.weight_decay=0.0"],
    ),
}
TARGET = 0.99
MQAR_FIGURE = ROOT / "docs/memory-mqar-curves.png"
# The settings `mqar-curriculum`'s second stage trains beside seq 256 (§1.0's mixture; stop 17 also ran `s128` alone)
STAGE2_MIX = ("s64", "s128")
# Tagged curricula (`mqar-curriculum --tag`) whose stage-2 runs `<model>-s256-<tag>` `report` plots beside the
# untagged `<model>-s256`, with what each tag changed (the legend's words).
REPORTED_TAGS = {
    "s16": "stop 16",
    "s16-nodecayvec": "stop 16, no decay on vectors",
    "s16-nodecayvec-seed1": "stop 16, no decay on vectors, seed 1",
    "s17-nodecayvec-seed2": "stop 17, no decay on vectors, seed 2",
    "s16-mac-nodecayvec": "stop 16, block MAC, no decay on vectors",
    "s16-mal-nodecayvec": "stop 16, block MAL, no decay on vectors",
    "s17-mix128-seed3": "stop 17, 256 beside 128 only, seed 3",
    "s17-mix128-seed4": "stop 17, 256 beside 128 only, seed 4",
    "s17-mix128-seed5": "stop 17, 256 beside 128 only, seed 5",
    "s17-mix128-mac": "stop 17, block MAC, 256 beside 128 only",
    "s17-mix128-mal": "stop 17, block MAL, 256 beside 128 only",
    "s18-mac-stream-seed0": "stop 18, block MAC storing the stream, seed 0",
    "s18-mac-stream-seed1": "stop 18, block MAC storing the stream, seed 1",
    "s18-mac-stream-seed2": "stop 18, block MAC storing the stream, seed 2",
    "s18-mal-stream": "stop 18, block MAL attending to the stream",
    "s19-mal-residual-seed0": "stop 19, block MAL, memory as a residual sub-layer",
    "s19-mal-residual-zero-seed0": "stop 19, block MAL, residual memory starting at zero, seed 0",
    "s19-mal-residual-zero-seed1": "stop 19, block MAL, residual memory starting at zero, seed 1",
    "s20-mal-residual-w1-seed0": "stop 20, block MAL, residual memory, window 1 in stage 1, seed 0",
    "s20-mal-residual-w1-seed1": "stop 20, block MAL, residual memory, window 1 in stage 1, seed 1",
    "s20-mal-residual-w1-seed2": "stop 20, block MAL, residual memory, window 1 in stage 1, seed 2",
    "s20-seed0": "stop 20, seed 0",
    "s20-seed1": "stop 20, seed 1",
    "s18-stream": "stop 18, storing the stream",
    "s18": "stop 18",
    "s18-mag-seed3": "stop 18, stop 17's seed-3 run again",
    "s18-stream-sigmaatt": "stop 18, storing the stream, σ on attention",
    "s18-mlp": "stop 18, a 2-layer MLP memory",
}


def committed_memory_package() -> tuple[str, dict]:
    """The memory package as committed at HEAD (a snapshot on PYTHONPATH): runs queued for long on a shared
    working tree then train the code of one commit, never someone's half-made edit."""
    commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    snapshot = Path("/tmp/memory-study-src") / commit
    if (
        not snapshot.exists()
    ):  # extracted aside, then renamed: two runs starting at once never share a half-made one
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=snapshot.parent, prefix=f".{commit}-"))
        archive = subprocess.run(["git", "archive", commit, "packages/memory/src"], cwd=ROOT, check=True,
                                 capture_output=True).stdout  # fmt: skip
        subprocess.run(["tar", "-x", "-C", str(staging)], input=archive, check=True)
        try:
            staging.rename(snapshot)
        except OSError:  # another run got there first with the same commit's files
            shutil.rmtree(staging)
    env = dict(os.environ, PYTHONPATH=str(snapshot / "packages/memory/src"))
    return commit, env


def fit(config: str, run_dir: Path, flags: list[str], minutes: float, target: float = TARGET) -> None:
    """`timeloom fit` with a CPU-time budget of ``minutes``, CSV metrics, and a stop at validation accuracy
    ``target``."""
    commit, env = committed_memory_package()
    if run_dir.exists():  # keep the older run (its CSV would otherwise mix into this one's)
        superseded = run_dir.parent / "superseded" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        superseded.parent.mkdir(parents=True, exist_ok=True)
        run_dir.rename(superseded)
    run_dir.mkdir(parents=True)
    # A wall-clock cap that only a stuck run meets: 3x, since a slot on the shared machine measured about
    # half a core of CPU time per wall second (2x would cut runs at the budget's edge).
    cap = round(3 * minutes * 60)
    wall_cap = f"00:{cap // 3600:02d}:{cap // 60 % 60:02d}:{cap % 60:02d}"
    command = [
        TIMELOOM, "fit", "-c", str(ROOT / "configs/memory" / config), "-c", str(ROOT / "configs/logger/csv.yaml"),
        f"--trainer.default_root_dir={run_dir}", f"--checkpoint.dirpath={run_dir}/checkpoints",
        f"--trainer.max_time={wall_cap}", "--trainer.max_epochs=-1", "--trainer.enable_progress_bar=false",
        # each callback's flags follow its own `callbacks+=`
        "--trainer.callbacks+=EarlyStopping", "--trainer.callbacks.monitor=val/acc",
        "--trainer.callbacks.mode=max", f"--trainer.callbacks.stopping_threshold={target}",
        "--trainer.callbacks.patience=100000",
        "--trainer.callbacks+=timeloom.throughput.CpuTimeBudget", f"--trainer.callbacks.minutes={minutes}", *flags,
    ]  # fmt: skip
    start = time.time()
    status = subprocess.call(command, cwd=ROOT, env=env)
    curve = read_curve(run_dir)
    summary = {
        "config": config,
        "commit": commit,
        "flags": flags,
        "budget_cpu_minutes": minutes,
        "stop_at_val_acc": target,
        "cpu_minutes": curve["cpu_minutes"],
        "wall_seconds": round(time.time() - start, 1),
        "exit_status": status,
        "steps": curve["steps"],
        "best_val_acc": max(curve["val_acc"], default=None),
        "final_val_acc": curve["val_acc"][-1] if curve["val_acc"] else None,
        "first_step_at_target": next((s for s, a in zip(curve["val_step"], curve["val_acc"]) if a >= TARGET), None),
        # every other validation set (a mixture's settings): best and last accuracy
        "other_val_acc": {name: {"best": max(values), "final": values[-1]} for name, (_, values) in curve["val"].items()
                          if name.endswith("/acc") and name != "val/acc"},
    }  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def read_curve(run_dir: Path) -> dict:
    """Validation accuracy by step, the last training step and the CPU minutes used (as the budget counted
    them), from the newest CSV log of a run."""
    import csv

    files = sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:]))
    curve = {"val_step": [], "val_acc": [], "train_step": [], "train_acc": [], "steps": 0, "val": {},
             "cpu_minutes": None}  # fmt: skip
    if not files:
        return curve
    with files[-1].open() as handle:
        for row in csv.DictReader(handle):
            step = int(row["step"])
            curve["steps"] = max(curve["steps"], step)
            if row.get("val/acc"):
                curve["val_step"].append(step)
                curve["val_acc"].append(float(row["val/acc"]))
            if row.get("train/cpu_minutes"):
                curve["cpu_minutes"] = round(float(row["train/cpu_minutes"]), 2)
            if row.get("train/acc"):
                curve["train_step"].append(step)
                curve["train_acc"].append(float(row["train/acc"]))
            for name, value in row.items():  # every validation metric, e.g. val/acc_first
                if name.startswith("val") and value:  # also a mixture's val_<setting>/…
                    steps, values = curve["val"].setdefault(name, ([], []))
                    steps.append(step)
                    values.append(float(value))
    return curve


def mqar(
    model: str,
    setting: str,
    minutes: float,
    mix: list[str],
    cosine_steps: int | None,
    cosine_budget: bool,
    init_from: str,
    tag: str,
    extra: list[str],
    target: float = TARGET,
) -> None:
    """One MQAR run at ``setting``; ``mix`` trains the smaller settings beside it (Zoology's multi-setting
    training, validated per setting, `val/acc` staying ``setting``'s); ``cosine_steps`` decays the rate to 0
    over that many steps (also the run's step limit: pick it from the model's steps per CPU-minute), and
    ``cosine_budget`` over the run's CPU-minutes instead (no guess of the steps they buy);
    ``init_from`` starts from the weights an earlier MQAR run ended with (a curriculum stage; same model);
    ``target`` is the validation accuracy that ends the run early."""
    task = MQAR_SETTINGS[setting]
    flags = [f"--data.init_args.{key}={value}" for key, value in task.items()]
    if mix:
        pairs = ",".join(f"[{MQAR_SETTINGS[s]['seq_len']},{MQAR_SETTINGS[s]['num_pairs']}]" for s in mix)
        flags.append(f"--data.init_args.mix_with=[{pairs}]")
    if init_from:
        flags.append(f"--model.init_args.init_from={RUNS / 'mqar' / init_from / 'checkpoints/last.ckpt'}")
    if cosine_steps and cosine_budget:
        raise SystemExit("--cosine-steps and --cosine-budget are two clocks for one decay: pick one")
    if cosine_steps:
        flags.append(f"--trainer.max_steps={cosine_steps}")
    if cosine_budget:
        flags.append("--model.init_args.scheduler.init_args.horizon=cpu_budget")
    if cosine_steps or cosine_budget:
        flags.append("--model.init_args.scheduler.init_args.min_lr_ratio=0")
    # enough distinct training items that a long run does not cycle, and a validation every 64 steps
    flags += ["--data.init_args.train_length=65536", "--trainer.val_check_interval=64", *extra]
    name = f"{model}-{setting}" + (f"-{tag}" if tag else "")
    fit(MODELS[model], RUNS / "mqar" / name, flags, minutes, target)


def mqar_curriculum(
    model: str,
    stage1_minutes: float,
    total_minutes: float,
    tag: str,
    extra: list[str],
    stage1_target: float = TARGET,
    mix: tuple[str, ...] = STAGE2_MIX,
    stage1_extra: tuple[str, ...] = (),
) -> None:
    """§1.0's recipe in one call: seq 64 / 4 pairs (vocab 512) alone until validation ``stage1_target`` or
    ``stage1_minutes``, then seq 256 with the ``mix`` settings beside it (one setting per batch) from its
    weights, the rate decaying to 0 over the CPU-minutes left of ``total_minutes`` (both stages share the
    budget). ``extra`` flags (e.g. a model option) go to both stages, ``stage1_extra`` to the first alone (an option
    that leaves the weights' shapes as they are, such as the attention window); the runs are ``<model>-s64-<tag>-stage1``
    and ``<model>-s256-<tag>`` (`report` plots the tags in ``REPORTED_TAGS``)."""
    first = f"{tag}-stage1"
    mqar(model, "s64", stage1_minutes, mix=[], cosine_steps=None, cosine_budget=False, init_from="", tag=first,
         extra=["--data.init_args.vocab_size=512", *extra, *stage1_extra], target=stage1_target)  # fmt: skip
    stage1 = json.loads((RUNS / "mqar" / f"{model}-s64-{first}" / "summary.json").read_text())
    if stage1["exit_status"] or stage1["cpu_minutes"] is None:
        raise SystemExit(f"stage 1 of {model} ({tag}) failed (exit {stage1['exit_status']}): no stage 2")
    used = stage1["cpu_minutes"]
    mqar(model, "s256", round(total_minutes - used, 2), mix=list(mix), cosine_steps=None, cosine_budget=True,
         init_from=f"{model}-s64-{first}", tag=tag, extra=extra)  # fmt: skip


def video(model: str, minutes: float, extra: list[str]) -> None:
    config, flags = VIDEO_MODELS[model]
    fit(config, RUNS / "video" / model, [*flags, *extra], minutes)


def sniah_flags(length: int, depths: tuple[float, ...]) -> list[str]:
    return [f"--data.init_args.seq_len={length}", f"--data.init_args.test_seq_len={length}",
            f"--data.init_args.depths=[{','.join(str(d) for d in depths)}]", "--data.init_args.train_length=131072",
            "--trainer.val_check_interval=128"]  # fmt: skip


def sniah(
    model: str, minutes: float, length: int, depths: tuple[float, ...], tag: str, extra: list[str]
) -> None:
    """One S-NIAH run at ``length`` and ``depths``: ``sniah/<model>`` or, tagged, ``sniah/<model>-<tag>``."""
    flags = [*sniah_flags(length, depths), *extra]
    fit(SNIAH_MODELS[model], RUNS / "sniah" / (f"{model}-{tag}" if tag else model), flags, minutes)


def sniah_curriculum(model: str, first_stage: int, extra: list[str]) -> None:
    """`SNIAH_CURRICULUM`'s stages one after another, each from the weights the one before ended with; the
    last stage's run is ``sniah/<model>-curriculum`` (what `sniah-eval` scores), the others ``…-stage<i>``.
    ``first_stage`` > 1 starts from the checkpoint an earlier call left for the stage before it."""
    stages = len(SNIAH_CURRICULUM)

    def run_dir(index: int) -> Path:
        return (
            RUNS
            / "sniah"
            / (f"{model}-curriculum" if index == stages else f"{model}-curriculum-stage{index}")
        )

    for index, (length, depths, minutes) in enumerate(SNIAH_CURRICULUM, 1):
        if index < first_stage:
            continue
        init = (
            []
            if index == 1
            else [f"--model.init_args.init_from={run_dir(index - 1) / 'checkpoints/last.ckpt'}"]
        )
        fit(SNIAH_MODELS[model], run_dir(index), [*sniah_flags(length, depths), *init, *extra], minutes)


# S-NIAH test sets: the passkey haystack as SNIAH builds it by default (filler phase 0: one haystack per length and
# depth, the test of stops 10-16) and with a random filler phase per sequence (a layout learned at one length does
# not carry over to it). Name -> (`evaluate` flag, folder under the run).
SNIAH_TESTS = {
    "fixed phase": ("--no-random-phase", "eval"),
    "random phase": ("--random-phase", "eval-random-phase"),
}


def sniah_eval(samples: int, runs: list[str]) -> None:
    """`timeloom evaluate memory` on the named S-NIAH runs (default: every trained one), on both of
    `SNIAH_TESTS`: exact match by test length and depth."""
    lengths = ",".join(str(n) for n in SNIAH_TEST_LENGTHS)
    for model, (flag, folder) in itertools.product(runs or sniah_runs(), SNIAH_TESTS.values()):
        run_dir = RUNS / "sniah" / model
        checkpoint = run_dir / "checkpoints/last.ckpt"
        if not checkpoint.exists():
            print(f"skip {model}: no {checkpoint}")
            continue
        scored = run_dir / folder / "memory-sniah.json"
        if scored.exists() and scored.stat().st_mtime > checkpoint.stat().st_mtime:
            print(f"skip {model}: {scored} is newer than its checkpoint")
            continue
        _, env = committed_memory_package()  # the code the runs trained with
        command = [TIMELOOM, "evaluate", "memory", "--checkpoint", str(checkpoint), "--task", "sniah", flag,
                   f"--lengths={lengths}", f"--samples={samples}", "--batch-size=4", f"--out={run_dir / folder}"]  # fmt: skip
        subprocess.run(command, cwd=ROOT, env=env, check=True)


def sniah_runs() -> list[str]:
    """The S-NIAH runs scored and reported: one per model, each model's curriculum (its last stage), and the
    tagged runs of `SNIAH_TAGGED_RUNS`."""
    return [*(name for model in SNIAH_MODELS for name in (model, f"{model}-curriculum")), *SNIAH_TAGGED_RUNS]


def by_reach(run_dir: Path, task: dict, samples: int = 512) -> dict:
    """Validation accuracy of a run's last checkpoint split by where the query is: among the first ``reach``
    tokens (the MAC segment or attention window, so attention alone sees the context) or past them; and by
    whether its value token is less than ``reach`` tokens back (inside one window) or not. Beside it,
    how often the answer is one of the sequence's own values: the 1/num_pairs plateau answers a context value
    without binding it to its key, and past ``reach`` only a memory (or a second layer) can know those values.
    With a Titans memory, also ``memory_alone``: the accuracy with every attention's output zeroed, i.e. what the
    memory answers by itself (MAG's gate then passes σ(0) = ½ of the memory's read; MAL `residual` keeps its memory
    sub-layers; MAL `stream` and `memory` reach the stream only through their attention, so there it is ≈ 0).
    Kept in ``<run>/by_reach.json`` and reused while the checkpoint it scored is unchanged (`report` scores every
    run, and a seq-256 Titans checkpoint takes ≈ 12 CPU-seconds)."""
    checkpoint = run_dir / "checkpoints/last.ckpt"
    cache, stamp = run_dir / "by_reach.json", checkpoint.stat().st_mtime_ns
    kept = json.loads(cache.read_text()) if cache.exists() else {}
    fresh = kept.get("checkpoint_mtime_ns") == stamp and kept.get("samples") == samples
    if fresh and "memory_alone" in kept["result"]:
        return kept["result"]
    import torch
    from timeloom_memory.module import MemoryLMModule
    from timeloom_memory.tasks import IGNORE, MQAR
    from timeloom_memory.titans import Attention

    module = MemoryLMModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    config = module.config
    reach = config.segment if config.block == "mac" else config.window
    items = [MQAR(**task, length=samples, split="val")[i] for i in range(samples)]
    input_ids = torch.stack([item["input_ids"] for item in items])
    labels = torch.stack([item["labels"] for item in items])

    def answer() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([module(ids).argmax(-1) for ids in input_ids.split(64)])

    answers = answer()
    memory_alone = None
    if any(block.memory is not None for block in module.model.blocks):
        hooks = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out))
                 for m in module.modules() if isinstance(m, Attention)]  # fmt: skip
        silenced = answer()
        for hook in hooks:
            hook.remove()
        memory_alone = round(float((silenced == labels)[labels != IGNORE].float().mean()), 3)
    values = input_ids[:, 1 : 2 * task["num_pairs"] : 2]
    a_value = (answers.unsqueeze(-1) == values.unsqueeze(1)).any(-1)
    labelled, position = labels != IGNORE, torch.arange(labels.shape[1])
    # how far back the queried key's value token is (at s256 every query is past the first 32 tokens, so
    # only this split says whether a window alone could see the answer)
    keys = input_ids[:, 0 : 2 * task["num_pairs"] : 2]
    value_at = 2 * (input_ids.unsqueeze(-1) == keys.unsqueeze(1)).float().argmax(-1) + 1
    result = {"reach": reach, "memory_alone": memory_alone}
    splits = (("near", position < reach), ("far", position >= reach),
              ("value_within_reach", position - value_at < reach), ("value_beyond_reach", position - value_at >= reach))  # fmt: skip
    for name, where in splits:
        chosen = labelled & where
        if not chosen.any():
            continue
        result[name] = {
            "queries": int(chosen.sum()),
            "acc": round(float((answers == labels)[chosen].float().mean()), 3),
            "answer_is_a_context_value": round(float(a_value[chosen].float().mean()), 3),
        }
    cache.write_text(
        json.dumps({"checkpoint_mtime_ns": stamp, "samples": samples, "result": result}, indent=2)
    )
    return result


def init_run(run_dir: Path) -> Path | None:
    """The MQAR run whose weights started ``run_dir`` (`--init-from`), from its summary's flags."""
    summary = run_dir / "summary.json"
    flags = json.loads(summary.read_text())["flags"] if summary.exists() else []
    path = next((f.split("=", 1)[1] for f in flags if f.startswith("--model.init_args.init_from=")), None)
    return Path(path).parents[1] if path else None


def earlier_steps(run_dir: Path) -> int:
    """Training steps of the curriculum stages before ``run_dir`` (0 for a run from scratch)."""
    stage = init_run(run_dir)
    return 0 if stage is None else read_curve(stage)["steps"] + earlier_steps(stage)


def report(figure_path: Path = MQAR_FIGURE, mqar_only: bool = False) -> None:
    """Accuracy-vs-step curves per setting (``figure_path``) and a results table (JSON), then the recall
    figures unless ``mqar_only``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    from matplotlib.lines import Line2D

    summaries = {}
    # one colour per run family (a model and a tag), one legend beneath all panels; the line style says how a
    # curve was trained: alone at this setting (or its last stage), in a larger setting's mixture, or the seq-64
    # stage a mixture run started from
    families = [
        (model, suffix)
        for model, suffix in itertools.product(MODELS, ["", *(f"-{tag}" for tag in REPORTED_TAGS)])
        if any((RUNS / "mqar" / f"{model}-{setting}{suffix}").exists() for setting in MQAR_SETTINGS)
    ]
    colours = plt.get_cmap("tab20").colors[::2] + plt.get_cmap("tab20").colors[1::2]  # the dark ten first
    rows = -(-(len(families) + 3) // 3)
    height = 3.4 + 0.16 * rows
    figure, axes = plt.subplots(
        1, len(MQAR_SETTINGS), figsize=(4.6 * len(MQAR_SETTINGS), height), squeeze=False
    )
    for ax, (setting, task) in zip(axes[0], MQAR_SETTINGS.items()):
        name = f"val_seq{task['seq_len']}x{task['num_pairs']}/acc"
        for index, (model, suffix) in enumerate(families):
            colour = colours[index % len(colours)]
            for other in MQAR_SETTINGS:
                run_dir = RUNS / "mqar" / f"{model}-{other}{suffix}"
                curve = read_curve(run_dir)
                steps, values = (
                    (curve["val_step"], curve["val_acc"])
                    if other == setting
                    else curve["val"].get(name, ([], []))
                )
                if other == setting and (run_dir / "summary.json").exists():
                    summaries[run_dir.name] = json.loads((run_dir / "summary.json").read_text())
                    if (run_dir / "checkpoints/last.ckpt").exists():
                        summaries[run_dir.name]["by_reach"] = by_reach(run_dir, task)
                if steps:  # steps count from the first stage's start
                    start = earlier_steps(run_dir)
                    ax.plot(
                        [start + s for s in steps],
                        values,
                        ls="-" if other == setting else "--",
                        color=colour,
                        lw=1.2,
                    )
                stage = init_run(run_dir)
                if stage is not None and stage.name.startswith(f"{model}-{setting}-"):
                    curve = read_curve(stage)
                    ax.plot(curve["val_step"], curve["val_acc"], ls=":", color=colour, lw=1.2)
        ax.axhline(TARGET, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled minor ticks collide
        ax.set(title=f"MQAR seq {task['seq_len']} / {task['num_pairs']} pairs / V {task['vocab_size']}",
               xlabel="training step (batch 64, log scale)", ylabel="validation accuracy", ylim=(0, 1.02))  # fmt: skip
    handles = [Line2D([], [], color=colours[i % len(colours)], lw=2) for i in range(len(families))]
    labels = [model + (f" ({REPORTED_TAGS[suffix[1:]]})" if suffix else "") for model, suffix in families]
    handles += [Line2D([], [], color="black", ls=style) for style in ("-", "--", ":")]
    labels += ["trained at this setting (or its last stage)", "this setting's validation in a mixture run",
               "the seq-64 stage a mixture run started from"]  # fmt: skip
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.tight_layout(rect=(0, 0.16 * rows / height, 1, 1))
    figure.savefig(figure_path, dpi=120)
    (RUNS / "mqar/results.json").write_text(json.dumps(summaries, indent=2))
    print(json.dumps(summaries, indent=2))
    if not mqar_only:
        recall_report()


def recall_report() -> None:
    """Long-video recall curves (docs/memory-video-recall.png) and S-NIAH exact match by length
    (docs/memory-sniah.png), with their results JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    video_results = {}
    video_runs = {
        model: RUNS / "video" / model
        for model in VIDEO_MODELS
        if (RUNS / "video" / model / "summary.json").exists()
    }
    if video_runs:
        # one panel per question, one colour per run: "first" separates the memories from the window
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
        for colour, (model, run_dir) in enumerate(video_runs.items()):
            curve = read_curve(run_dir)
            for ax, question in zip(axes, ("first", "last")):
                steps, values = curve["val"].get(f"val/acc_{question}", ([], []))
                ax.plot(steps, values, color=f"C{colour}", lw=1, label=model)
            video_results[model] = {**json.loads((run_dir / "summary.json").read_text()),
                                           **{name: values[-1] for name, (_, values) in curve["val"].items()}}  # fmt: skip
        for ax, question in zip(axes, ("first", "last")):
            ax.axhline(0.1, color="grey", lw=0.8, ls="--")  # chance: 10 digits
            ax.set(xscale="log", xlabel="training step (batch 32)", ylim=(0, 1.02),
                   title=f"which digit appeared {question}?")  # fmt: skip
        axes[0].set_ylabel("validation accuracy")
        axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.tight_layout()
        figure.savefig(ROOT / "docs/memory-video-recall.png", dpi=120)
        (RUNS / "video/results.json").write_text(json.dumps(video_results, indent=2))

    results = {test: {} for test in SNIAH_TESTS}
    stages = [
        f"{model}-curriculum-stage{i}" for model in SNIAH_MODELS for i in range(2, len(SNIAH_CURRICULUM))
    ]
    for model, (test, (_, folder)) in itertools.product([*sniah_runs(), *stages], SNIAH_TESTS.items()):
        report_file = RUNS / "sniah" / model / folder / "memory-sniah.json"  # once scored (`sniah-eval`)
        if report_file.exists():
            results[test][model] = json.loads(report_file.read_text())["by_length"]
    if any(results.values()):
        (RUNS / "sniah/results.json").write_text(json.dumps(results, indent=2))
        # one colour per run in both panels; the runs trained at 1K (curriculum stage 4 and stop 17's) solid
        runs = list(dict.fromkeys(model for by_model in results.values() for model in by_model))
        figure, axes = plt.subplots(1, len(SNIAH_TESTS), figsize=(11, 3.8), sharey=True)
        for ax, (test, by_model) in zip(axes, results.items()):
            for model, by_length in by_model.items():
                lengths = sorted(by_length, key=int)
                trained_at_1k = model.endswith("-curriculum") or model in SNIAH_TAGGED_RUNS
                ax.plot([int(n) for n in lengths], [by_length[n]["exact_match"] for n in lengths],
                        marker="o", ls="-" if trained_at_1k else ":", color=f"C{runs.index(model)}",
                        label=f"{model} ({SNIAH_TRAINED_ON.get(model, '?')})")  # fmt: skip
            ax.axvline(1024, color="grey", lw=0.8, ls="--")  # the training length of the solid lines
            ax.set(xscale="log", xlabel="test length (tokens)", ylim=(-0.02, 1.02),
                   title=f"{test} of the filler")  # fmt: skip
            ax.set_xticks(list(SNIAH_TEST_LENGTHS), [str(n) for n in SNIAH_TEST_LENGTHS])
        axes[0].set_ylabel("exact match (all five depths)")
        legend = {label: handle for ax in axes for handle, label in zip(*ax.get_legend_handles_labels())}
        axes[-1].legend(
            legend.values(), legend.keys(), fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5)
        )
        figure.suptitle(
            "S-NIAH pass-key by test length. Solid: trained at ≤ 1K (dashed line); dotted: at 64 or 256"
        )
        figure.tight_layout()
        figure.savefig(ROOT / "docs/memory-sniah.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("mqar", help="one MQAR run")
    run.add_argument("model", choices=MODELS)
    run.add_argument("setting", choices=MQAR_SETTINGS)
    run.add_argument(
        "--minutes", type=float, default=30.0, help="CPU-time budget of the run (the issue's 30)"
    )
    run.add_argument("--mix", nargs="*", default=[], choices=MQAR_SETTINGS, help="settings trained beside it")
    run.add_argument("--cosine-steps", type=int, help="decay the rate to 0 over these steps (and stop there)")
    run.add_argument(
        "--cosine-budget", action="store_true", help="decay the rate to 0 over the run's CPU-minutes"
    )
    run.add_argument(
        "--init-from", default="", help="an earlier MQAR run (its name) whose weights start this one"
    )
    run.add_argument("--tag", default="", help="run name suffix (a probe, a curriculum stage)")
    run.add_argument(
        "--target", type=float, default=TARGET, help="validation accuracy that ends the run early"
    )
    run = commands.add_parser("mqar-curriculum", help="§1.0's two stages (seq 64 alone, then the mixture)")
    run.add_argument("model", choices=MODELS)
    run.add_argument(
        "--stage1-minutes", type=float, required=True, help="CPU-minutes at most for seq 64 alone"
    )
    run.add_argument(
        "--minutes", type=float, default=30.0, help="CPU-minutes of both stages (the issue's 30)"
    )
    run.add_argument("--tag", required=True, help="run name part (a recipe or model variant)")
    run.add_argument(
        "--stage1-target", type=float, default=TARGET,
        help="validation accuracy that ends seq 64 alone early (e.g. once it leaves the 1/4 plateau)",
    )  # fmt: skip
    run.add_argument("--mix", nargs="+", default=list(STAGE2_MIX), choices=MQAR_SETTINGS,
                     help="the settings trained beside seq 256 in the second stage")  # fmt: skip
    run.add_argument(
        "--stage1-flags", default="", help="flags for seq 64 alone only, one string (shell-split)"
    )
    run = commands.add_parser("sniah", help="one S-NIAH pass-key training run")
    run.add_argument("model", choices=SNIAH_MODELS)
    run.add_argument("--minutes", type=float, default=8.0, help="CPU-minute budget of the run")
    run.add_argument(
        "--length", type=int, default=SNIAH_TRAIN_LENGTH, help="training (and validation) length"
    )
    run.add_argument(
        "--depths", default=",".join(str(d) for d in SNIAH_TRAIN_DEPTHS), help="needle depths, %%"
    )
    run.add_argument("--tag", default="", help="run name suffix (keeps the untagged run)")
    run = commands.add_parser("sniah-curriculum", help="S-NIAH training in SNIAH_CURRICULUM's stages")
    run.add_argument("model", choices=SNIAH_MODELS)
    run.add_argument("--from-stage", type=int, default=1, help="skip the stages before it (their runs exist)")
    run = commands.add_parser("video", help="one long-video recall training run")
    run.add_argument("model", choices=VIDEO_MODELS)
    run.add_argument("--minutes", type=float, default=6.0, help="CPU-minute budget of the run")
    run = commands.add_parser("sniah-eval", help="accuracy by test length of the trained S-NIAH runs")
    run.add_argument("--samples", type=int, default=10, help="test sequences per (length, depth) cell")
    run.add_argument("runs", nargs="*", help="run names under sniah/ (default: every reported run)")
    run = commands.add_parser("report", help="figures and results JSON")
    run.add_argument("--figure", type=Path, default=MQAR_FIGURE, help="where the MQAR curves go")
    run.add_argument("--mqar-only", action="store_true", help="leave the recall figures as they are")
    commands.add_parser("recall-report", help="the video recall and S-NIAH figures alone")
    args, extra = parser.parse_known_args(argv)
    if args.command == "mqar":
        mqar(
            args.model,
            args.setting,
            args.minutes,
            args.mix,
            args.cosine_steps,
            args.cosine_budget,
            args.init_from,
            args.tag,
            extra,
            args.target,
        )
    elif args.command == "mqar-curriculum":
        stage1_extra = tuple(shlex.split(args.stage1_flags))
        mqar_curriculum(args.model, args.stage1_minutes, args.minutes, args.tag, extra, args.stage1_target,
                        args.mix, stage1_extra)  # fmt: skip
    elif args.command == "sniah":
        depths = tuple(float(d) if "." in d else int(d) for d in args.depths.split(","))
        sniah(args.model, args.minutes, args.length, depths, args.tag, extra)
    elif args.command == "sniah-curriculum":
        sniah_curriculum(args.model, args.from_stage, extra)
    elif args.command == "video":
        video(args.model, args.minutes, extra)
    elif args.command == "sniah-eval":
        sniah_eval(args.samples, args.runs)
    elif args.command == "recall-report":
        recall_report()
    else:
        report(args.figure, args.mqar_only)


if __name__ == "__main__":
    main()
