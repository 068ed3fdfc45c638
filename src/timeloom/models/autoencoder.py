"""A small causal video autoencoder: the tiniest real model, for the demo and the core's own tests.

Every temporal convolution pads only on the past side, so frame t of the reconstruction depends on frames
<= t (an image, T = 1, is just the first frame). Space is downsampled ``2**levels`` times.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from timeloom.module import TimeloomModule


@dataclass
class VideoAutoencoderConfig:
    channels: int = 1
    width: int = 32
    latent_channels: int = 2
    levels: int = 1
    temporal_kernel: int = 3


class CausalConv3d(nn.Conv3d):
    """3-D convolution padded (t: past only; h, w: both sides) so the output keeps T and never sees the future."""

    def __init__(self, cin: int, cout: int, temporal_kernel: int, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__(cin, cout, (temporal_kernel, 3, 3), stride=stride)
        self.time_pad = temporal_kernel - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (1, 1, 1, 1, self.time_pad, 0), mode="replicate"))


class ChannelNorm(nn.Module):
    """LayerNorm over channels at each (t, h, w): keeps activations well scaled without mixing frames, so the
    model stays causal (GroupNorm would pool statistics over future frames)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def conv_block(cin: int, cout: int, temporal_kernel: int, stride: tuple[int, int, int] = (1, 1, 1)) -> list:
    return [CausalConv3d(cin, cout, temporal_kernel, stride), ChannelNorm(cout), nn.SiLU()]


class CausalVideoAutoencoder(nn.Module):
    def __init__(self, config: VideoAutoencoderConfig):
        super().__init__()
        self.config = c = config
        encoder = conv_block(c.channels, c.width, c.temporal_kernel)
        decoder = conv_block(c.latent_channels, c.width, c.temporal_kernel)
        for _ in range(c.levels):
            encoder += conv_block(c.width, c.width, c.temporal_kernel, stride=(1, 2, 2))
            decoder += [nn.Upsample(scale_factor=(1, 2, 2), mode="nearest")]
            decoder += conv_block(c.width, c.width, c.temporal_kernel)
        self.encoder = nn.Sequential(*encoder, CausalConv3d(c.width, c.latent_channels, 1))
        self.decoder = nn.Sequential(*decoder, CausalConv3d(c.width, c.channels, 1))

    def check_input(self, video: torch.Tensor) -> None:
        c = self.config
        factor = 2**c.levels
        if (
            video.dim() != 5
            or video.shape[1] != c.channels
            or video.shape[-1] % factor
            or video.shape[-2] % factor
        ):
            raise ValueError(
                f"expected a video (B, C={c.channels}, T, H, W) with H and W divisible by {factor}, "
                f"got shape {tuple(video.shape)}"
            )

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.check_input(video)
        return self.encoder(video)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.decoder(latent))

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(video))


class VideoAutoencoder(TimeloomModule):
    """Trains `CausalVideoAutoencoder` with an MSE reconstruction loss; logs PSNR and sample videos.

    MSE rather than L1: on mostly-black digit videos L1's optimum is the background (the per-pixel median),
    and training stalls there.
    """

    def __init__(
        self, config: VideoAutoencoderConfig | None = None, log_video_every_n_epochs: int = 1, **kwargs
    ):
        super().__init__(**kwargs)
        self.config = config or VideoAutoencoderConfig()
        self.model = CausalVideoAutoencoder(self.config)
        self.log_video_every_n_epochs = log_video_every_n_epochs

    def count_tokens(self, batch: dict) -> int:
        b, _, t, h, w = batch["video"].shape
        return b * t * (h // 2**self.config.levels) * (w // 2**self.config.levels)

    def _loss(self, batch: dict, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        video = batch["video"]
        recon = self.model(video)
        loss = F.mse_loss(recon, video)
        # PSNR on [-1, 1] data: peak-to-peak range is 2.
        psnr = 10 * torch.log10(4 / loss.detach().clamp_min(1e-10))
        self.log_dict(
            {f"{stage}/loss": loss, f"{stage}/psnr": psnr}, prog_bar=True, sync_dist=stage != "train"
        )
        return loss, recon

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._loss(batch, "train")[0]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        _, recon = self._loss(batch, "val")
        if batch_idx == 0 and self.current_epoch % self.log_video_every_n_epochs == 0:
            pairs = torch.cat([batch["video"][:4], recon[:4]], dim=-1)  # input | reconstruction side by side
            self.log_video("val/reconstruction", pairs)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._loss(batch, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.model(batch["video"])
