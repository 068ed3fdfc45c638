"""Latent codecs (spec §2): what turns pixels into the latents the VDM diffuses, and back.

- `PixelCodec`: the identity; tiny runs diffuse MovingDigits pixels directly.
- `TokenizerCodec`: a trained OmniTokenizer with the KL bottleneck, loaded from a local `save_pretrained`
  folder or a Lightning checkpoint of `timeloom fit`, and frozen. Latents are the posterior mean scaled by ``scale`` (``1/std`` of the mean on training
  clips, stored in the config); pixel frames ``T = 1 + k·t`` give ``1 + k`` latent frames.

Both are plain objects, not `nn.Module` children: a frozen codec's weights stay out of the VDM's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

__all__ = ["LatentCodec", "PixelCodec", "TokenizerCodec"]


class LatentCodec(Protocol):
    channels: int
    scale: float  # latents = posterior mean · scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]: ...

    def encode(self, video: Tensor) -> Tensor: ...

    def decode(self, latents: Tensor) -> Tensor: ...


class PixelCodec:
    """Pixels are the latents: ``(B, C, T, H, W)`` in [-1, 1] both ways."""

    def __init__(self, channels: int) -> None:
        self.channels, self.scale = channels, 1.0

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return frames, height, width

    def encode(self, video: Tensor) -> Tensor:
        if video.dim() != 5 or video.shape[1] != self.channels:
            raise ValueError(f"expected pixels (B, {self.channels}, T, H, W); got {tuple(video.shape)}")
        return video

    def decode(self, latents: Tensor) -> Tensor:
        return latents.clamp(-1, 1)


class TokenizerCodec:
    """A frozen KL OmniTokenizer from ``directory`` (`save_pretrained` / `timeloom export`) or a ``.ckpt`` file."""

    def __init__(self, directory: str | Path, scale: float = 1.0) -> None:
        from timeloom_tokenizer.quantizers import DiagonalGaussian

        from timeloom.module import TimeloomModule

        directory = Path(directory)
        if not directory.exists():
            raise FileNotFoundError(f"no tokenizer checkpoint or exported folder at {directory}")
        load = TimeloomModule.from_pretrained if directory.is_dir() else TimeloomModule.from_checkpoint
        module = load(directory)
        self.tokenizer = module.model.eval().requires_grad_(False)
        if not isinstance(self.tokenizer.quantizer, DiagonalGaussian):
            raise ValueError(
                f"{directory} holds a tokenizer with a {type(self.tokenizer.quantizer).__name__} bottleneck; "
                "the VDM diffuses continuous latents: use a KL (quantizer: kl) tokenizer"
            )
        self.channels = self.tokenizer.config.latent_dim
        self.scale = scale

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        return self.tokenizer.latent_shape(frames, height, width)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        self.tokenizer.to(video.device)
        return self.tokenizer.quantizer.mode(self.tokenizer.encode_latent(video)) * self.scale

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        self.tokenizer.to(latents.device)
        return self.tokenizer.decode(latents / self.scale).clamp(-1, 1)
