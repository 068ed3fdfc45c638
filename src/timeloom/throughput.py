"""Throughput and model-FLOP utilisation, measured against this machine's own matmul peak.

MFU here is (model FLOPs per second) / (the FLOP/s a plain matmul reaches on the same device and dtype).
Using a measured peak rather than a datasheet number keeps the ratio meaningful on a 2-core CPU and an H100.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from math import prod

import lightning.pytorch as pl
import torch
from timeloom_kernels.bench import synchronize
from torch.utils.flop_counter import (
    FlopCounterMode,
    conv_flop_count,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)
from tqdm.auto import tqdm


# torch's FlopCounterMode does not count the CPU flash-attention kernels at all, and counts a grouped (e.g.
# depth-wise) convolution's weight gradient as if it were dense: both skew MFU on the CPU.
def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _conv_backward_flops(
    grad_out_shape,
    x_shape,
    w_shape,
    _bias,
    _stride,
    _padding,
    _dilation,
    transposed,
    _output_padding,
    _groups,
    output_mask,
    out_shape=None,
    **kwargs,
) -> int:
    """Input gradient as torch counts it (a transposed conv with the grouped weight); the weight gradient
    multiplies every weight entry once per sample and position it was applied at."""
    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, out_shape[0], not transposed)
    if output_mask[1]:
        positions = x_shape[2:] if transposed else grad_out_shape[2:]
        flops += 2 * prod(w_shape) * x_shape[0] * prod(positions)
    return flops


_aten = torch.ops.aten
FLOP_CORRECTIONS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
    _aten.convolution_backward: _conv_backward_flops,
}


def flop_counter() -> FlopCounterMode:
    """`FlopCounterMode` with the CPU attention kernel and grouped-conv backward counted correctly."""
    return FlopCounterMode(display=False, custom_mapping=FLOP_CORRECTIONS)


@functools.cache
def measure_matmul_peak(
    device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048, cpu_time: bool = False
) -> float:
    """FLOP/s of an ``n x n`` matmul on ``device``: the best of a few timed runs after a warm-up, by the wall
    clock or, with ``cpu_time`` (a CPU device), by this thread's CPU time, which a shared machine's load leaves
    alone (the same clock as the CPU times it is set against)."""
    if cpu_time and torch.device(device).type != "cpu":
        raise ValueError(f"cpu_time needs a CPU device; got {device!r}")
    clock = time.thread_time if cpu_time else time.perf_counter
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(a.device)
    best = float("inf")
    for _ in range(3):
        start = clock()
        a @ b
        synchronize(a.device)
        best = min(best, clock() - start)
    return 2 * n**3 / best


def interleaved_times(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    device: torch.device | str = "cpu",
    *,
    budget_s: float = 0.0,
    max_rounds: int | None = None,
    warmup: int = 2,
) -> dict[str, dict[str, list[float]]]:
    """Seconds of every call, the calls taking turns (one of each per round) so a shared machine's load hits them
    alike: ``warmup`` untimed rounds, then ``rounds`` timed ones, and more while ``budget_s`` seconds last, up to
    ``max_rounds``. Returns ``{"wall": {name: [...]}, "cpu": {name: [...]}}``, "cpu" being this thread's CPU time
    (CPU devices only). CUDA work is synchronised after each call."""
    device = torch.device(device)
    times: dict[str, dict[str, list[float]]] = {"wall": {n: [] for n in calls}, "cpu": {n: [] for n in calls}}
    for _ in range(warmup):
        for call in calls.values():
            call()
            synchronize(device)
    limit = max(rounds, max_rounds or 0)
    deadline = time.perf_counter() + budget_s
    with tqdm(total=rounds, desc="timed rounds", leave=False) as progress:
        while progress.n < rounds or (progress.n < limit and time.perf_counter() < deadline):
            for name, call in calls.items():
                wall, cpu = time.perf_counter(), time.thread_time()
                call()
                synchronize(device)
                times["wall"][name].append(time.perf_counter() - wall)
                times["cpu"][name].append(time.thread_time() - cpu)
            progress.update()
    if device.type != "cpu":
        times.pop("cpu")
    return times


def _compute_dtype(precision: str, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in under a Lightning precision setting ("bf16-mixed", "16-true", "32-true" ...)."""
    if precision.startswith("bf16"):
        return torch.bfloat16
    if precision.startswith("16"):
        return torch.float16
    return parameter_dtype


class Throughput(pl.Callback):
    """Logs ``train/samples_per_s``, ``train/tokens_per_s`` and ``train/mfu`` every ``log_every_n_batches``.

    FLOPs are counted once, on the first training batch (forward, backward and, unless gradients accumulate,
    the optimiser step), by wrapping the real batch in ``FlopCounterMode``; later batches run untouched and
    are timed. The peak is a matmul in the dtype the model computes in (bf16 under ``bf16-mixed``).
    """

    def __init__(self, log_every_n_batches: int = 10):
        self.log_every_n_batches = log_every_n_batches
        self.flops_per_batch: int | None = None
        self.peak_flops: float | None = None
        self._counter: FlopCounterMode | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_batch is None:
            self._counter = flop_counter()
            self._counter.__enter__()
        synchronize(pl_module.device)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_batch = self._counter.get_total_flops()
            self._counter = None
            dtype = _compute_dtype(str(trainer.precision), next(pl_module.parameters()).dtype)
            self.peak_flops = measure_matmul_peak(str(pl_module.device.type), dtype)
            return  # the counted batch ran slower than normal: do not time it
        if batch_idx % self.log_every_n_batches:
            return
        synchronize(pl_module.device)  # CUDA runs asynchronously: time the work, not its queueing
        seconds = time.perf_counter() - self._start
        samples = pl_module.count_samples(batch)
        metrics = {"train/samples_per_s": samples / seconds}
        tokens = pl_module.count_tokens(batch)
        if tokens is not None:
            metrics["train/tokens_per_s"] = tokens / seconds
        if self.flops_per_batch and self.peak_flops:
            metrics["train/mfu"] = self.flops_per_batch / seconds / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)


class CpuTimeBudget(pl.Callback):
    """Stops training once this process has used ``minutes`` of CPU time since ``fit`` began.

    A wall-clock limit (``Trainer(max_time=...)``) gives a run on a shared machine fewer steps than the same run
    alone; CPU time does not, so budgets such as "30 CPU-minutes per run" compare across runs. It counts every
    thread of the process (validation and data loading in the main process included), so with one compute thread
    it is close to the wall time of an unshared run. Logs ``train/cpu_minutes`` at each check.
    """

    def __init__(self, minutes: float, check_every_n_batches: int = 10):
        if minutes <= 0:
            raise ValueError(f"CpuTimeBudget minutes must be positive, got {minutes}")
        self.minutes = minutes
        self.check_every_n_batches = check_every_n_batches
        self._start = 0.0

    def used_minutes(self) -> float:
        return (time.process_time() - self._start) / 60

    def spent_share(self) -> float:
        """The budget's share used so far, 0 to 1 (`WarmupCosine(horizon="cpu_budget")` decays over it)."""
        return min(self.used_minutes() / self.minutes, 1.0)

    def on_fit_start(self, trainer, pl_module) -> None:
        self._start = time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % self.check_every_n_batches:
            return
        used = self.used_minutes()
        pl_module.log("train/cpu_minutes", used, on_step=True, on_epoch=False)
        if used >= self.minutes:
            trainer.should_stop = True
