"""`timeloom bench kernels`: attention speed (and CUDA memory) on the project's shapes, in one run.

Sections (spec §10):
1. CAB's four patterns (non-causal self NS, causal self CS, non-causal cross NC, causal cross CC) over a length
   sweep, embed 512 = 8 heads x 64, for every softmax backend that can serve the call, the dense-mask SDPA
   baseline ("vanilla", CAB's vanilla attention) and Lightning Attention-2 (chunked) on the self patterns. From
   them the efficiency length: the crossover of a quadratic fit of the baseline's time with a linear fit of
   Lightning's.
2. Block-causal attention by frame (16 frames x 256 tokens), inference: every backend (among them `tiled`,
   SDPA over each query tile's key span) against SDPA with the dense mask (target >= 1.5x; ideal
   1/density), and compiled flex on CPU where the preset allows its compile time (reported separately).
3. Lightning Attention-2 forward time(L=16384) / time(L=1024) (target <= 20).

Timing: inputs are built before timing; warm-up calls; then the mean of the latencies inside the
inter-quartile range. Peak memory is the allocated-bytes delta on CUDA. Output: `kernels.jsonl` (one line per
cell), `kernels_summary.json` (derived numbers) and `kernels.md` under `--out`. Compare runs only from the same
device.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from timeloom_kernels.attention import BACKENDS, attend, describe, ineligibility
from timeloom_kernels.linear import alibi_decay, lightning_attention
from timeloom_kernels.masks import Mask, block_causal, causal, ccam

EMBED, HEADS = 512, 8
HEAD_DIM = EMBED // HEADS
TEXT_TOKENS = 120  # NC: video queries attend to a caption (spec §10)
CC_FRAMES = 16  # CC: Video-CCAM-style queries over 16 frames
PATTERNS = ("NS", "CS", "NC", "CC")
BLOCK_CAUSAL_TARGET = 1.5
LIGHTNING_RATIO_TARGET = 20.0


@dataclass(frozen=True)
class Preset:
    """How big and how long: `full` (about 10 min on 2 CPU cores), `quick` (about 1 min), `tiny` (seconds)."""

    lengths: tuple[int, ...]
    batch: int
    warmup_s: float  # warm-up time per cell (at least one call)
    budget_s: float  # measuring time per cell (at least `min_runs` calls)
    min_runs: int
    max_runs: int
    max_call_s: float  # skip a cell whose projected single call takes longer
    frames: int
    tokens_per_frame: int
    lightning_lengths: tuple[int, int]
    compile_flex_on_cpu: bool = False  # also time compiled flex on CPU (~30 s compile per shape)


_FULL = dict(frames=16, tokens_per_frame=256, lightning_lengths=(1024, 16384))
_TINY = dict(lengths=(16, 32, 64), batch=1, frames=4, tokens_per_frame=16, lightning_lengths=(64, 256))
CPU_PRESETS = {
    "full": Preset(
        lengths=(256, 512, 1024, 2048, 4096, 8192),
        batch=1,  # the spec's batch 4 would take an hour on 2 cores
        warmup_s=0.1,
        budget_s=0.5,
        min_runs=2,
        max_runs=100,
        max_call_s=5.0,
        compile_flex_on_cpu=True,
        **_FULL,
    ),
    "quick": Preset(
        lengths=(256, 512, 1024, 2048),
        batch=1,
        warmup_s=0.05,
        budget_s=0.2,
        min_runs=3,
        max_runs=20,
        max_call_s=0.5,
        **_FULL,
    ),
    "tiny": Preset(warmup_s=0.0, budget_s=0.0, min_runs=1, max_runs=1, max_call_s=0.5, **_TINY),
}
CUDA_PRESETS = {
    "full": Preset(
        lengths=(256, 512, 1024, 2048, 4096, 8192, 16384, 32768),
        batch=4,
        warmup_s=0.025,
        budget_s=0.1,
        min_runs=5,
        max_runs=100,
        max_call_s=10.0,
        **_FULL,
    ),
    "quick": Preset(
        lengths=(256, 1024, 4096, 8192),
        batch=4,
        warmup_s=0.025,
        budget_s=0.05,
        min_runs=5,
        max_runs=50,
        max_call_s=2.0,
        **_FULL,
    ),
    "tiny": Preset(warmup_s=0.0, budget_s=0.0, min_runs=1, max_runs=1, max_call_s=0.5, **_TINY),
}


# ------------------------------------------------------------------------------------------------ timing


HAND_WRITTEN = "(not written by the bench)"


def write_report(path: Path, generated: str) -> None:
    """Write a bench's Markdown report at ``path``, keeping what a person added under an earlier one: all from
    the first ``## `` heading marked `HAND_WRITTEN` on (a study's figures beside the bench's tables)."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    marked = next(
        (i for i, line in enumerate(lines) if line.startswith("## ") and HAND_WRITTEN in line), None
    )
    kept = "" if marked is None else "\n" + "".join(lines[marked:])
    path.write_text(generated.rstrip("\n") + "\n" + kept)


def iqr_mean(samples: list[float]) -> float:
    """Mean of the samples inside the inter-quartile range (all of them when there are fewer than 4)."""
    if len(samples) < 4:
        return statistics.fmean(samples)
    low, _, high = statistics.quantiles(samples, n=4, method="inclusive")
    return statistics.fmean(s for s in samples if low <= s <= high)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously: a timer must time the work, not its queueing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimingBudget(Protocol):
    """The timing fields `measure` reads (a `Preset` here; other suites bring their own)."""

    warmup_s: float
    budget_s: float
    min_runs: int
    max_runs: int
    max_call_s: float


def measure(fn: Callable[[], Any], device: torch.device, preset: TimingBudget) -> tuple[float, float]:
    """`(first_call_s, iqr_mean_ms)`: a first call (compiles, caches masks), warm-up, then timed calls.

    A call slower than `preset.max_call_s` after warming up is timed once: its warm-up is the first call.
    """
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    latest = 0.0
    deadline = time.perf_counter() + preset.warmup_s
    while not latest or time.perf_counter() < deadline:  # at least one warm-up call after the first
        start = time.perf_counter()
        fn()
        synchronize(device)
        latest = time.perf_counter() - start
    if latest > preset.max_call_s:
        return first, latest * 1e3
    samples: list[float] = []
    deadline = time.perf_counter() + preset.budget_s
    while len(samples) < preset.max_runs and (
        len(samples) < preset.min_runs or time.perf_counter() < deadline
    ):
        start = time.perf_counter()
        fn()
        synchronize(device)
        samples.append(time.perf_counter() - start)
    return first, iqr_mean(samples) * 1e3


def out_of_memory(device: torch.device) -> str:
    """The skip reason for a cell that ran out of device memory, after freeing what it left cached."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return "out of device memory"


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak allocated bytes above the starting point during one call, in MB (CUDA only)."""
    if device.type != "cuda":
        return None
    synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------------------ problems


@dataclass
class Case:
    """One attention problem: inputs plus the mask; `self_attention` says whether linear attention applies."""

    pattern: str
    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None
    causal: bool
    self_attention: bool

    @property
    def shape(self) -> dict[str, int]:
        batch, heads, q_len, head_dim = self.q.shape
        return {
            "batch": batch,
            "heads": heads,
            "q_len": q_len,
            "kv_len": self.k.shape[2],
            "head_dim": head_dim,
        }


def make_case(pattern: str, length: int, batch: int, device: torch.device, dtype: torch.dtype) -> Case:
    """CAB's patterns at sequence length L.

    NS: L x L, no mask. CS: L x L causal. NC: L video queries x 120 text keys, no mask. CC: L/4 queries over
    16 frames of L/16 tokens with Video-CCAM's causal cross mask (query i sees frames <= floor(16 i / Q)).
    """
    gen = torch.Generator(device="cpu").manual_seed(length)

    def rand(tokens: int) -> Tensor:
        return torch.randn(batch, HEADS, tokens, HEAD_DIM, generator=gen).to(device=device, dtype=dtype)

    if pattern == "NS":
        return Case(pattern, rand(length), rand(length), rand(length), None, False, True)
    if pattern == "CS":
        return Case(pattern, rand(length), rand(length), rand(length), causal(), True, True)
    if pattern == "NC":
        return Case(pattern, rand(length), rand(TEXT_TOKENS), rand(TEXT_TOKENS), None, False, False)
    if pattern == "CC":
        queries = max(1, length // 4)
        mask = ccam(queries, CC_FRAMES, max(1, length // CC_FRAMES))
        keys = CC_FRAMES * max(1, length // CC_FRAMES)
        return Case(pattern, rand(queries), rand(keys), rand(keys), mask, True, False)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def _vanilla(case: Case) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """CAB's vanilla attention: SDPA with the mask materialised as a dense boolean tensor."""
    dense = None
    if case.mask is not None:
        batch, heads, q_len, _ = case.q.shape
        dense = case.mask.dense(batch, heads, q_len, case.k.shape[2], device=case.q.device)
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense)


# ------------------------------------------------------------------------------------------------ runner


@dataclass
class Cell:
    """One JSON line: environment, problem, backend and timings (None where not measured)."""

    section: str
    pattern: str
    backend: str
    batch: int
    heads: int
    q_len: int
    kv_len: int
    head_dim: int
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_mb: float | None = None
    compile_s: float | None = None
    status: str = "ok"
    reason: str | None = None


TimingKey = tuple[str, str, str]  # (pattern, backend, "fwd" | "fwd_bwd")


class Runner:
    """Runs cells, projects call times to skip hopeless ones, and prints one line per cell."""

    def __init__(self, device: torch.device, dtype: torch.dtype, preset: Preset, environment: dict[str, Any]):
        self.device, self.dtype, self.preset, self.environment = device, dtype, preset, environment
        self.cells: list[Cell] = []
        self._last: dict[TimingKey, tuple[float, float]] = {}  # last measured (work, seconds per call)

    def _projected_s(self, key: TimingKey, work: float) -> float | None:
        """The last measured call of this (pattern, backend, mode), scaled by the work ratio."""
        if key not in self._last:
            return None
        last_work, seconds = self._last[key]
        # `work` counts score entries Lq*Lk: softmax attention is linear in it, Lightning in sqrt(it) = L
        exponent = 0.5 if key[1] == "lightning" else 1.0
        return seconds * (work / last_work) ** exponent

    def time(
        self, key: TimingKey, work: float, fn: Callable[[], Any], project: bool
    ) -> tuple[float | None, float, str | None]:
        """`(ms, first_call_s, skip_reason)` for one mode of one cell; `project=False` never skips."""
        projected = self._projected_s(key, work) if project else None
        if projected is not None and projected > self.preset.max_call_s:
            return (
                None,
                0.0,
                f"projected {projected:.1f} s per call exceeds this preset's {self.preset.max_call_s} s",
            )
        try:
            first, ms = measure(fn, self.device, self.preset)
        except torch.OutOfMemoryError:
            return None, 0.0, out_of_memory(self.device)
        self._last[key] = (work, ms / 1e3)
        return ms, first, None

    def record(self, cell: Cell) -> None:
        if cell.reason:  # some libraries explain themselves over many lines
            cell.reason = cell.reason.splitlines()[0]
        self.cells.append(cell)
        timings = " ".join(
            f"{name} {value:.2f} ms"
            for name, value in (("fwd", cell.fwd_ms), ("fwd+bwd", cell.fwd_bwd_ms))
            if value is not None
        )
        if cell.status != "ok":
            detail = f"skipped: {cell.reason}"
        else:
            detail = timings + (f"  ({cell.reason})" if cell.reason else "")
        print(
            f"[{len(self.cells):3d}] {cell.section:<12} {cell.pattern:<3} Lq={cell.q_len:<6} Lk={cell.kv_len:<6} "
            f"{cell.backend:<16} {detail}",
            flush=True,
        )

    def run_case(
        self,
        section: str,
        case: Case,
        backend: str,
        forward: Callable[..., Tensor],
        no_backward: str | None = "inference only",
        project_from: str | None = None,
    ) -> Cell:
        """Time `forward(q, k, v)` without gradients, and with a backward pass unless `no_backward` says why not.

        With `project_from`, the cell is skipped when its call time, projected from the last measured cell of
        that pattern with the same backend, exceeds the preset's limit; without it the cell always runs.
        """
        cell = Cell(section, case.pattern, backend, **case.shape)
        work = float(case.shape["q_len"]) * case.shape["kv_len"]
        q, k, v = case.q, case.k, case.v

        def fwd() -> Tensor:
            with torch.no_grad():
                return forward(q, k, v)

        pattern = project_from or case.pattern
        ms, first, reason = self.time((pattern, backend, "fwd"), work, fwd, project=project_from is not None)
        if ms is None:
            cell.status, cell.reason = "skipped", reason
            return cell
        cell.fwd_ms = ms
        if backend.startswith(
            "flex"
        ):  # its first call compiles (CUDA, flex_compiled) or builds the BlockMask
            cell.compile_s = max(0.0, first - ms / 1e3)
        if no_backward is None:
            qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
            try:
                grad_out = torch.ones_like(forward(qg, kg, vg))
            except torch.OutOfMemoryError:
                cell.reason = f"backward skipped: {out_of_memory(self.device)}"
                return cell

            def fwd_bwd() -> None:
                torch.autograd.grad(forward(qg, kg, vg), (qg, kg, vg), grad_out)

            cell.fwd_bwd_ms, _, backward_reason = self.time(
                (pattern, backend, "fwd_bwd"), work, fwd_bwd, project=project_from is not None
            )
            if backward_reason:
                cell.reason = f"backward skipped: {backward_reason}"
            cell.peak_mb = peak_memory_mb(fwd_bwd, self.device) if cell.fwd_bwd_ms is not None else None
        else:
            cell.reason = no_backward
            cell.peak_mb = peak_memory_mb(fwd, self.device)
        return cell


def _reference_fits(case: Case, device: torch.device) -> bool:
    """The reference backend materialises fp32 scores and probabilities (and their gradients)."""
    shape = case.shape
    scores_bytes = shape["batch"] * shape["heads"] * shape["q_len"] * shape["kv_len"] * 4
    limit = 3 * 2**30 if device.type == "cpu" else torch.cuda.mem_get_info(device)[0] // 2
    return 4 * scores_bytes <= limit


def sweep(runner: Runner) -> None:
    """Section 1: CAB patterns x lengths x backends, plus Lightning Attention-2 on the self patterns."""
    preset, device = runner.preset, runner.device
    decay = alibi_decay(HEADS).to(device)
    for pattern in PATTERNS:
        for length in preset.lengths:
            case = make_case(pattern, length, preset.batch, device, runner.dtype)
            candidates: list[tuple[str, Callable[..., Tensor] | None, str | None]] = []
            if case.mask is not None:
                candidates.append(("vanilla", _vanilla(case), None))
            for backend in BACKENDS:
                reason = ineligibility(
                    backend, describe(case.q, case.k, case.v, case.mask, probe_xformers=True)
                )
                if backend == "reference" and reason is None and not _reference_fits(case, device):
                    reason = "scores would exceed this device's memory budget"
                forward = (
                    (lambda q, k, v, b=backend, m=case.mask: attend(q, k, v, m, backend=b))
                    if reason is None
                    else None
                )
                candidates.append((backend, forward, reason))
            if case.self_attention:
                lightning_decay = decay if case.causal else None
                candidates.append(
                    (
                        "lightning",
                        lambda q, k, v, c=case.causal, d=lightning_decay: lightning_attention(
                            q, k, v, d, causal=c
                        )[0],
                        None,
                    )
                )
            for backend, forward, reason in candidates:
                if forward is None:
                    cell = Cell("cab", pattern, backend, **case.shape, status="skipped", reason=reason)
                else:
                    with_grad = describe(case.q.detach().requires_grad_(), case.k, case.v, case.mask)
                    why_not = ineligibility(backend, with_grad) if backend in BACKENDS else None
                    no_backward = None if why_not is None else f"forward only: {why_not}"
                    cell = runner.run_case("cab", case, backend, forward, no_backward, project_from=pattern)
                runner.record(cell)


def block_causal_section(runner: Runner) -> None:
    """Section 2: block-causal by frame, inference, each path against SDPA with the dense mask."""
    preset, device = runner.preset, runner.device
    length = preset.frames * preset.tokens_per_frame
    case = make_case("CS", length, preset.batch, device, runner.dtype)
    case.pattern, case.mask = "BC", block_causal(preset.tokens_per_frame)
    expected = _vanilla(case)(case.q, case.k, case.v)
    paths: list[tuple[str, Callable[..., Tensor] | None, str | None]] = [("sdpa_dense", _vanilla(case), None)]
    for backend in BACKENDS:
        reason = ineligibility(backend, describe(case.q, case.k, case.v, case.mask, probe_xformers=True))
        if backend == "reference":
            reason = reason or "the reference is the truth, not a contender"
        forward = (
            (lambda q, k, v, b=backend: attend(q, k, v, case.mask, backend=b)) if reason is None else None
        )
        paths.append((backend, forward, reason))
    if device.type == "cpu":
        compiled_reason = (
            None if preset.compile_flex_on_cpu else "compiling flex on CPU takes ~30 s; full preset only"
        )
        paths.append(
            ("flex_compiled", _compiled_flex(case) if compiled_reason is None else None, compiled_reason)
        )
    for name, forward, reason in paths:
        if forward is None:
            runner.record(Cell("block_causal", "BC", name, **case.shape, status="skipped", reason=reason))
            continue
        # eager flex on CPU, say, is projected from its causal sweep and skipped when hopeless
        cell = runner.run_case("block_causal", case, name, forward, project_from="CS")
        if cell.status == "ok":  # checked after timing, so the first timed call still pays any compile
            with torch.no_grad():
                error = (forward(case.q, case.k, case.v).float() - expected.float()).abs().max().item()
            if error > 1e-2:
                raise RuntimeError(f"block-causal path {name} disagrees with dense SDPA by {error:.3e}")
        runner.record(cell)


def _compiled_flex(case: Case) -> Callable[..., Tensor]:
    """flex_attention compiled for this shape (on CPU the `flex` backend runs eager)."""
    from torch.nn.attention.flex_attention import flex_attention

    batch, heads, q_len, _ = case.q.shape
    block_mask = case.mask.block_mask(batch, heads, q_len, case.k.shape[2], None, None, case.q.device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def lightning_section(runner: Runner) -> None:
    """Section 3: Lightning Attention-2 forward at the two scaling lengths."""
    decay = alibi_decay(HEADS).to(runner.device)
    for length in runner.preset.lightning_lengths:
        case = make_case("CS", length, runner.preset.batch, runner.device, runner.dtype)
        forward = lambda q, k, v: lightning_attention(q, k, v, decay)[0]  # noqa: E731
        # the scaling target needs both lengths: never skipped
        runner.record(runner.run_case("lightning", case, "lightning", forward))


# ------------------------------------------------------------------------------------------------ analysis


def crossover(lengths: list[int], quadratic_ms: list[float], linear_ms: list[float]) -> float | None:
    """The efficiency length: the L beyond which a quadratic fit of the baseline stays above a linear fit of the
    efficient method. 0 when the linear fit is below everywhere on L > 0; None when it never gets below (or
    there are too few points to fit)."""
    if len(lengths) < 3:
        return None
    c2, c1, c0 = np.polyfit(lengths, quadratic_ms, 2)
    if abs(c2) * max(lengths) ** 2 < 1e-9 * max(map(abs, quadratic_ms)):
        c2 = 0.0  # round-off of an exactly linear baseline, not curvature
    d1, d0 = np.polyfit(lengths, linear_ms, 1)
    difference = np.array([c2, c1 - d1, c0 - d0])  # baseline minus linear, as a polynomial in L
    roots = sorted(float(r.real) for r in np.roots(np.trim_zeros(difference, "f")) if abs(r.imag) < 1e-9)
    last = max([0.0] + [r for r in roots if r > 0])
    return last if np.polyval(difference, 2 * last + max(lengths)) > 0 else None


def _times(cells: list[Cell], section: str, pattern: str, backend: str, field: str) -> dict[int, float]:
    return {
        c.q_len: getattr(c, field)
        for c in cells
        if c.section == section
        and c.pattern == pattern
        and c.backend == backend
        and getattr(c, field) is not None
    }


def summarise(cells: list[Cell], tokens_per_frame: int) -> dict[str, Any]:
    """Efficiency lengths, the block-causal speed-up and the Lightning scaling ratio."""
    summary: dict[str, Any] = {"efficiency_length": {}, "block_causal": None, "lightning_scaling": None}
    exact = [b for b in BACKENDS if b != "reference"]
    for pattern in ("NS", "CS"):
        for field in ("fwd_ms", "fwd_bwd_ms", "peak_mb"):
            linear = _times(cells, "cab", pattern, "lightning", field)
            if not linear:  # peak memory is measured on CUDA only
                continue
            vanilla = _times(cells, "cab", pattern, "vanilla" if pattern == "CS" else "sdpa", field)
            per_backend = [_times(cells, "cab", pattern, b, field) for b in exact]
            best = {
                length: min(t[length] for t in per_backend if length in t)
                for length in linear
                if any(length in t for t in per_backend)
            }
            for baseline_name, baseline in (("vanilla", vanilla), ("best_exact", best)):
                shared = sorted(set(baseline) & set(linear))
                summary["efficiency_length"][f"{pattern}/{field}/{baseline_name}"] = crossover(
                    shared, [baseline[n] for n in shared], [linear[n] for n in shared]
                )
    block = [c for c in cells if c.section == "block_causal" and c.fwd_ms is not None]
    dense = next((c for c in block if c.backend == "sdpa_dense"), None)
    if dense is not None:
        contenders = [c for c in block if c.backend != "sdpa_dense"]
        best_cell = min(contenders, key=lambda c: c.fwd_ms) if contenders else dense
        frames = dense.q_len // tokens_per_frame
        density = (frames + 1) / (2 * frames)  # lower block triangle incl. the diagonal
        summary["block_causal"] = {
            "baseline_ms": dense.fwd_ms,
            "best_backend": best_cell.backend,
            "best_ms": best_cell.fwd_ms,
            "speedup": dense.fwd_ms / best_cell.fwd_ms,
            "ideal": 1 / density,
            "target": BLOCK_CAUSAL_TARGET,
            "per_backend_speedup": {c.backend: dense.fwd_ms / c.fwd_ms for c in contenders},
        }
    lightning = sorted(
        (c.q_len, c.fwd_ms) for c in cells if c.section == "lightning" and c.fwd_ms is not None
    )
    if len(lightning) == 2:
        (short, short_ms), (long, long_ms) = lightning
        summary["lightning_scaling"] = {
            "lengths": [short, long],
            "ratio": long_ms / short_ms,
            "length_ratio": long / short,
            "target": LIGHTNING_RATIO_TARGET,
        }
    return summary


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def markdown(cells: list[Cell], summary: dict[str, Any], environment: dict[str, Any]) -> str:
    """A readable report of the same numbers."""
    env = ", ".join(f"{k} {v}" for k, v in environment.items())
    lines = ["# timeloom kernels benchmark", "", f"{env}", "", "Times in ms (mean inside the IQR).", ""]
    for pattern in PATTERNS:
        rows = [c for c in cells if c.section == "cab" and c.pattern == pattern]
        if not rows:
            continue
        backends = list(dict.fromkeys(c.backend for c in rows))
        lines += [
            f"## {pattern}",
            "",
            "| Lq | Lk | " + " | ".join(f"{b} fwd / fwd+bwd" for b in backends) + " |",
        ]
        lines.append("|---|---|" + "---|" * len(backends))
        for length in dict.fromkeys(c.q_len for c in rows):
            row = {c.backend: c for c in rows if c.q_len == length}
            first = next(iter(row.values()))
            values = [
                f"{_fmt(row[b].fwd_ms)} / {_fmt(row[b].fwd_bwd_ms)}"
                if b in row and row[b].status == "ok"
                else "skipped"
                for b in backends
            ]
            lines.append(f"| {length} | {first.kv_len} | " + " | ".join(values) + " |")
        lines.append("")
    lines += [
        "## Efficiency length (Lightning Attention-2 vs softmax)",
        "",
        "| pattern / metric / baseline | L* |",
        "|---|---|",
    ]
    for name, value in summary["efficiency_length"].items():
        if value is None:
            text = "none: softmax stays faster"
        elif value < min(c.q_len for c in cells if c.section == "cab"):
            text = f"{value:.0f} (below the sweep: linear wins at every measured length)"
        else:
            text = f"{value:.0f}"
        lines.append(f"| {name} | {text} |")
    lines.append("")
    block = summary["block_causal"]
    if block is not None:
        met = "met" if block["speedup"] >= block["target"] else "NOT met"
        lines += [
            "## Block-causal by frame, inference",
            "",
            f"SDPA with the dense mask: {_fmt(block['baseline_ms'])} ms. Best: `{block['best_backend']}` "
            f"{_fmt(block['best_ms'])} ms = {block['speedup']:.2f}x (target {block['target']}x: {met}; "
            f"ideal 1/density = {block['ideal']:.2f}x).",
            "",
        ]
        lines += [f"- `{name}`: {speedup:.2f}x" for name, speedup in block["per_backend_speedup"].items()]
        skipped = [c for c in cells if c.section == "block_causal" and c.status != "ok"]
        lines += [f"- `{c.backend}`: skipped ({c.reason})" for c in skipped]
        compiled = [c for c in cells if c.section == "block_causal" and c.compile_s is not None]
        lines += [
            f"- `{c.backend}` first-call overhead (compile, BlockMask): {c.compile_s:.1f} s" for c in compiled
        ]
        lines.append("")
    scaling = summary["lightning_scaling"]
    if scaling is not None:
        short, long = scaling["lengths"]
        met = "met" if scaling["ratio"] <= scaling["target"] else "NOT met"
        lines += [
            "## Lightning Attention-2 scaling",
            "",
            f"forward time(L={long}) / time(L={short}) = {scaling['ratio']:.1f} for a {scaling['length_ratio']:.0f}x "
            f"longer input (target <= {scaling['target']:.0f} at 1024 -> 16384: {met}).",
            "",
        ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ entry point


def resolve_device_and_dtype(device_name: str, dtype_name: str) -> tuple[torch.device, torch.dtype]:
    """`--device` / `--dtype` values to torch objects: `auto` is CUDA when available, and bf16 on CUDA, fp32 on
    CPU. Raises ValueError when CUDA is named but not available."""
    device = torch.device(
        "cuda" if device_name == "auto" and torch.cuda.is_available() else device_name.replace("auto", "cpu")
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device_name} requested but CUDA is not available")
    if dtype_name != "auto":
        return device, getattr(torch, dtype_name)
    return device, torch.bfloat16 if device.type == "cuda" else torch.float32


def describe_environment(device: torch.device, dtype: torch.dtype, mode: str) -> dict[str, Any]:
    """What a result depends on besides the code: device, threads, versions, dtype and preset."""
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "mode": mode,
    }


@dataclass
class SuiteRun:
    """What a preset-driven suite's command line resolves to."""

    out: Path
    device: torch.device
    dtype: torch.dtype
    preset: Any
    environment: dict[str, Any]


def parse_suite_arguments(
    suite: str,
    description: str,
    argv: list[str] | None,
    cpu_presets: dict[str, Any],
    cuda_presets: dict[str, Any],
    quick_help: str,
    tiny_help: str,
) -> SuiteRun:
    """The options every `timeloom bench SUITE` shares (``--out``, ``--quick | --tiny``, ``--device``,
    ``--dtype``), resolved to a device, dtype and the preset for that device; prints the environment."""
    parser = argparse.ArgumentParser(prog=f"timeloom bench {suite}", description=description)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick_help)
    size.add_argument("--tiny", action="store_true", help=tiny_help)
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    args = parser.parse_args(argv)
    try:
        device, dtype = resolve_device_and_dtype(args.device, args.dtype)
    except ValueError as error:
        parser.error(str(error))
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    preset = (cuda_presets if device.type == "cuda" else cpu_presets)[mode]
    environment = describe_environment(device, dtype, mode)
    print(f"timeloom bench {suite}: {environment}", flush=True)
    return SuiteRun(args.out, device, dtype, preset, environment)


def main(argv: list[str] | None = None) -> int:
    """`timeloom bench kernels [--out DIR] [--quick | --tiny] [--device cpu|cuda]`."""
    run = parse_suite_arguments(
        "kernels",
        __doc__.split("\n")[0],
        argv,
        CPU_PRESETS,
        CUDA_PRESETS,
        quick_help="shorter sweep (about a minute on 2 CPU cores)",
        tiny_help="smoke test of the harness (seconds)",
    )
    device, dtype, preset, environment = run.device, run.dtype, run.preset, run.environment
    runner = Runner(device, dtype, preset, environment)
    started = time.perf_counter()
    sweep(runner)
    block_causal_section(runner)
    lightning_section(runner)
    summary = summarise(runner.cells, preset.tokens_per_frame)
    summary["wall_s"] = time.perf_counter() - started

    run.out.mkdir(parents=True, exist_ok=True)
    with open(run.out / "kernels.jsonl", "w") as handle:
        for cell in runner.cells:
            handle.write(json.dumps({**environment, **asdict(cell)}) + "\n")
    (run.out / "kernels_summary.json").write_text(json.dumps({**environment, **summary}, indent=2) + "\n")
    write_report(run.out / "kernels.md", markdown(runner.cells, summary, environment))
    print(
        f"wrote {run.out / 'kernels.jsonl'}, kernels_summary.json and kernels.md in {summary['wall_s']:.0f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
