"""`timeloom bench generation`: what the temporal KV cache saves per chunk, against its ideal (spec §7.5).

A steady-state chunk (the cache already full with ``P`` frames) costs, for ``S`` Euler steps and chunk ``C``:

- cached: ``S`` forwards of the ``C`` chunk frames reading the cache, plus one write forward of them;
- windowed recompute (OS-Fix): ``S`` forwards of the last ``P`` clean frames plus the ``C`` chunk frames.

With per-frame work ``a`` and attention ``b`` per query–key pair the ideal speedup is
``S(P + C) / ((S + 1)C)`` whatever ``a`` and ``b``. Each cell times both primitives on the same model and
inputs (warm-up, then the inter-quartile mean) and reports measured, ideal and measured / ideal. Text encoding
and decoding are excluded. Output: ``generation.json`` and ``generation.md`` under ``--out``. Mind the machine's
load (recorded): compare only runs on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from timeloom_kernels.bench import describe_environment, measure, resolve_device_and_dtype

from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig

__all__ = ["main", "time_chunk"]

TINY = CausalSTDiTConfig(in_channels=1, patch=4, width=96, depth=4, heads=4, text_tokens=16)
# (P, C, S): the tiny config's steady state, and the P = 24, C = 8 at two step counts.
GRID = [(7, 2, 20), (24, 8, 20), (24, 8, 50)]


@dataclass
class Budget:
    warmup_s: float = 0.5
    min_runs: int = 3
    max_runs: int = 10
    budget_s: float = 6.0
    max_call_s: float = 20.0


def time_chunk(
    model: CausalSTDiT, prefix: int, chunk: int, steps: int, grid: tuple[int, int], batch: int, budget: Budget
) -> dict:
    """Seconds per steady-state chunk, cached and windowed, for one ``(P, C, S)`` cell."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = model.config
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, config.in_channels, prefix + chunk, *grid, generator=generator).to(
        device, dtype
    )
    text = torch.randn(batch, config.text_tokens, config.width, generator=generator).to(device, dtype)
    levels = torch.cat((torch.zeros(batch, prefix), torch.full((batch, chunk), 0.5)), dim=1).to(device, dtype)
    cache = model.new_cache(batch, grid, prefix, device, dtype)
    with torch.inference_mode():
        model(frames[:, :, :prefix], levels[:, :prefix], text, cache=cache, write=True)
        state = cache.state_dict()
        chunk_positions = torch.arange(prefix, prefix + chunk, device=device)

        def read() -> None:
            with cache.frozen():
                model(frames[:, :, prefix:], levels[:, prefix:], text, positions=chunk_positions, cache=cache)

        def write() -> None:  # appends C frames and evicts C: restore the full cache for the next call
            model(
                frames[:, :, prefix:],
                levels[:, prefix:] * 0,
                text,
                positions=chunk_positions,
                cache=cache,
                write=True,
            )
            cache.load_state_dict(state)

        def window() -> None:
            model(frames, levels, text)

        _, read_ms = measure(read, device, budget)
        _, write_ms = measure(write, device, budget)
        _, window_ms = measure(window, device, budget)
    cached_s, window_s = (steps * read_ms + write_ms) / 1e3, steps * window_ms / 1e3
    ideal = steps * (prefix + chunk) / ((steps + 1) * chunk)
    measured = window_s / cached_s
    return {
        "prefix": prefix,
        "chunk": chunk,
        "steps": steps,
        "read_ms": read_ms,
        "write_ms": write_ms,
        "window_ms": window_ms,
        "cached_chunk_s": cached_s,
        "window_chunk_s": window_s,
        "speedup": measured,
        "ideal": ideal,
        "of_ideal": measured / ideal,
    }


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="timeloom bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=32, help="latent grid side (pixels with the tiny config)")
    args = parser.parse_args(argv)
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    model = CausalSTDiT(TINY).to(device, dtype).eval()
    rows = [time_chunk(model, p, c, s, (args.size, args.size), args.batch, Budget()) for p, c, s in GRID]
    environment = {**describe_environment(device, dtype, "tiny"), "load_average": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(
        json.dumps({"environment": environment, "rows": rows}, indent=2)
    )
    lines = [
        f"Steady-state chunk, tiny CausalSTDiT, batch {args.batch}, {args.size}² grid, {environment['device_name']}, "
        f"{environment['threads']} threads, load {environment['load_average'][0]:.1f}",
        "",
        "| P | C | S | cached s/chunk | windowed s/chunk | speedup | ideal | of ideal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['prefix']} | {r['chunk']} | {r['steps']} | {r['cached_chunk_s']:.3f} | {r['window_chunk_s']:.3f} "
        f"| {r['speedup']:.2f} | {r['ideal']:.2f} | {r['of_ideal']:.2f} |"
        for r in rows
    ]
    (args.out / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
