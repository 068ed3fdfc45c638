"""OmniTokenizer: a causal spatial-temporal transformer tokenizer for images and videos (spec §1).

Pixels ``(B, C, T, H, W)`` with ``T = 1 + k·t`` become a latent grid ``(T', h, w) = (1 + k, H/p, W/p)``:

    frame 0 ─ p×p patches ─┐
                           ├─ spatial stack ─ temporal stack ─ pre_quant ─ quantizer ─► latent
    frames 1… ─ t×p×p ─────┘   ("ttww": global   (causal over
                tubelets         + window)         latent frames)

and the decoder runs the mirror image (post_quant, temporal stack, global spatial stack, two pixel heads).
An image ``(B, C, H, W)`` is a one-frame video and comes back as an image.

Every token tensor between blocks is kept as ``(B, T', h, w, d)``: each attention flavour reshapes it into
the sequences it needs (per frame, window-major per frame, or per location over time), and the PEG sees the
true ``(B, d, T', h, w)`` grid. Temporal causality is exact: latent frame ``j`` only ever reads latent frames
``≤ j`` (causal masks in the temporal stacks, causal temporal padding in every PEG), and latent frame ``j``
covers input frames ``1 + (j−1)·t … j·t``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timeloom_kernels import Attend, masks, name_attention_layers
from timeloom_kernels.positions import apply_rotary, rope_2d_angles
from torch import Tensor, nn

from timeloom_tokenizer.quantizers import (
    DiagonalGaussian,
    EMAVectorQuantizer,
    LookupFreeQuantizer,
    Quantizer,
    QuantizerOutput,
)

__all__ = ["OmniTokenizer", "OmniTokenizerConfig"]

# Cosine-sim attention: q·k of unit vectors lies in [−1, 1], so a fixed temperature sharpens it (upstream's 8).
LOGIT_SCALE = 8.0
BlockKind = Literal["global", "window", "temporal"]
SPATIAL_BLOCKS: dict[str, BlockKind] = {"t": "global", "w": "window"}


@dataclass
class OmniTokenizerConfig:
    """Sizes of an `OmniTokenizer`. The defaults are the paper-size base model (≈51 M parameters).

    Attributes:
        channels: pixel channels.
        patch: spatial patch size ``p``.
        temporal_patch: frames per tubelet ``t``; videos need ``T = 1 + k·t``.
        dim: token width ``d``.
        heads, head_dim: attention heads and their width (``head_dim`` even, for the 2-D RoPE).
        encoder_spatial: encoder spatial blocks in order, ``t`` = global attention (with RoPE and PEG),
            ``w`` = window attention (Swin table, no PEG).
        window: window side, in tokens; the token grid must be a multiple of it when ``w`` blocks exist.
        encoder_temporal_depth, decoder_temporal_depth: causal temporal blocks in each stack.
        decoder_spatial_depth: global spatial blocks of the decoder.
        latent_dim: channels of the latent; for ``"lfq"`` it is the number of bits (``2^latent_dim`` codes).
        quantizer: ``"vq"`` (EMA vector quantiser), ``"kl"`` (diagonal Gaussian) or ``"lfq"`` (lookup-free).
        codebook_size: VQ codes.
        l2_codes: l2-normalise VQ inputs and codes.
        commitment: commitment weight of VQ and LFQ.
        kl_weight: KL weight of the Gaussian bottleneck.
        lfq_entropy_weight: entropy-loss weight of LFQ.
        dropout: dropout after the GEGLU of every feed-forward.
    """

    channels: int = 3
    patch: int = 8
    temporal_patch: int = 4
    dim: int = 512
    heads: int = 8
    head_dim: int = 64
    encoder_spatial: str = "ttww"
    window: int = 8
    encoder_temporal_depth: int = 4
    decoder_temporal_depth: int = 4
    decoder_spatial_depth: int = 4
    latent_dim: int = 8
    quantizer: Literal["vq", "kl", "lfq"] = "vq"
    codebook_size: int = 8192
    l2_codes: bool = True
    commitment: float = 0.25
    kl_weight: float = 1e-6
    lfq_entropy_weight: float = 0.1
    dropout: float = 0.0

    @classmethod
    def micro(cls, **overrides: Any) -> OmniTokenizerConfig:
        """The smallest useful tokenizer (1 channel, width 32, one layer per stack, 4 latent channels), for tests
        and smoke runs; ``overrides`` replace any field."""
        sizes = dict(
            channels=1,
            patch=4,
            temporal_patch=2,
            dim=32,
            heads=2,
            head_dim=16,
            encoder_spatial="t",
            encoder_temporal_depth=1,
            decoder_temporal_depth=1,
            decoder_spatial_depth=1,
            latent_dim=4,
            codebook_size=64,
        )
        return cls(**{**sizes, **overrides})

    def __post_init__(self) -> None:
        sizes = ("channels", "patch", "temporal_patch", "dim", "heads", "head_dim", "window", "latent_dim")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        if self.head_dim % 2 or self.head_dim < 4:
            raise ValueError(f"head_dim must be even and ≥ 4 for the 2-D RoPE, got {self.head_dim}")
        if not self.encoder_spatial or set(self.encoder_spatial) - set(SPATIAL_BLOCKS):
            raise ValueError(
                f"encoder_spatial must be a non-empty string of 't'/'w', got {self.encoder_spatial!r}"
            )
        if self.quantizer not in ("vq", "kl", "lfq"):
            raise ValueError(f"quantizer must be 'vq', 'kl' or 'lfq', got {self.quantizer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def feedforward_dim(self) -> int:
        """GEGLU inner width ``int(4·⅔·d)``: the parameter count of a 4·d GELU MLP."""
        return int(4 * 2 / 3 * self.dim)

    @property
    def has_windows(self) -> bool:
        return "w" in self.encoder_spatial


# ----------------------------------------------------------------------------------------------------------
# Token layouts: (B, T', h, w, d) ↔ the sequences each attention flavour attends over
# ----------------------------------------------------------------------------------------------------------
def frames_to_sequences(x: Tensor) -> Tensor:
    """``(B, T, h, w, d) → (B·T, h·w, d)``: one raster-order sequence per frame."""
    return x.flatten(0, 1).flatten(1, 2)


def frames_to_windows(x: Tensor, window: int) -> Tensor:
    """``(B, T, h, w, d) → (B·T·n, window², d)``: one raster-order sequence per window (n windows per frame).

    Each window its own sequence rather than a frame-long one under a block-diagonal mask: the same
    attention, without computing the (h·w)² − n·window⁴ scores the mask would discard.
    """
    batch, frames, height, width, dim = x.shape
    x = x.reshape(batch * frames, height // window, window, width // window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, dim)


def windows_to_frames(x: Tensor, shape: torch.Size, window: int) -> Tensor:
    """Inverse of `frames_to_windows` for a ``(B, T, h, w, d)`` ``shape``."""
    batch, frames, height, width, dim = shape
    x = x.reshape(batch * frames, height // window, width // window, window, window, dim)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(shape)


def frames_to_timelines(x: Tensor) -> Tensor:
    """``(B, T, h, w, d) → (B·h·w, T, d)``: one sequence over time per spatial location."""
    return x.permute(0, 2, 3, 1, 4).flatten(0, 2)


def timelines_to_frames(x: Tensor, shape: torch.Size) -> Tensor:
    """Inverse of `frames_to_timelines` for a ``(B, T, h, w, d)`` ``shape``."""
    batch, frames, height, width, dim = shape
    return x.reshape(batch, height, width, frames, dim).permute(0, 3, 1, 2, 4)


def patchify(video: Tensor, frames_per_patch: int, patch: int) -> Tensor:
    """``(B, C, T, H, W) → (B, T/pt, H/p, W/p, pt·p·p·C)``, each patch flattened (time, row, column, channel)."""
    batch, channels, frames, height, width = video.shape
    x = video.reshape(
        batch,
        channels,
        frames // frames_per_patch,
        frames_per_patch,
        height // patch,
        patch,
        width // patch,
        patch,
    )
    x = x.permute(0, 2, 4, 6, 3, 5, 7, 1)
    patch_dim = (
        frames_per_patch * patch * patch * channels
    )  # explicit: a video with no tubelets has 0 elements
    return x.reshape(batch, frames // frames_per_patch, height // patch, width // patch, patch_dim)


def unpatchify(x: Tensor, frames_per_patch: int, patch: int, channels: int) -> Tensor:
    """Inverse of `patchify`: ``(B, T', h, w, pt·p·p·C) → (B, C, T'·pt, h·p, w·p)``."""
    batch, frames, height, width, _ = x.shape
    x = x.reshape(batch, frames, height, width, frames_per_patch, patch, patch, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(batch, channels, frames * frames_per_patch, height * patch, width * patch)


# ----------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------
class PatchEmbedding(nn.Module):
    """LayerNorm → Linear → LayerNorm on flattened patches (MAGVIT-v2 / OmniTokenizer)."""

    def __init__(self, patch_dim: int, dim: int) -> None:
        super().__init__()
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, dim)
        self.norm_out = nn.LayerNorm(dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.norm_out(self.proj(self.norm_in(patches)))


class PEG(nn.Module):
    """Positional encoding generator: a depth-wise 3×3×3 conv on ``(B, d, T', h, w)``.

    Time is padded with two past frames and no future one, so a token never sees later frames.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, kernel_size=3, groups=dim)

    def forward(self, x: Tensor) -> Tensor:
        grid = x.permute(0, 4, 1, 2, 3)
        grid = F.pad(grid, (1, 1, 1, 1, 2, 0))  # (w_left, w_right, h_top, h_bottom, t_past, t_future)
        return self.conv(grid).permute(0, 2, 3, 4, 1)


class Attention(nn.Module):
    """Pre-LN cosine-sim multi-head self-attention of one flavour over a ``(B, T', h, w, d)`` token grid.

    - ``global``: every token of a frame, 2-D RoPE;
    - ``window``: each ``window × window`` window of a frame as its own sequence, Swin's learned
      relative-position table as the bias;
    - ``temporal``: each spatial location over latent frames, causal mask and ALiBi.

    Per head: RoPE → l2-normalise q, k → learnable per-dimension scales → fixed logit scale 8 (the scales do
    not commute with the rotation, so the order is upstream's).
    """

    def __init__(self, config: OmniTokenizerConfig, kind: BlockKind) -> None:
        super().__init__()
        self.kind = kind
        self.heads, self.head_dim, self.window = config.heads, config.head_dim, config.window
        inner = config.heads * config.head_dim
        self.norm = nn.LayerNorm(config.dim, bias=False)
        self.to_qkv = nn.Linear(config.dim, 3 * inner, bias=False)
        self.q_scale = nn.Parameter(torch.ones(config.head_dim))
        self.k_scale = nn.Parameter(torch.ones(config.head_dim))
        self.proj = nn.Linear(inner, config.dim, bias=False)
        self.attend = Attend()
        self.relative_position = None
        self.alibi = None
        self.mask = None
        if kind == "window":
            self.relative_position = masks.RelativePositionBias(config.window, config.window, config.heads)
        elif kind == "temporal":
            self.alibi = masks.ALiBi(config.heads)
            self.mask = masks.causal()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, T', h, w, d) → (B, T', h, w, d)``, the residual branch (without the skip)."""
        height, width = x.shape[2], x.shape[3]
        tokens = self.norm(x)
        if self.kind == "global":
            sequences = frames_to_sequences(tokens)
        elif self.kind == "window":
            sequences = frames_to_windows(tokens, self.window)
        else:
            sequences = frames_to_timelines(tokens)

        q, k, v = self.to_qkv(sequences).unflatten(-1, (3, self.heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        if self.kind == "global":
            angles = rope_2d_angles(height, width, self.head_dim // 2, device=x.device)
            q, k = apply_rotary(q, angles), apply_rotary(k, angles)
        q = F.normalize(q, dim=-1) * self.q_scale
        k = F.normalize(k, dim=-1) * self.k_scale
        bias = self.relative_position if self.kind == "window" else self.alibi
        out = self.attend(q, k, v, self.mask, bias=bias, scale=LOGIT_SCALE)
        out = self.proj(out.transpose(1, 2).flatten(2))

        if self.kind == "global":
            return out.reshape(x.shape)
        if self.kind == "window":
            return windows_to_frames(out, x.shape, self.window)
        return timelines_to_frames(out, x.shape)


class FeedForward(nn.Module):
    """Pre-LN GEGLU MLP: LayerNorm → Linear(d → 2·inner) → GEGLU → Dropout → Linear(inner → d)."""

    def __init__(self, config: OmniTokenizerConfig) -> None:
        super().__init__()
        inner = config.feedforward_dim
        self.norm = nn.LayerNorm(config.dim, bias=False)
        self.up = nn.Linear(config.dim, 2 * inner, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.down = nn.Linear(inner, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        hidden, gate = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(self.dropout(hidden * F.gelu(gate)))


class Block(nn.Module):
    """``[PEG] → Attention → FeedForward``, each residual; window blocks have no PEG."""

    def __init__(self, config: OmniTokenizerConfig, kind: BlockKind) -> None:
        super().__init__()
        self.peg = PEG(config.dim) if kind != "window" else None
        self.attn = Attention(config, kind)
        self.ff = FeedForward(config)

    def forward(self, x: Tensor) -> Tensor:
        if self.peg is not None:
            x = x + self.peg(x)
        x = x + self.attn(x)
        return x + self.ff(x)


class Stack(nn.Module):
    """A sequence of blocks closed by a LayerNorm."""

    def __init__(self, config: OmniTokenizerConfig, kinds: list[BlockKind]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(config, kind) for kind in kinds)
        self.norm = nn.LayerNorm(config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def build_quantizer(config: OmniTokenizerConfig) -> Quantizer:
    """The bottleneck named by ``config.quantizer``; its ``in_channels`` sizes ``pre_quant``."""
    if config.quantizer == "vq":
        return EMAVectorQuantizer(
            config.codebook_size,
            config.latent_dim,
            commitment=config.commitment,
            l2_normalize=config.l2_codes,
        )
    if config.quantizer == "kl":
        return DiagonalGaussian(config.latent_dim, kl_weight=config.kl_weight)
    return LookupFreeQuantizer(
        config.latent_dim, commitment=config.commitment, entropy_weight=config.lfq_entropy_weight
    )


# ----------------------------------------------------------------------------------------------------------
# The tokenizer
# ----------------------------------------------------------------------------------------------------------
class OmniTokenizer(nn.Module):
    """Joint image–video tokenizer: causal spatial-temporal transformer encoder/decoder around a quantiser.

    Videos are ``(B, C, T, H, W)`` with ``T = 1 + k·t``; images ``(B, C, H, W)`` are one-frame videos and
    keep their image layout in every output (latents ``(B, c, h, w)``, reconstructions ``(B, C, H, W)``).
    """

    def __init__(self, config: OmniTokenizerConfig) -> None:
        super().__init__()
        self.config = config
        c, p, t, d = config.channels, config.patch, config.temporal_patch, config.dim
        self.first_frame_embedding = PatchEmbedding(c * p * p, d)
        self.tubelet_embedding = PatchEmbedding(c * t * p * p, d)
        self.encoder_spatial = Stack(config, [SPATIAL_BLOCKS[kind] for kind in config.encoder_spatial])
        self.encoder_temporal = Stack(config, ["temporal"] * config.encoder_temporal_depth)
        self.quantizer = build_quantizer(config)
        self.pre_quant = nn.Linear(d, self.quantizer.in_channels)
        self.post_quant = nn.Linear(config.latent_dim, d)
        self.decoder_temporal = Stack(config, ["temporal"] * config.decoder_temporal_depth)
        self.decoder_spatial = Stack(config, ["global"] * config.decoder_spatial_depth)
        self.first_frame_head = nn.Linear(d, c * p * p)
        self.tubelet_head = nn.Linear(d, c * t * p * p)
        name_attention_layers(self)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        """The latent grid ``(T', h, w)`` of a ``frames × height × width`` video (validated)."""
        self._check_size(frames, height, width)
        p = self.config.patch
        return 1 + (frames - 1) // self.config.temporal_patch, height // p, width // p

    def encode_latent(self, video: Tensor) -> Tensor:
        """The quantiser's input, channels first: ``(B, q, T', h, w)``, or ``(B, q, h, w)`` for an image.

        ``q`` is ``latent_dim``, or ``2·latent_dim`` (mean, log-variance) for the KL bottleneck.
        """
        video, is_image = self._as_video(video)
        tokens = self._embed(video)
        tokens = self.encoder_temporal(self.encoder_spatial(tokens))
        latent = self.pre_quant(tokens).permute(0, 4, 1, 2, 3)
        return latent[:, :, 0] if is_image else latent

    def encode(self, video: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Encode and quantise: ``(quantized latent (B, latent_dim, T', h, w), QuantizerOutput)``.

        Images give ``(B, latent_dim, h, w)`` latents and ``(B, h, w)`` indices.
        """
        quantized = self.quantizer(self.encode_latent(video))
        return quantized.quantized, quantized

    def decode(self, latent: Tensor) -> Tensor:
        """``(B, latent_dim, T', h, w) → (B, C, 1 + (T'−1)·t, h·p, w·p)``; a 4-D latent decodes to an image."""
        if not isinstance(latent, Tensor) or latent.dim() not in (4, 5) or not latent.is_floating_point():
            raise ValueError(
                "expected a floating latent (B, latent_dim, T', h, w) or (B, latent_dim, h, w), got "
                f"{_describe(latent)}"
            )
        if latent.shape[1] != self.config.latent_dim:
            raise ValueError(
                f"expected {self.config.latent_dim} latent channels on dim 1, got {latent.shape[1]} "
                f"in {tuple(latent.shape)}"
            )
        is_image = latent.dim() == 4
        grid = latent[:, :, None] if is_image else latent
        tokens = self.post_quant(grid.permute(0, 2, 3, 4, 1))
        tokens = self.decoder_spatial(self.decoder_temporal(tokens))
        c, p, t = self.config.channels, self.config.patch, self.config.temporal_patch
        first = unpatchify(self.first_frame_head(tokens[:, :1]), 1, p, c)
        later = unpatchify(self.tubelet_head(tokens[:, 1:]), t, p, c)
        video = torch.cat((first, later), dim=2)
        return video[:, :, 0] if is_image else video

    def forward(self, video: Tensor) -> tuple[Tensor, QuantizerOutput]:
        """Reconstruct ``video`` (or an image) through the bottleneck: ``(reconstruction, QuantizerOutput)``."""
        quantized, output = self.encode(video)
        return self.decode(quantized), output

    def _embed(self, video: Tensor) -> Tensor:
        """Frame 0 as p×p patches, the rest as t×p×p tubelets: ``(B, T', h, w, d)``."""
        p, t = self.config.patch, self.config.temporal_patch
        first = self.first_frame_embedding(patchify(video[:, :, :1], 1, p))
        later = self.tubelet_embedding(patchify(video[:, :, 1:], t, p))
        return torch.cat((first, later), dim=1)

    def _as_video(self, video: Tensor) -> tuple[Tensor, bool]:
        """Validate pixels; returns ``(B, C, T, H, W)`` and whether the input was an image."""
        if not isinstance(video, Tensor) or video.dim() not in (4, 5) or not video.is_floating_point():
            raise ValueError(
                f"expected a floating video (B, C, T, H, W) or image (B, C, H, W), got {_describe(video)}"
            )
        if video.shape[1] != self.config.channels:
            raise ValueError(
                f"expected {self.config.channels} channels on dim 1, got {video.shape[1]} in {tuple(video.shape)}"
            )
        is_image = video.dim() == 4
        if is_image:
            video = video[:, :, None]
        self._check_size(*video.shape[2:])
        return video, is_image

    def _check_size(self, frames: int, height: int, width: int) -> None:
        t, p = self.config.temporal_patch, self.config.patch
        if frames < 1 or (frames - 1) % t:
            raise ValueError(f"expected T = 1 + k·{t} frames (1, {1 + t}, {1 + 2 * t}, …), got T = {frames}")
        multiple = p * self.config.window if self.config.has_windows else p
        if height % multiple or width % multiple:
            why = f"patch {p} × window {self.config.window}" if self.config.has_windows else f"patch {p}"
            raise ValueError(f"expected H and W divisible by {multiple} ({why}), got H×W = {height}×{width}")


def _describe(x: object) -> str:
    return f"{x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
