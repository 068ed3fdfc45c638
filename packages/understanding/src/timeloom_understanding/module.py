"""`VideoLLMModule`: trains a `VideoLLM` with `timeloom fit` (spec §6).

Batches arrive as lists of conversation items (TemporalQA conflict groups or `ConversationDataset` items); the
module tokenises them with its model's tokenizer, so the visual-token count and the context check always
match the model. ``stage`` is ``align`` (captions, stage 1) or ``instruct`` (questions, stage 2); ``trainable``
names the parameters that learn (``fnmatch`` patterns over parameter names; the rest is frozen), and
``init_from`` starts from a `save_pretrained` folder or a Lightning checkpoint, e.g. stage 2 from stage 1;
``llm_init`` takes only the LLM from one, e.g. from a text stage (`TemporalQA(control="text")`), as real
video-LLMs start from a pretrained LLM, and ``encoder_init`` only the vision encoder, e.g. from the digit
pretraining stage (`DigitPatchModule`), as they start from a pretrained vision encoder; ``side_encoder_init``
does the same for the side encoder. ``init_from`` may also widen a one-encoder checkpoint with a fresh side path
(`VideoLLMConfig.side_join` ``projector``, whose zeroed output keeps the checkpoint's function at step 0).
"""

from __future__ import annotations

from collections import Counter
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from safetensors.torch import load_file

from timeloom.module import (
    TimeloomModule,
    checkpoint_state_dict,
    default_optimizer,
    default_scheduler,
    load_state_dict_checked,
)
from timeloom_understanding.data import ConversationCollator, flatten_groups
from timeloom_understanding.model import VideoLLM, VideoLLMConfig

__all__ = ["VideoLLMModule"]

STAGES = ("align", "instruct")


class VideoLLMModule(TimeloomModule):
    """Video-LLM training: next-token loss on the answers; validation also scores the answers.

    ``val/accuracy`` is the share of replies whose first token, the deciding one (an option letter or
    yes/no), is the greedy choice; ``val/exact_match`` the share whose whole reply is, i.e. what greedy
    decoding would write. Both also per aspect when the items name one.

    Args:
        config: the model.
        stage: ``align`` or ``instruct`` (recorded with the run; the data and `trainable` make the stage).
        trainable: parameter-name patterns that learn, e.g. ``["projector.*"]``; None trains everything.
        init_from: weights that start this run: a `save_pretrained` folder or a `timeloom fit` checkpoint.
        llm_init: the LLM's weights (only its ``llm.`` parameters) from such a folder or checkpoint, e.g. a
            text stage; the encoder and projector keep their fresh initialisation. Not with ``init_from``.
        encoder_init: the vision encoder's weights (only its ``encoder.`` parameters) from such a folder or
            checkpoint, or from a `DigitPatchModule` checkpoint (stage 0). Not with ``init_from``.
        side_encoder_init: the side encoder's weights, from the ``encoder.`` parameters of such a source.
            With ``init_from`` only when that checkpoint has no side path: its side keys are then the only
            ones allowed missing, and the side projector keeps its zeroed output.
        frames, height, width: the media size, for the visual-token count of the context check.
        optimizer, scheduler, decay_vectors: as for `TimeloomModule`.
    """

    starting_weights = ("init_from", "llm_init", "encoder_init", "side_encoder_init")

    def __init__(
        self,
        config: VideoLLMConfig | None = None,
        stage: str = "instruct",
        trainable: list[str] | None = None,
        init_from: str | None = None,
        llm_init: str | None = None,
        encoder_init: str | None = None,
        side_encoder_init: str | None = None,
        frames: int = 8,
        height: int = 32,
        width: int = 32,
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        decay_vectors: bool = True,
    ) -> None:
        super().__init__(optimizer, scheduler, decay_vectors)
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}; got {stage!r}")
        self.model = VideoLLM(config or VideoLLMConfig())
        if init_from and (llm_init or encoder_init):
            raise ValueError(
                f"give init_from ({init_from}) or llm_init/encoder_init ({llm_init}, {encoder_init}), not both"
            )
        if side_encoder_init and self.model.side_encoder is None:
            raise ValueError(
                f"side_encoder_init {side_encoder_init} given, but the config has no side_encoder"
            )
        if init_from:
            _load_widened(self.model, init_from, side_encoder_init)
        for target, source in (
            ("llm", llm_init),
            ("encoder", encoder_init),
            ("side_encoder", side_encoder_init),
        ):
            if source:
                _load_part(getattr(self.model, target), target, source)
        if trainable is not None:
            names = [name for name, _ in self.model.named_parameters()]
            unmatched = [p for p in trainable if not any(fnmatch(name, p) for name in names)]
            if unmatched:
                raise ValueError(f"trainable patterns {unmatched} match no parameter of the model")
            for name, parameter in self.model.named_parameters():
                parameter.requires_grad_(any(fnmatch(name, p) for p in trainable))
        self.collate = ConversationCollator(
            self.model.tokenizer,
            self.model.visual_tokens_per_media(frames, height, width),
            self.model.config.max_length,
        )

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> dict[str, Any]:
        # the default collation leaves lists of conversation items (or of conflict groups) as they are
        return self.collate(flatten_groups(batch)) if isinstance(batch, list) else batch

    def count_samples(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def count_tokens(self, batch: dict[str, Any]) -> int:
        return int(batch["lengths"].sum())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, supervised = self.model.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=supervised)
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._score(batch, "test")

    def _score(self, batch: dict[str, Any], split: str) -> None:
        logits, targets, samples = self.model.supervised_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), targets)
        self.log(f"{split}/loss", loss, prog_bar=True, batch_size=len(targets))
        size = len(batch["input_ids"])
        wrong = (logits.argmax(-1) != targets).float()
        first = torch.ones_like(samples, dtype=torch.bool)
        first[1:] = samples[1:] != samples[:-1]
        decided = torch.zeros(size, device=wrong.device).index_add_(0, samples[first], 1 - wrong[first])
        exact = torch.zeros(size, device=wrong.device).index_add_(0, samples, wrong) == 0
        self.log(f"{split}/accuracy", decided.mean(), prog_bar=True, batch_size=size)
        self.log(f"{split}/exact_match", exact.float().mean(), batch_size=size)
        for aspect, count in Counter(batch.get("aspect", [])).items():
            rows = torch.tensor([a == aspect for a in batch["aspect"]], device=decided.device)
            self.log(f"{split}/accuracy/{aspect}", decided[rows].mean(), batch_size=count)


SIDE_PATH = ("side_encoder.", "side_projector.")


def _load_widened(model: VideoLLM, source: str, side_encoder_init: str | None) -> None:
    """Load ``init_from`` strictly; a checkpoint without a side path may start a model with one: then exactly
    the side keys may be missing, and they keep the model's fresh weights (the side projector's zeroed output)."""
    weights = _stage_weights(Path(source), "init_from")
    has_side = any(name.startswith(SIDE_PATH) for name in weights)
    if side_encoder_init and has_side:
        raise ValueError(
            f"init_from {source} holds a side path already; side_encoder_init {side_encoder_init} would overwrite it"
        )
    if not has_side and model.side_projector is not None:
        fresh_side = {k: v for k, v in model.state_dict().items() if k.startswith(SIDE_PATH)}
        weights = {**weights, **fresh_side}
    load_state_dict_checked(model, weights, source=source)


def _load_part(target: torch.nn.Module, part: str, source: str) -> None:
    """Load the ``encoder.*`` weights (for the side encoder too) or the ``{part}.*`` ones of a checkpoint or
    `save_pretrained` folder into ``target``."""
    prefix = "encoder." if part == "side_encoder" else f"{part}."
    weights = {
        name.removeprefix(prefix): value
        for name, value in _stage_weights(Path(source), f"{part}_init").items()
        if name.startswith(prefix)
    }
    if not weights:
        raise ValueError(f"{part}_init {source} holds no {prefix}* weights")
    load_state_dict_checked(target, weights, source=source)


def _stage_weights(path: Path, argument: str) -> dict[str, torch.Tensor]:
    """The `VideoLLM` weights in a `save_pretrained` folder or in a Lightning checkpoint of this module."""
    if path.is_dir():
        return load_file(path / "model.safetensors")
    state = checkpoint_state_dict(path, argument)
    return {name.removeprefix("model."): value for name, value in state.items() if name.startswith("model.")}
