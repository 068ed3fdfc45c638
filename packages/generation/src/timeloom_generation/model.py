"""CausalSTDiT: a causal spatial-temporal diffusion transformer over latent videos (spec §3).

Latents ``(B, C, F, H, W)`` become ``n_s = (H/p)·(W/p)`` tokens per frame. Every block is, in order,

    spatial attention   within one frame            (B·F, heads, n_s, d)   adaLN-modulated, gated
    temporal attention  causal over frames          (B·n_s, heads, F, d)   RMS qk-norm, 1-D RoPE on frame index
    cross-attention     frame tokens -> text tokens (B, heads, F·n_s, L), or (B·F, heads, n_s, L) per frame
    MLP                 per token                                          adaLN-modulated, gated

Unlike STDiT, the temporal and cross-attention inputs are layer-normalised (without affine terms): the
residual stream's scale then cannot change what those layers see, which keeps the tiny models stable.

Noise levels are per frame (``tau (B, F)``, adaLN-single: one shared projection of the timestep embedding
plus a learned table per block), so clean prompt frames (``tau = 0``) and noisy frames share one sequence.

Causality: only the temporal attention mixes frames, and it is causal, so the output at frame ``t`` depends
only on the inputs (values, tau, text, positions) of frames ``<= t``. The KV cache rests on this: a clean
frame's temporal keys and values, once written, are the same at every later step. With ``cache`` given, the
temporal layers attend over ``[cached frames; these frames]`` (`KVCache.fetch_with`, which copies only these
frames' keys at each denoising step) and, when ``write`` is set, append these frames' keys and values (after
qk-norm; keys rotated by their absolute frame index, which never changes, so the cache needs no re-rotation
and no re-basing). What is the same for every block (RoPE angles, text rows) is computed once per forward.

Every attention goes through a named `timeloom_kernels.Attend` (``blocks.{i}.spatial.attend``,
``blocks.{i}.temporal.attend``, ``blocks.{i}.cross.attend``), so sampling-time processors can hook them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timeloom_kernels import Attend, KVCache, KVCacheStack, Mask, masks, name_attention_layers
from timeloom_kernels.positions import apply_rotary, rope_angles
from torch import Tensor, nn

__all__ = ["CausalSTDiT", "CausalSTDiTConfig"]


@dataclass
class CausalSTDiTConfig:
    """Sizes of a `CausalSTDiT`. Defaults are the tiny CPU model; `configs/generation/vdm-base.yaml` is paper size.

    Attributes:
        in_channels: latent channels ``C`` (pixel channels when diffusing pixels).
        patch: spatial patch side ``p`` (patches are ``1 x p x p``: never across frames, to keep causality).
        width: token width ``d``.
        depth: number of blocks.
        heads: attention heads (``width / heads`` must be even, for RoPE).
        mlp_ratio: MLP hidden width over ``d``.
        text_tokens: text context length ``L_txt`` (the null embedding's length).
    """

    in_channels: int = 1
    patch: int = 4
    width: int = 96
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    text_tokens: int = 16

    def __post_init__(self) -> None:
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(
                f"width {self.width} must split into {self.heads} heads of an even size (RoPE pairs dims)"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_embedding(tau: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``1000·tau`` (any shape ``(...)`` -> ``(..., dim)``), as DiT does for t."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, device=tau.device, dtype=torch.float32) / half
    )
    angles = 1000.0 * tau.float().unsqueeze(-1) * freqs
    return torch.cat((angles.cos(), angles.sin()), dim=-1)


@functools.lru_cache(maxsize=16)
def sincos_2d(height: int, width: int, dim: int) -> Tensor:
    """Fixed 2-D sin-cos embedding of a row-major ``height x width`` grid: ``(height·width, dim)``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    parts = []
    for coord in (rows.reshape(-1), cols.reshape(-1)):
        angles = coord.double().unsqueeze(-1) * omega
        parts += [angles.sin(), angles.cos()]
    embedding = torch.cat(parts, dim=-1).float()
    return F.pad(embedding, (0, dim - embedding.shape[-1]))


class SpatialAttention(nn.Module):
    """Full attention among the ``n_s`` tokens of one frame."""

    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.out = nn.Linear(config.width, config.width)
        self.attend = Attend()

    def forward(self, x: Tensor) -> Tensor:  # (B·F, n_s, d)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.out(self.attend(q, k, v).transpose(1, 2).flatten(2))


class TemporalAttention(nn.Module):
    """Causal attention over frames at each spatial location, with RMS qk-norm and 1-D RoPE on frame index.

    The output projection starts at zero, so a fresh block is a per-frame image model (as in STDiT).
    """

    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm = nn.LayerNorm(config.width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(config.width, 3 * config.width)
        self.q_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
        self.k_norm = nn.RMSNorm(config.head_dim, eps=1e-6)
        self.out = nn.Linear(config.width, config.width)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.attend = Attend()

    def forward(
        self,
        x: Tensor,
        positions: Tensor,
        angles: Tensor,
        mask: Mask,
        cache: KVCache | None = None,
        write: bool = False,
    ) -> Tensor:
        """``x (B·n_s, F, d)``; ``positions (F,)`` absolute frame indices and their RoPE ``angles``;
        ``mask`` over frame indices."""
        q, k, v = self.qkv(self.norm(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(self.q_norm(q), angles), apply_rotary(self.k_norm(k), angles)
        keys, values, key_positions = k, v, positions
        if cache is not None:
            # a staging buffer, not the cache's slots: the append below cannot overwrite what we attend to
            keys, values, key_positions, _ = cache.fetch_with(k, v, positions)
            key_positions = key_positions[0]
            if write:  # rotated by absolute frame index once: no denoising step re-rotates the cache
                cache.append(k, v, positions)
        out = self.attend(q, keys, values, mask, q_pos=positions, kv_pos=key_positions)
        return self.out(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    """Each frame's tokens attend to that frame's text context.

    A context shared by all frames is projected once per video, and the video's ``F·n_s`` tokens query it as
    one sequence (the same result as per frame, without F copies of the text's keys and values).
    """

    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.norm = nn.LayerNorm(config.width, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(config.width, config.width)
        self.kv = nn.Linear(config.width, 2 * config.width)
        self.out = nn.Linear(config.width, config.width)
        self.attend = Attend()

    def forward(self, x: Tensor, text: Tensor) -> Tensor:
        """``x (B, F, n_s, d)``; ``text (B, L, d)`` shared by the frames or ``(B, F, L, d)`` per frame."""
        shared = text.dim() == 3
        queries, context = (x.flatten(1, 2), text) if shared else (x.flatten(0, 1), text.flatten(0, 1))
        q = self.q(self.norm(queries)).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        k, v = self.kv(context).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)
        return self.out(self.attend(q, k, v).transpose(1, 2).flatten(2)).view_as(x)


class MLP(nn.Module):
    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        hidden = int(config.width * config.mlp_ratio)
        self.fc = nn.Linear(config.width, hidden)
        self.proj = nn.Linear(hidden, config.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    """Spatial -> causal temporal -> cross-attention -> MLP, with per-frame adaLN-single modulation."""

    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(config.width, elementwise_affine=False, eps=1e-6)
        self.spatial = SpatialAttention(config)
        self.temporal = TemporalAttention(config)
        self.cross = CrossAttention(config)
        self.norm2 = nn.LayerNorm(config.width, elementwise_affine=False, eps=1e-6)
        self.mlp = MLP(config)
        # PixArt-alpha's adaLN-single: this block's offsets to the shared timestep modulation.
        self.modulation = nn.Parameter(torch.randn(6, config.width) / config.width**0.5)

    def forward(
        self,
        x: Tensor,
        time: Tensor,
        text: Tensor,
        positions: Tensor,
        angles: Tensor,
        mask: Mask,
        cache: KVCache | None = None,
        write: bool = False,
    ) -> Tensor:
        """``x (B, F, n_s, d)``; ``time (B, F, 6, d)``; ``text (B, L, d)`` or ``(B, F, L, d)``."""
        batch, frames, tokens, width = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (time + self.modulation).unsqueeze(3).unbind(2)
        spatial = self.spatial(modulate(self.norm1(x), shift1, scale1).flatten(0, 1))
        x = x + gate1 * spatial.view_as(x)
        # temporal layout: one sequence of frames per spatial location
        temporal = self.temporal(x.transpose(1, 2).flatten(0, 1), positions, angles, mask, cache, write)
        x = x + gate1 * temporal.view(batch, tokens, frames, width).transpose(1, 2)
        x = x + self.cross(x, text)
        return x + gate2 * self.mlp(modulate(self.norm2(x), shift2, scale2))


class CausalSTDiT(nn.Module):
    """Predicts the flow velocity ``eps - x0`` of latents ``x (B, C, F, H, W)`` at per-frame levels ``tau``."""

    def __init__(self, config: CausalSTDiTConfig) -> None:
        super().__init__()
        self.config = config
        d, p = config.width, config.patch
        self.patch_embed = nn.Linear(config.in_channels * p * p, d)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.time_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        nn.init.zeros_(self.time_modulation[1].weight)
        nn.init.zeros_(self.time_modulation[1].bias)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Parameter(torch.randn(2, d) / d**0.5)
        self.final = nn.Linear(d, config.in_channels * p * p)
        nn.init.zeros_(self.final.weight)
        nn.init.zeros_(self.final.bias)
        self.layer_names = name_attention_layers(self)

    def new_cache(
        self, batch: int, grid: tuple[int, int], frames: int, device=None, dtype=torch.float32
    ) -> KVCacheStack:
        """An empty temporal KV cache for ``batch`` videos of latent ``grid (H, W)``, FIFO over ``frames``."""
        height, width = grid
        tokens = (height // self.config.patch) * (width // self.config.patch)
        return KVCacheStack(
            self.config.depth,
            batch * tokens,
            self.config.heads,
            self.config.head_dim,
            max_len=frames,
            dtype=dtype,
            device=device,
        )

    def check_input(self, x: Tensor, tau: Tensor, text: Tensor) -> None:
        """Raise a `ValueError` naming the mismatch before any compute."""
        c, p = self.config.in_channels, self.config.patch
        if x.dim() != 5 or x.shape[1] != c or x.shape[3] % p or x.shape[4] % p:
            raise ValueError(
                f"latents must be (B, {c}, F, H, W) with H and W multiples of the patch {p}; got {tuple(x.shape)}"
            )
        batch, _, frames = x.shape[:3]
        if tau.shape != (batch, frames):
            raise ValueError(f"tau must be per frame, (B, F) = ({batch}, {frames}); got {tuple(tau.shape)}")
        shared = (batch, self.config.text_tokens, self.config.width)
        if text.shape not in (shared, (batch, frames, *shared[1:])):
            raise ValueError(f"text must be {shared} or per frame (B, F, L, d); got {tuple(text.shape)}")

    def forward(
        self,
        x: Tensor,
        tau: Tensor,
        text: Tensor,
        positions: Tensor | None = None,
        mask: Mask | None = None,
        cache: KVCacheStack | None = None,
        write: bool = False,
    ) -> Tensor:
        """Velocity ``(B, C, F, H, W)``.

        Args:
            x: latents ``(B, C, F, H, W)``.
            tau: noise level per frame ``(B, F)`` in ``[0, 1]`` (0 = clean prompt frame).
            text: projected text context ``(B, L, d)`` shared by all frames, or ``(B, F, L, d)`` per frame.
            positions: absolute frame indices ``(F,)`` int64; default ``0..F-1``.
            mask: temporal mask over frame indices; default causal (with a cache: causal over cache + frames).
            cache: temporal KV cache from `new_cache`; its frames precede these.
            write: append these frames' temporal keys/values to ``cache``.
        """
        self.check_input(x, tau, text)
        batch, channels, frames, height, width = x.shape
        p, d = self.config.patch, self.config.width
        h, w = height // p, width // p
        if positions is None:
            positions = torch.arange(frames, device=x.device)
        mask = masks.causal() if mask is None else mask
        patches = x.view(batch, channels, frames, h, p, w, p).permute(0, 2, 3, 5, 1, 4, 6)
        tokens = self.patch_embed(patches.reshape(batch, frames, h * w, channels * p * p))
        tokens = tokens + sincos_2d(h, w, d).to(tokens)
        time = self.time_embed(timestep_embedding(tau, d).to(tokens))  # (B, F, d)
        block_time = self.time_modulation(time).unflatten(-1, (6, d))
        # what `apply_rope` would compute in every block: the angles in the rotation's dtype
        rotation_dtype = torch.promote_types(tokens.dtype, torch.float32)
        angles = rope_angles(positions.to(rotation_dtype), self.config.head_dim // 2)
        for index, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[index]
            tokens = block(tokens, block_time, text, positions, angles, mask, layer_cache, write)
        shift, scale = (time.unsqueeze(2) + self.final_modulation).unsqueeze(3).unbind(2)
        out = self.final(modulate(self.final_norm(tokens), shift, scale))
        out = out.view(batch, frames, h, w, channels, p, p).permute(0, 4, 1, 2, 5, 3, 6)
        return out.reshape(batch, channels, frames, height, width)
