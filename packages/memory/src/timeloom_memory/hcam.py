"""HCAM: hierarchical chunk attention memory (Lampinen, Chan, Banino, Hill, NeurIPS 2021), spec §3.

The memory is a layer's past inputs in chunks of ``C`` steps, each with a summary (the mean of its contents).
A query first scores the summaries of the chunks completed before it, keeps the top k, and then attends in
detail inside each chosen chunk; the k detailed reads are mixed by the softmax of their summary scores:

    r_{t,i} = (W_q x_t)·(W_k s_i)/√d       over chunks i with (i+1)·C ≤ t
    out_t   = Σ_{i ∈ top-k} softmax(r_t)_i · MHA(x_t; contents of chunk i)

Contents and summaries are stop-gradient (``detach_memory``, as DeepMind's module); the projections learn.
``path="dense"`` scores every stored chunk in one batched `attend` (training); ``path="gather"`` reads only
the k chosen chunks per query (streaming). ``summary="oracle"`` scores a chunk by the log-sum-exp of the
detailed logits, with which ``k = M`` and one head give exact softmax attention over all stored tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from timeloom_kernels import attend, masks
from torch import Tensor, nn

__all__ = ["HCAMAttention", "HCAMState", "sinusoidal_positions"]


@dataclass
class HCAMState:
    """Everything stored so far: ``tokens (B, T, d)`` (complete chunks, then the partial accumulator)."""

    tokens: Tensor

    def detach(self) -> HCAMState:
        return replace(self, tokens=self.tokens.detach())

    def to(self, *args, **kwargs) -> HCAMState:
        return replace(self, tokens=self.tokens.to(*args, **kwargs))


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> Tensor:
    """``(length, dim)`` sine/cosine encodings of positions ``0..length−1`` (Vaswani et al.)."""
    pos = torch.arange(length, device=device, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, device=device, dtype=torch.float64) / dim)
    table = torch.zeros(length, dim, device=device, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return table.to(dtype)


class HCAMAttention(nn.Module):
    """``forward(x (B, L, d), state) -> (out (B, L, d), state)``: read the memory of the layer's past inputs,
    then store ``x``. A query never reads its own (partial) chunk: that is left to local attention."""

    def __init__(
        self,
        dim: int,
        heads: int = 2,
        chunk_size: int = 16,
        top_k: int = 4,
        summary: Literal["mean", "oracle"] = "mean",
        positional: bool = True,
        summary_norm: bool = False,
        detach_memory: bool = True,
        path: Literal["dense", "gather"] = "dense",
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"HCAMAttention: dim ({dim}) must be divisible by heads ({heads})")
        if chunk_size < 1 or top_k < 1:
            raise ValueError(f"HCAMAttention: chunk_size and top_k must be ≥ 1; got {chunk_size}, {top_k}")
        if summary not in ("mean", "oracle") or path not in ("dense", "gather"):
            raise ValueError(f"HCAMAttention: unknown summary {summary!r} or path {path!r}")
        self.heads, self.chunk_size, self.top_k = heads, chunk_size, top_k
        self.summary, self.positional, self.detach_memory, self.path = (
            summary,
            positional,
            detach_memory,
            path,
        )
        self.relevance_q = nn.Linear(dim, dim, bias=False)
        self.relevance_k = nn.Linear(dim, dim, bias=False)
        self.summary_norm = nn.LayerNorm(dim) if summary_norm else nn.Identity()
        self.q = nn.Linear(dim, dim, bias=False)
        self.kv = nn.Linear(dim, 2 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def init_state(self, batch_size: int, dim: int, device=None, dtype=torch.float32) -> HCAMState:
        return HCAMState(tokens=torch.zeros(batch_size, 0, dim, device=device, dtype=dtype))

    def _heads(self, t: Tensor) -> Tensor:
        """``(…, n, d) → (…, H, n, d/H)``."""
        return t.unflatten(-1, (self.heads, -1)).transpose(-2, -3)

    def forward(self, x: Tensor, state: HCAMState | None = None) -> tuple[Tensor, HCAMState]:
        if not torch.isfinite(x).all():
            raise FloatingPointError("HCAMAttention input x holds NaN or inf")
        b, n, d = x.shape
        if state is None:
            state = self.init_state(b, d, x.device, x.dtype)
        past = state.tokens.shape[1]
        stored = torch.cat([state.tokens, x], 1)
        new_state = HCAMState(tokens=stored)
        c = self.chunk_size
        num_chunks = stored.shape[1] // c
        # Only chunks completed before the call's last query can be read.
        num_chunks = min(num_chunks, (past + n - 1) // c)
        if num_chunks == 0:
            return x.new_zeros(b, n, d), new_state
        memory = stored[:, : num_chunks * c]
        memory = memory.detach() if self.detach_memory else memory
        contents = memory.view(b, num_chunks, c, d)
        if self.positional:
            contents = contents + sinusoidal_positions(c, d, x.device, x.dtype)
        q = self._heads(self.q(x))  # (B, H, n, dh)
        k, v = (self._heads(t) for t in self.kv(contents).chunk(2, -1))  # (B, M, H, C, dh)

        q_pos = torch.arange(past, past + n, device=x.device)
        visible = masks.completed_chunks(c).dense(1, 1, n, num_chunks, q_pos=q_pos, device=x.device)[0, 0]
        scores = self._relevance(x, memory.view(b, num_chunks, c, d), q, k)
        scores = scores.masked_fill(~visible, -math.inf)  # (B, n, M)
        top = min(self.top_k, num_chunks)
        # Stable sort: ties go to the earlier chunk.
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :top]
        chosen = scores.gather(-1, order)
        weights = torch.softmax(chosen, -1).nan_to_num(0.0)  # no visible chunk: all -inf → 0
        weights = weights.masked_fill(chosen == -math.inf, 0.0)
        if self.path == "dense":
            out = self._dense(q, k, v, order, weights, num_chunks)
        else:
            out = self._gather(q, k, v, order, weights)
        return self.out(out.transpose(1, 2).reshape(b, n, d)), new_state

    def _relevance(self, x: Tensor, chunks: Tensor, q: Tensor, k: Tensor) -> Tensor:
        """``(B, n, M)`` chunk scores: mean summaries, or the oracle log-sum-exp of detailed logits."""
        if self.summary == "oracle":
            logits = torch.einsum("bhnd,bmhcd->bhnmc", q, k) / math.sqrt(q.shape[-1])
            return torch.logsumexp(logits, -1).mean(1)
        summaries = self.summary_norm(chunks.mean(2))
        rq, rk = self.relevance_q(x), self.relevance_k(summaries)
        return rq @ rk.transpose(-1, -2) / math.sqrt(x.shape[-1])

    def _dense(self, q, k, v, order, weights, num_chunks) -> Tensor:
        """Detailed attention to every stored chunk at once, mixed with zero weight outside the top-k."""
        b, h, n, dh = q.shape
        per_chunk = attend(
            q.unsqueeze(1).expand(b, num_chunks, h, n, dh).reshape(b * num_chunks, h, n, dh),
            k.reshape(b * num_chunks, h, -1, dh),
            v.reshape(b * num_chunks, h, -1, dh),
        ).view(b, num_chunks, h, n, dh)
        # CUDA autocast gives float32 softmax weights beside bfloat16 values: scatter in the weights' dtype
        mix = weights.new_zeros(b, n, num_chunks).scatter(-1, order, weights)
        return torch.einsum("bnm,bmhnd->bhnd", mix.to(per_chunk.dtype), per_chunk)

    def _gather(self, q, k, v, order, weights) -> Tensor:
        """Each query reads only its k chosen chunks (one `attend` row per query and chunk)."""
        b, h, n, dh = q.shape
        top, c = order.shape[-1], k.shape[3]
        index = order.reshape(b, n * top, 1, 1, 1).expand(b, n * top, h, c, dh)
        k_sel = k.gather(1, index).view(b * n * top, h, c, dh)
        v_sel = v.gather(1, index).view(b * n * top, h, c, dh)
        q_rep = q.permute(0, 2, 1, 3).unsqueeze(2).expand(b, n, top, h, dh).reshape(b * n * top, h, 1, dh)
        read = attend(q_rep, k_sel, v_sel).view(b, n, top, h, dh)
        return torch.einsum("bnk,bnkhd->bhnd", weights, read)
