"""Titans language models (Behrouz, Zhong, Mirrokni, arXiv 2501.00663 §4), nanoGPT style, spec §2.4–2.5.

One residual stack, one block kind per model (pre-norm, RMSNorm, a SwiGLU FFN after each mixer):

- ``lmm``: ``x ← x + Mem(norm x)`` — the memory alone as a sequence layer.
- ``mac`` (memory as context): per segment of ``segment`` tokens, retrieve ``h = M*(x_s)`` with the memory of
  the previous segments, attend from ``x_s`` to ``[P ‖ h ‖ x_s]`` (token i sees P and ``h_j``, ``x_j``, j ≤ i),
  store the attention output ``y`` (or ``x_s + y``: `TitansConfig.mac_store`) in the memory, and gate ``y``
  with the memory's read-after-write ``m``.
- ``mag`` (memory as gate): sliding-window attention with the persistent prefix beside the memory on
  ``[P ‖ x]``, combined by the same gate.
- ``mal`` (memory as layer): the memory on ``[P ‖ x]``, then sliding-window attention on its output.
- ``hcam``: sliding-window attention plus an HCAM read of the completed chunks (`timeloom_memory.hcam`).
- ``attention`` / ``swa``: the baselines, full causal and sliding-window attention with the prefix.

Every attention goes through `timeloom_kernels.attend` with a kernel mask. Persistent tokens (Eq. 19) are
``N_p`` learned vectors prepended as a prefix every query sees; a memory branch reads them once, at stream
start, and their output positions are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F
from timeloom_kernels import KVCache, attend, masks
from timeloom_kernels.positions import apply_rope
from torch import Tensor, nn

from timeloom_memory.hcam import HCAMAttention, HCAMState
from timeloom_memory.neural_memory import NeuralMemory, NeuralMemoryConfig, NeuralMemoryState

__all__ = ["BLOCKS", "BlockState", "TitansConfig", "TitansLM"]

BLOCKS = ("lmm", "mac", "mag", "mal", "hcam", "attention", "swa")
BlockKind = Literal["lmm", "mac", "mag", "mal", "hcam", "attention", "swa"]


@dataclass
class TitansConfig:
    """Sizes of a `TitansLM`.

    Args:
        vocab_size: tokens of the embedding and the head.
        dim: residual width.
        depth: residual blocks.
        heads: attention heads.
        block: the block kind (module docstring).
        memory_layers: indices of the blocks that carry memory (default: all); the others are ``swa`` for
            ``mag``/``mal`` and ``attention`` for ``mac``/``lmm``.
        persistent_tokens: ``N_p``, learned prefix vectors per block.
        segment: MAC segment length ``C`` (the memory's chunk size must divide it).
        window: sliding-window length of ``mag``, ``mal``, ``hcam`` and ``swa``.
        hcam_chunk_size, hcam_top_k: HCAM's chunk length ``C`` and chunks read per query ``k``.
        gate_sigmoid_on: which branch of MAC/MAG's gate ``W_O(norm(y) ⊗ norm(m))`` goes through the sigmoid:
            ``"memory"`` (``norm(y) ⊙ σ(norm(m))``) or ``"attention"`` (``σ(norm(y)) ⊙ norm(m)``). The paper
            says only "a non-linearity"; with σ on the memory, a value the window cannot see reaches the
            output only as a multiplier of the attention's features.
        mac_store: what MAC's memory stores and reads after writing: ``"attention"``, the attention output ``y``
            (Eq. 24 read literally), or ``"stream"``, ``x_s + y`` (the segment's normed input plus ``y``, as a
            residual sub-layer's output would be). Our reading of MQAR (benchmarks/memory-quality.md, stop 18): at
            initialisation ``y`` is a blend of the segment, so with ``"attention"`` the memory cannot tell tokens
            apart until the attention has learnt to; with ``"stream"`` it sees each token from the first step.
        mal_attend: what MAL's attention reads: ``"memory"``, the memory's output (Eq. 30); ``"stream"``, the
            normed input plus the memory's output; or ``"residual"``, the RMSNorm of the residual stream after the
            memory's output is added to it (the memory and the attention as two residual sub-layers, as hybrid
            stacks such as H3 and Samba place their layers; the memory's read then reaches the head directly). On
            MQAR seq 256, ``"residual"`` reaches 0.99 once the first training stage runs at ``window=1``, where only
            the memory can answer (configs/memory/titans-mal-delta-tiny.yaml; benchmarks/memory-quality.md, stop 20).
        ffn_mult: SwiGLU hidden width in multiples of ``dim``; 0 = no FFN (Zoology's MQAR harness).
        tie_embeddings: the head reuses the embedding matrix.
        memory: the neural memory's options (its ``dim`` is set to ``dim``).
    """

    vocab_size: int = 256
    dim: int = 64
    depth: int = 2
    heads: int = 2
    block: BlockKind = "mac"
    memory_layers: list[int] | None = None
    persistent_tokens: int = 4
    segment: int = 32
    window: int = 32
    hcam_chunk_size: int = 16
    hcam_top_k: int = 4
    gate_sigmoid_on: Literal["memory", "attention"] = "memory"
    mac_store: Literal["attention", "stream"] = "attention"
    mal_attend: Literal["memory", "stream", "residual"] = "memory"
    ffn_mult: float = 4.0
    tie_embeddings: bool = True
    memory: NeuralMemoryConfig = field(default_factory=NeuralMemoryConfig)

    def __post_init__(self) -> None:
        if isinstance(self.memory, dict):
            self.memory = NeuralMemoryConfig(**self.memory)
        if self.block not in BLOCKS:
            raise ValueError(f"TitansConfig.block must be one of {BLOCKS}; got {self.block!r}")
        for name, allowed in (
            ("gate_sigmoid_on", ("memory", "attention")),
            ("mac_store", ("attention", "stream")),
            ("mal_attend", ("memory", "stream", "residual")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"TitansConfig.{name} must be one of {allowed}; got {getattr(self, name)!r}")
        if self.dim % self.heads:
            raise ValueError(f"TitansConfig.dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.block == "mac" and self.segment % self.memory.chunk_size:
            raise ValueError(
                f"MAC needs memory.chunk_size ({self.memory.chunk_size}) to divide segment ({self.segment})"
            )
        for layer in self.memory_layers or []:
            if not 0 <= layer < self.depth:
                raise ValueError(f"TitansConfig.memory_layers holds {layer}, outside 0..{self.depth - 1}")
        self.memory = replace(self.memory, dim=self.dim)

    def kind_of(self, layer: int) -> str:
        if self.block in ("attention", "swa") or self.memory_layers is None or layer in self.memory_layers:
            return self.block
        return "swa" if self.block in ("mag", "mal", "hcam") else "attention"


# --------------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, an optional prefix, and MAC's interleaved memory tokens."""

    def __init__(self, dim: int, heads: int, window: int | None = None):
        super().__init__()
        self.heads, self.window = heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def _split(self, t: Tensor) -> Tensor:
        b, n, d = t.shape
        return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(
        self,
        x: Tensor,
        prefix: Tensor | None = None,
        memory: Tensor | None = None,
        cache: KVCache | None = None,
        start: int = 0,
    ) -> Tensor:
        """``x (B, L, d)`` at stream positions ``start…``; ``prefix (B|1, P, d)`` seen by every query;
        ``memory (B, L, d)``: token i also sees ``memory_j`` for j ≤ i (MAC's retrieved vectors); ``cache``:
        the last ``window − 1`` keys and values of the stream, read and then updated."""
        b, n, _ = x.shape
        h = self.heads
        positions = torch.arange(start, start + n, device=x.device)
        q, k, v = (self._split(t) for t in self.qkv(x).chunk(3, dim=-1))
        if memory is None:
            q, k = apply_rope(torch.cat([q, k], 1), positions).split(h, 1)  # one rotation for both
        else:
            _, mk, mv = (self._split(t) for t in self.qkv(memory).chunk(3, dim=-1))
            q, k, mk = apply_rope(torch.cat([q, k, mk], 1), positions).split(h, 1)
        q_pos = kv_pos = positions
        if memory is not None:
            # Interleave h_0 x_0 h_1 x_1 …: at positions 2j and 2j+1 a plain causal mask shows query x_i
            # exactly h_j and x_j for j ≤ i.
            k = torch.stack([mk, k], 3).flatten(2, 3)
            v = torch.stack([mv, v], 3).flatten(2, 3)
            q_pos, kv_pos = 2 * positions + 1, torch.arange(2 * start, 2 * (start + n), device=x.device)
        if cache is not None:
            past, keep = cache.fetch(), min(n, cache.max_len)
            # The cache holds the stream's dtype; under autocast k, v come in the compute dtype.
            new_k, new_v = (t[:, :, n - keep :].detach().to(cache.k.dtype) for t in (k, v))
            # Concatenate before appending: `fetch` returns views of the ring buffer that `append` overwrites.
            k, v = torch.cat([past.k.to(k.dtype), k], 2), torch.cat([past.v.to(v.dtype), v], 2)
            kv_pos = torch.cat([past.positions[0], kv_pos])
            cache.append(new_k, new_v, positions[n - keep :])
        num_prefix = 0 if prefix is None else prefix.shape[1]
        if num_prefix:
            _, pk, pv = (self._split(t) for t in self.qkv(prefix).chunk(3, dim=-1))
            k = torch.cat([pk.expand(b, -1, -1, -1), k], 2)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], 2)
            q_pos = q_pos + num_prefix
            kv_pos = torch.cat([torch.arange(num_prefix, device=x.device), kv_pos + num_prefix])
        local = masks.sliding_window(self.window) if self.window else masks.causal()
        mask = masks.prefix(num_prefix, masks.causal(), local) if num_prefix else local
        y = attend(q, k, v, mask, q_pos=q_pos, kv_pos=kv_pos)
        return self.out(y.transpose(1, 2).reshape(b, n, -1))

    def new_cache(self, x: Tensor) -> KVCache | None:
        """A window cache for streaming (None for full attention, which keeps no cache here)."""
        if not self.window or self.window < 2:
            return None
        d = x.shape[-1] // self.heads
        return KVCache(x.shape[0], self.heads, d, max_len=self.window - 1, dtype=x.dtype, device=x.device)


class MemoryGate(nn.Module):
    """MAC/MAG's output: ``W_O(RMSNorm_a(y) ⊙ σ(RMSNorm_b(m)))``, or with σ on the attention branch
    ``W_O(σ(RMSNorm_a(y)) ⊙ RMSNorm_b(m))`` (`TitansConfig.gate_sigmoid_on`)."""

    def __init__(self, dim: int, sigmoid_on: str = "memory"):
        super().__init__()
        self.norm_y, self.norm_m = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.out = nn.Linear(dim, dim, bias=False)
        self.sigmoid_on = sigmoid_on

    def forward(self, y: Tensor, m: Tensor) -> Tensor:
        y, m = self.norm_y(y), self.norm_m(m)
        return self.out(y * torch.sigmoid(m) if self.sigmoid_on == "memory" else torch.sigmoid(y) * m)


# --------------------------------------------------------------------------------------------------------
# The block
# --------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    """One pre-norm residual block of kind ``kind``; ``forward(x, state) -> (x, state)``."""

    def __init__(self, config: TitansConfig, kind: str):
        super().__init__()
        self.kind, self.config = kind, config
        d = config.dim
        self.norm = nn.RMSNorm(d)
        self.persistent = (
            nn.Parameter(torch.randn(1, config.persistent_tokens, d) * 0.02)
            if config.persistent_tokens
            else None
        )
        window = config.window if kind in ("swa", "mag", "mal", "hcam") else None
        self.attention = Attention(d, config.heads, window) if kind != "lmm" else None
        self.memory = NeuralMemory(config.memory) if kind in ("lmm", "mac", "mag", "mal") else None
        self.gate = MemoryGate(d, config.gate_sigmoid_on) if kind in ("mac", "mag") else None
        self.attention_norm = nn.RMSNorm(d) if kind == "mal" and config.mal_attend == "residual" else None
        self.hcam = (
            HCAMAttention(d, config.heads, config.hcam_chunk_size, config.hcam_top_k)
            if kind == "hcam"
            else None
        )
        hidden = int(config.ffn_mult * d)
        self.ffn_norm = nn.RMSNorm(d) if hidden else None
        self.ffn = SwiGLU(d, hidden) if hidden else None

    def _remember(self, h: Tensor, state: NeuralMemoryState | None) -> tuple[Tensor, NeuralMemoryState]:
        """The memory over ``[P ‖ h]`` at stream start (P's outputs dropped), over ``h`` afterwards."""
        if state is not None or self.persistent is None:
            return self.memory(h, state)
        p = self.persistent.expand(h.shape[0], -1, -1).to(h.dtype)
        m, state = self.memory(torch.cat([p, h], 1), None)
        return m[:, p.shape[1] :], state

    def _mac(self, h: Tensor, state: NeuralMemoryState | None) -> tuple[Tensor, NeuralMemoryState]:
        c = self.config.segment
        if state is None:
            state = self.memory.init_state(h.shape[0], h.device, _state_dtype(h.dtype))
        if state.position % c:
            raise ValueError(
                f"MAC continues a stream only at segment boundaries ({c}); it is at {state.position}"
            )
        outputs = []
        for start in range(0, h.shape[1], c):
            segment = h[:, start : start + c]
            retrieved = self.memory.retrieve(segment, state)  # memory of the previous segments
            y = self.attention(segment, self.persistent, memory=retrieved)
            stored = y if self.config.mac_store == "attention" else segment + y
            m, state = self.memory(stored, state)  # read after write
            outputs.append(self.gate(y, m))
        return torch.cat(outputs, 1), state

    def forward(self, x: Tensor, state: BlockState | None = None) -> tuple[Tensor, BlockState]:
        if state is None:
            state = BlockState(cache=self.attention.new_cache(x) if self.attention is not None else None)
        elif self.kind == "attention":
            raise ValueError(
                "full causal attention keeps no cache: stream with lmm, mac, mag, mal, hcam or swa"
            )
        h, memory, start = self.norm(x), state.memory, state.position
        prefix = self.persistent
        if self.kind == "swa":
            out = self.attention(h, prefix, cache=state.cache, start=start)
        elif self.kind == "attention":
            out = self.attention(h, prefix)
        elif self.kind == "lmm":
            out, memory = self._remember(h, memory)
        elif self.kind == "mac":
            out, memory = self._mac(h, memory)
        elif self.kind == "hcam":
            read, memory = self.hcam(h, memory)
            out = self.attention(h, prefix, cache=state.cache, start=start) + read
        elif self.kind == "mag":
            m, memory = self._remember(h, memory)
            out = self.gate(self.attention(h, prefix, cache=state.cache, start=start), m)
        else:  # mal: the memory's outputs at P positions become the attention's prefix for the whole stream
            first = memory is None and prefix is not None  # at stream start the memory reads [P ‖ h]
            p = prefix.expand(h.shape[0], -1, -1).to(h.dtype) if first else None
            z = torch.cat([p, h], 1) if first else h
            y, memory = self.memory(z, memory)
            if self.config.mal_attend == "residual":  # x ← x + Mem(norm x), then the attention reads norm x
                stream = (torch.cat([p, x], 1) if first else x) + y
                x = stream[:, prefix.shape[1] :] if first else stream
                y = self.attention_norm(stream)
            elif self.config.mal_attend == "stream":
                y = z + y
            if first:
                state = replace(state, prefix=y[:, : prefix.shape[1]])
                y = y[:, prefix.shape[1] :]
            out = self.attention(y, state.prefix, cache=state.cache, start=start)
        x = x + out
        if self.ffn is not None:
            x = x + self.ffn(self.ffn_norm(x))
        return x, replace(state, memory=memory, position=start + x.shape[1])


@dataclass
class BlockState:
    """A block's stream: its memory, its attention window cache, MAL's prefix, and tokens seen."""

    memory: NeuralMemoryState | HCAMState | None = None
    cache: KVCache | None = None
    prefix: Tensor | None = None
    position: int = 0


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------
class TitansLM(nn.Module):
    """Token LM: embedding, ``depth`` blocks, RMSNorm, head. ``forward(ids, states) -> (logits, states)``.

    ``states`` holds one `BlockState` per block. Passing them back continues the streams: memories carry
    over, sliding-window attention reads a cache of its last ``window − 1`` keys (inference: the cache is
    detached), and ``mac`` continues at segment boundaries. Full causal attention keeps no cache.
    """

    def __init__(self, config: TitansConfig | None = None):
        super().__init__()
        self.config = c = config or TitansConfig()
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(Block(c, c.kind_of(i)) for i in range(c.depth))
        self.norm = nn.RMSNorm(c.dim)
        # A tied head reads the embedding matrix (no second parameter: safetensors refuses shared storage).
        self.head = None if c.tie_embeddings else nn.Linear(c.dim, c.vocab_size, bias=False)

    def features(
        self, input_ids: Tensor, states: list[BlockState | None] | None = None
    ) -> tuple[Tensor, list[BlockState | None]]:
        """Final normed hidden states ``(B, L, dim)`` and the new memory states."""
        if input_ids.dim() != 2:
            raise ValueError(f"TitansLM expects input_ids of shape (B, L); got {tuple(input_ids.shape)}")
        states = states if states is not None else [None] * len(self.blocks)
        x, new_states = self.embed(input_ids), []
        for block, state in zip(self.blocks, states):
            x, state = block(x, state)
            new_states.append(state)
        return self.norm(x), new_states

    def forward(
        self, input_ids: Tensor, states: list[BlockState | None] | None = None
    ) -> tuple[Tensor, list[BlockState | None]]:
        x, states = self.features(input_ids, states)
        return self.logits(x), states

    def logits(self, hidden: Tensor) -> Tensor:
        """Token logits of final hidden states (from `features`)."""
        return F.linear(hidden, self.embed.weight if self.head is None else self.head.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
