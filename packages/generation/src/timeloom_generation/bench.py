"""`timeloom bench generation`: what the temporal KV cache saves per chunk, against its ideal (spec §7.5).

A steady-state chunk (the cache already full with ``P`` frames) costs, for ``S`` Euler steps and chunk ``C``:

- cached: ``S`` forwards of the ``C`` chunk frames reading the cache, plus one write forward of them;
- windowed recompute (OS-Fix): ``S`` forwards of the last ``P`` clean frames plus the ``C`` chunk frames.

With per-frame work ``a`` and attention ``b`` per query–key pair the ideal speedup is
``S(P + C) / ((S + 1)C)`` whatever ``a`` and ``b``. Each cell times the primitives on the same model and
inputs, **interleaved** (read, write, window, chunk-only, then again, for ``--rounds`` rounds), so load on a
shared machine hits all of them alike; the speedup is computed from each primitive's best call (best of N,
the least disturbed) and, as a check, from the medians. The chunk-only forward (the same C frames with no
cache) is the floor of a cached read: ``read / chunk-only - 1`` is what the cache itself costs. CPU runs use
one thread unless ``--threads`` says otherwise. Text encoding and decoding are excluded. Output:
``generation.json`` and ``generation.md`` under ``--out``. Mind the machine's load (recorded): compare only
runs on the same device.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timeloom_kernels.bench import describe_environment, resolve_device_and_dtype
from tqdm.auto import tqdm

from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig

__all__ = ["interleaved_times", "main", "time_chunk"]

TINY = CausalSTDiTConfig(in_channels=1, patch=4, width=96, depth=4, heads=4, text_tokens=16)
# (P, C, S): the tiny config's steady state, and the P = 24, C = 8 at two step counts.
GRID = [(7, 2, 20), (24, 8, 20), (24, 8, 50)]


def interleaved_times(
    primitives: dict[str, Callable[[], None]], rounds: int, device
) -> dict[str, list[float]]:
    """Seconds of every call, ``rounds`` calls each, the primitives taking turns (after two warm-up rounds)."""
    times: dict[str, list[float]] = {name: [] for name in primitives}
    for index in range(rounds + 2):
        for name, primitive in primitives.items():
            start = time.perf_counter()
            primitive()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if index >= 2:
                times[name].append(time.perf_counter() - start)
    return times


def time_chunk(
    model: CausalSTDiT,
    prefix: int,
    chunk: int,
    steps: int,
    grid: tuple[int, int],
    batch: int,
    rounds: int = 15,
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
        chunk_frames, chunk_levels = frames[:, :, prefix:], levels[:, prefix:]
        chunk_positions = torch.arange(prefix, prefix + chunk, device=device)

        def read() -> None:
            with cache.frozen():
                model(chunk_frames, chunk_levels, text, positions=chunk_positions, cache=cache)

        def write() -> None:  # appends C frames and evicts C: restore the full cache for the next call
            model(chunk_frames, chunk_levels * 0, text, positions=chunk_positions, cache=cache, write=True)
            cache.load_state_dict(state)

        def window() -> None:
            model(frames, levels, text)

        def chunk_only() -> None:
            model(chunk_frames, chunk_levels, text, positions=chunk_positions)

        times = interleaved_times(
            {"read": read, "write": write, "window": window, "chunk_only": chunk_only}, rounds, device
        )
    ideal = steps * (prefix + chunk) / ((steps + 1) * chunk)
    row = {"prefix": prefix, "chunk": chunk, "steps": steps, "rounds": rounds, "ideal": ideal}
    for statistic, reduce in (("best", min), ("median", statistics.median)):
        ms = {name: reduce(values) * 1e3 for name, values in times.items()}
        cached_s, window_s = (steps * ms["read"] + ms["write"]) / 1e3, steps * ms["window"] / 1e3
        row[statistic] = {
            **{f"{name}_ms": value for name, value in ms.items()},
            "cached_chunk_s": cached_s,
            "window_chunk_s": window_s,
            "speedup": window_s / cached_s,
            "of_ideal": window_s / cached_s / ideal,
            "cache_overhead": ms["read"] / ms["chunk_only"] - 1,
        }
    return row


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timeloom bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=32, help="latent grid side (pixels with the tiny config)")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per primitive, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: least disturbed by load)")
    args = parser.parse_args(argv)
    device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CausalSTDiT(TINY).to(device, dtype).eval()
    rows = [
        time_chunk(model, p, c, s, (args.size, args.size), args.batch, args.rounds)
        for p, c, s in tqdm(GRID, desc="cells")
    ]
    environment = {**describe_environment(device, dtype, "tiny"), "load_average": os.getloadavg()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(
        json.dumps({"environment": environment, "rows": rows}, indent=2)
    )
    lines = [
        f"Steady-state chunk, tiny CausalSTDiT, batch {args.batch}, {args.size}² grid, {environment['device_name']}, "
        f"{environment['threads']} threads, load {environment['load_average'][0]:.1f}; best of {args.rounds} "
        "interleaved calls per primitive (median in brackets)",
        "",
        "| P | C | S | read ms | write ms | window ms | cached s/chunk | windowed s/chunk | speedup | ideal "
        "| of ideal | cache overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best, median = r["best"], r["median"]
        lines.append(
            f"| {r['prefix']} | {r['chunk']} | {r['steps']} | {best['read_ms']:.1f} | {best['write_ms']:.1f} "
            f"| {best['window_ms']:.1f} | {best['cached_chunk_s']:.3f} | {best['window_chunk_s']:.3f} "
            f"| {best['speedup']:.2f} ({median['speedup']:.2f}) | {r['ideal']:.2f} "
            f"| **{best['of_ideal']:.2f}** ({median['of_ideal']:.2f}) "
            f"| {best['cache_overhead']:+.0%} ({median['cache_overhead']:+.0%}) |"
        )
    (args.out / "generation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
