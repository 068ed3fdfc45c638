"""`timeloom bench memory`: Titans' memory update, chunked against token by token, and Titans training
throughput side by side with titans-pytorch.

Part 1, the update: for every cell (update kernel × heads × chunk size b × length L) it times the
`NeuralMemory` layer forward (no grad) and forward+backward, reports tokens/s and the speed-up of each chunk
kernel over `sequential` (the definition), plus the state's bytes per sample (constant in L, so per token it
falls as 1/L) and the per-token weights `scan` materialises per chunk. `sequential` and `dual` are timed in
turns (one call of each per round, after a warm-up round), so a shared machine's load hits them alike, and
`scan` on its own; the inter-quartile mean of the wall times, and of this thread's CPU times beside them.
``dual-compiled`` is `dual` with `NeuralMemoryConfig.compile` (``torch.compile``), timed in turns with both where
`sequential` runs; it is compiled before the timing, and the first calls' seconds (compiling included) are
reported beside. Each row's FLOPs (`timeloom.throughput.flop_counter`, the eager layer) over its time give its FLOP
rate, set against this run's matmul peak (`measure_matmul_peak`, by the same clock): the share of the peak each
chunk kernel runs at, and the share a 10× speed-up over `sequential` would need. Below 100 %, a faster kernel can
reach 10×; above it, only fewer FLOPs can.

Part 2, training: tokens/s of one AdamW step of our `TitansLM` (MAC), of titans-pytorch's
`MemoryAsContextTransformer` at the closest equal configuration (`TITANS_PYTORCH_MAPPING`) and of a plain
transformer (our ``attention`` block) as the yardstick, timed round-robin so the machine's load hits all
alike; the bytes each step saves for backward, per token; and, with ``--mqar-steps``, MQAR accuracy of each
after the same number of steps on the same batches. titans-pytorch is an optional extra
(``pip install 'timeloom-memory[compare]'``); without it those rows are skipped with the reason.

Outputs `memory.json` and `memory.md` under ``--out``. Compare runs from the same device only, and mind the
machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from timeloom_kernels.bench import (
    describe_environment,
    iqr_mean,
    resolve_device_and_dtype,
    synchronize,
    write_report,
)
from torch import Tensor, nn
from tqdm.auto import tqdm

from timeloom.throughput import flop_counter, interleaved_times, measure_matmul_peak
from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig
from timeloom_memory.tasks import IGNORE, MQAR
from timeloom_memory.titans import TitansConfig, TitansLM

__all__ = ["main"]


@dataclass(frozen=True)
class MemoryPreset:
    lengths: tuple[int, ...]
    batch: int
    shapes: tuple[tuple[int, int], ...]  # (heads, head_dim)
    chunk_sizes: tuple[int, ...]
    sequential_max_length: int  # the token loop is slow: longer cells skip it
    scan_max_length: int  # under autograd `scan` keeps every token's weights (O(L·|W|) memory)
    compiled_max_length: int = 0  # `dual-compiled` compiles one graph per cell, unrolled over its chunks
    budget_s: float = 0.5  # per kernel and cell: rounds go on until min_runs and this budget are both spent
    min_runs: int = 5
    max_runs: int = 10
    # Part 2, training side by side.
    train_batch: int = 16
    train_length: int = 256
    train_steps: int = 5  # timed steps per model, after one warm-up step
    mqar: tuple[int, int, int] = (256, 64, 4)  # vocab, seq, pairs
    mqar_batch: int = 32
    mqar_test: int = 256


PRESETS = {
    "quick": MemoryPreset(
        lengths=(256, 1024),
        batch=8,
        shapes=((1, 64), (4, 32)),
        chunk_sizes=(16, 64),
        sequential_max_length=256,
        scan_max_length=256,
        compiled_max_length=256,
    ),
    "tiny": MemoryPreset(
        lengths=(32,),
        batch=2,
        shapes=((2, 8),),
        chunk_sizes=(8,),
        sequential_max_length=32,
        scan_max_length=32,
        budget_s=0.05,
        min_runs=1,
        max_runs=2,
        train_batch=2,
        train_length=64,
        train_steps=1,
        mqar=(64, 32, 2),
        mqar_batch=4,
        mqar_test=8,
    ),
}
UPDATES = ("sequential", "scan", "dual", "dual-compiled")


def interleaved_ms(
    calls: dict[str, Callable[[], None]], preset: MemoryPreset, device: torch.device
) -> dict[str, dict[str, float | None]]:
    """Inter-quartile mean ms of each call, wall and this thread's CPU time (None on a GPU), the calls taking
    turns (`timeloom.throughput.interleaved_times`), so a shared machine's load hits all alike."""
    times = interleaved_times(calls, preset.min_runs, device, budget_s=preset.budget_s * len(calls),
                              max_rounds=preset.max_runs)  # fmt: skip
    ms = {
        clock: {name: iqr_mean(values) * 1e3 for name, values in per_call.items()}
        for clock, per_call in times.items()
    }
    return {name: {"wall": ms["wall"][name], "cpu": ms.get("cpu", {}).get(name)} for name in calls}


def update_flops(config: NeuralMemoryConfig, x: Tensor) -> tuple[int, int]:
    """FLOPs of one forward (no grad) and one forward+backward of an eager layer of ``config``."""
    memory = NeuralMemory(config).to(x.device)
    with flop_counter() as counter, torch.no_grad():
        memory(x)
    forward = counter.get_total_flops()
    with flop_counter() as counter:
        y, _ = memory(x)
        y.sum().backward()
    return forward, counter.get_total_flops()


def run_cell(
    preset: MemoryPreset,
    updates: list[str],
    heads: int,
    head_dim: int,
    b: int,
    length: int,
    device: torch.device,
) -> list[dict]:
    """One row per update kernel on the same input and weights: `sequential`, `dual` and `dual-compiled` timed
    in turns, `scan` on its own (its gigabytes of per-token weights, freed and refetched each call, slowed the
    call after it by up to 2x when it took turns with the others). `dual-compiled` is compiled first: its row
    keeps the wall seconds of its first forward and first forward+backward, compiling included."""
    dim = heads * head_dim
    memories = {}
    for update in updates:
        torch.manual_seed(0)  # the same weights for every kernel
        config = NeuralMemoryConfig(dim=dim, heads=heads, head_dim=head_dim, depth=2, expansion=4, chunk_size=b,
                                    update="dual" if update == "dual-compiled" else update,
                                    compile=update == "dual-compiled")  # fmt: skip
        memories[update] = NeuralMemory(config).to(device)
    x = torch.randn(preset.batch, length, dim, generator=torch.Generator().manual_seed(0)).to(device)

    def forward(memory: NeuralMemory) -> None:
        with torch.no_grad():
            memory(x)

    def forward_backward(memory: NeuralMemory) -> None:
        y, _ = memory(x)
        y.sum().backward()

    compile_s = {}
    if "dual-compiled" in updates:
        torch.compiler.reset()  # a fresh cache per cell: dynamo's recompile limit never binds
        for what, call in (("forward", forward), ("forward_backward", forward_backward)):
            start = time.perf_counter()
            call(memories["dual-compiled"])
            synchronize(device)
            compile_s[what] = time.perf_counter() - start
    fwd, fwdbwd = {}, {}
    for group in ([u for u in updates if u != "scan"], [u for u in updates if u == "scan"]):
        fwd.update(interleaved_ms({u: lambda m=memories[u]: forward(m) for u in group}, preset, device))
        fwdbwd.update(
            interleaved_ms({u: lambda m=memories[u]: forward_backward(m) for u in group}, preset, device)
        )
    tokens = preset.batch * length
    weights = sum(heads * o * i for o, i in config.layer_shapes)
    flops = {u: update_flops(memories[u].config, x) for u in updates if u != "dual-compiled"}
    if "dual-compiled" in updates:  # compiling changes no math (`dual` runs wherever `dual-compiled` does)
        flops["dual-compiled"] = flops["dual"]
    return [
        {
            "update": u, "heads": heads, "head_dim": head_dim, "chunk_size": b, "length": length,
            "batch": preset.batch, "forward_ms": fwd[u]["wall"], "forward_backward_ms": fwdbwd[u]["wall"],
            "forward_cpu_ms": fwd[u]["cpu"], "forward_backward_cpu_ms": fwdbwd[u]["cpu"],
            "forward_tokens_per_s": tokens / fwd[u]["wall"] * 1e3,
            "forward_backward_tokens_per_s": tokens / fwdbwd[u]["wall"] * 1e3,
            "forward_flops": flops[u][0], "forward_backward_flops": flops[u][1],
            "state_bytes_per_sample": 2 * weights * 4,  # weights and momentum, float32
            "scan_weights_bytes_per_chunk": b * weights * 4 if u == "scan" else 0,
            **({f"first_{k}_s": v for k, v in compile_s.items()} if u == "dual-compiled" else {}),
        }
        for u in updates
    ]  # fmt: skip


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or denominator is None else numerator / denominator


def speedups(cells: list[dict]) -> list[dict]:
    """Each chunk kernel's speed-up over `sequential` on the same cell, where both ran (CPU-time ratios None on
    a GPU)."""
    key = ("heads", "head_dim", "chunk_size", "length")
    base = {tuple(c[k] for k in key): c for c in cells if c["update"] == "sequential"}
    out = []
    for c in cells:
        ref = base.get(tuple(c[k] for k in key))
        if c["update"] != "sequential" and ref:
            out.append({**{k: c[k] for k in key}, "update": c["update"],
                        "forward": ref["forward_ms"] / c["forward_ms"],
                        "forward_backward": ref["forward_backward_ms"] / c["forward_backward_ms"],
                        "forward_cpu": _ratio(ref["forward_cpu_ms"], c["forward_cpu_ms"]),
                        "forward_backward_cpu": _ratio(ref["forward_backward_cpu_ms"], c["forward_backward_cpu_ms"])})  # fmt: skip
    return out


def _bytes(value: float | None) -> str:
    return "n/a (torch.func inside)" if value is None else f"{value:.0f}"


def _times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}×"


def _number(value: float | None, unit: float) -> str:
    return "n/a" if value is None else f"{value / unit:.1f}"


def _compiled_lines(cells: list[dict]) -> list[str]:
    """`dual-compiled` against eager `dual` (timed in turns in the same cell), and its compile time."""
    key = ("heads", "head_dim", "chunk_size", "length")
    eager = {tuple(c[k] for k in key): c for c in cells if c["update"] == "dual"}
    lines = []
    for c in cells:
        ref = eager.get(tuple(c[k] for k in key))
        if c["update"] == "dual-compiled" and ref:
            lines.append(
                f"| {c['heads']}×{c['head_dim']} | {c['chunk_size']} | {c['length']} | "
                f"{ref['forward_ms'] / c['forward_ms']:.2f}× | {ref['forward_backward_ms'] / c['forward_backward_ms']:.2f}× | "
                f"{c['first_forward_s']:.0f} | {c['first_forward_backward_s']:.0f} |"
            )  # fmt: skip
    if not lines:
        return []
    return [
        "",
        "`dual-compiled` (`NeuralMemoryConfig.compile`: `torch.compile` of the chunk loop) over eager `dual`, wall, "
        "and the wall seconds of its first calls, which compile it (not in the timings above):",
        "",
        "| H×d_h | b | L | fwd | fwd+bwd | first fwd, s | first fwd+bwd, s |",
        "|---|---|---|---|---|---|---|",
        *lines,
    ]  # fmt: skip


def _roofline_lines(cells: list[dict], peak: float | None) -> list[str]:
    """Each chunk kernel's FLOP rate as a share of the matmul peak, and the share 10× over `sequential` needs."""
    key = ("heads", "head_dim", "chunk_size", "length")
    base = {tuple(c[k] for k in key): c for c in cells if c["update"] == "sequential"}
    lines = []
    for c in cells:
        ref = base.get(tuple(c[k] for k in key))
        if c["update"] in ("sequential", "scan") or not ref or not peak:
            continue
        shares = []
        for part in ("forward", "forward_backward"):
            clock = f"{part}_cpu_ms" if c[f"{part}_cpu_ms"] is not None else f"{part}_ms"  # CPU time on a CPU
            flops = c[f"{part}_flops"]
            shares += [flops / c[clock] * 1e3 / peak, flops / (ref[clock] / 10) * 1e3 / peak]
        lines.append(f"| {c['update']} | {c['heads']}×{c['head_dim']} | {c['chunk_size']} | {c['length']} | "
                     + " | ".join(f"{share:.0%}" for share in shares) + " |")  # fmt: skip
    if not lines:
        return []
    return [
        "",
        f"FLOP rates against this run's matmul peak ({peak / 1e9:.1f} GFLOP/s: a 2048² float32 matmul on the same "
        "device and threads), all by this thread's CPU time on a CPU (the wall clock on a GPU): the share each chunk "
        "kernel runs at, and the share a 10× speed-up over `sequential` would need (its FLOPs in a tenth of "
        "`sequential`'s time). Below 100 %, a faster kernel can reach 10×; above it, only fewer FLOPs can:",
        "",
        "| update | H×d_h | b | L | fwd: runs at | fwd: 10× needs | fwd+bwd: runs at | fwd+bwd: 10× needs |",
        "|---|---|---|---|---|---|---|---|",
        *lines,
    ]


def markdown(result: dict) -> str:
    cells, ups, skipped = result["cells"], result["speedups"], result["skipped"]
    lines = [
        "# Titans memory: update speed and training side by side (`timeloom bench memory`)",
        "",
        f"Environment: `{json.dumps(result['environment'])}`",
        "",
    ]
    if result.get("sources"):
        lines += [
            "Sources: " + "; ".join(f"{part}: `{how}`" for part, how in result["sources"].items()) + ".",
            "",
        ]
    lines += [
        "## The memory update (`NeuralMemory` layer, L_M = 2, expansion 4)",
        "",
        "| update | H×d_h | b | L | fwd tok/s | fwd+bwd tok/s | fwd GFLOP/s | fwd+bwd GFLOP/s | state B/sample "
        "| state B/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c['update']} | {c['heads']}×{c['head_dim']} | {c['chunk_size']} | {c['length']} | "
            f"{c['forward_tokens_per_s']:.0f} | {c['forward_backward_tokens_per_s']:.0f} | "
            f"{c['forward_flops'] / c['forward_ms'] / 1e6:.1f} | "
            f"{c['forward_backward_flops'] / c['forward_backward_ms'] / 1e6:.1f} | "
            f"{c['state_bytes_per_sample']} | {c['state_bytes_per_sample'] / c['length']:.0f} |"
        )
    lines += ["", "Speed-up over the token-by-token definition (`sequential`), timed in turns with it (`scan` on its "
              "own); wall clock, and this thread's CPU time beside it:", ""]  # fmt: skip
    lines += [
        "| update | H×d_h | b | L | fwd | fwd+bwd | fwd (CPU) | fwd+bwd (CPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for u in ups:
        lines.append(
            f"| {u['update']} | {u['heads']}×{u['head_dim']} | {u['chunk_size']} | {u['length']} | "
            f"{u['forward']:.1f}× | {u['forward_backward']:.1f}× | {_times(u['forward_cpu'])} | "
            f"{_times(u['forward_backward_cpu'])} |"
        )
    lines += _roofline_lines(cells, result.get("matmul_peak_flops"))
    lines += _compiled_lines(cells)
    rows, mqar = result.get("training", []), result.get("mqar_accuracy", {})
    if rows:
        r0 = rows[0]
        lines += [
            "",
            f"## Training step (AdamW, batch {r0['batch']} × {r0['length']} tokens, round-robin)",
            "",
            "| model | parameters | train tok/s | × plain transformer | saved for backward, B/token "
            "| train kFLOP/token | GFLOP/s |"
            + (f" MQAR acc after {result['mqar_steps']} steps |" if mqar else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if mqar else ""),
        ]
        for r in rows:
            lines.append(
                f"| {r['model']} | {r['parameters']:,} | {r['tokens_per_s']:.0f} | {r['vs_plain_transformer']:.2f} | "
                f"{_bytes(r['saved_bytes_per_token'])} | {_number(r['flops_per_token'], 1e3)} | "
                f"{_number(r['gflops_per_s'], 1)} |" + (f" {mqar[r['model']]:.3f} |" if mqar else "")
            )
        lines += ["", "Equal configuration (ours → titans-pytorch 0.5.5):", ""]
        lines += [f"- {m}" for m in TITANS_PYTORCH_MAPPING]
        if mqar:
            vocab, seq, pairs = result["mqar"]
            lines += ["", f"MQAR: vocab {vocab}, seq {seq}, {pairs} pairs, batch {result['mqar_batch']}, "
                      "AdamW lr 3e-3, clip 1.0, the same batches for every model."]  # fmt: skip
    lines += [""] + [f"Skipped: {s}" for s in dict.fromkeys(skipped)]  # once per reason
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Part 2: training throughput and MQAR, ours against titans-pytorch at an equal configuration
# --------------------------------------------------------------------------------------------------------
WIDTH, DEPTH, HEADS, SEGMENT, CHUNK, PERSISTENT, MEMORY_EXPANSION, THETA_MAX = 64, 2, 2, 32, 16, 4, 2, 0.1
TITANS_PYTORCH_MAPPING = [
    f"width {WIDTH}, depth {DEPTH}, {HEADS} heads of {WIDTH // HEADS}: `dim`, `depth`, `heads`, `dim_head`; "
    "the memory's own `heads`/`dim_head` the same",
    f"MAC segment {SEGMENT}: `segment_len={SEGMENT}`; persistent tokens {PERSISTENT}: "
    f"`num_persist_mem_tokens={PERSISTENT}`; no learned long-term memory tokens (`num_longterm_mem_tokens=0`)",
    f"memory MLP depth 2, hidden {MEMORY_EXPANSION}·d_h: `MemoryMLP(dim={WIDTH // HEADS}, depth=2, "
    f"expansion_factor={MEMORY_EXPANSION})` (theirs adds a LayerNorm + residual around it)",
    f"chunk b = {CHUNK}: `neural_memory_segment_len={CHUNK}` (their gate/update chunk) and "
    f"`neural_memory_batch_size={CHUNK}` (weights refresh every b tokens, as ours); the `default` row keeps "
    "their default `batch_size=None` (a whole call uses its start weights: less sequential work)",
    f"θ_max {THETA_MAX}: `default_step_transform_max_lr={THETA_MAX}·d_h` (their loss is a mean over features)",
    "FFN: SwiGLU 4·d (ours), GEGLU `ff_mult=4` (theirs); plain residual: `num_residual_streams=1`",
    "data flow differs (spec §2.6): theirs stores and retrieves from the layer input before attention, "
    "ours retrieves → attends → stores the attention output",
]


def our_model(vocab: int, block: str) -> TitansLM:
    memory = NeuralMemoryConfig(heads=HEADS, head_dim=WIDTH // HEADS, depth=2, expansion=MEMORY_EXPANSION,
                                chunk_size=CHUNK, theta_max=THETA_MAX, surprise_clip=1.0)  # fmt: skip
    config = TitansConfig(vocab_size=vocab, dim=WIDTH, depth=DEPTH, heads=HEADS, block=block,
                          persistent_tokens=PERSISTENT, segment=SEGMENT, ffn_mult=4.0, memory=memory)  # fmt: skip
    return TitansLM(config)


def titans_pytorch_model(vocab: int, batch_size: int | None) -> nn.Module:
    """titans-pytorch's `MemoryAsContextTransformer` per `TITANS_PYTORCH_MAPPING` (ImportError without it)."""
    from titans_pytorch import MemoryAsContextTransformer, MemoryMLP

    model = MemoryAsContextTransformer(
        num_tokens=vocab, dim=WIDTH, depth=DEPTH, heads=HEADS, dim_head=WIDTH // HEADS, segment_len=SEGMENT,
        num_persist_mem_tokens=PERSISTENT, num_longterm_mem_tokens=0, ff_mult=4, num_residual_streams=1,
        neural_memory_segment_len=CHUNK, neural_memory_batch_size=batch_size,
        neural_memory_model=MemoryMLP(dim=WIDTH // HEADS, depth=2, expansion_factor=MEMORY_EXPANSION),
        neural_memory_kwargs=dict(heads=HEADS, dim_head=WIDTH // HEADS,
                                  default_step_transform_max_lr=THETA_MAX * WIDTH // HEADS),
    )  # fmt: skip
    # Its per-head memory parameters are one storage broadcast over heads (stride 0); AdamW's in-place
    # weight decay refuses such a tensor, so each gets its own copy (same values).
    for parameter in model.parameters():
        parameter.data = parameter.data.clone()
    return model


def training_models(
    vocab: int, device: torch.device
) -> tuple[dict[str, Callable[[Tensor], Tensor]], dict[str, nn.Module], list[str]]:
    """``{name: ids -> logits}``, the modules (on ``device``), and the rows skipped (with why)."""
    torch.manual_seed(0)
    modules: dict[str, nn.Module] = {
        "timeloom Titans MAC": our_model(vocab, "mac"),
        "timeloom plain transformer (yardstick)": our_model(vocab, "attention"),
    }
    skipped = []
    try:
        modules["titans-pytorch MAC (batch_size = b)"] = titans_pytorch_model(vocab, CHUNK)
        modules["titans-pytorch MAC (default batch_size=None)"] = titans_pytorch_model(vocab, None)
    except ImportError as error:
        skipped.append(
            f"titans-pytorch side by side: not installed ({error}); pip install 'timeloom-memory[compare]'"
        )
    for module in modules.values():
        module.to(device)
    logits = {
        name: (lambda ids, m=m: m(ids)[0]) if isinstance(m, TitansLM) else (lambda ids, m=m: m(ids))
        for name, m in modules.items()
    }
    return logits, modules, skipped


def saved_bytes(loss_fn: Callable[[], Tensor], module: nn.Module) -> int | None:
    """Bytes of the distinct tensors one forward saves for its backward (parameters excluded).

    None for a model that takes gradients with `torch.func` inside (titans-pytorch): torch refuses
    saved-tensor hooks there.
    """
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss_fn()
    except RuntimeError as error:
        if "saved tensor hooks" not in str(error):
            raise
        return None
    return sum(storages.values())


def training_flops(loss_fn: Callable[[], Tensor]) -> int | None:
    """FLOPs of one forward+backward (the core's counter, with its CPU-attention corrections)."""
    counter = flop_counter()
    try:
        with counter:
            loss_fn().backward()
    except RuntimeError as error:  # torch.func inside (titans-pytorch) is not countable here
        if "functorch" not in str(error).lower() and "torch.func" not in str(error):
            raise
        return None
    return counter.get_total_flops()


def training_throughput(
    preset: MemoryPreset, device: torch.device, vocab: int = 256
) -> tuple[list[dict], list[str]]:
    """Median tokens/s of a training step per model, timed round-robin on one shared batch."""
    logits, modules, skipped = training_models(vocab, device)
    ids = torch.randint(0, vocab, (preset.train_batch, preset.train_length + 1)).to(device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for n, m in modules.items()}

    def loss_of(name: str) -> Tensor:
        return F.cross_entropy(logits[name](inputs).flatten(0, 1), targets.flatten())

    def step(name: str) -> None:
        optimizers[name].zero_grad()
        loss_of(name).backward()
        optimizers[name].step()

    steps = {name: lambda n=name: step(n) for name in modules}
    times = interleaved_times(steps, preset.train_steps, device, warmup=1)["wall"]
    tokens = inputs.numel()
    rows = []
    for name, module in modules.items():
        seconds = statistics.median(times[name])
        saved = saved_bytes(lambda n=name: loss_of(n), module)
        flops = training_flops(lambda n=name: loss_of(n))
        rows.append({
            "model": name, "tokens_per_s": tokens / seconds, "step_ms": seconds * 1e3,
            "parameters": sum(p.numel() for p in module.parameters()),
            "saved_bytes_per_token": None if saved is None else saved / tokens,
            "flops_per_token": None if flops is None else flops / tokens,
            "gflops_per_s": None if flops is None else flops / seconds / 1e9,
            "batch": preset.train_batch, "length": preset.train_length,
        })  # fmt: skip
    yardstick = next(r for r in rows if "yardstick" in r["model"])
    for row in rows:
        row["vs_plain_transformer"] = row["tokens_per_s"] / yardstick["tokens_per_s"]
    return rows, skipped


def mqar_accuracy(preset: MemoryPreset, steps: int, device: torch.device) -> dict[str, float]:
    """Per model, MQAR accuracy at labelled positions after ``steps`` AdamW steps on the same batches."""
    vocab, seq, pairs = preset.mqar
    task = dict(vocab_size=vocab, seq_len=seq, num_pairs=pairs)
    train = MQAR(length=steps * preset.mqar_batch, split="train", **task)
    test = MQAR(length=preset.mqar_test, split="test", **task)
    stack = lambda items, key: torch.stack([item[key] for item in items]).to(device)  # noqa: E731
    logits, modules, _ = training_models(vocab, device)
    accuracy = {}
    for name, module in modules.items():
        optimizer = torch.optim.AdamW(module.parameters(), lr=3e-3, weight_decay=0.1)
        module.train()
        for i in tqdm(range(steps), desc=f"MQAR {name}"):
            items = [train[j] for j in range(i * preset.mqar_batch, (i + 1) * preset.mqar_batch)]
            ids, labels = stack(items, "input_ids"), stack(items, "labels")
            labelled = labels != IGNORE
            loss = F.cross_entropy(logits[name](ids)[labelled], labels[labelled])
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            optimizer.step()
        module.eval()
        items = [test[j] for j in range(len(test))]
        ids, labels = stack(items, "input_ids"), stack(items, "labels")
        labelled = labels != IGNORE
        with torch.no_grad():
            accuracy[name] = (
                (logits[name](ids)[labelled].argmax(-1) == labels[labelled]).float().mean().item()
            )
    return accuracy


def _commit() -> str:
    """The working tree's short commit (``unknown`` outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _earlier_training(path: Path) -> tuple[dict, str]:
    """The training part of an earlier run in the same folder and its source, so that ``--parts update``
    refreshes the update table without dropping the training rows (which it did not rerun)."""
    earlier = json.loads(path.read_text()) if path.exists() else {}
    if "training" not in earlier:
        return {}, ""
    kept = {
        k: earlier[k]
        for k in ("training", "mqar_steps", "mqar", "mqar_batch", "mqar_accuracy")
        if k in earlier
    }
    return kept, earlier.get("sources", {}).get("training", "an earlier run").removesuffix(
        ", carried over: not rerun"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeloom bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (float32 either way)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    parser.add_argument("--mqar-steps", type=int, default=0, help="MQAR training steps per model (0: skip)")
    parser.add_argument("--parts", default="update,training", help="comma-separated: update, training")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if parts - {"update", "training"}:
        parser.error(f"--parts takes update and/or training; got {args.parts!r}")
    torch.set_num_threads(args.threads)
    try:
        device, _ = resolve_device_and_dtype(args.device, "float32")
    except ValueError as error:  # CUDA named but absent
        parser.error(str(error))
    preset = PRESETS[args.preset]
    cells, skipped = [], []
    grid = [(h, d, b, n) for h, d in preset.shapes for b in preset.chunk_sizes for n in preset.lengths]
    for i, (heads, head_dim, b, length) in enumerate(grid if "update" in parts else []):
        updates = []
        for update in UPDATES:
            limit = {"sequential": preset.sequential_max_length, "scan": preset.scan_max_length,
                     "dual-compiled": preset.compiled_max_length}.get(update)  # fmt: skip
            if limit is not None and length > limit:
                why = (
                    "compiling takes minutes"
                    if update == "dual-compiled"
                    else "too slow or too much memory here"
                )
                skipped.append(f"{update} at L={length} (> {limit}: {why})")
            else:
                updates.append(update)
        for c in run_cell(preset, updates, heads, head_dim, b, length, device):
            cells.append(c)
            print(f"[{i + 1}/{len(grid)}] {c['update']:10s} H×d {heads}×{head_dim} b {b} L {length}: "
                  f"{c['forward_tokens_per_s']:.0f} / {c['forward_backward_tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
    environment = describe_environment(device, torch.float32, args.preset)
    result = {"environment": environment, "cells": cells, "speedups": speedups(cells), "skipped": skipped}
    if cells:  # by the clock of the shares set against it: this thread's CPU time on a CPU, wall on a GPU
        result["matmul_peak_flops"] = measure_matmul_peak(device.type, cpu_time=device.type == "cpu")
    result["sources"] = {part: f"timeloom bench memory {' '.join(argv if argv is not None else sys.argv[1:])} "
                         f"(commit {_commit()})" for part in sorted(parts)}  # fmt: skip
    if "training" not in parts:
        earlier, source = _earlier_training(args.out / "memory.json")
        if earlier:
            result.update(earlier)
            result["sources"]["training"] = f"{source}, carried over: not rerun"
    if "training" in parts:
        result["training"], missing = training_throughput(preset, device)
        skipped += missing
        for r in result["training"]:
            print(f"{r['model']}: {r['tokens_per_s']:.0f} tok/s ({r['vs_plain_transformer']:.2f}× plain)")
        if args.mqar_steps:
            result.update(mqar_steps=args.mqar_steps, mqar=preset.mqar, mqar_batch=preset.mqar_batch)
            result["mqar_accuracy"] = mqar_accuracy(preset, args.mqar_steps, device)
            print("MQAR accuracy:", result["mqar_accuracy"])
        else:
            skipped.append("MQAR accuracy side by side: pass --mqar-steps N")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory.json").write_text(json.dumps(result, indent=2))
    write_report(args.out / "memory.md", markdown(result))
    print(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
