"""`OmniTokenizerModule`: trains an `OmniTokenizer` with `TokenizerLoss` (spec sections 3 and 4).

Optimisation is always manual, one code path with or without a discriminator: each batch takes a generator
step, then (once the discriminator is active) a discriminator step, each with its own optimiser, scheduler
and gradient clipping. Step-keyed schedules read our own ``train_step`` counter (batches trained), because
Lightning's ``global_step`` counts every optimiser step and the discriminator's are irregular.

Progressive training (spec section 4) is configuration: ``init_from`` names the previous stage's checkpoint,
loaded when a fit starts (not when it resumes), with the tubelet weights inflated (``inflate``) and fresh
weights kept where ``reinitialize`` says (e.g. ``pre_quant`` for the stage-3 KL fine-tune); see
`timeloom_tokenizer.inflate`. Batches may be images (one-frame videos) or videos, at any resolution the
model accepts; validation reports each kind under its own names (``val/…`` for videos, ``val_image/…``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from timeloom.module import TimeloomModule, checkpoint_state_dict
from timeloom_tokenizer.inflate import DiscriminatorSlot, InflationStrategy, transfer_state
from timeloom_tokenizer.losses import TokenizerLoss
from timeloom_tokenizer.model import OmniTokenizer, OmniTokenizerConfig

__all__ = ["OmniTokenizerModule", "TokenizerLossConfig"]

log = logging.getLogger(__name__)

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
        init_from: a Lightning checkpoint of an `OmniTokenizerModule` (the previous stage) to start from,
            loaded when a fit starts; a resumed fit takes its weights from its own checkpoint instead.
        inflate: ``"static"``, ``"upstream"`` or ``"first"`` to initialise the tubelet embedding and head
            from the checkpoint's first-frame weights (stage 1 → 2); None copies them as they are.
        discriminator_inflate: the time tap (``"center"``, ``"first"``, ``"last"``) or ``"average"`` at
            which a video discriminator is initialised from the checkpoint's image discriminator.
        reinitialize: state-dict prefixes (e.g. ``"model.pre_quant"``) that keep their fresh initialisation.
        **kwargs: ``optimizer`` / ``scheduler`` callables of `TimeloomModule`, used for both optimisers.
    """

    def __init__(
        self,
        config: OmniTokenizerConfig | None = None,
        loss: TokenizerLossConfig | None = None,
        discriminator_lr: float | None = None,
        gradient_clip_val: float | None = 1.0,
        log_video_every_n_epochs: int = 1,
        init_from: str | None = None,
        inflate: InflationStrategy | None = None,
        discriminator_inflate: DiscriminatorSlot = "center",
        reinitialize: Sequence[str] = (),
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
        self.init_from = init_from
        self.inflate = inflate
        self.discriminator_inflate = discriminator_inflate
        self.reinitialize = tuple(reinitialize)
        self.train_step = 0
        # Reconstructions are compared in [-1, 1], a peak-to-peak range of 2; images and videos apart.
        self.val_psnr = nn.ModuleDict({kind: PeakSignalNoiseRatio(data_range=2.0) for kind in _KINDS})
        self.val_ssim = nn.ModuleDict(
            {kind: StructuralSimilarityIndexMeasure(data_range=2.0) for kind in _KINDS}
        )

    # -- progressive initialisation -----------------------------------------------------------------------
    def on_fit_start(self) -> None:
        # Here, not in `setup`: only now does the trainer know whether it resumed from a checkpoint.
        # Loading copies into the existing parameters, so the optimisers built before still hold them.
        if self.init_from is not None and self.trainer.ckpt_path is None:
            self.load_initial_weights(self.init_from)

    def load_initial_weights(self, path: str | Path) -> list[str]:
        """Load the previous stage's checkpoint at ``path`` (inflating and re-initialising as configured).

        Returns the checkpoint's keys that this module does not use; raises `KeyError` naming every weight
        the checkpoint cannot fill.
        """
        try:
            state, unused = transfer_state(
                checkpoint_state_dict(path, "init_from"),
                self.state_dict(),
                channels=self.config.channels,
                patch=self.config.patch,
                temporal_patch=self.config.temporal_patch,
                inflate=self.inflate,
                discriminator_slot=self.discriminator_inflate,
                reinitialize=self.reinitialize,
            )
        except KeyError as error:
            raise KeyError(f"init_from {path}: {error.args[0]}") from None
        self.load_state_dict(state)
        if unused:
            log.info("init_from %s: unused checkpoint weights %s", path, ", ".join(unused))
        return unused

    @property
    def has_discriminator(self) -> bool:
        return bool(self.discriminator_parameters())

    def discriminator_parameters(self) -> list[nn.Parameter]:
        discriminators = (self.loss.image_discriminator, self.loss.video_discriminator)
        return [p for d in discriminators if d is not None for p in d.parameters()]

    # -- optimisation -------------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        optimizers = [self.optimizer(self.parameter_groups(self.model.parameters()))]
        if self.has_discriminator:
            discriminator_optimizer = self.optimizer(self.parameter_groups(self.discriminator_parameters()))
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
    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        video = batch["video"]
        kind = "image" if video.shape[2] == 1 else "video"
        prefix = _KINDS[kind]
        recon, quantized = self.model(video)
        _, metrics = self.loss.generator_step(video, recon, step=self.train_step, quant_loss=quantized.loss)
        logged = {
            f"{prefix}/{k}": v.float() for k, v in {**self._applicable(metrics), **quantized.metrics}.items()
        }
        # Several loaders (videos, images) log under their own prefixes, so Lightning need not suffix them.
        self.log_dict(logged, sync_dist=True, batch_size=len(video), add_dataloader_idx=False)
        # Metrics per frame: SSIM is an image measure, and the decoder's output is not bounded.
        frames, recon_frames = _frames(video), _frames(recon.clamp(-1, 1))
        self.val_psnr[kind](recon_frames, frames)
        self.val_ssim[kind](recon_frames, frames)
        self.log_dict(
            {f"{prefix}/psnr": self.val_psnr[kind], f"{prefix}/ssim": self.val_ssim[kind]},
            prog_bar=True,
            batch_size=len(video),
            add_dataloader_idx=False,
        )
        if batch_idx == 0 and self.current_epoch % self.log_video_every_n_epochs == 0:
            pairs = torch.cat([video[:4], recon[:4].clamp(-1, 1)], dim=-1)  # input | reconstruction
            self.log_video(f"{prefix}/reconstruction", pairs)

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


# Validation metric prefix of each kind of batch.
_KINDS = {"video": "val", "image": "val_image"}


def _as_list(value: Any) -> list:
    """Lightning returns a lone optimiser or scheduler bare, several as a list."""
    return value if isinstance(value, list) else [value]


def _frames(video: Tensor) -> Tensor:
    """``(B, C, T, H, W)`` → ``(B·T, C, H, W)``."""
    return video.transpose(1, 2).flatten(0, 1)
