"""`MemoryLMModule`: trains a `TitansLM` on the recall tasks (spec §6 "Training").

Logits are computed only at labelled positions (6 % of MQAR's), the loss is their cross-entropy, and the
metrics are the per-position accuracy there (``acc``) and the share of sequences with every labelled
position right (``exact_match``), under ``train/``, ``val/`` and ``test/``. A data module with several
validation sets (`MQARDataModule(mix_with=…)`) names them in ``val_names``: the first is logged under ``val/``
(what early stopping and checkpoints watch), each other one under ``val_<name>/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from timeloom.module import TimeloomModule, checkpoint_state_dict, load_state_dict_checked
from timeloom_memory.tasks import IGNORE
from timeloom_memory.titans import TitansConfig, TitansLM

__all__ = ["MemoryLMModule"]


class MemoryLMModule(TimeloomModule):
    """A `TitansLM` (any block kind, the attention baselines included) on token recall batches.

    Args:
        config: the model's sizes; its ``vocab_size`` must cover the task's tokens.
        init_from: a `MemoryLMModule` checkpoint whose weights start this run (a curriculum's earlier stage,
            e.g. shorter sequences); the optimiser, step and data start afresh. Ignored when resuming.
        **kwargs: ``optimizer`` / ``scheduler`` callables of `TimeloomModule`.
    """

    starting_weights: ClassVar[tuple[str, ...]] = ("init_from",)

    def __init__(
        self, config: TitansConfig | None = None, init_from: str | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.config = config or TitansConfig()
        self.model = TitansLM(self.config)
        self.init_from = init_from

    def on_fit_start(self) -> None:
        # Here, not in __init__: only now does the trainer know whether it resumes from a checkpoint, and
        # loading copies into the parameters the optimiser already holds.
        if self.init_from is not None and self.trainer.ckpt_path is None:
            self.load_initial_weights(self.init_from)

    def load_initial_weights(self, path: str | Path) -> None:
        """Copy every weight of the checkpoint at ``path`` into this module (they must match exactly: a
        `StateDictMismatchError` names the keys that do not)."""
        load_state_dict_checked(self, checkpoint_state_dict(path, "init_from"), f"init_from {path}")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)[0]

    def count_samples(self, batch: dict) -> int:
        return len(batch["input_ids"])

    def count_tokens(self, batch: dict) -> int:
        return batch["input_ids"].numel()

    def scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(loss, acc, exact_match)`` of a batch, with logits only where a label is."""
        input_ids, labels = batch["input_ids"], batch["labels"]
        if int(input_ids.max()) >= self.config.vocab_size:
            raise ValueError(
                f"token {int(input_ids.max())} is outside the model's vocab_size {self.config.vocab_size}"
            )
        labelled = labels != IGNORE
        if not labelled.any():
            raise ValueError("a batch without any labelled position (labels all -100)")
        hidden, _ = self.model.features(input_ids)
        logits = self.model.logits(hidden[labelled])
        targets = labels[labelled]
        loss = F.cross_entropy(logits.float(), targets)
        correct = logits.argmax(-1) == targets
        wrong = torch.zeros_like(labelled)
        wrong[labelled] = ~correct
        exact = (~wrong.any(1)).float().mean()
        return loss, correct.float().mean(), exact

    def _log_scores(self, batch: dict, split: str) -> torch.Tensor:
        loss, acc, exact = self.scores(batch)
        on_step = split == "train"
        size = len(batch["input_ids"])
        for name, value in (("loss", loss), ("acc", acc), ("exact_match", exact)):
            self.log(f"{split}/{name}", value, prog_bar=name != "exact_match", on_step=on_step,
                     on_epoch=not on_step, batch_size=size, add_dataloader_idx=False)  # fmt: skip
        return loss

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._log_scores(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        split = "val" if dataloader_idx == 0 else f"val_{self.trainer.datamodule.val_names[dataloader_idx]}"
        self._log_scores(batch, split)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._log_scores(batch, "test")
