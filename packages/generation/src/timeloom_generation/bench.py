"""`timeloom bench generation`: what the temporal KV cache saves per chunk, against its ideal (spec §7.5).

A steady-state chunk (the cache already full with ``P`` frames) costs, for ``S`` Euler steps and chunk ``C``:

- cached: ``S`` forwards of the ``C`` chunk frames reading the cache, plus one write forward of them (the
  first read after a write restages the held keys and values, `KVCache.fetch_with`: it is timed apart);
- windowed recompute (OS-Fix): ``S`` forwards of the last ``P`` clean frames plus the ``C`` chunk frames.

With per-frame work ``a`` and attention ``b`` per query–key pair the ideal speedup is
``S(P + C) / ((S + 1)C)`` whatever ``a`` and ``b``. The cache is in a rollout's steady state: filled with
``P`` frames, then ``C`` more that evicted the oldest, so its ring has wrapped. The primitives (write, first
read, read, window, chunk-only) of every cell and batch size are timed **interleaved**, one call each per round for
``--rounds`` rounds, so load on a shared machine hits all of them alike. The speedup is computed from each
primitive's best call (best of N, the least disturbed), and as checks from the medians and from the best
thread CPU time (on CPU, what the call computed, whatever else ran). The chunk-only forward (the same C frames
with no cache) is the floor of a cached read: ``read / chunk-only - 1`` is what the cache itself costs, and
``S·window / ((S + 1)·chunk-only)`` over the ideal is the most a free cache could reach (a forward's fixed
costs do not shrink with its frames). Beside the steady state, whole rollouts of
``--rollout-frames`` latent frames from text (`ARSampler`, cached against windowed) are timed end to end, with
their own ideal: frames run through the model, counted over the rollout's chunks (the first ones have shorter
prefixes). CPU runs use one thread unless ``--threads`` says otherwise. Text encoding and decoding are excluded. Output: ``generation.json`` and ``generation.md`` under ``--out``. Mind
the machine's load (recorded): compare only runs on the same device.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from timeloom_kernels.bench import describe_environment, resolve_device_and_dtype, write_report
from tqdm.auto import tqdm

from timeloom.throughput import interleaved_times
from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig
from timeloom_generation.sampling import ARSampler, chunk_plan

__all__ = [
    "chunk_primitives",
    "chunk_row",
    "main",
    "rollout_ideal",
    "time_chunk",
    "time_rollout",
]

TINY = CausalSTDiTConfig(in_channels=1, patch=4, width=96, depth=4, heads=4, text_tokens=16)
# (P, C, S): the tiny config's steady state, and the issue's P = 24, C = 8 at two step counts.
GRID = [(7, 2, 20), (24, 8, 20), (24, 8, 50)]
PRIMITIVES = (
    "write",
    "first_read",
    "read",
    "window",
    "chunk_only",
)  # in this order: first_read follows write


def chunk_primitives(
    model: CausalSTDiT, prefix: int, chunk: int, grid: tuple[int, int], batch: int
) -> dict[str, Callable[[], None]]:
    """The timed calls of a steady-state chunk, in `PRIMITIVES` order (each enters inference mode)."""
    parameter = next(model.parameters())
    device, dtype = parameter.device, parameter.dtype
    config = model.config
    generator = torch.Generator().manual_seed(0)
    frames = torch.randn(batch, config.in_channels, prefix + 2 * chunk, *grid, generator=generator)
    frames = frames.to(device, dtype)
    text = torch.randn(batch, config.text_tokens, config.width, generator=generator).to(device, dtype)
    clean = torch.zeros(batch, prefix, device=device, dtype=dtype)
    noisy = torch.full((batch, chunk), 0.5, device=device, dtype=dtype)
    cache = model.new_cache(batch, grid, prefix, device, dtype)
    chunk_frames = frames[:, :, prefix + chunk :]
    chunk_positions = torch.arange(prefix + chunk, prefix + 2 * chunk, device=device)
    window_frames = frames[:, :, chunk:]  # the P frames the cache holds, then the chunk
    window_levels = torch.cat((clean, noisy), dim=1)
    with torch.inference_mode():
        model(frames[:, :, :prefix], clean, text, cache=cache, write=True)
        written = torch.arange(prefix, prefix + chunk, device=device)  # evicts C frames: the ring wraps
        model(frames[:, :, prefix : prefix + chunk], noisy * 0, text, written, cache=cache, write=True)
        state = cache.state_dict()

    @torch.inference_mode()
    def write() -> None:  # appends C frames and evicts C: restore the full cache for the next call
        model(chunk_frames, noisy * 0, text, positions=chunk_positions, cache=cache, write=True)
        cache.load_state_dict(state)

    @torch.inference_mode()
    def read() -> None:  # right after `write` it is a chunk's first read, later ones find the entries staged
        with cache.frozen():
            model(chunk_frames, noisy, text, positions=chunk_positions, cache=cache)

    @torch.inference_mode()
    def window() -> None:
        model(window_frames, window_levels, text)

    @torch.inference_mode()
    def chunk_only() -> None:
        model(chunk_frames, noisy, text, positions=chunk_positions)

    return {"write": write, "first_read": read, "read": read, "window": window, "chunk_only": chunk_only}


def chunk_row(
    times: dict[str, dict[str, list[float]]], prefix: int, chunk: int, steps: int, batch: int
) -> dict:
    """Speedups of one ``(P, C, S)`` cell from its primitives' times (see `interleaved_times`)."""
    ideal = steps * (prefix + chunk) / ((steps + 1) * chunk)
    rounds = len(times["wall"]["read"])
    row = {"prefix": prefix, "chunk": chunk, "steps": steps, "batch": batch, "rounds": rounds, "ideal": ideal}
    statistics_ = [("best", "wall", min), ("median", "wall", statistics.median)]
    if "cpu" in times:
        statistics_.append(("best_cpu", "cpu", min))
    for statistic, clock, reduce in statistics_:
        ms = {name: reduce(times[clock][name]) * 1e3 for name in PRIMITIVES}
        cached_s = ((steps - 1) * ms["read"] + ms["first_read"] + ms["write"]) / 1e3
        window_s = steps * ms["window"] / 1e3
        row[statistic] = {
            **{f"{name}_ms": value for name, value in ms.items()},
            "cached_chunk_s": cached_s,
            "window_chunk_s": window_s,
            "speedup": window_s / cached_s,
            "of_ideal": window_s / cached_s / ideal,
            "cache_overhead": ms["read"] / ms["chunk_only"] - 1,
            "free_cache_of_ideal": window_s / ((steps + 1) * ms["chunk_only"] / 1e3) / ideal,
        }
    return row


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
    primitives = chunk_primitives(model, prefix, chunk, grid, batch)
    device = next(model.parameters()).device
    return chunk_row(interleaved_times(primitives, rounds, device), prefix, chunk, steps, batch)


def rollout_ideal(frames: int, prefix: int, chunk: int, steps: int) -> float:
    """Frames the windowed rollout runs through the model over those the cached one runs (writes included)."""
    chunks = chunk_plan(frames, 0, chunk)
    windowed = sum(steps * (min(c.start, prefix) + len(c)) for c in chunks)
    cached = sum(steps * len(c) for c in chunks) + sum(len(c) for c in chunks[:-1])  # the last is not written
    return windowed / cached


def time_rollout(
    model: CausalSTDiT,
    frames: int,
    prefix: int,
    chunk: int,
    steps: int,
    grid: tuple[int, int],
    batch: int,
    rounds: int = 1,
) -> dict:
    """Seconds to generate ``frames`` latent frames from text, cached and windowed, interleaved."""
    parameter = next(model.parameters())
    config = model.config
    text = torch.randn(batch, config.text_tokens, config.width, generator=torch.Generator().manual_seed(0))
    text = text.to(parameter.device, parameter.dtype)
    samplers = {
        mode: ARSampler(model, chunk_frames=chunk, cache_frames=prefix, steps=steps, mode=mode)
        for mode in ("cached", "window")
    }
    calls = {
        mode: functools.partial(sampler.sample, text, frames=frames, grid=grid)
        for mode, sampler in samplers.items()
    }
    times = interleaved_times(calls, rounds, parameter.device)["wall"]
    best = {mode: min(values) for mode, values in times.items()}
    ideal = rollout_ideal(frames, prefix, chunk, steps)
    speedup = best["window"] / best["cached"]
    return {
        "frames": frames,
        "prefix": prefix,
        "chunk": chunk,
        "steps": steps,
        "batch": batch,
        "rounds": rounds,
        "cached_s": best["cached"],
        "window_s": best["window"],
        "speedup": speedup,
        "ideal": ideal,
        "of_ideal": speedup / ideal,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="timeloom bench generation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8], help="batch sizes, timed together")
    parser.add_argument("--size", type=int, default=32, help="latent grid side (pixels with the tiny config)")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per primitive, interleaved")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (one: least disturbed by load)")
    parser.add_argument("--rollout-frames", type=int, default=64, help="latent frames of the timed rollouts")
    parser.add_argument(
        "--rollout-batch",
        type=int,
        nargs="*",
        default=[1],
        help="batch sizes of the timed rollouts (none: skip)",
    )
    parser.add_argument("--rollout-rounds", type=int, default=1, help="timed rollouts per mode, interleaved")
    args = parser.parse_args(argv)
    try:
        device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    except ValueError as error:  # CUDA named but absent
        parser.error(str(error))
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = CausalSTDiT(TINY).to(device, dtype).eval()
    grid = (args.size, args.size)
    shapes = sorted({(p, c) for p, c, _ in GRID})
    # every primitive of every (P, C, batch) takes its turn in each round: one load for all rows
    primitives = {
        (p, c, batch, name): call
        for batch in args.batch
        for p, c in shapes
        for name, call in chunk_primitives(model, p, c, grid, batch).items()
    }
    load_before = os.getloadavg()
    times = interleaved_times(primitives, args.rounds, device)
    rows = []
    for batch in args.batch:
        for p, c, s in GRID:
            cell = {
                clock: {n: values[(p, c, batch, n)] for n in PRIMITIVES} for clock, values in times.items()
            }
            rows.append(chunk_row(cell, p, c, s, batch))
    # the issue's P = 24, C = 8, S = 20, as whole rollouts from text
    rollouts = [
        time_rollout(model, args.rollout_frames, 24, 8, 20, grid, batch, args.rollout_rounds)
        for batch in tqdm(args.rollout_batch, desc="rollouts")
    ]
    environment = {
        **describe_environment(device, dtype, "tiny"),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "generation.json").write_text(
        json.dumps({"environment": environment, "rows": rows, "rollouts": rollouts}, indent=2)
    )
    lines = [
        f"Steady-state chunk (cache full, ring wrapped), tiny CausalSTDiT, {args.size}² grid, "
        f"{environment['device_name']}, {environment['threads']} threads, load "
        f"{load_before[0]:.1f} → {environment['load_average_after'][0]:.1f}; {args.rounds} rounds, every "
        "primitive of every row interleaved; times are the best call's wall time",
        "",
        "| batch | P | C | S | read ms | first read ms | write ms | chunk-only ms | window ms | speedup | ideal "
        "| of ideal | median | CPU time | free-cache ceiling | cache overhead |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        best, median, cpu = r["best"], r["median"], r.get("best_cpu")
        lines.append(
            f"| {r['batch']} | {r['prefix']} | {r['chunk']} | {r['steps']} | {best['read_ms']:.1f} "
            f"| {best['first_read_ms']:.1f} "
            f"| {best['write_ms']:.1f} | {best['chunk_only_ms']:.1f} | {best['window_ms']:.1f} "
            f"| {best['speedup']:.2f} | {r['ideal']:.2f} | **{best['of_ideal']:.2f}** | {median['of_ideal']:.2f} "
            f"| {'-' if cpu is None else format(cpu['of_ideal'], '.2f')} | {best['free_cache_of_ideal']:.2f} "
            f"| {best['cache_overhead']:+.0%} |"
        )
    lines += [
        "",
        "Cached chunk = (S − 1) reads + the first read (it restages the cache) + the write (restoring the cache "
        "after it is timed too). *of ideal*: measured speedup / ideal from each primitive's best wall time; *median*: the same from "
        "median wall times; *CPU time*: from the best thread CPU time; *free-cache ceiling*: what a cache costing "
        "nothing (read = chunk-only) would reach; *cache overhead*: read / chunk-only − 1 (the attention to the "
        "held frames included).",
    ]
    if rollouts:
        lines += [
            "",
            f"Whole rollouts of {args.rollout_frames} latent frames from text (P = 24, C = 8, S = 20; best of "
            f"{args.rollout_rounds} interleaved per mode; ideal: frames through the model, windowed over cached)",
            "",
            "| batch | cached s | windowed s | speedup | ideal | of ideal |",
            "|---|---|---|---|---|---|",
            *(
                f"| {r['batch']} | {r['cached_s']:.2f} | {r['window_s']:.2f} | {r['speedup']:.2f} | {r['ideal']:.2f} "
                f"| **{r['of_ideal']:.2f}** |"
                for r in rollouts
            ),
        ]
    write_report(args.out / "generation.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
