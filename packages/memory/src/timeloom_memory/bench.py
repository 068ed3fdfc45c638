"""`timeloom bench memory`: speed of Titans' memory update, chunked parallel against token by token.

For every cell (update kernel × heads × chunk size b × length L) it times the `NeuralMemory` layer forward
(no grad) and forward+backward, reports tokens/s and the speed-up of each chunk kernel over `sequential`
(the definition), plus the state's bytes per sample (constant in L) and the per-token weights `scan`
materialises per chunk. Timing reuses the kernels suite (warm-up, then the inter-quartile mean). Outputs
`memory.json` and `memory.md` under ``--out``. The side-by-side run of titans-pytorch is not part of this
suite yet (listed as skipped). Compare runs from the same device only, and mind the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timeloom_kernels.bench import describe_environment, measure

from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig

__all__ = ["main"]


@dataclass(frozen=True)
class MemoryPreset:
    lengths: tuple[int, ...]
    batch: int
    shapes: tuple[tuple[int, int], ...]  # (heads, head_dim)
    chunk_sizes: tuple[int, ...]
    sequential_max_length: int  # the token loop is slow: longer cells skip it
    scan_max_length: int  # under autograd `scan` keeps every token's weights (O(L·|W|) memory)
    warmup_s: float = 0.05
    budget_s: float = 0.5
    min_runs: int = 3
    max_runs: int = 10
    max_call_s: float = 5.0


PRESETS = {
    "quick": MemoryPreset(
        lengths=(256, 1024),
        batch=8,
        shapes=((1, 64), (4, 32)),
        chunk_sizes=(16, 64),
        sequential_max_length=256,
        scan_max_length=256,
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
    ),
}
UPDATES = ("sequential", "scan", "dual")


def run_cell(preset: MemoryPreset, update: str, heads: int, head_dim: int, b: int, length: int) -> dict:
    torch.manual_seed(0)
    dim = heads * head_dim
    config = NeuralMemoryConfig(dim=dim, heads=heads, head_dim=head_dim, depth=2, expansion=4, chunk_size=b,
                                update=update)  # fmt: skip
    memory = NeuralMemory(config)
    x = torch.randn(preset.batch, length, dim)

    def forward() -> None:
        with torch.no_grad():
            memory(x)

    def forward_backward() -> None:
        y, _ = memory(x)
        y.sum().backward()

    device = torch.device("cpu")
    tokens = preset.batch * length
    _, fwd_ms = measure(forward, device, preset)
    _, fwdbwd_ms = measure(forward_backward, device, preset)
    weights = sum(h * o * i for o, i in config.layer_shapes for h in [heads])
    return {
        "update": update, "heads": heads, "head_dim": head_dim, "chunk_size": b, "length": length,
        "batch": preset.batch, "forward_ms": fwd_ms, "forward_backward_ms": fwdbwd_ms,
        "forward_tokens_per_s": tokens / fwd_ms * 1e3, "forward_backward_tokens_per_s": tokens / fwdbwd_ms * 1e3,
        "state_bytes_per_sample": 2 * weights * 4,  # weights and momentum, float32
        "scan_weights_bytes_per_chunk": b * weights * 4 if update == "scan" else 0,
    }  # fmt: skip


def speedups(cells: list[dict]) -> list[dict]:
    """Each chunk kernel's speed-up over `sequential` on the same cell, where both ran."""
    key = ("heads", "head_dim", "chunk_size", "length")
    base = {tuple(c[k] for k in key): c for c in cells if c["update"] == "sequential"}
    out = []
    for c in cells:
        ref = base.get(tuple(c[k] for k in key))
        if c["update"] != "sequential" and ref:
            out.append({**{k: c[k] for k in key}, "update": c["update"],
                        "forward": ref["forward_ms"] / c["forward_ms"],
                        "forward_backward": ref["forward_backward_ms"] / c["forward_backward_ms"]})  # fmt: skip
    return out


def markdown(cells: list[dict], ups: list[dict], environment: dict, skipped: list[str]) -> str:
    lines = [
        "# Titans memory update: tokens/s (`timeloom bench memory`)",
        "",
        f"Environment: `{json.dumps(environment)}`",
        "",
        "| update | H×d_h | b | L | fwd tok/s | fwd+bwd tok/s | state B/sample |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        lines.append(
            f"| {c['update']} | {c['heads']}×{c['head_dim']} | {c['chunk_size']} | {c['length']} | "
            f"{c['forward_tokens_per_s']:.0f} | {c['forward_backward_tokens_per_s']:.0f} | "
            f"{c['state_bytes_per_sample']} |"
        )
    lines += ["", "Speed-up over the token-by-token definition (`sequential`):", ""]
    lines += ["| update | H×d_h | b | L | fwd | fwd+bwd |", "|---|---|---|---|---|---|"]
    for u in ups:
        lines.append(
            f"| {u['update']} | {u['heads']}×{u['head_dim']} | {u['chunk_size']} | {u['length']} | "
            f"{u['forward']:.1f}× | {u['forward_backward']:.1f}× |"
        )
    lines += [""] + [f"Skipped: {s}" for s in skipped]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="timeloom bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    cells, skipped = [], []
    grid = [(h, d, b, n) for h, d in preset.shapes for b in preset.chunk_sizes for n in preset.lengths]
    for i, (heads, head_dim, b, length) in enumerate(grid):
        for update in UPDATES:
            limit = {"sequential": preset.sequential_max_length, "scan": preset.scan_max_length}.get(update)
            if limit is not None and length > limit:
                skipped.append(f"{update} at L={length} (> {limit}: too slow or too much memory here)")
                continue
            cells.append(run_cell(preset, update, heads, head_dim, b, length))
            c = cells[-1]
            print(f"[{i + 1}/{len(grid)}] {update:10s} H×d {heads}×{head_dim} b {b} L {length}: "
                  f"{c['forward_tokens_per_s']:.0f} / {c['forward_backward_tokens_per_s']:.0f} tok/s", flush=True)  # fmt: skip
    skipped.append("titans-pytorch side by side: not implemented yet")
    ups = speedups(cells)
    environment = describe_environment(torch.device("cpu"), torch.float32, args.preset)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": environment, "cells": cells, "speedups": ups, "skipped": skipped}
    (args.out / "memory.json").write_text(json.dumps(result, indent=2))
    (args.out / "memory.md").write_text(markdown(cells, ups, environment, skipped))
    print(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.md'}")
    return 0
