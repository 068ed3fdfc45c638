"""`OmniTokenizerModule`: manual GAN optimisation gated by `disc_start`, and `timeloom fit` lowering the loss."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from timeloom_tokenizer import OmniTokenizerConfig, OmniTokenizerModule, TokenizerLossConfig
from torch.utils.data import DataLoader

from timeloom.cli import main
from timeloom.data import MovingDigitsDataModule

ROOT = Path(__file__).resolve().parents[2]
VIDEO_VQ = ROOT / "configs/tokenizer/omnitokenizer-tiny-vq.yaml"
MICRO = OmniTokenizerConfig.micro()


def snapshot(parameters) -> list[torch.Tensor]:
    return [p.detach().clone() for p in parameters]


def changed(before: list[torch.Tensor], parameters) -> bool:
    return any(not torch.equal(b, p.detach()) for b, p in zip(before, parameters))


class RecordDiscriminatorBeforeItStarts(pl.Callback):
    """Snapshots the discriminator after the last batch before `disc_start` (batch index `disc_start - 1`)."""

    def __init__(self, disc_start: int) -> None:
        self.disc_start = disc_start
        self.before_start: list[torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.disc_start - 1:
            self.before_start = snapshot(pl_module.discriminator_parameters())


def test_discriminator_trains_only_from_disc_start_and_the_generator_always():
    torch.manual_seed(0)
    disc_start = 2
    module = OmniTokenizerModule(
        MICRO,
        TokenizerLossConfig(
            image_gan_weight=0.1, video_gan_weight=0.1, disc_start=disc_start, disc_channels=8, disc_layers=2
        ),
        discriminator_lr=1e-3,
        optimizer=lambda params: torch.optim.Adam(params, lr=1e-3, betas=(0.5, 0.9)),
    )
    assert not module.automatic_optimization
    data = MovingDigitsDataModule(size=16, frames=5, batch_size=2, train_length=16, val_length=2)
    generator_start = snapshot(module.model.parameters())
    discriminator_start = snapshot(module.discriminator_parameters())
    recorder = RecordDiscriminatorBeforeItStarts(disc_start)
    # Lightning's max_steps counts optimiser steps: batches 0 and 1 step G only, batch 2 steps G and D.
    trainer = pl.Trainer(
        max_steps=4,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    trainer.fit(module, data)

    assert module.train_step == 3
    assert len(trainer.optimizers) == 2
    assert recorder.before_start is not None
    assert not changed(discriminator_start, recorder.before_start)
    assert changed(recorder.before_start, module.discriminator_parameters())
    assert changed(generator_start, module.model.parameters())
    assert "train/d_loss" in trainer.callback_metrics


def test_without_gan_weights_there_is_no_discriminator_nor_its_optimiser():
    module = OmniTokenizerModule(MICRO, TokenizerLossConfig(image_gan_weight=0.0, video_gan_weight=0.0))
    assert module.discriminator_parameters() == []
    optimizers, schedulers = module.configure_optimizers()
    assert len(optimizers) == 1 and len(schedulers) == 1
    video = torch.zeros(3, 1, 5, 16, 16)
    # 3 latent frames (1 + 4/2) of 4 × 4 tokens each.
    assert module.count_tokens({"video": video}) == 3 * 3 * 4 * 4


def test_timeloom_fit_on_the_tiny_config_lowers_the_reconstruction_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["timeloom"])
    overlay = tmp_path / "short.yaml"
    overlay.write_text(
        f"""
model:
  init_args:
    scheduler:
      init_args: {{warmup_steps: 2}}
data:
  init_args: {{frames: 5, batch_size: 4, train_length: 48, val_length: 4}}
trainer:
  max_steps: 12
  limit_val_batches: 1
  log_every_n_steps: 1
  enable_progress_bar: false
  default_root_dir: {tmp_path}
  logger:
    class_path: lightning.pytorch.loggers.CSVLogger
    init_args: {{save_dir: {tmp_path}}}
checkpoint:
  dirpath: {tmp_path}/checkpoints
"""
    )
    main(["fit", "-c", str(VIDEO_VQ), "-c", str(overlay)])

    with next(tmp_path.rglob("metrics.csv")).open() as f:
        rows = list(csv.DictReader(f))
    rec = [float(row["train/rec"]) for row in rows if row.get("train/rec")]
    assert len(rec) >= 10
    assert sum(rec[-3:]) / 3 < 0.8 * sum(rec[:3]) / 3, rec
    assert any(row.get("val/psnr") for row in rows) and any(row.get("train/perplexity") for row in rows)
    assert list((tmp_path / "media").glob("val_reconstruction_*.mp4"))


class RecordWeightsAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def micro_trainer(tmp_path: Path, max_steps: int, callbacks=()) -> pl.Trainer:
    return pl.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
        callbacks=list(callbacks),
    )


def test_init_from_loads_at_fit_start_and_a_resumed_fit_ignores_it(tmp_path):
    data = MovingDigitsDataModule(size=16, frames=5, batch_size=2, train_length=8, val_length=2)
    no_gan = TokenizerLossConfig(image_gan_weight=0.0)
    torch.manual_seed(0)
    source = OmniTokenizerModule(MICRO, no_gan)
    trainer = micro_trainer(tmp_path / "source", max_steps=2)
    trainer.fit(source, data)
    checkpoint = tmp_path / "source.ckpt"
    trainer.save_checkpoint(checkpoint)

    torch.manual_seed(1)
    recorder = RecordWeightsAtTrainStart()
    started = OmniTokenizerModule(MICRO, no_gan, init_from=str(checkpoint))
    trainer = micro_trainer(tmp_path / "started", max_steps=1, callbacks=[recorder])
    trainer.fit(started, data)
    for key, value in source.state_dict().items():
        assert torch.equal(recorder.weights[key], value), key

    # Resuming takes the run's own checkpoint; the (now missing) init checkpoint is not read.
    checkpoint.rename(tmp_path / "moved.ckpt")
    resumed = OmniTokenizerModule(MICRO, no_gan, init_from=str(checkpoint))
    micro_trainer(tmp_path / "resumed", max_steps=3).fit(resumed, data, ckpt_path=tmp_path / "moved.ckpt")
    assert resumed.train_step == 3


def test_image_and_video_batches_validate_under_their_own_names(tmp_path):
    module = OmniTokenizerModule(MICRO, TokenizerLossConfig(image_gan_weight=0.0))
    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    images = DataLoader([{"video": torch.rand(1, 1, 16, 16) * 2 - 1} for _ in range(2)], batch_size=2)
    videos = DataLoader([{"video": torch.rand(1, 5, 16, 16) * 2 - 1} for _ in range(2)], batch_size=2)
    metrics = trainer.validate(module, [videos, images], verbose=False)
    logged = {k for m in metrics for k in m}
    assert {"val/psnr", "val/ssim", "val_image/psnr", "val_image/ssim"} <= logged
    assert not any("dataloader_idx" in k for k in logged)
