"""Throughput and model-FLOP utilisation, measured against this machine's own matmul peak.

MFU here is (model FLOPs per second) / (the FLOP/s a plain matmul reaches on the same device and dtype).
Using a measured peak rather than a datasheet number keeps the ratio meaningful on a 2-core CPU and an H100.
"""

from __future__ import annotations

import functools
import time

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode


@functools.cache
def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """FLOP/s of an ``n x n`` matmul on ``device``: the best of a few timed runs after a warm-up."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


class Throughput(pl.Callback):
    """Logs ``train/samples_per_s``, ``train/tokens_per_s`` and ``train/mfu``.

    FLOPs are counted once, on the first training step (forward, backward and optimiser step together), by
    wrapping the real step in ``FlopCounterMode``; later steps run untouched and are timed.
    """

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = log_every_n_steps
        self.flops_per_step: int | None = None
        self.peak_flops: float | None = None
        self._counter: FlopCounterMode | None = None
        self._start = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.flops_per_step is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self.flops_per_step = self._counter.get_total_flops()
            self._counter = None
            dtype = next(pl_module.parameters()).dtype
            self.peak_flops = measure_matmul_peak(str(pl_module.device.type), dtype)
            return  # the counted step ran slower than normal: do not time it
        if trainer.global_step % self.log_every_n_steps:
            return
        seconds = time.perf_counter() - self._start
        samples = pl_module.count_samples(batch)
        metrics = {"train/samples_per_s": samples / seconds}
        tokens = pl_module.count_tokens(batch)
        if tokens is not None:
            metrics["train/tokens_per_s"] = tokens / seconds
        if self.flops_per_step and self.peak_flops:
            metrics["train/mfu"] = self.flops_per_step / seconds / self.peak_flops
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
