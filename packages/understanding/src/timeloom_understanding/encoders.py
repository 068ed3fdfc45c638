"""Vision encoders: a video in, a grid of tokens per frame out (spec §2.2)."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["TimmEncoder", "vit_options"]


def vit_options(
    img_size: int = 32,
    patch_size: int = 8,
    embed_dim: int = 32,
    depth: int = 1,
    num_heads: int = 2,
    in_chans: int = 1,
) -> dict[str, Any]:
    """`TimmEncoder` options for a small randomly initialised timm ViT without a class token (the defaults
    are the smallest useful one: tests and smoke runs)."""
    return {
        "model_name": "vit_tiny_patch16_224",
        "img_size": img_size,
        "patch_size": patch_size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "in_chans": in_chans,
        "class_token": False,
    }


def _import_timm():
    # timm imports torchvision; a torchvision built for another torch fails with a RuntimeError, not an ImportError
    try:
        import timm
    except (ImportError, RuntimeError) as error:
        raise ImportError(
            f"TimmEncoder needs timm with a torchvision that matches the installed torch ({error}); "
            "`make setup` installs the matching pair"
        ) from error
    return timm


class TimmEncoder(nn.Module):
    """Any timm ViT as a per-frame encoder: ``(B, C, T, H, W) → (B, T, h·w, width)`` and the grid ``(h, w)``.

    Built with ``num_classes=0, global_pool=''`` and without pretrained weights; ``checkpoint_path`` loads a
    local file (nothing is downloaded). Prefix tokens (CLS, registers) are dropped. ``feature_layer`` picks a
    block's output (−1 the last, −2 the LLaVA convention); the final norm applies only to the last.

    Args:
        model_name: a timm architecture, e.g. ``vit_tiny_patch16_224``.
        checkpoint_path: a local weight file for timm to load, or None (random init).
        feature_layer: which block's tokens to return.
        **overrides: timm model arguments (``img_size``, ``patch_size``, ``embed_dim``, ``depth``, …).
    """

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        checkpoint_path: str | None = None,
        feature_layer: int = -1,
        **overrides: Any,
    ) -> None:
        super().__init__()
        timm = _import_timm()
        extra = {"checkpoint_path": checkpoint_path} if checkpoint_path else {}
        self.vit = timm.create_model(
            model_name, pretrained=False, num_classes=0, global_pool="", **extra, **overrides
        )
        depth = len(self.vit.blocks)
        if not -depth <= feature_layer < depth:
            raise ValueError(f"feature_layer {feature_layer} outside the {depth} blocks of {model_name}")
        self.feature_layer = feature_layer % depth
        self.width = self.vit.embed_dim
        self.in_channels = self.vit.patch_embed.proj.in_channels

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid of a ``height × width`` frame."""
        patch_h, patch_w = self.vit.patch_embed.patch_size
        return height // patch_h, width // patch_w

    def forward(self, video: Tensor) -> tuple[Tensor, tuple[int, int]]:
        batch, channels, frames, height, width = video.shape
        if channels != self.in_channels:
            raise ValueError(f"the encoder takes {self.in_channels}-channel frames; got {channels} channels")
        images = video.transpose(1, 2).reshape(batch * frames, channels, height, width)
        x = self.vit.patch_drop(self.vit.norm_pre(self.vit._pos_embed(self.vit.patch_embed(images))))
        for block in self.vit.blocks[: self.feature_layer + 1]:
            x = block(x)
        if self.feature_layer == len(self.vit.blocks) - 1:
            x = self.vit.norm(x)
        tokens = x[:, self.vit.num_prefix_tokens :]
        return tokens.reshape(batch, frames, tokens.shape[1], self.width), self.grid(height, width)
