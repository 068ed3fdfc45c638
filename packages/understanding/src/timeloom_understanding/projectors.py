"""Projectors: frame token grids → LLM-width visual tokens, plus what each token is (spec §2.2, §3.1).

A projector takes encoder features ``(B, T, N, C_v)`` on an ``(h, w)`` grid and returns visual tokens
``(B, N_v, D)`` with their `VisualTokens` description (frame or block, grid cell), which the layout needs.

- `MLPProjector` (LLaVA): optional ``pool × pool`` average pooling, then Linear–GELU–Linear; ``T·(h/p)(w/p)``
  tokens, frame by frame.
- `CCAMProjector` (Video-CCAM): ``Q`` learned queries cross-attend to the frames under the causal cross-attention
  mask (query ``i`` reads frames ``≤ b(i) = ⌊i·T/Q⌋``) and attend to each other block-causally; always ``Q``
  tokens, whatever ``T``.
- `SlowFastProjector` (LITA): per-frame means (fast) and a few pooled frames (slow), then the MLP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timeloom_kernels import attend
from timeloom_kernels.masks import Mask
from torch import Tensor, nn

from timeloom_understanding.layouts import (
    VISUAL,
    VisualTokens,
    ccam_blocks,
    ccam_cross_mask,
    ccam_query_mask,
)

__all__ = [
    "PROJECTORS",
    "CCAMProjector",
    "MLPProjector",
    "SlowFastProjector",
    "make_projector",
    "zero_output_layer",
]


class MLPProjector(nn.Module):
    """LLaVA's two-layer MLP, after an optional ``pool × pool`` average pooling of each frame's grid."""

    def __init__(self, in_dim: int, out_dim: int, pool: int = 1, hidden: int | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden or out_dim), nn.GELU(), nn.Linear(hidden or out_dim, out_dim)
        )

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]

    def num_tokens(self, frames: int, grid: tuple[int, int]) -> int:
        return frames * (grid[0] // self.pool) * (grid[1] // self.pool)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> tuple[Tensor, VisualTokens]:
        batch, frames, _, channels = features.shape
        height, width = grid
        if height % self.pool or width % self.pool:
            raise ValueError(f"a {height}x{width} token grid does not pool by {self.pool}")
        if self.pool > 1:
            maps = features.reshape(batch * frames, height, width, channels).permute(0, 3, 1, 2)
            maps = F.avg_pool2d(maps, self.pool)
            height, width = maps.shape[-2:]
            features = maps.permute(0, 2, 3, 1).reshape(batch, frames, height * width, channels)
        tokens = self.net(features.reshape(batch, frames * height * width, channels))
        return tokens, VisualTokens.grid(frames, height, width)


class Attention(nn.Module):
    """Multi-head attention through `timeloom_kernels.attend`; ``context`` None is self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} does not split into {heads} heads")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Mask, context: Tensor | None = None) -> Tensor:
        source = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(
            1, 2
        )  # (B, L, D) → (B, heads, L, D/heads)
        q, (k, v) = split(self.q(x)), (split(t) for t in self.kv(source).chunk(2, dim=-1))
        return self.out(attend(q, k, v, mask).transpose(1, 2).flatten(-2))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class CCAMLayer(nn.Module):
    """Pre-norm: block-causal query self-attention, causal cross-attention to the frames, SwiGLU."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.self_norm, self.cross_norm, self.mlp_norm = (
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
            nn.LayerNorm(dim),
        )
        self.self_attention = Attention(dim, heads)
        self.cross_attention = Attention(dim, heads)
        self.mlp = SwiGLU(dim, mlp_hidden)

    def forward(self, queries: Tensor, frames: Tensor, self_mask: Mask, cross_mask: Mask) -> Tensor:
        queries = queries + self.self_attention(self.self_norm(queries), self_mask)
        queries = queries + self.cross_attention(self.cross_norm(queries), cross_mask, context=frames)
        return queries + self.mlp(self.mlp_norm(queries))


class CCAMProjector(nn.Module):
    """Video-CCAM: ``Q`` learned queries read the frames through causal cross-attention masks.

    Order comes from the masks alone (no frame embedding), so the output is always ``Q`` tokens and a model
    trained on few frames runs on more (up to ``Q``).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_queries: int = 64,
        width: int = 128,
        heads: int = 4,
        layers: int = 2,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.frames_in = nn.Linear(in_dim, width)  # K, V = Linear(F)
        self.layers = nn.ModuleList(CCAMLayer(width, heads, int(width * mlp_ratio)) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, out_dim)

    @property
    def output_layer(self) -> nn.Linear:
        return self.out

    def num_tokens(self, frames: int, grid: tuple[int, int]) -> int:
        return self.num_queries

    def forward(self, features: Tensor, grid: tuple[int, int]) -> tuple[Tensor, VisualTokens]:
        batch, frames, per_frame, _ = features.shape
        blocks = ccam_blocks(self.num_queries, frames)  # raises for more frames than queries
        self_mask = ccam_query_mask(self.num_queries, frames)
        cross_mask = ccam_cross_mask(self.num_queries, frames, per_frame)
        memory = self.frames_in(features).reshape(batch, frames * per_frame, -1)
        queries = self.queries.expand(batch, -1, -1)
        for layer in self.layers:
            queries = layer(queries, memory, self_mask, cross_mask)
        return self.out(self.norm(queries)), VisualTokens.queries(blocks)


class SlowFastProjector(nn.Module):
    """LITA's SlowFast tokens, then LLaVA's MLP on each.

    Fast: every frame's spatial mean (``T`` tokens, no grid). Slow: ``s`` frames at
    ``round(linspace(0, T−1, s))`` (``s = min(slow_frames, T)``, so no frame twice), each ``pool × pool``
    average-pooled (``s·(h/p)(w/p)`` tokens on a grid). Fast tokens come first (our choice; upstream's order
    is unverified). LITA: T = 100 on 16×16 → 100 + 4·64 = 356 tokens. The slow frames depend on ``T``, so
    a stream cannot reuse them as frames arrive.
    """

    def __init__(
        self, in_dim: int, out_dim: int, slow_frames: int = 4, pool: int = 2, hidden: int | None = None
    ) -> None:
        super().__init__()
        self.slow_frames, self.pool = slow_frames, pool
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden or out_dim), nn.GELU(), nn.Linear(hidden or out_dim, out_dim)
        )

    def slow_indices(self, frames: int) -> Tensor:
        count = min(self.slow_frames, frames)
        return torch.linspace(0, frames - 1, count).round().long()

    @property
    def output_layer(self) -> nn.Linear:
        return self.net[-1]

    def num_tokens(self, frames: int, grid: tuple[int, int]) -> int:
        return frames + len(self.slow_indices(frames)) * (grid[0] // self.pool) * (grid[1] // self.pool)

    def forward(self, features: Tensor, grid: tuple[int, int]) -> tuple[Tensor, VisualTokens]:
        batch, frames, _, channels = features.shape
        height, width = grid
        if height % self.pool or width % self.pool:
            raise ValueError(f"a {height}x{width} token grid does not pool by {self.pool}")
        fast = features.mean(dim=2)  # (B, T, C)
        slow_frames = self.slow_indices(frames)
        maps = features[:, slow_frames].reshape(-1, height, width, channels).permute(0, 3, 1, 2)
        maps = F.avg_pool2d(maps, self.pool)
        slow = maps.permute(0, 2, 3, 1).reshape(batch, -1, channels)  # frame by frame, raster order
        tokens = self.net(torch.cat((fast, slow), dim=1))
        pooled = VisualTokens.grid(len(slow_frames), height // self.pool, width // self.pool)
        no_grid = torch.full((frames,), -1)
        visual = VisualTokens(
            kind=torch.cat((torch.full((frames,), VISUAL), pooled.kind)),
            frame=torch.cat((torch.arange(frames), slow_frames[pooled.frame])),
            row=torch.cat((no_grid, pooled.row)),
            col=torch.cat((no_grid, pooled.col)),
        )
        return tokens, visual


PROJECTORS: dict[str, type[nn.Module]] = {
    "mlp": MLPProjector,
    "ccam": CCAMProjector,
    "slowfast": SlowFastProjector,
}


def make_projector(name: str, in_dim: int, out_dim: int, **options) -> nn.Module:
    """A projector by name (``mlp``, ``ccam``, ``slowfast`` or ``memory``) with its options."""
    if name == "memory":  # imported here: it wraps the MLP and needs the optional timeloom-memory package
        from timeloom_understanding.memory_projector import MemoryProjector

        return MemoryProjector(in_dim, out_dim, **options)
    if name not in PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; choose one of {sorted([*PROJECTORS, 'memory'])}")
    return PROJECTORS[name](in_dim, out_dim, **options)


def zero_output_layer(projector: nn.Module) -> None:
    """Zero the projector's last linear layer: its tokens start at zero, so a projector added beside another
    changes nothing until it learns (the gradient reaches that layer's weight at once)."""
    if not hasattr(projector, "output_layer"):
        raise ValueError(
            f"{type(projector).__name__} has no single output layer to zero; use mlp, ccam or slowfast"
        )
    nn.init.zeros_(projector.output_layer.weight)
    nn.init.zeros_(projector.output_layer.bias)
