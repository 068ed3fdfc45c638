"""Titans' neural long-term memory (Behrouz, Zhong, Mirrokni, arXiv 2501.00663), spec §2.

Per head the memory is an MLP ``f(z; W)`` whose weights are written at test time by gradient descent on the
associative loss ``ℓ(W; k, v) = ‖f(k; W) − v‖²``, with momentum ("surprise") and forgetting:

    u_t = ∇_W ℓ(W_{t'}; k_t, v_t)        gradient at the weights of the chunk start t'
    S_t = η_t S_{t−1} − θ_t u_t          surprise with momentum
    W_t = (1 − α_t) W_{t−1} + S_t        forgetting = weight decay
    y_t = f(q_t; W_t)                    read after write (or W_{t−1}: read before)

Because every gradient of a chunk is taken at the same weights, a chunk is computed in parallel: the two
recurrences are linear, so they unroll to ``W_i = D_{i,0} W' + c_i S' − Σ_j C_{i,j} θ_j u_j`` with ``C = D·E``
from cumulative sums of the log gates (the closed form of their parallel scan). Three chunk kernels compute
the same thing: `dual_chunk` (default; never builds per-token weights; `dual_chunks` runs a call's chunks with
the gate work done before the loop), `scan_chunk` (per-token weights from an associative scan) and
`sequential_chunk` (the definition: a token loop with autograd gradients).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

__all__ = [
    "NeuralMemory",
    "NeuralMemoryConfig",
    "NeuralMemoryState",
    "chunk_coefficients",
    "dual_chunk",
    "dual_chunks",
    "linear_scan",
    "scan_chunk",
    "sequential_chunk",
]


@dataclass
class NeuralMemoryConfig:
    """Sizes and options of `NeuralMemory`.

    Args:
        dim: width of the input features and the output.
        heads: memories per sample (one MLP each).
        head_dim: width of each head's keys, values and queries.
        depth: MLP layers ``L_M`` (1 = a matrix memory).
        expansion: hidden width of a deep memory, in multiples of ``head_dim``.
        chunk_size: the paper's ``b``: tokens whose gradients share the chunk-start weights (1 = online).
        theta_max: upper bound of the inner learning rate θ.
        read: ``"after"`` reads ``f(q_t; W_t)``, ``"before"`` reads ``f(q_t; W_{t−1})``.
        conv_kernel: causal depthwise convolution after the q/k/v projections (0 turns it off).
        update: chunk kernel, see the module docstring.
        compile: run the `dual` kernel's chunk loop (`dual_chunks`) through ``torch.compile`` (inductor), for
            fixed shapes: every new input shape, grad mode or option compiles again (tens of seconds to minutes
            on a CPU), and past ``torch._dynamo.config.recompile_limit`` of them torch runs it eagerly. The
            math is the same; outputs agree with eager to float rounding. Requires ``update="dual"``.
        surprise_clip: clip each token's gradient to this Frobenius norm (None: no clip).
        momentum: False fixes η = 0 (``S_t = −θ_t u_t``: plain gradient steps; with ``depth=1`` the gated delta
            rule, Titans App. C); the chunk kernels then skip the surprise terms, which are zero.
        eta_bias, alpha_bias: initial gate biases (η ≈ 0.88 and α ≈ 0.018 at start).
        zero_init_output: start the output projection at zero, so the layer as a residual branch starts as the
            identity of its stream and its read joins the stream as it is learnt (initialisation only).
    """

    dim: int = 64
    heads: int = 2
    head_dim: int = 32
    depth: int = 2
    expansion: int = 2
    chunk_size: int = 16
    theta_max: float = 0.1
    read: Literal["after", "before"] = "after"
    conv_kernel: int = 4
    update: Literal["dual", "scan", "sequential"] = "dual"
    compile: bool = False
    surprise_clip: float | None = None
    momentum: bool = True
    eta_bias: float = 2.0
    alpha_bias: float = -4.0
    zero_init_output: bool = False

    def __post_init__(self) -> None:
        for name in ("dim", "heads", "head_dim", "depth", "expansion", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"NeuralMemoryConfig.{name} must be ≥ 1; got {getattr(self, name)}")
        if self.read not in ("after", "before"):
            raise ValueError(f"NeuralMemoryConfig.read must be 'after' or 'before'; got {self.read!r}")
        if self.update not in ("dual", "scan", "sequential"):
            raise ValueError(
                f"NeuralMemoryConfig.update must be dual, scan or sequential; got {self.update!r}"
            )
        if self.compile and self.update != "dual":
            raise ValueError(f"NeuralMemoryConfig.compile needs update='dual'; got {self.update!r}")
        if not self.theta_max > 0:
            raise ValueError(f"NeuralMemoryConfig.theta_max must be > 0; got {self.theta_max}")

    @property
    def layer_shapes(self) -> list[tuple[int, int]]:
        """``(out, in)`` of each memory layer."""
        d, hidden = self.head_dim, self.expansion * self.head_dim
        widths = [d] + [hidden] * (self.depth - 1) + [d]
        return [(widths[i + 1], widths[i]) for i in range(self.depth)]

    def fingerprint(self) -> str:
        """Of the options that shape the state; ``compile`` and ``zero_init_output`` do not (a saved state loads
        either way)."""
        options = {k: v for k, v in asdict(self).items() if k not in ("compile", "zero_init_output")}
        return hashlib.sha1(json.dumps(options, sort_keys=True).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------------------
@dataclass
class NeuralMemoryState:
    """Memory of a batch of streams, batch first (one memory per sample and head).

    ``weights`` / ``momentum``: per layer ``(B, H, out, in)`` at the last chunk boundary. ``pending_*``: the
    tokens of the unfinished chunk (keys, values ``(B, H, p, d)``; θ, log η, log(1 − α) ``(B, H, p)``), which
    have been read but not committed. ``conv_tail``: the last projected inputs the causal conv still needs.
    ``position``: tokens seen so far.
    """

    weights: list[Tensor]
    momentum: list[Tensor]
    pending_k: Tensor
    pending_v: Tensor
    pending_theta: Tensor
    pending_log_eta: Tensor
    pending_log_keep: Tensor
    conv_tail: Tensor
    position: int = 0

    def _map(self, fn) -> NeuralMemoryState:
        changes = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                changes[f.name] = fn(value)
            elif isinstance(value, list):
                changes[f.name] = [fn(t) for t in value]
        return replace(self, **changes)

    def detach(self) -> NeuralMemoryState:
        """The same state cut from the autograd graph (truncated BPTT)."""
        return self._map(Tensor.detach)

    def to(self, *args, **kwargs) -> NeuralMemoryState:
        return self._map(lambda t: t.to(*args, **kwargs))

    def reset(self, mask: Tensor, initial: NeuralMemoryState) -> NeuralMemoryState:
        """Restart the samples where ``mask`` (B,) is True from ``initial`` (`NeuralMemory.init_state`).

        Their pending tokens become no-ops (θ = 0, η = 1, α = 0), so a restarted sample keeps the batch's
        chunk grid: its first chunk is shorter by the pending tokens.
        """
        mask = mask.to(torch.bool)

        def pick(fresh: Tensor, old: Tensor) -> Tensor:
            return torch.where(mask.view(-1, *([1] * (old.dim() - 1))), fresh, old)

        no_op = torch.zeros_like(self.pending_theta)
        return replace(
            self,
            weights=[pick(w0, w) for w0, w in zip(initial.weights, self.weights)],
            momentum=[pick(s0, s) for s0, s in zip(initial.momentum, self.momentum)],
            pending_theta=pick(no_op, self.pending_theta),
            pending_log_eta=pick(no_op, self.pending_log_eta),
            pending_log_keep=pick(no_op, self.pending_log_keep),
            conv_tail=pick(torch.zeros_like(self.conv_tail), self.conv_tail),
        )

    def tensors(self) -> dict[str, Tensor]:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                out[f.name] = value
            elif isinstance(value, list):
                out.update({f"{f.name}.{i}": t for i, t in enumerate(value)})
        return out

    def save(self, path: str | Path, config: NeuralMemoryConfig) -> Path:
        """One safetensors file: the tensors, plus position and the config's fingerprint as metadata."""
        path = Path(path)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.tensors().items()}
        metadata = {
            "position": str(self.position),
            "config": config.fingerprint(),
            "depth": str(config.depth),
        }
        save_file(tensors, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | Path, config: NeuralMemoryConfig, device=None) -> NeuralMemoryState:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        if metadata.get("config") != config.fingerprint():
            raise ValueError(f"{path}: memory state was saved with another NeuralMemoryConfig")
        tensors = load_file(str(path), device=str(device or "cpu"))
        depth = config.depth
        return cls(
            weights=[tensors[f"weights.{i}"] for i in range(depth)],
            momentum=[tensors[f"momentum.{i}"] for i in range(depth)],
            **{f.name: tensors[f.name] for f in fields(cls) if f.name.startswith(("pending", "conv"))},
            position=int(metadata["position"]),
        )


# --------------------------------------------------------------------------------------------------------
# The memory MLP and its closed-form inner gradients
# --------------------------------------------------------------------------------------------------------
class SiluAndGrad(torch.autograd.Function):
    """``(silu(a), silu'(a))`` together, with a hand-written backward through both.

    The inner gradients need the activation and its derivative at the same pre-activations; autograd through
    ``sigmoid``, ``1 − s`` and two products would keep and revisit every intermediate, each the size of the
    hidden layer (the biggest tensors of a chunk).
    """

    @staticmethod
    def forward(ctx, a: Tensor) -> tuple[Tensor, Tensor]:
        s = torch.sigmoid(a)
        y = a * s
        dy = torch.addcmul(s, y, 1 - s)  # silu'(a) = s (1 + a (1 − s)) = s + y (1 − s)
        ctx.save_for_backward(a, s, dy)
        return y, dy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: Tensor | None, grad_dy: Tensor | None) -> Tensor:
        a, s, dy = ctx.saved_tensors
        if grad_dy is None:
            return grad_y * dy
        grad = silu_second(a, s, grad_dy)
        return grad if grad_y is None else grad.addcmul_(grad_y, dy)


def silu_second(a: Tensor, s: Tensor, grad: Tensor) -> Tensor:
    """``grad · silu''(a)`` with ``s = sigmoid(a)``: ``silu''(a) = s (1 − s) (2 + a (1 − 2s))``; aten's
    ``sigmoid_backward(g, s)`` is ``g·s·(1 − s)`` in one pass."""
    return torch.ops.aten.sigmoid_backward(torch.addcmul(a.new_tensor(2.0), a, 1 - 2 * s).mul_(grad), s)


def mlp_forward(weights: list[Tensor], z: Tensor) -> Tensor:
    """``f(z; W)`` for per-(sample, head) weights ``(B, H, out, in)`` and inputs ``(B, H, n, in)``."""
    for i, w in enumerate(weights):
        z = z @ w.transpose(-1, -2)
        if i < len(weights) - 1:
            z = F.silu(z)
    return z


class KeyPass(NamedTuple):
    """The keys' pass through the memory at the chunk-start weights: per layer ``l`` its input ``ẑ_l`` and
    backpropagated signal ``δ_l`` (`inner_gradients`), and what the hand-written backward needs besides:
    each hidden layer's pre-activation ``p_l`` and ``δ_{l+1} W_{l+1}`` (``δ_l`` before the slope)."""

    inputs: list[Tensor]
    deltas: list[Tensor]
    pre: list[Tensor]
    back: list[Tensor]


# ``grad · silu'(a)`` in one fused pass; aten gives it no derivative
SILU_BACKWARD = torch.ops.aten.silu_backward


def key_pass(weights: list[Tensor], k: Tensor, v: Tensor) -> KeyPass:
    """`KeyPass` of keys ``k`` and values ``v`` ``(…, n, d)`` at ``weights`` ``(…, out, in)``.

    Under autograd the slopes ``silu'(p)`` come from `SiluAndGrad`; otherwise (no backward, or `DualStep`'s
    forward) ``δ_l = silu_backward(δ_{l+1} W_{l+1}, p_l)``, one pass, and no slope is materialised.
    """
    differentiable = torch.is_grad_enabled()
    inputs, pre, slopes, back = [], [], [], []
    z = k
    for i, w in enumerate(weights):
        inputs.append(z)
        z = z @ w.mT
        if i < len(weights) - 1:
            pre.append(z)
            if differentiable:
                z, slope = SiluAndGrad.apply(z)
                slopes.append(slope)
            else:
                z = F.silu(z)
    delta = 2 * (z - v)
    deltas = [delta]
    for i in range(len(weights) - 1, 0, -1):
        back.insert(0, delta @ weights[i])
        delta = back[0] * slopes[i - 1] if differentiable else SILU_BACKWARD(back[0], pre[i - 1])
        deltas.insert(0, delta)
    return KeyPass(inputs, deltas, pre, back)


def inner_gradients(weights: list[Tensor], k: Tensor, v: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per token and layer, the rank-1 factors of ``∇_{W_l} ‖f(k; W) − v‖² = δ_l ẑ_lᵀ``.

    Returns ``(inputs, deltas)``: ``ẑ_l (B, H, n, in_l)`` the layer's input and ``δ_l (B, H, n, out_l)`` the
    backpropagated signal at its output, both at ``weights``.
    """
    keys = key_pass(weights, k, v)
    return keys.inputs, keys.deltas


def surprise_scale(inputs: list[Tensor], deltas: list[Tensor], clip: float) -> Tensor:
    """Per token ``min(1, clip/‖u‖)``, ``‖u‖`` the Frobenius norm of its gradient over all layers."""
    # ‖δ ẑᵀ‖_F = ‖δ‖·‖ẑ‖ per layer; ‖u‖ is the norm of those.
    norms = [
        torch.linalg.vector_norm(d, dim=-1) * torch.linalg.vector_norm(z, dim=-1)
        for z, d in zip(inputs, deltas)
    ]
    norm = torch.linalg.vector_norm(torch.stack(norms, -1), dim=-1)
    # min(1, clip/‖u‖) with a denominator ≥ clip: a tiny ‖u‖ (1e-25) would underflow ‖u‖² in the backward
    # pass and turn the gradient into NaN
    return clip / norm.clamp_min(clip)


def clipped_theta(theta: Tensor, inputs: list[Tensor], deltas: list[Tensor], clip: float | None) -> Tensor:
    """θ scaled so that each token's step ``θ·u`` uses ``u·min(1, clip/‖u‖)``."""
    return theta if clip is None else theta * surprise_scale(inputs, deltas, clip)


# --------------------------------------------------------------------------------------------------------
# Chunk kernels: one chunk from (W', S'), returning outputs and the weights after its last token
# --------------------------------------------------------------------------------------------------------
ChunkResult = tuple[Tensor, list[Tensor], list[Tensor]]


class ChunkCoefficients(NamedTuple):
    """The gate coefficients the `dual` kernel needs (`dual_plans`), already cut to its rows (``n`` tokens).

    ``read_*``: rows of the readout tokens (``W_i`` after the write, or ``W_{i−1}`` before it): ``D_{i,0}``,
    ``c_i`` ``(…, n)`` and ``C_{i,j}`` ``(…, n, n)``. ``end_*``: the chunk's last row, for the weights
    (``D_{n,0}``, ``c_n``, ``C_{n,j}``) and the momentum (``E_{n,0}``, ``E_{n,j}``).
    """

    read_d0: Tensor
    read_c: Tensor
    read_C: Tensor
    end_d0: Tensor
    end_c: Tensor
    end_C: Tensor
    end_E0: Tensor
    end_E: Tensor


def chunk_coefficients(log_eta: Tensor, log_keep: Tensor, read: str = "after") -> ChunkCoefficients:
    """Unrolled coefficients of the chunk's two linear recurrences; any leading dims (e.g. all chunks at once).

    With ``E_{i,j} = Π_{l=j+1..i} η_l`` and ``D_{i,j} = Π_{l=j+1..i} (1 − α_l)`` (token 0 = the chunk start):
    ``S_i = E_{i,0} S' − Σ_j E_{i,j} θ_j u_j`` and ``W_i = D_{i,0} W' + c_i S' − Σ_j C_{i,j} θ_j u_j`` with
    ``C = D·E`` and ``c_i = (D·E)_{i,0} − D_{i,0}``. Over tokens ``1..n`` alone (``E_{k,j} = 0`` for ``k < j``):
    ``C`` is the product of the two n×n lower-triangular decay matrices, ``c = D·E_{:,0}``, and the start
    column is ``exp`` of the cumulative log gates. Every coefficient is then an output of its own op, not a
    slice of an (n+1)×(n+1) product, whose backward would fill and copy the whole product once per slice.
    """

    def decay_matrix(cum: Tensor) -> Tensor:
        lower = torch.ones(cum.shape[-1], cum.shape[-1], dtype=torch.bool, device=cum.device).tril()
        return (cum.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill_(~lower, float("-inf")).exp_()

    cum_eta, cum_keep = log_eta.cumsum(-1), log_keep.cumsum(-1)
    E, D = decay_matrix(cum_eta), decay_matrix(cum_keep)
    C = D @ E
    d0, e0 = cum_keep.exp(), cum_eta.exp()
    c = (D @ e0.unsqueeze(-1)).squeeze(-1)
    end = (d0[..., -1], c[..., -1], C[..., -1, :], e0[..., -1], E[..., -1, :])
    if read == "after":  # rows 1..n
        return ChunkCoefficients(d0, c, C, *end)
    # rows 0..n−1: row 0 reads the chunk-start weights (D_{0,0} = 1, c_0 = 0, C_{0,·} = 0)
    before = (
        F.pad(d0[..., :-1], (1, 0), value=1.0),
        F.pad(c[..., :-1], (1, 0)),
        F.pad(C[..., :-1, :], (0, 0, 1, 0)),
    )
    return ChunkCoefficients(*before, *end)


class DualPlan(NamedTuple):
    """What one `dual` chunk takes from its gates (and θ), for ``N = B·H`` flattened memories and ``n`` tokens.

    Readout rows: ``read_d0``, ``read_c`` ``(N, n, 1)`` (``D_{i,0}``, ``c_i``), ``mix (N, n, n)`` (``C_{i,j} θ_j``)
    and ``first_scores`` (``mix ⊙ q kᵀ``: the first layer's scores, whose gradient inputs are the keys). End of
    chunk: ``end_d0``, ``end_c``, ``end_e0`` ``(N, 1, 1)`` (``D_{n,0}``, ``c_n``, ``E_{n,0}``) and each token's
    step ``end_w``, ``end_s`` ``(N, n, 1)`` (``C_{n,j} θ_j``, ``E_{n,j} θ_j``). Without momentum the terms of
    ``S'`` are None.
    """

    read_d0: Tensor
    read_c: Tensor | None
    mix: Tensor
    first_scores: Tensor
    end_d0: Tensor
    end_c: Tensor | None
    end_e0: Tensor | None
    end_w: Tensor
    end_s: Tensor | None


def dual_plans(q, k, theta, log_eta, log_keep, read: str, with_momentum: bool) -> list[DualPlan]:
    """`DualPlan` of every chunk of a call at once: the gates' work is batched, the chunk loop only unbinds.

    Inputs have leading dims ``(N, chunks)`` (q, k ``(…, n, d)``, gates ``(…, n)``).
    """
    co = chunk_coefficients(log_eta, log_keep, read)
    mix = co.read_C * theta.unsqueeze(-2)
    momentum_terms = (co.read_c[..., None], co.end_c[..., None, None], co.end_E0[..., None, None],
                      (co.end_E * theta)[..., None])  # fmt: skip
    read_c, end_c, end_e0, end_s = momentum_terms if with_momentum else (None,) * 4
    fields = (co.read_d0[..., None], read_c, mix, mix * (q @ k.mT), co.end_d0[..., None, None], end_c, end_e0,
              (co.end_C * theta)[..., None], end_s)  # fmt: skip
    chunks = q.shape[1]
    per_chunk = [[None] * chunks if t is None else t.unbind(1) for t in fields]
    return [DualPlan(*p) for p in zip(*per_chunk)]


def dual_step(
    weights: list[Tensor], momentum: list[Tensor] | None, q: Tensor, k: Tensor, v: Tensor, plan: DualPlan,
    surprise_clip: float | None,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:  # fmt: skip
    """One chunk of the `dual` kernel on flattened memories: ``weights``, ``momentum`` per layer ``(N, out, in)``
    (``momentum=None``: η = 0), ``q, k, v (N, n, d)``. Returns the readout and the end weights and momentum.

    With a backward pass to come it runs as `DualStep`, whose backward is written by hand; otherwise plainly
    (nothing kept for a backward).
    """
    if torch.is_grad_enabled():
        y, *state = DualStep.apply(len(weights), surprise_clip, q, k, v, *plan, *weights, *(momentum or []))
        return y, state[: len(weights)], state[len(weights) :] or None
    inputs, deltas = inner_gradients(weights, k, v)
    deltas = clipped_deltas(inputs, deltas, surprise_clip)
    return dual_forward(weights, momentum, q, inputs, deltas, plan)


def clipped_deltas(inputs: list[Tensor], deltas: list[Tensor], clip: float | None) -> list[Tensor]:
    """``δ`` rows scaled so that each token's gradient ``u_j = δ_j ẑ_jᵀ`` is clipped (a per-token factor)."""
    if clip is None:
        return deltas
    scale = surprise_scale(inputs, deltas, clip).unsqueeze(-1)
    return [d * scale for d in deltas]


def dual_forward(
    weights: list[Tensor], momentum: list[Tensor] | None, q: Tensor, inputs: list[Tensor], deltas: list[Tensor],
    plan: DualPlan, saved: list[list[Tensor]] | None = None,
) -> tuple[Tensor, list[Tensor], list[Tensor] | None]:  # fmt: skip
    """The chunk's readout and end state from the keys' gradient factors ``(ẑ, δ)`` (`dual_step`).

    Layer ``l``'s output at row ``i`` is ``D_{i,0} W' z_i + c_i S' z_i − Σ_j C_{i,j} θ_j δ_j (ẑ_j·z_i)``: a
    masked n×n product, like attention. End weights are sums of rank-1 terms, ``Σ_j w_j δ_j ẑ_jᵀ = Δᵀ diag(w) Ẑ``
    (Eq. 17 as one matmul), subtracted in place on the decayed start state. It runs outside autograd (under
    no grad, or as `DualStep`'s forward), so the in-place ops cost no copies in a backward. ``saved``: four lists
    that receive, per layer, the readout's input ``z``, ``z ẑᵀ``, the scores and a hidden layer's
    pre-activation (`DualStep`'s backward).
    """
    surprise = momentum if momentum is not None else [None] * len(weights)
    z = q
    for i, (w, s, zl, dl) in enumerate(zip(weights, surprise, inputs, deltas)):
        products = None if i == 0 else z @ zl.mT
        scores = plan.first_scores if i == 0 else plan.mix * products
        if saved is not None:
            for kept, t in zip(saved, (z, products, scores)):
                kept.append(t)
        a = _decayed_read(z, w, s, plan.read_d0, plan.read_c).baddbmm_(scores, dl, alpha=-1)
        z = a if i == len(weights) - 1 else F.silu(a)
        if saved is not None and i < len(weights) - 1:
            saved[3].append(a)
    end_w = [
        (torch.addcmul(plan.end_d0 * w, plan.end_c, s) if s is not None else plan.end_d0 * w).baddbmm_(
            *_weighted_outer(dl, zl, plan.end_w), alpha=-1
        )
        for w, s, dl, zl in zip(weights, surprise, deltas, inputs)
    ]
    end_s = None
    if momentum is not None:
        end_s = [
            (plan.end_e0 * s).baddbmm_(*_weighted_outer(dl, zl, plan.end_s), alpha=-1)
            for s, dl, zl in zip(momentum, deltas, inputs)
        ]
    return z, end_w, end_s


def _add(total: Tensor | None, value: Tensor) -> Tensor:
    """``total + value`` in place on ``total`` (a gradient buffer this backward made), or ``value`` first."""
    return value if total is None else total.add_(value)


def _add_matmul(total: Tensor | None, a: Tensor, b: Tensor, alpha: float = 1.0) -> Tensor:
    """``total + alpha · a @ b`` accumulated in place (one ``baddbmm_``), or a fresh product first."""
    if total is None:
        product = torch.bmm(a, b)
        return product if alpha == 1.0 else product.mul_(alpha)
    return total.baddbmm_(a, b, alpha=alpha)


def _scaled_outer(a: Tensor, b: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
    """Factors of ``aᵀ diag(rows) b`` with the row factors on the narrower of ``a (n, p)``, ``b (n, r)``."""
    return ((a * rows).mT, b) if a.shape[-1] <= b.shape[-1] else (a.mT, b * rows)


class DualStep(torch.autograd.Function):
    """`dual_step` with the backward written by hand.

    ``apply(depth, surprise_clip, q, k, v, *plan, *weights, *momentum)`` → ``(y, *end_weights, *end_momentum)``
    (no momentum tensors: η = 0). The backward walks the end state, the readout's layers top-down and the keys'
    pass once, accumulating each gradient in one buffer with in-place ``baddbmm_``: ``W'`` is used four times
    per chunk (keys' pass, its backpropagation, readout, end state), and autograd would add the four gradients
    and record a graph node per op. It is differentiable once: a second derivative (``create_graph=True``)
    raises.
    """

    @staticmethod
    def forward(ctx, depth: int, surprise_clip: float | None, q, k, v, *tensors):
        plan = DualPlan(*tensors[:9])
        weights, momentum = list(tensors[9 : 9 + depth]), list(tensors[9 + depth :]) or None
        keys = key_pass(weights, k, v)
        deltas, clip = keys.deltas, []  # δ as the update uses it; the clip's factor
        if surprise_clip is not None:
            clip = [surprise_scale(keys.inputs, keys.deltas, surprise_clip).unsqueeze(-1)]
            deltas = [d * clip[0] for d in deltas]
        saved = [[], [], [], []]  # readout inputs, z ẑᵀ, scores, hidden pre-activations
        y, end_w, end_s = dual_forward(weights, momentum, q, keys.inputs, deltas, plan, saved)
        ctx.set_materialize_grads(False)
        ctx.depth, ctx.with_momentum, ctx.surprise_clip = depth, momentum is not None, surprise_clip
        raw = keys.deltas if clip else []
        groups = [list(plan), weights, momentum or [], keys.inputs, deltas, raw, clip, keys.pre, keys.back,
                  *saved]  # fmt: skip
        ctx.sizes = [len(g) for g in groups]
        ctx.save_for_backward(*(t for g in groups for t in g))
        return (y, *end_w, *(end_s or []))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, *grad_state):
        flat = list(ctx.saved_tensors)
        # the update runs in the state's dtype (float32 under bf16 autocast), and so does its backward, also
        # when called inside an autocast region
        with torch.autocast(_autocast_device(flat[0]), enabled=False):
            return DualStep.gradients(ctx, flat, grad_y, grad_state)

    @staticmethod
    def gradients(ctx, flat: list[Tensor], grad_y: Tensor | None, grad_state: tuple) -> tuple:
        groups = []
        for size in ctx.sizes:
            groups.append(flat[:size])
            flat = flat[size:]
        (plan_list, weights, momentum, inputs, deltas, raw, clip, pre, back, reads, products, scores,
         read_pre) = groups  # fmt: skip
        plan = DualPlan(*plan_list)
        depth = ctx.depth
        surprise = momentum if ctx.with_momentum else [None] * depth
        grad_end_w = grad_state[:depth]
        grad_end_s = grad_state[depth:] if ctx.with_momentum else [None] * depth
        grad_w, grad_s = [None] * depth, [None] * depth
        need_s = any(ctx.needs_input_grad[14 + depth :])  # the start momentum (zeros at a stream's start)
        grad_delta, grad_input = [None] * depth, [None] * depth
        g = dict.fromkeys(DualPlan._fields)  # gradients of the plan's coefficients

        # End state: W_n = D_{n,0} W' + c_n S' − Δᵀ diag(C_{n,j} θ_j) Ẑ, S_n = E_{n,0} S' − Δᵀ diag(E_{n,j} θ_j) Ẑ
        ends = ((grad_end_w, plan.end_w, "end_w", ((weights, "end_d0", grad_w), (surprise, "end_c", grad_s))),
                (grad_end_s, plan.end_s, "end_s", ((surprise, "end_e0", grad_s),)))  # fmt: skip
        for grads, step, step_name, decays in ends:
            for i, grad in enumerate(grads):
                if grad is None:
                    continue
                for state, name, into in decays:
                    if state[i] is not None:
                        dot = torch.linalg.vecdot(state[i].flatten(1), grad.flatten(1)).view(-1, 1, 1)
                        g[name] = _add(g[name], dot)
                        if into is grad_w or need_s:
                            coef = getattr(plan, name)
                            into[i] = coef * grad if into[i] is None else into[i].addcmul_(coef, grad)
                spread = inputs[i] @ grad.mT  # (n, out): row j is G ẑ_j
                g[step_name] = _add(g[step_name], (spread * deltas[i]).sum(-1, keepdim=True).neg_())
                grad_delta[i] = _add(grad_delta[i], spread.mul_(-step))
                grad_input[i] = _add_matmul(grad_input[i], deltas[i] * step, grad, alpha=-1.0)

        # Readout, layers top-down: a_l = D_{i,0} W' z + c_i S' z − scores_l Δ_l, z_{l+1} = silu(a_l)
        grad_a = grad_y
        grad_q = None
        for i in reversed(range(depth) if grad_y is not None else []):
            z, w, s = reads[i], weights[i], surprise[i]
            through_w = grad_a @ w  # (n, in)
            g["read_d0"] = _add(g["read_d0"], (through_w * z).sum(-1, keepdim=True))
            grad_z = through_w.mul_(plan.read_d0)
            grad_w[i] = _add_matmul(grad_w[i], *_scaled_outer(grad_a, z, plan.read_d0))
            if s is not None:
                through_s = grad_a @ s
                g["read_c"] = _add(g["read_c"], (through_s * z).sum(-1, keepdim=True))
                grad_z.addcmul_(through_s, plan.read_c)
                if need_s:
                    grad_s[i] = _add_matmul(grad_s[i], *_scaled_outer(grad_a, z, plan.read_c))
            grad_delta[i] = _add_matmul(grad_delta[i], scores[i].mT, grad_a, alpha=-1.0)
            grad_scores = (grad_a @ deltas[i].mT).neg_()
            if i == 0:
                g["first_scores"] = grad_scores
                grad_q = grad_z
            else:
                g["mix"] = _add(g["mix"], grad_scores * products[i])
                grad_products = grad_scores.mul_(plan.mix)
                grad_z.baddbmm_(grad_products, inputs[i])
                grad_input[i] = _add_matmul(grad_input[i], grad_products.mT, z)
                grad_a = SILU_BACKWARD(grad_z, read_pre[i - 1])

        # an output without a gradient (None) can leave a factor without one
        grad_delta = [torch.zeros_like(d) if gd is None else gd for d, gd in zip(deltas, grad_delta)]
        grad_input = [torch.zeros_like(z) if gz is None else gz for z, gz in zip(inputs, grad_input)]
        # The surprise clip: the update used δ̃_l = δ_l·s with s = c / max(‖u‖, c), ‖u‖² = Σ_l ‖δ_l‖² ‖ẑ_l‖², so
        # ∂s/∂‖u‖ = −s/‖u‖ where it binds (0 elsewhere); `through` is Σ_l ⟨∂/∂δ̃_l, δ_l⟩
        if clip:
            (scale,) = clip
            norm = ctx.surprise_clip / scale
            through = sum((g_ * d).sum(-1, keepdim=True) for g_, d in zip(grad_delta, raw))
            coef = torch.where(norm > ctx.surprise_clip, through * scale / norm.square(), 0.0)
            for i, (d, z) in enumerate(zip(raw, inputs)):
                grad_delta[i] = grad_delta[i].mul_(scale).sub_(coef * z.square().sum(-1, keepdim=True) * d)
                grad_input[i] = grad_input[i].sub_(coef * d.square().sum(-1, keepdim=True) * z)
            deltas = raw  # the keys' pass below made the unclipped δ
        # Keys' backpropagation, bottom-up: δ_l = (δ_{l+1} W_{l+1}) ⊙ silu'(p_l)
        grad_key_slopes = []
        for i in range(depth - 1):
            grad_back = SILU_BACKWARD(grad_delta[i], pre[i])
            grad_key_slopes.append(grad_delta[i] * back[i])
            grad_delta[i + 1] = _add_matmul(grad_delta[i + 1], grad_back, weights[i + 1].mT)
            grad_w[i + 1] = _add_matmul(grad_w[i + 1], deltas[i + 1].mT, grad_back)
        # Keys' forward pass, top-down: δ_top = 2 (p_top − v), ẑ_{l+1} = silu(p_l)
        grad_pre = 2 * grad_delta[-1]
        grad_v = -grad_pre
        for i in reversed(range(depth)):
            if i < depth - 1:
                grad_pre = silu_second(pre[i], torch.sigmoid(pre[i]), grad_key_slopes[i])
                grad_pre.add_(SILU_BACKWARD(grad_input[i + 1], pre[i]))
            grad_w[i] = _add_matmul(grad_w[i], grad_pre.mT, inputs[i])
            grad_input[i] = _add_matmul(grad_input[i], grad_pre, weights[i])
        grads_s = grad_s if ctx.with_momentum else []
        plan_grads = (g[name] for name in DualPlan._fields)
        return (None, None, grad_q, grad_input[0], grad_v, *plan_grads, *grad_w, *grads_s)


def _weighted_outer(delta: Tensor, z: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """Factors ``(a, b)`` with ``a @ b = Δᵀ diag(coef) Ẑ``, the per-token weights on the narrower of the two."""
    if delta.shape[-1] <= z.shape[-1]:
        return (delta * coef).mT, z
    return delta.mT, z * coef


def _decayed_read(z: Tensor, w: Tensor, s: Tensor | None, d0: Tensor, c: Tensor | None) -> Tensor:
    """``d0_i W' z_i + c_i S' z_i`` for every row ``i`` of ``z``, scaling the narrower side of the product
    (``s = None``: no momentum, the first term alone). A fresh tensor: the caller may add to it in place.

    The row factors commute with the matmul, so a layer that widens (in < out) scales its inputs and adds
    the second product inside the first's call: no elementwise pass over its wide output.
    """
    if w.shape[-1] < w.shape[-2]:
        read = (d0 * z) @ w.mT
        return read if s is None else read.baddbmm_(c * z, s.mT)
    read = z @ w.mT
    return read.mul_(d0) if s is None else torch.addcmul(d0 * read, c, z @ s.mT)


def dual_chunks(
    weights, momentum, q, k, v, theta, log_eta, log_keep, chunk_size, read="after", surprise_clip=None,
    with_momentum=True,
) -> ChunkResult:  # fmt: skip
    """All chunks of a call with the `dual` kernel (spec §2.3): chunks of ``chunk_size`` tokens, the last may
    be shorter (read, not committed); returns the readout and the state after the last complete chunk
    (``(B, H, …)`` in and out).

    The per-call work is hoisted out of the chunk loop: the heads are flattened into the batch once and every
    chunk's gate coefficients are computed together (`dual_plans`). ``with_momentum=False`` (η = 0: ``c = 0``
    and ``S_n = −θ_n u_n``) carries ``W`` alone and builds ``S`` from the last committed token.
    """
    batch, heads, total = q.shape[:3]
    if total == 0:
        return q, weights, momentum
    flat = [t.flatten(0, 1) for t in (q, k, v, theta, log_eta, log_keep)]
    w_flat = [w.reshape(-1, *w.shape[2:]) for w in weights]
    s_flat = [s.reshape(-1, *s.shape[2:]) for s in momentum] if with_momentum else None
    committed = total - total % chunk_size
    plans = []
    for start, stop in ((0, committed), (committed, total)):
        if stop > start:
            q_, k_, _, theta_, log_eta_, log_keep_ = (
                t[:, start:stop].unflatten(1, (-1, min(chunk_size, stop - start))) for t in flat
            )
            plans += dual_plans(q_, k_, theta_, log_eta_, log_keep_, read, with_momentum)
    pieces = [t.split(chunk_size, dim=1) for t in flat[:4]]
    outputs = []
    for q_, k_, v_, theta_, plan in zip(*pieces, plans):
        y, end_w, end_s = dual_step(w_flat, s_flat, q_, k_, v_, plan, surprise_clip)
        outputs.append(y)
        if q_.shape[1] == chunk_size:
            last = (theta_[:, -1:, None], w_flat, k_[:, -1:], v_[:, -1:])
            w_flat, s_flat = end_w, end_s
    y = (torch.cat(outputs, 1) if len(outputs) > 1 else outputs[0]).unflatten(0, (batch, heads))
    weights = [w.unflatten(0, (batch, heads)) for w in w_flat]
    if with_momentum:
        momentum = [s.unflatten(0, (batch, heads)) for s in s_flat]
    elif committed:  # S_n = −θ_n u_n: the last committed token's rank-1 step, at its chunk's start weights
        theta_n, w_start, k_n, v_n = last
        inputs, deltas = inner_gradients(w_start, k_n, v_n)
        deltas = clipped_deltas(inputs, deltas, surprise_clip)
        momentum = [(-(theta_n * dl.mT) @ zl).unflatten(0, (batch, heads)) for dl, zl in zip(deltas, inputs)]
    return y, weights, momentum


@functools.cache
def compiled_dual_chunks():
    """`dual_chunks` through ``torch.compile`` (`NeuralMemoryConfig.compile`), made once; dynamo keeps one
    compiled graph per input shape and mode. Inductor fuses the elementwise work around the matmuls, in the
    forward and in `DualStep`'s hand-written backward, which it traces too."""
    return torch.compile(dual_chunks, dynamic=False)


def dual_chunk(
    weights, momentum, q, k, v, theta, log_eta, log_keep, read="after", surprise_clip=None, with_momentum=True
) -> ChunkResult:
    """One chunk with the `dual` kernel: `dual_chunks` over a single chunk of all the given tokens."""
    return dual_chunks(weights, momentum, q, k, v, theta, log_eta, log_keep, max(q.shape[2], 1), read,
                       surprise_clip, with_momentum)  # fmt: skip


def linear_scan(a: Tensor, x: Tensor, h0: Tensor) -> Tensor:
    """All ``h_i = a_i h_{i−1} + x_i`` (i = 1..n) by a Hillis–Steele associative scan.

    ``a (…, n)`` scalars per step, ``x (…, n, *shape)``, ``h0 (…, *shape)``; returns ``(…, n, *shape)``.
    Combining step pairs, ``(a₁, x₁) ∘ (a₂, x₂) = (a₁a₂, a₂x₁ + x₂)``, is associative, so ``log₂ n`` rounds
    of element-wise work replace the length-n loop.
    """
    extra = x.dim() - a.dim()
    a = a.reshape(*a.shape, *([1] * extra))
    n, shift = a.shape[a.dim() - extra - 1], 1
    dim = a.dim() - extra - 1
    while shift < n:
        a_prev = F.pad(a.narrow(dim, 0, n - shift), [0, 0] * extra + [shift, 0], value=1.0)
        x_prev = F.pad(x.narrow(dim, 0, n - shift), [0, 0] * extra + [shift, 0], value=0.0)
        a, x = a * a_prev, a * x_prev + x
        shift *= 2
    return a * h0.unsqueeze(dim) + x


def scan_chunk(
    weights, momentum, q, k, v, theta, log_eta, log_keep, read="after", surprise_clip=None
) -> ChunkResult:
    """The chunk with per-token weights ``W_i`` from two associative scans (spec §2.3 "scan")."""
    inputs, deltas = inner_gradients(weights, k, v)
    theta = clipped_theta(theta, inputs, deltas, surprise_clip)
    eta, keep = log_eta.exp(), log_keep.exp()
    per_token_w, end_w, end_s = [], [], []
    for w, s, dl, zl in zip(weights, momentum, deltas, inputs):
        steps = -theta[..., None, None] * dl.unsqueeze(-1) * zl.unsqueeze(-2)  # −θ_j u_j (B, H, n, out, in)
        surprise = linear_scan(eta, steps, s)
        w_tokens = linear_scan(keep, surprise, w)
        per_token_w.append(
            w_tokens if read == "after" else torch.cat([w.unsqueeze(2), w_tokens[:, :, :-1]], 2)
        )
        end_w.append(w_tokens[:, :, -1])
        end_s.append(surprise[:, :, -1])
    z = q
    for i, w_tokens in enumerate(per_token_w):
        z = (w_tokens @ z.unsqueeze(-1)).squeeze(-1)
        if i < len(per_token_w) - 1:
            z = F.silu(z)
    return z, end_w, end_s


def sequential_chunk(
    weights, momentum, q, k, v, theta, log_eta, log_keep, read="after", surprise_clip=None
) -> ChunkResult:
    """The definition, token by token, with the gradient from autograd at the chunk-start weights."""
    outer_graph = torch.is_grad_enabled()
    start = [w if outer_graph and w.requires_grad else w.detach().requires_grad_() for w in weights]
    w, s, outputs = list(weights), list(momentum), []
    for t in range(q.shape[-2]):
        with torch.enable_grad():
            loss = (mlp_forward(start, k[:, :, t : t + 1]) - v[:, :, t : t + 1]).pow(2).sum()
            grads = torch.autograd.grad(loss, start, create_graph=outer_graph)
        step = theta[:, :, t, None, None]
        if surprise_clip is not None:
            squared = sum(g.pow(2).sum((-1, -2)) for g in grads)
            step = step * (surprise_clip / squared.clamp_min(surprise_clip**2).sqrt())[..., None, None]
        if read == "before":
            outputs.append(mlp_forward(w, q[:, :, t : t + 1]))
        eta, keep = log_eta[:, :, t, None, None].exp(), log_keep[:, :, t, None, None].exp()
        s = [eta * s_l - step * g for s_l, g in zip(s, grads)]
        w = [keep * w_l + s_l for w_l, s_l in zip(w, s)]
        if read == "after":
            outputs.append(mlp_forward(w, q[:, :, t : t + 1]))
    return torch.cat(outputs, dim=2), w, s


# log η without momentum (`NeuralMemoryConfig.momentum=False`)
NO_MOMENTUM = -1e4

CHUNK_KERNELS = {"scan": scan_chunk, "sequential": sequential_chunk}


def chunk_loop(
    kernel, weights, momentum, q, k, v, theta, log_eta, log_keep, chunk_size, read="after", surprise_clip=None
) -> ChunkResult:
    """A chunk kernel over chunks of ``chunk_size`` tokens (the last may be shorter: read, not committed);
    returns the readout and the state after the last complete chunk."""
    # Split once (a slice per chunk would cost a full-size zero fill each in backward).
    pieces = [t.split(chunk_size, dim=2) for t in (q, k, v, theta, log_eta, log_keep)]
    outputs = []
    for chunk in zip(*pieces):
        y, end_w, end_s = kernel(weights, momentum, *chunk, read=read, surprise_clip=surprise_clip)
        outputs.append(y)
        if chunk[0].shape[2] == chunk_size:
            weights, momentum = end_w, end_s
    return (torch.cat(outputs, 2) if len(outputs) > 1 else outputs[0]), weights, momentum


# --------------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------------
class NeuralMemory(nn.Module):
    """Titans' long-term memory as a sequence layer: ``forward(x (B, L, dim), state) -> (y, state)``.

    Outputs do not depend on how a stream is cut into calls: tokens of an unfinished chunk are kept as
    pending in the state, read at once, and committed when their chunk completes.
    """

    def __init__(self, config: NeuralMemoryConfig | None = None):
        super().__init__()
        self.config = c = config or NeuralMemoryConfig()
        inner = c.heads * c.head_dim
        self.to_qkv = nn.Linear(c.dim, 3 * inner, bias=False)
        # Depthwise causal conv: the spatial half of "depthwise-separable" (the projection is the pointwise).
        self.conv = (
            nn.Conv1d(3 * inner, 3 * inner, c.conv_kernel, groups=3 * inner, bias=False)
            if c.conv_kernel > 0
            else None
        )
        self.to_gates = nn.Linear(c.dim, 3 * c.heads)  # θ, η, α per token and head
        with torch.no_grad():
            self.to_gates.bias.view(3, c.heads)[1].fill_(c.eta_bias)
            self.to_gates.bias.view(3, c.heads)[2].fill_(c.alpha_bias)
        self.initial_weights = nn.ParameterList(
            nn.Parameter(torch.randn(c.heads, out, inp) / inp**0.5) for out, inp in c.layer_shapes
        )
        self.out_norm = nn.RMSNorm(c.head_dim)
        self.to_gate = nn.Linear(c.dim, inner, bias=False)
        self.to_out = nn.Linear(inner, c.dim, bias=False)
        if c.zero_init_output:
            nn.init.zeros_(self.to_out.weight)

    # ---- state ------------------------------------------------------------------------------------------
    def init_state(
        self, batch_size: int, device=None, dtype: torch.dtype = torch.float32
    ) -> NeuralMemoryState:
        c = self.config
        device = device or self.initial_weights[0].device
        inner = c.heads * c.head_dim
        weights = [
            w.to(device, dtype).unsqueeze(0).expand(batch_size, -1, -1, -1) for w in self.initial_weights
        ]
        empty = torch.zeros(batch_size, c.heads, 0, device=device, dtype=dtype)
        return NeuralMemoryState(
            weights=weights,
            momentum=[torch.zeros_like(w) for w in weights],
            pending_k=torch.zeros(batch_size, c.heads, 0, c.head_dim, device=device, dtype=dtype),
            pending_v=torch.zeros(batch_size, c.heads, 0, c.head_dim, device=device, dtype=dtype),
            pending_theta=empty,
            pending_log_eta=empty,
            pending_log_keep=empty,
            conv_tail=torch.zeros(
                batch_size, max(c.conv_kernel - 1, 0), 3 * inner, device=device, dtype=dtype
            ),
        )

    def reset(self, state: NeuralMemoryState, mask: Tensor) -> NeuralMemoryState:
        """Restart the streams where ``mask`` (B,) is True."""
        w = state.weights[0]
        return state.reset(mask, self.init_state(w.shape[0], w.device, w.dtype))

    # ---- projections ------------------------------------------------------------------------------------
    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.config.heads, self.config.head_dim).transpose(1, 2)

    def project(self, x: Tensor, conv_tail: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Queries, keys, values ``(B, H, L, d)`` and the new conv tail; ``conv_tail=None``: zero history."""
        p = self.to_qkv(x)
        if self.conv is not None:
            k = self.config.conv_kernel
            history = conv_tail if conv_tail is not None else p.new_zeros(p.shape[0], k - 1, p.shape[-1])
            p = torch.cat([history.to(p.dtype), p], dim=1)
            new_tail = p[:, p.shape[1] - (k - 1) :]
            p = causal_depthwise_conv(p, self.conv.weight)
        else:
            new_tail = p[:, :0]
        # SiLU and ℓ2 in the (B, L, ·) layout, where every head's features are contiguous, then split heads
        q, k, v = F.silu(p).unflatten(-1, (3, self.config.heads, self.config.head_dim)).unbind(2)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), new_tail

    def project_queries(self, x: Tensor) -> Tensor:
        """``project(x, None)``'s queries alone (a read needs no keys or values)."""
        inner = self.config.heads * self.config.head_dim
        p = F.linear(x, self.to_qkv.weight[:inner])
        if self.conv is not None:
            p = causal_depthwise_conv(
                F.pad(p, (0, 0, self.config.conv_kernel - 1, 0)), self.conv.weight[:inner]
            )
        return F.normalize(F.silu(self._heads(p)), dim=-1)

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """θ, log η, log(1 − α), each ``(B, H, L)``, in log space so long products stay finite."""
        g = self.to_gates(x).view(x.shape[0], x.shape[1], 3, self.config.heads).permute(2, 0, 3, 1)
        # without momentum log η = −1e4: exp is exactly 0, and cumulative sums stay finite (no −inf − −inf)
        log_eta = F.logsigmoid(g[1]) if self.config.momentum else torch.full_like(g[1], NO_MOMENTUM)
        return self.config.theta_max * torch.sigmoid(g[0]), log_eta, F.logsigmoid(-g[2])

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        """``W_O(RMSNorm(y) ⊙ SiLU(x W_G))``, heads concatenated (Gated DeltaNet's output gate)."""
        y = self.out_norm(y).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(y * F.silu(self.to_gate(x)))

    # ---- forward ----------------------------------------------------------------------------------------
    def forward(self, x: Tensor, state: NeuralMemoryState | None = None) -> tuple[Tensor, NeuralMemoryState]:
        """Read and write the memory along ``x (B, L, dim)``; ``state=None`` starts new streams."""
        check_finite(x, "NeuralMemory input x")
        if state is None:
            state = self.init_state(x.shape[0], x.device, _state_dtype(x.dtype))
        q, k, v, conv_tail = self.project(x, state.conv_tail)
        theta, log_eta, log_keep = self.gates(x)
        y, state = self.write_and_read(state, q, k, v, theta, log_eta, log_keep)
        state = replace(state, conv_tail=conv_tail.to(state.conv_tail.dtype))
        return self._output(y.to(x.dtype), x), state

    def write_and_read(
        self, state: NeuralMemoryState, q, k, v, theta, log_eta, log_keep
    ) -> tuple[Tensor, NeuralMemoryState]:
        """The update on projected heads: pending tokens first, then chunks on the stream's grid."""
        c = self.config
        dtype = state.weights[0].dtype
        pending = state.pending_k.shape[2]
        with torch.autocast(_autocast_device(q), enabled=False):
            q, k, v, theta, log_eta, log_keep = (t.to(dtype) for t in (q, k, v, theta, log_eta, log_keep))
            if pending:
                q = torch.cat([q.new_zeros(*q.shape[:2], pending, q.shape[-1]), q], 2)
                k, v, theta, log_eta, log_keep = (
                    torch.cat([old, new], 2)
                    for old, new in zip(
                        (state.pending_k, state.pending_v, state.pending_theta, state.pending_log_eta,
                         state.pending_log_keep),
                        (k, v, theta, log_eta, log_keep),
                    )
                )  # fmt: skip
            tokens = (q, k, v, theta, log_eta, log_keep)
            options = {"read": c.read, "surprise_clip": c.surprise_clip}
            if c.update == "dual":
                kernel = compiled_dual_chunks() if c.compile else dual_chunks
                y, weights, momentum = kernel(state.weights, state.momentum, *tokens, c.chunk_size,
                                              with_momentum=c.momentum, **options)  # fmt: skip
            else:
                kernel = CHUNK_KERNELS[c.update]
                y, weights, momentum = chunk_loop(kernel, state.weights, state.momentum, *tokens, c.chunk_size,
                                                  **options)  # fmt: skip
            y = y[:, :, pending:] if pending else y
            # Once per call: a non-finite value never turns finite again in the recurrences.
            check_finite(weights + momentum + [y], "memory state or readout after this call")
            total = k.shape[2]
            rest = slice(total - total % c.chunk_size, total)
            new_state = replace(
                state,
                weights=weights,
                momentum=momentum,
                pending_k=k[:, :, rest],
                pending_v=v[:, :, rest],
                pending_theta=theta[:, :, rest],
                pending_log_eta=log_eta[:, :, rest],
                pending_log_keep=log_keep[:, :, rest],
                position=state.position + total - pending,
            )
        return y, new_state

    def current_weights(self, state: NeuralMemoryState) -> list[Tensor]:
        """Weights after every token seen, pending ones included."""
        if state.pending_k.shape[2] == 0:
            return state.weights
        p = state
        _, weights, _ = dual_chunk(
            p.weights, p.momentum, p.pending_k, p.pending_k, p.pending_v,
            p.pending_theta, p.pending_log_eta, p.pending_log_keep, surprise_clip=self.config.surprise_clip,
            with_momentum=self.config.momentum,
        )  # fmt: skip
        return weights

    def retrieve(self, x: Tensor, state: NeuralMemoryState) -> Tensor:
        """Eq. 15's ``M*(q)``: read with the current weights, no write; the state is left as it was.

        Queries come from ``x`` alone (the conv starts from zero history), so a read does not touch the
        write stream's conv tail.
        """
        check_finite(x, "NeuralMemory.retrieve input x")
        q = self.project_queries(x)
        weights = self.current_weights(state)
        y = mlp_forward(weights, q.to(weights[0].dtype))
        return self._output(y.to(x.dtype), x)


def causal_depthwise_conv(padded: Tensor, weight: Tensor) -> Tensor:
    """``nn.Conv1d(groups=C)`` along time in the ``(B, T, C)`` layout: ``padded (B, K−1+L, C)`` holds the K−1
    inputs before the call, ``weight (C, 1, K)`` the conv's; returns ``(B, L, C)`` (`CausalDepthwiseConv`)."""
    return CausalDepthwiseConv.apply(padded, weight)


class CausalDepthwiseConv(torch.autograd.Function):
    """K fused multiply-adds over shifted views: no transposes in or out, and faster than oneDNN's depthwise
    conv on CPU. The backward is written by hand: autograd would give each shifted view's gradient a zero-filled
    copy of the whole input (four per call) and keep a product per tap for the weights' gradient."""

    @staticmethod
    def forward(ctx, padded: Tensor, weight: Tensor) -> Tensor:
        taps = weight[:, 0]
        k = taps.shape[-1]
        length = padded.shape[1] - (k - 1)
        out = padded[:, :length] * taps[:, 0]
        for i in range(1, k):
            out.addcmul_(padded[:, i : i + length], taps[:, i])
        ctx.save_for_backward(padded, weight)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        padded, weight = ctx.saved_tensors
        taps = weight[:, 0]
        k, length = taps.shape[-1], grad.shape[1]
        grad_padded = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_padded = grad.new_zeros(padded.shape)
            for i in range(k):
                grad_padded[:, i : i + length].addcmul_(grad, taps[:, i])
        if ctx.needs_input_grad[1]:
            per_tap = [(grad * padded[:, i : i + length]).sum((0, 1)) for i in range(k)]
            grad_weight = torch.stack(per_tap, -1).unsqueeze(1)
        return grad_padded, grad_weight


def _autocast_device(t: Tensor) -> str:
    return t.device.type if t.device.type in ("cuda", "cpu", "xpu", "mps") else "cpu"


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Memory state is float32 (float64 when the inputs are), also under bf16 autocast."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_finite(tensors: Tensor | list[Tensor], what: str) -> None:
    """Raise a clear error instead of carrying a NaN/inf state forward.

    One reduction per tensor, in its own dtype: a sum is NaN/inf when any element is (or when the values are
    so large that they overflow, which is an exploded state too).
    """
    with torch.no_grad():
        total = sum(t.detach().sum() for t in (tensors if isinstance(tensors, list) else [tensors]))
    if not torch.isfinite(total):
        raise FloatingPointError(
            f"{what} holds NaN or inf; lower theta_max, set surprise_clip, or clip gradients"
        )
