"""Stage 0 of a video-LLM: the vision encoder learns to name digits before it meets the LLM.

Real video-LLMs start from a pretrained vision encoder (CLIP, SigLIP); the tiny configs' ViT is random, and the
only digit signal a video-LLM run gives it is a caption or answer naming a digit, too weak for order and
speed questions. Here the same ViT learns on `TemporalQA` frames with a *dense* target the generator already
knows: for every patch, which digit (if any) covers it. The tokens then carry the digit's identity where
the digit is, which is what a projector needs to tell "3 before 7" from "7 before 3". The checkpoint's
``encoder.*`` weights start a video-LLM run (`VideoLLMModule(encoder_init=...)`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.utils.data import Dataset

from timeloom.data.datamodule import TimeloomDataModule
from timeloom.data.moving_digits import digit_glyphs, render_digits
from timeloom.module import TimeloomModule, default_optimizer, default_scheduler
from timeloom_understanding.data import TemporalQA
from timeloom_understanding.encoders import TimmEncoder, vit_options

__all__ = ["BACKGROUND", "DigitPatches", "DigitPatchesDataModule", "DigitPatchModule", "patch_digit_targets"]

BACKGROUND = 10  # the class of a patch no digit covers (digits are 0–9)


def patch_digit_targets(
    meta: dict[str, Any], size: int, glyph_size: int, patch: int, min_ink: float = 1.0
) -> Tensor:
    """``(T, h·w)`` class of every patch of every frame: the digit with the most ink in the patch, or
    `BACKGROUND` when no digit leaves ``min_ink`` in it (ink summed over the patch's pixels, 1 = one fully
    inked pixel, so a glyph's faint anti-aliased rim does not name a patch). From the scene metadata alone.
    """
    if size % patch:
        raise ValueError(f"patch {patch} does not divide the {size}-px canvas")
    glyphs = digit_glyphs(glyph_size)[0][torch.as_tensor(meta["glyph_index"])]
    trajectory = torch.as_tensor(meta["trajectory"], dtype=torch.float32)
    visible = torch.as_tensor(meta["visible"])
    ink = torch.stack(  # (n, T, H, W): each digit drawn alone
        [
            render_digits(glyphs[k : k + 1], trajectory[:, k : k + 1], visible[:, k : k + 1], size)
            for k in range(len(glyphs))
        ]
    )
    per_patch = F.avg_pool2d(ink, patch) * patch**2  # (n, T, h, w) ink per patch
    most, which = per_patch.flatten(2).max(0)  # (T, h·w)
    labels = torch.as_tensor(meta["labels"], dtype=torch.long)[which]
    return torch.where(most >= min_ink, labels, torch.full_like(labels, BACKGROUND))


class DigitPatches(Dataset):
    """One `TemporalQA` frame with a digit in it, and its per-patch digit targets: ``{"video" (C, 1, H, W),
    "targets" (1, h·w), "frame"}`` (which frame of the video).

    Item ``i`` is a frame drawn (by ``(seed, i)``) among the frames of conflict group ``i``'s video (the
    variant alternates) that show a digit, so every scene kind appears: moving, still, blinking and
    successive digits, one or two per frame, on the split's own glyphs. One frame per video, because a
    video's frames are near copies: a batch of frames from as many videos holds more digits to tell apart.
    """

    def __init__(
        self, split: str = "train", length: int = 1000, patch: int = 8, seed: int = 0, **scene: Any
    ) -> None:
        self.scenes = TemporalQA(split, length=length, seed=seed, **scene)
        if self.scenes.size % patch:
            raise ValueError(f"patch {patch} does not divide the {self.scenes.size}-px canvas")
        self.patch, self.seed = patch, seed

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        item = self.scenes[index][index % 2]
        meta = item["meta"]
        shown = np.flatnonzero(meta["visible"].any(1))
        frame = int(np.random.default_rng([self.seed, index]).choice(shown))
        targets = patch_digit_targets(meta, self.scenes.size, self.scenes.glyph_size, self.patch)
        return {
            "video": item["video"][:, frame : frame + 1],
            "targets": targets[frame : frame + 1],
            "frame": frame,
        }


class DigitPatchesDataModule(TimeloomDataModule):
    """`DigitPatches` splits (disjoint glyph images); ``patch`` must be the encoder's patch size."""

    def __init__(
        self,
        patch: int = 8,
        size: int = 32,
        frames: int = 8,
        glyph_size: int = 10,
        channels: int = 1,
        train_length: int = 100_000,
        val_length: int = 128,
        test_length: int = 256,
        batch_size: int = 128,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, seed=seed, pin_memory=pin_memory)
        self.save_hyperparameters()
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}
        self.scene = dict(size=size, frames=frames, glyph_size=glyph_size, channels=channels, seed=seed)
        DigitPatches(length=0, patch=patch, **self.scene)  # fail now, not at a batch

    def build_dataset(self, split: str) -> DigitPatches:
        return DigitPatches(split, self.lengths[split], self.hparams.patch, **self.scene)


OBJECTIVES = ("region", "region_and_position", "patch")


class DigitPatchClassifier(nn.Module):
    """The video-LLM's encoder (same `TimmEncoder` arguments), a linear head naming a digit (or background)
    from a token (``patch``) or from the mean of the tokens a digit covers (``region``), and a linear head
    reading each token's own place in the grid (``position``)."""

    def __init__(self, encoder: dict[str, Any]) -> None:
        super().__init__()
        self.encoder = TimmEncoder(**encoder)
        self.head = nn.Linear(self.encoder.width, BACKGROUND + 1)
        self.position = nn.Linear(self.encoder.width, 2)

    def forward(self, video: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """``video (B, C, T, H, W)``, ``targets (B, T, h·w)`` → per-token logits and targets, and per-region
        logits and targets (one region per digit visible in a frame), each as ``(N, 11)`` and ``(N,)``."""
        tokens, (rows, cols) = self.encoder(video)  # (B, T, h·w, width)
        members = F.one_hot(targets, BACKGROUND + 1).float()[..., :BACKGROUND]  # (B, T, h·w, 10)
        size = members.sum(2)  # (B, T, 10) patches per digit
        pooled = torch.einsum("btpk,btpc->btkc", members, tokens) / size.clamp(min=1)[..., None]
        present = size > 0
        digits = torch.arange(BACKGROUND, device=targets.device).expand_as(size)
        return {
            "patch_logits": self.head(tokens).flatten(0, 2),
            "patch_targets": targets.flatten(),
            "region_logits": self.head(pooled[present]),
            "region_targets": digits[present],
            "position": self.position(tokens).flatten(0, 2),
            "position_targets": grid_positions(rows, cols, tokens.device).repeat(
                tokens.shape[0] * tokens.shape[1], 1
            ),
        }


def grid_positions(rows: int, cols: int, device: torch.device) -> Tensor:
    """``(rows·cols, 2)`` (row, column) of every patch in row-major order, scaled to [−1, 1]."""
    row, col = torch.meshgrid(torch.linspace(-1, 1, rows), torch.linspace(-1, 1, cols), indexing="ij")
    return torch.stack((row.flatten(), col.flatten()), -1).to(device)


def balanced_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy averaged over digit patches and over background patches, the two halves weighted
    equally: about nine patches in ten are background, and a plain mean is minimised by naming none."""
    losses = F.cross_entropy(logits, targets, reduction="none")
    digit = targets != BACKGROUND
    return sum(losses[part].mean() for part in (digit, ~digit) if part.any())


class DigitPatchModule(TimeloomModule):
    """Stage 0: the encoder's tokens name the digits where they are.

    ``objective``: ``region`` (default) classifies the mean of the tokens each digit covers, as a projector's
    attention pools them; ``region_and_position`` adds a regression of every token's own grid place, so the
    tokens keep where they are (Video-CCAM's projector sees no patch positions: a digit's place, and so its
    direction, reaches it only through the tokens); ``patch`` classifies every token alone (`balanced_loss`), which the tiny 2-layer ViT
    learns far more slowly (benchmarks/understanding-quality.md, stop 13). Logged either way: ``val/region_accuracy`` (digits named
    from their tokens' mean, chance 10 %), ``val/patch_accuracy`` (digit patches named alone) and
    ``val/background_accuracy`` (0 under ``region``, which never asks for the background class).

    Args:
        encoder: `TimmEncoder` arguments, as in the video-LLM config that will load the weights.
        objective: ``region``, ``region_and_position`` or ``patch``.
        optimizer, scheduler, decay_vectors: as for `TimeloomModule`.
    """

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        objective: str = "region",
        optimizer: OptimizerCallable = default_optimizer,
        scheduler: LRSchedulerCallable | None = default_scheduler,
        decay_vectors: bool = True,
    ) -> None:
        super().__init__(optimizer, scheduler, decay_vectors)
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}; got {objective!r}")
        self.objective = objective
        self.model = DigitPatchClassifier(encoder or vit_options())

    def _loss(self, out: dict[str, Tensor]) -> Tensor:
        if self.objective == "patch":
            return balanced_loss(out["patch_logits"], out["patch_targets"])
        loss = F.cross_entropy(out["region_logits"], out["region_targets"])
        if self.objective == "region_and_position":
            loss = loss + F.mse_loss(out["position"], out["position_targets"])
        return loss

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self._loss(self.model(batch["video"], batch["targets"]))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._score(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self._score(batch, "test")

    def _score(self, batch: dict[str, Tensor], split: str) -> None:
        out = self.model(batch["video"], batch["targets"])
        self.log(f"{split}/loss", self._loss(out), prog_bar=True)
        patch_right = out["patch_logits"].argmax(-1) == out["patch_targets"]
        digit = out["patch_targets"] != BACKGROUND
        region_right = out["region_logits"].argmax(-1) == out["region_targets"]
        self.log(f"{split}/position_mse", F.mse_loss(out["position"], out["position_targets"]))
        # weighted by count, so the epoch figure is the share of all regions (patches)
        for name, right in (
            ("region_accuracy", region_right),
            ("patch_accuracy", patch_right[digit]),
            ("background_accuracy", patch_right[~digit]),
        ):
            self.log(
                f"{split}/{name}",
                right.float().mean(),
                prog_bar=name == "region_accuracy",
                batch_size=len(right),
            )
