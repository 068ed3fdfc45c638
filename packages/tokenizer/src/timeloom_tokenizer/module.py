"""`OmniTokenizerModule`: trains an `OmniTokenizer` with `TokenizerLoss` (spec sections 3 and 4).

Optimisation is always manual, one code path with or without a discriminator: each batch takes a generator
step, then (once the discriminator is active) a discriminator step, each with its own optimiser, scheduler
and gradient clipping. Step-keyed schedules read our own ``train_step`` counter (batches trained), because
Lightning's ``global_step`` counts every optimiser step and the discriminator's are irregular.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from timeloom.module import TimeloomModule
from timeloom_tokenizer.losses import TokenizerLoss
from timeloom_tokenizer.model import OmniTokenizer, OmniTokenizerConfig

__all__ = ["OmniTokenizerModule", "TokenizerLossConfig"]

# A discriminator this close to zero loss already separates real from fake; stepping it further only
# sharpens it past what the generator can follow (spec section 3).
MIN_DISCRIMINATOR_LOSS = 1e-3


@dataclass
class TokenizerLossConfig:
    """Options of `TokenizerLoss` (its input channels come from the model config); see that class.

    The defaults are the paper's stage-1 recipe: L1 × 4, no perceptual network, a 2-D discriminator at 0.01.
    """

    reconstruction: Literal["l1", "l2"] = "l1"
    reconstruction_weight: float = 4.0
    perceptual_weight: float = 0.0
    perceptual_weights_path: str | None = None
    perceptual_all_frames: bool = False
    image_gan_weight: float = 0.01
    video_gan_weight: float = 0.0
    adaptive_gan_weight: bool = False
    max_adaptive_weight: float = 1e4
    disc_start: int = 0
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    disc_channels: int = 64
    disc_layers: int = 3
    disc_use_norm: bool = True
    disc_temporal_kernel_size: int = 3


class OmniTokenizerModule(TimeloomModule):
    """Trains `OmniTokenizer` on video batches ``{"video": (B, C, T, H, W)}`` in [-1, 1].

    Args:
        config: the tokenizer's sizes.
        loss: the training objective; with both GAN weights 0 no discriminator (nor its optimiser) exists.
        discriminator_lr: the discriminator optimiser's learning rate; None keeps the injected optimiser's.
        gradient_clip_val: max gradient norm for each optimiser (Trainer-level clipping does not apply to
            manual optimisation); None turns clipping off.
        log_video_every_n_epochs: how often the first validation batch is logged as input | reconstruction.
        **kwargs: ``optimizer`` / ``scheduler`` callables of `TimeloomModule`, used for both optimisers.
    """

    def __init__(
        self,
        config: OmniTokenizerConfig | None = None,
        loss: TokenizerLossConfig | None = None,
        discriminator_lr: float | None = None,
        gradient_clip_val: float | None = 1.0,
        log_video_every_n_epochs: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        self.config = config or OmniTokenizerConfig()
        self.loss_config = loss or TokenizerLossConfig()
        self.model = OmniTokenizer(self.config)
        self.loss = TokenizerLoss(in_channels=self.config.channels, **asdict(self.loss_config))
        self.discriminator_lr = discriminator_lr
        self.gradient_clip_val = gradient_clip_val
        self.log_video_every_n_epochs = log_video_every_n_epochs
        self.train_step = 0
        # Reconstructions are compared in [-1, 1], a peak-to-peak range of 2.
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0)

    @property
    def has_discriminator(self) -> bool:
        return bool(self.discriminator_parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        discriminators = (self.loss.image_discriminator, self.loss.video_discriminator)
        return [p for d in discriminators if d is not None for p in d.parameters()]

    # -- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer(self.model.parameters())]
        if self.has_discriminator:
            discriminator_optimizer = self.optimizer(self.discriminator_parameters())
            if self.discriminator_lr is not None:
                # Set before the scheduler is built, so it takes this as its base rate.
                for group in discriminator_optimizer.param_groups:
                    group["lr"] = self.discriminator_lr
            optimizers.append(discriminator_optimizer)
        if self.scheduler is None:
            return optimizers
        schedulers = [{"scheduler": self.scheduler(o), "interval": "step"} for o in optimizers]
        return optimizers, schedulers

    def training_step(self, batch: dict, batch_idx: int) -> None:
        video = batch["video"]
        optimizers = _as_list(self.optimizers())
        schedulers = (
            _as_list(self.lr_schedulers()) if self.scheduler is not None else [None] * len(optimizers)
        )

        recon, quantized = self.model(video)
        g_loss, g_metrics = self.loss.generator_step(
            video,
            recon,
            step=self.train_step,
            last_layer=self._last_layer(video),
            quant_loss=quantized.loss,
        )
        self._optimise(g_loss, optimizers[0], schedulers[0])
        logged = {**self._applicable(g_metrics), **quantized.metrics}

        if self.loss.is_discriminator_active(self.train_step):
            d_loss, d_metrics = self.loss.discriminator_step(video, recon, step=self.train_step)
            if d_loss.item() >= MIN_DISCRIMINATOR_LOSS:
                self._optimise(d_loss, optimizers[1], schedulers[1])
            logged.update(d_metrics)

        batch_size = len(video)
        self.log("train/rec", logged.pop("rec"), prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{k}": v.float() for k, v in logged.items()}, batch_size=batch_size)
        self.train_step += 1

    def _optimise(self, loss: Tensor, optimizer: LightningOptimizer, scheduler: Any | None) -> None:
        """One clipped step of ``optimizer`` on ``loss``, with only its own parameters receiving gradients."""
        # Toggling freezes the other optimiser's parameters: the generator loss flows through the
        # discriminator, and its gradients there must not leak into the discriminator's step.
        self.toggle_optimizer(optimizer)
        optimizer.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        if self.gradient_clip_val is not None:
            self.clip_gradients(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm"
            )
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        self.untoggle_optimizer(optimizer)

    def _applicable(self, metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The generator's metrics without the terms this objective never has (they are constant zeros)."""
        absent = set()
        if self.loss.perceptual is None:
            absent.add("perceptual")
        if not self.has_discriminator:
            absent |= {"g_adv", "d_weight"}
        return {name: value for name, value in metrics.items() if name not in absent}

    def _last_layer(self, video: Tensor) -> Tensor:
        """The decoder's output weight for the adaptive GAN weight: the tubelet head, unless only frame 0
        exists (images), which only the first-frame head decodes."""
        head = self.model.tubelet_head if video.shape[2] > 1 else self.model.first_frame_head
        return head.weight

    # -- evaluation ---------------------------------------------------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        video = batch["video"]
        recon, quantized = self.model(video)
        _, metrics = self.loss.generator_step(video, recon, step=self.train_step, quant_loss=quantized.loss)
        logged = {
            f"val/{k}": v.float() for k, v in {**self._applicable(metrics), **quantized.metrics}.items()
        }
        self.log_dict(logged, sync_dist=True, batch_size=len(video))
        # Metrics per frame: SSIM is an image measure, and the decoder's output is not bounded.
        frames, recon_frames = _frames(video), _frames(recon.clamp(-1, 1))
        self.val_psnr(recon_frames, frames)
        self.val_ssim(recon_frames, frames)
        self.log_dict(
            {"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, prog_bar=True, batch_size=len(video)
        )
        if batch_idx == 0 and self.current_epoch % self.log_video_every_n_epochs == 0:
            pairs = torch.cat([video[:4], recon[:4].clamp(-1, 1)], dim=-1)  # input | reconstruction
            self.log_video("val/reconstruction", pairs)

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self.model(batch["video"])[0]

    # -- bookkeeping --------------------------------------------------------------------------------------
    def count_tokens(self, batch: dict) -> int:
        """Latent tokens the transformer attends over: ``B · T' · h · w``."""
        b, _, t, h, w = batch["video"].shape
        latent_frames, latent_h, latent_w = self.model.latent_shape(t, h, w)
        return b * latent_frames * latent_h * latent_w

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["train_step"] = self.train_step

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.train_step = checkpoint.get("train_step", 0)


def _as_list(value: Any) -> list:
    """Lightning returns a lone optimiser or scheduler bare, several as a list."""
    return value if isinstance(value, list) else [value]


def _frames(video: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B·T, C, H, W)``."""
    return video.transpose(1, 2).flatten(0, 1)
