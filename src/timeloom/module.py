"""`TimeloomModule`: the thin LightningModule every timeloom model trains through.

It owns only what all models share: optimiser and scheduler injection (LightningCLI's ``OptimizerCallable`` /
``LRSchedulerCallable``), video logging, sample/token counts for throughput, and safetensors export.
A subclass builds ``self.model`` (a plain ``nn.Module``) and implements ``training_step``.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.loggers import WandbLogger
from safetensors.torch import load_file, save_file
from torch.optim.lr_scheduler import LambdaLR

from timeloom.throughput import CpuTimeBudget
from timeloom.video_io import make_grid_video, write_video


class WarmupCosine(LambdaLR):
    """Linear warm-up to the base learning rate, then cosine decay to ``min_lr_ratio`` of it.

    ``total_steps=None`` means "the trainer's estimated number of optimiser steps"; the module fills it in
    when training starts. Without a finite estimate (``max_epochs=-1``) the rate holds after warm-up.
    ``horizon="cpu_budget"`` decays over the run's `timeloom.throughput.CpuTimeBudget` instead (the share of
    it spent), so a budget of CPU minutes needs no guess of the steps it will buy; like the budget, it starts
    afresh when a run resumes.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int = 100,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.1,
        horizon: str = "steps",
    ):
        if horizon not in ("steps", "cpu_budget"):
            raise ValueError(f"WarmupCosine horizon must be 'steps' or 'cpu_budget', got {horizon!r}")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.horizon = horizon
        # the decay's share done, where steps are not the clock (set when training starts)
        self.progress: Callable[[], float] | None = None
        super().__init__(optimizer, self.factor)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("progress")  # the running trainer's clock, set again when training starts
        return state

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.progress is not None:
            progress = self.progress()
        elif self.total_steps is not None:
            total = max(self.total_steps, self.warmup_steps + 1)
            progress = (step - self.warmup_steps) / (total - self.warmup_steps)
        else:
            return 1.0
        progress = min(max(progress, 0.0), 1.0)
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# How a module trains, not what it computes: left out of the saved hyper-parameters, so a module rebuilt from
# them (`from_pretrained`, `from_checkpoint`) needs none of them, whether or not its class forwards them.
TRAINING_ONLY_ARGS = ("optimizer", "scheduler", "decay_vectors")


def default_optimizer(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)


def default_scheduler(optimizer: torch.optim.Optimizer) -> WarmupCosine:
    return WarmupCosine(optimizer)


class TimeloomModule(pl.LightningModule):
    """Base class of every timeloom LightningModule (LightningCLI subclass mode picks the concrete one)."""

    model: torch.nn.Module
    # Init arguments naming files a run *starts* from (a checkpoint, a text stage). They stay in the
    # hyper-parameters as a record, but a saved module already holds those weights, so `from_pretrained` and
    # `from_checkpoint` rebuild without them: the starting file may be gone, and re-reading it is wasted work.
    starting_weights: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        decay_vectors: bool = True,
    ):
        """``decay_vectors=False``: tensors of fewer than two dimensions (norm gains, biases, gates' biases)
        get no weight decay, as in nanoGPT and litgpt (see `parameter_groups`)."""
        super().__init__()
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.decay_vectors = decay_vectors
        # Lightning collects the init args of the concrete subclass from the call stack.
        self.save_hyperparameters(ignore=list(TRAINING_ONLY_ARGS))
        # Plain values only, so checkpoints load with `torch.load(weights_only=True)`.
        self.hparams.update(_jsonable(dict(self.hparams)))

    # -- optimisation -------------------------------------------------------------------------------------
    def parameter_groups(self, parameters: Iterable[torch.nn.Parameter]) -> Iterable[Any]:
        """What the optimiser is given: ``parameters`` as they are, or with ``decay_vectors=False`` two groups,
        the vectors' with weight decay 0. Decay pulls a gate's bias toward 0, a gate half open: in one pair of
        MQAR runs differing only here, Titans MAG reached 0.989 at seq 256 without it and 0.039 with it, and it
        moved a video memory's forgetting bias from −8 to −5.2 (benchmarks/memory-quality.md, stop 16)."""
        if self.decay_vectors:
            return parameters
        parameters = list(parameters)
        groups = [
            {"params": [p for p in parameters if p.dim() >= 2]},
            {"params": [p for p in parameters if p.dim() < 2], "weight_decay": 0.0},
        ]
        return [group for group in groups if group["params"]]

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer(self.parameter_groups(self.parameters()))
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_train_start(self) -> None:
        # Not in configure_optimizers: asking for the step estimate there builds the train loader before a
        # checkpoint's loader state is restored, and a mid-epoch resume would then restart the epoch.
        budget = next((c for c in self.trainer.callbacks if isinstance(c, CpuTimeBudget)), None)
        for config in self.trainer.lr_scheduler_configs:
            schedule = config.scheduler
            if not isinstance(schedule, WarmupCosine):
                continue
            if schedule.horizon == "cpu_budget":
                if budget is None:
                    raise ValueError("WarmupCosine(horizon='cpu_budget') needs a CpuTimeBudget callback")
                schedule.progress = budget.spent_share
            elif schedule.total_steps is None:
                steps = self.trainer.estimated_stepping_batches
                schedule.total_steps = int(steps) if math.isfinite(steps) else None

    # -- throughput accounting (used by `timeloom.throughput.Throughput`) ----------------------------------
    def count_samples(self, batch: Any) -> int:
        """Samples in a batch: the leading dimension of its ``video`` (override for other batch layouts)."""
        return len(batch["video"])

    def count_tokens(self, batch: Any) -> int | None:
        """Tokens the model attends over in a batch, or None when the notion does not apply."""
        return None

    # -- media --------------------------------------------------------------------------------------------
    def log_video(
        self, key: str, video: torch.Tensor, fps: int = 8, caption: str | None = None
    ) -> Path | None:
        """Log a video (or a batch of videos, tiled) as W&B media and as a local MP4 and GIF.

        ``video`` is ``(C, T, H, W)`` or ``(B, C, T, H, W)`` in ``[-1, 1]``. Files go to
        ``<default_root_dir>/media/<key>_<step>.{mp4,gif}``; returns the MP4's path (None on non-zero ranks).
        """
        if self.trainer is None or not self.trainer.is_global_zero:
            return None
        if video.dim() == 5:
            video = make_grid_video(video)
        media_dir = Path(self.trainer.default_root_dir) / "media"
        media_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{key.replace('/', '_')}_{self.global_step:07d}"
        mp4 = write_video(media_dir / f"{stem}.mp4", video.detach().float().cpu(), fps=fps)
        write_video(media_dir / f"{stem}.gif", video.detach().float().cpu(), fps=fps)
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                # The MP4 carries its frame rate; W&B ignores `fps` for files.
                logger.log_video(key, videos=[str(mp4)], step=self.global_step, caption=[caption])
        return mp4

    # -- export -------------------------------------------------------------------------------------------
    @classmethod
    def class_path(cls) -> str:
        return f"{cls.__module__}.{cls.__qualname__}"

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # With the class path beside the (plain) hyper-parameters, a checkpoint rebuilds without its config.
        checkpoint["class_path"] = self.class_path()

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` (weights of ``self.model``) and ``config.json`` (how to rebuild it)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(_unshared_tensors(self.model.state_dict()), directory / "model.safetensors")
        config = {"class_path": self.class_path(), "init_args": dict(self.hparams)}
        (directory / "config.json").write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any) -> TimeloomModule:
        """Rebuild a module saved by ``save_pretrained`` (any subclass; ``cls`` only checks the type).

        ``overrides`` replace init arguments of the saved config. Weights that do not fit the module built
        raise a `StateDictMismatchError` naming the missing, unexpected and differently shaped keys.
        """
        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        module = cls._build(config["class_path"], config["init_args"], overrides, source=directory)
        weights = directory / "model.safetensors"
        load_state_dict_checked(module.model, load_file(weights), source=weights)
        return module

    @classmethod
    def from_checkpoint(cls, path: str | Path, **overrides: Any) -> TimeloomModule:
        """Rebuild a module from a Lightning checkpoint written by `timeloom fit` (loaded ``weights_only``).

        ``overrides`` and mismatching weights behave as in `from_pretrained`.
        """
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        if "class_path" not in checkpoint:
            raise ValueError(f"{path} was not written by a TimeloomModule (it names no class_path)")
        hparams = checkpoint.get("hyper_parameters", {})
        module = cls._build(checkpoint["class_path"], hparams, overrides, source=path)
        load_state_dict_checked(module, checkpoint["state_dict"], source=path)
        return module

    @classmethod
    def _build(
        cls, class_path: str, saved_args: dict[str, Any], overrides: dict[str, Any], source: str | Path
    ) -> TimeloomModule:
        module_name, _, class_name = class_path.rpartition(".")
        klass = getattr(importlib.import_module(module_name), class_name)
        if not issubclass(klass, cls):
            raise ValueError(f"{source} holds a {klass.__name__}, which is not a {cls.__name__}")
        # LightningCLI adds private bookkeeping (`_class_path`, `_instantiator`) to the hyper-parameters.
        # Checkpoints of stop 16 saved `decay_vectors`, which a class without it would not take.
        init_args = {
            k: v for k, v in saved_args.items() if not k.startswith("_") and k not in TRAINING_ONLY_ARGS
        }
        init_args.update({name: None for name in klass.starting_weights if name in init_args})
        init_args.update(overrides)
        # jsonargparse rebuilds typed arguments (dataclass configs, nested classes) from plain JSON.
        parser = ArgumentParser(exit_on_error=False)
        parser.add_class_arguments(klass, "module", skip=set(TRAINING_ONLY_ARGS))
        return parser.instantiate(parser.parse_object({"module": init_args})).module


def checkpoint_state_dict(path: str | Path, argument: str) -> dict[str, torch.Tensor]:
    """The weights of the Lightning checkpoint at ``path``, which the init ``argument`` named (for the errors):
    a missing file or a file without a ``state_dict`` fails here, before any weight is copied."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{argument}: no checkpoint at {path} (train that stage first)")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{argument}: {path} is not a Lightning checkpoint (it has no state_dict)")
    return checkpoint["state_dict"]


class StateDictMismatchError(ValueError):
    """Saved weights do not fit the module they are loaded into; the message names every disagreeing key."""


def load_state_dict_checked(
    target: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path, *, shown: int = 10
) -> None:
    """Load ``state`` into ``target`` strictly, or raise `StateDictMismatchError` naming what disagrees.

    Nothing is loaded when a key disagrees. The error names the missing keys, the unexpected keys and the
    shape mismatches (up to ``shown`` of each, with their counts): what a checkpoint saved with a
    different config looks like.
    """
    expected = target.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    reshaped = [
        f"{key} (saved {tuple(state[key].shape)}, model {tuple(expected[key].shape)})"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    problems = [
        _name_keys(kind, keys, shown)
        for kind, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", reshaped),
        )
        if keys
    ]
    if problems:
        raise StateDictMismatchError(
            f"{source} does not fit the {type(target).__name__} built from its config (was it saved "
            f"with a different config?): " + "; ".join(problems)
        )
    target.load_state_dict(state)


def _name_keys(kind: str, keys: list[str], shown: int) -> str:
    more = f", … and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} {kind}: {', '.join(keys[:shown])}{more}"


def _unshared_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict on the CPU with tied weights (e.g. an LM head sharing the embedding) copied apart:
    safetensors refuses tensors that share memory, and loading ties them again through the module."""
    seen: set[int] = set()
    weights = {}
    for name, tensor in state.items():
        tensor = tensor.detach()
        pointer = tensor.untyped_storage().data_ptr()
        weights[name] = (tensor.clone() if pointer in seen else tensor).contiguous().cpu()
        seen.add(pointer)
    return weights


def _jsonable(value: Any) -> Any:
    """Hyper-parameters as JSON (dataclass configs and tuples included)."""
    if hasattr(value, "__dataclass_fields__"):
        return {k: _jsonable(getattr(value, k)) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
