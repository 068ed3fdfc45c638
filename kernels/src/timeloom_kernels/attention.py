"""`attend`: the one entry point for softmax attention in timeloom.

``attend(q, k, v, mask)`` validates the call, describes it as a `Problem`, lets `select_backend` (one pure
function, spec §3) choose among the backends that can serve it, and runs that backend. Backends that
cannot express the mask, bias, dropout, dtype or gradient are *ineligible*: ``auto`` skips them and an
explicit ``backend=`` raises ``ValueError`` saying why. Nothing is dropped silently.
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from typing import Literal

import torch
from torch import Tensor

from timeloom_kernels.backends import AttentionArgs, Problem, ScoreHook
from timeloom_kernels.backends import flex as flex_backend
from timeloom_kernels.backends import reference as reference_backend
from timeloom_kernels.backends import sdpa as sdpa_backend
from timeloom_kernels.backends import tiled as tiled_backend
from timeloom_kernels.backends import xformers as xformers_backend
from timeloom_kernels.masks import Mask, ScoreMod, resolve_positions

__all__ = ["BACKENDS", "ENV_BACKEND", "Problem", "attend", "describe", "ineligibility", "select_backend"]

logger = logging.getLogger(__name__)

BACKENDS = {
    module.NAME: module
    for module in (reference_backend, sdpa_backend, tiled_backend, flex_backend, xformers_backend)
}
ENV_BACKEND = "TIMELOOM_ATTN_BACKEND"
BackendName = Literal["auto", "reference", "sdpa", "tiled", "flex", "xformers"]

# Rule 4 of spec §3: flex pays off for structured masks on large problems. `timeloom bench kernels`
# regenerates these thresholds.
FLEX_MIN_SCORES = 1024 * 1024
FLEX_MIN_BLOCK_SPARSITY = 0.25
# Off CUDA, a structured mask whose 128-row tiles skip at least this share of the scores, on a problem at
# least this large, runs tiled (SDPA on each query tile's key span): the per-tile calls then cost less than the masked
# work they skip. Measured by `timeloom bench kernels` (block-causal 16x256: 1.85x over dense SDPA).
TILED_MIN_SCORES = 512 * 512
TILED_MIN_BLOCK_SPARSITY = 0.25


def ineligibility(backend: str, problem: Problem) -> str | None:
    """None when ``backend`` can serve ``problem``; otherwise the reason it cannot."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {sorted(BACKENDS)} or 'auto'"
    return BACKENDS[backend].why_not(problem)


def select_backend(problem: Problem) -> str:
    """The backend ``auto`` runs for ``problem``: the first matching rule of spec §3 that is eligible.

    1. probabilities needed (an active processor, ``return_probs``) → ``reference``;
    2. not CUDA → ``tiled`` for a structured mask with block sparsity ≥ 25 % and ``Lq·Lk ≥ 512²``, else
       ``sdpa`` (flex on CPU is forward-only and compiles slowly, so it is opt-in);
    3. CUDA, no mask or plain causal over default positions → ``sdpa`` (flash / cuDNN);
    4. CUDA, structured mask, block sparsity ≥ 25 %, ``Lq·Lk ≥ 1024²``, no dropout → ``flex``;
    5. CUDA, exact xformers bias, fp16/bf16, and no flex in this torch → ``xformers``;
    6. otherwise → ``sdpa`` with a dense mask.
    """
    if problem.needs_probs:
        return "reference"
    mask = problem.mask
    plain = mask is None or (mask.is_plain("causal") and problem.default_positions)
    if problem.device_type != "cuda":
        sparse = problem.block_sparsity is not None and problem.block_sparsity >= TILED_MIN_BLOCK_SPARSITY
        return "tiled" if not plain and sparse and ineligibility("tiled", problem) is None else "sdpa"
    if plain:
        return "sdpa"
    if (
        problem.block_sparsity is not None
        and problem.block_sparsity >= FLEX_MIN_BLOCK_SPARSITY
        and problem.q_len * problem.kv_len >= FLEX_MIN_SCORES
        and ineligibility("flex", problem) is None
    ):
        return "flex"
    if (
        problem.dtype in (torch.float16, torch.bfloat16)
        and "flex" not in problem.available
        and ineligibility("xformers", problem) is None
    ):
        return "xformers"
    return "sdpa"


@functools.cache  # per process: what is installed does not change, and the xformers probe runs a kernel
def _available(device_type: str, probe_xformers: bool) -> frozenset[str]:
    names = {"reference", "sdpa"}
    try:
        import torch.nn.attention.flex_attention  # noqa: F401

        names.add("flex")
    except ImportError:
        pass
    if probe_xformers and xformers_backend.probe(device_type) is None:
        names.add("xformers")
    return frozenset(names)


def _validate(q: Tensor, k: Tensor, v: Tensor, mask, bias, dropout_p: float) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor (B, H, L, D); got {getattr(t, 'shape', type(t))}")
        if not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point; got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must share a device; got {q.device}, {k.device}, {v.device}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k and v must agree on (B, Hkv, Lk); got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size; got {q.shape[0]} and {k.shape[0]}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same head dim; got {q.shape[-1]} and {k.shape[-1]}")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]}) for GQA")
    if mask is not None and not isinstance(mask, Mask):
        raise ValueError(f"mask must be a timeloom_kernels.masks.Mask or None; got {type(mask).__name__}")
    batch, heads, q_len, _ = q.shape
    scores_shape = (batch, heads, q_len, k.shape[2])
    if isinstance(bias, ScoreMod):
        if bias.num_heads is not None and bias.num_heads != heads:
            raise ValueError(f"{bias!r} is defined for {bias.num_heads} heads, but q has {heads}")
    elif isinstance(bias, Tensor):
        try:
            torch.broadcast_shapes(bias.shape, scores_shape)
        except RuntimeError:
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not broadcast to (B, H, Lq, Lk) = {scores_shape}"
            ) from None
        if bias.dim() > 4 or not bias.dtype.is_floating_point:
            raise ValueError(
                f"bias must be a floating tensor with at most 4 dims; got {bias.dtype} {tuple(bias.shape)}"
            )
    elif bias is not None:
        raise ValueError(f"bias must be a tensor, a ScoreMod or None; got {type(bias).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1); got {dropout_p}")


def _bias_requires_grad(bias: Tensor | ScoreMod | None) -> bool:
    """A bias tensor, or a learned score mod (an `nn.Module` with parameters), that needs a gradient."""
    if isinstance(bias, Tensor):
        return bias.requires_grad
    return isinstance(bias, torch.nn.Module) and any(p.requires_grad for p in bias.parameters())


def _drop_full(mask: Mask | None) -> Mask | None:
    """`full()` allows everything: every backend serves it best as no mask at all."""
    return None if isinstance(mask, Mask) and mask.is_plain("full") else mask


def describe(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None = None,
    *,
    bias: Tensor | ScoreMod | None = None,
    dropout_p: float = 0.0,
    q_pos: Tensor | None = None,
    kv_pos: Tensor | None = None,
    needs_probs: bool = False,
    probe_xformers: bool = False,
    measure_sparsity: bool = True,
) -> Problem:
    """Validate an `attend` call (``ValueError`` on bad input) and describe it as a `Problem`.

    Run-time facts are gathered only where the choice can use them: block sparsity for large structured
    calls (flex on CUDA, tiled elsewhere) unless ``measure_sparsity`` is off (a backend was named), and the
    xformers probe on CUDA or when ``probe_xformers`` (an explicit request).
    """
    _validate(q, k, v, mask, bias, dropout_p)
    mask = _drop_full(mask)
    batch, q_heads, q_len, _ = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q_pos is not None or kv_pos is not None:
        resolve_positions(q_pos, kv_pos, batch, q_len, kv_len, q.device)  # raises on bad positions
    on_cuda = q.device.type == "cuda"
    probe_xformers = probe_xformers or on_cuda
    block_sparsity = None
    if not measure_sparsity or mask is None:
        pass
    elif on_cuda and q_len * kv_len >= FLEX_MIN_SCORES and dropout_p == 0:
        block_sparsity = mask.sparsity(batch, q_heads, q_len, kv_len, q_pos, kv_pos, q.device)
    elif (
        not on_cuda
        and q_len * kv_len >= TILED_MIN_SCORES
        and not (mask.is_plain("causal") and q_pos is None and kv_pos is None)  # sdpa's is_causal serves it
    ):
        # The dense mask is what sdpa and tiled both run with here (cached), so measure the skip on it.
        allowed = mask.dense(batch, q_heads, q_len, kv_len, q_pos, kv_pos, q.device)
        block_sparsity = tiled_backend.skipped_fraction(allowed)
    xformers_exact = probe_xformers and (
        mask is None or mask.xformers_bias(batch, q_heads, q_len, kv_len, q_pos, kv_pos) is not None
    )
    bias_requires_grad = torch.is_grad_enabled() and _bias_requires_grad(bias)
    return Problem(
        device_type=q.device.type,
        dtype=q.dtype,
        batch=batch,
        q_heads=q_heads,
        kv_heads=kv_heads,
        q_len=q_len,
        kv_len=kv_len,
        mask=mask,
        bias="none" if bias is None else ("score_mod" if isinstance(bias, ScoreMod) else "tensor"),
        bias_requires_grad=bias_requires_grad,
        dropout_p=dropout_p,
        needs_grad=bias_requires_grad
        or (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))),
        default_positions=q_pos is None and kv_pos is None,
        needs_probs=needs_probs,
        available=_available(q.device.type, probe_xformers),
        block_sparsity=block_sparsity,
        xformers_exact=xformers_exact,
    )


_logged: set[tuple] = set()


def _log_choice(name: str | None, problem: Problem, backend: str) -> None:
    """Log the backend once per (layer, signature). Lengths stay out of the signature: they grow every
    decoding step, and the set of logged signatures must stay small."""
    mask_name = problem.mask.name if problem.mask is not None else None
    signature = (name, problem.device_type, problem.dtype, mask_name, problem.bias, backend)
    if signature not in _logged:
        _logged.add(signature)
        logger.debug(
            "attention %s: %s (Lq=%d, Lk=%d, mask=%r)",
            name,
            backend,
            problem.q_len,
            problem.kv_len,
            problem.mask,
        )


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Mask | None = None,
    *,
    bias: Tensor | ScoreMod | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    backend: BackendName = "auto",
    name: str | None = None,
    q_pos: Tensor | None = None,
    kv_pos: Tensor | None = None,
    return_probs: bool = False,
    processor: ScoreHook | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention ``softmax(q·kᵀ·scale + bias, masked)·v``.

    Args:
        q: ``(B, Hq, Lq, D)``; k: ``(B, Hkv, Lk, D)``; v: ``(B, Hkv, Lk, Dv)``, with ``Hq % Hkv == 0`` (GQA).
        mask: what may attend to what (True = allowed); None or `full()` = everything.
        bias: an additive tensor broadcasting to ``(B, Hq, Lq, Lk)`` or a `ScoreMod` (e.g. `ALiBi`).
        scale: defaults to ``D^-½``.
        dropout_p: applied whenever > 0; pass ``p if self.training else 0``.
        backend: ``"auto"`` or a backend name. ``auto`` follows the env var ``TIMELOOM_ATTN_BACKEND``
            wherever that backend can serve the call (and warns where it cannot); a name given here raises
            ``ValueError`` when it cannot serve the call.
        name: the layer's qualified name, for logs.
        q_pos, kv_pos: int absolute positions ``(L,)`` or ``(B, L)`` the mask and score mod read. Default:
            keys ``0..Lk-1``, queries the last ``Lq`` of them (bottom-right aligned).
        return_probs: also return the probabilities ``(B, Hq, Lq, Lk)`` (forces ``reference``).
        processor: a `ScoreHook` (a processor bound to its context, see `timeloom_kernels.processors`)
            that edits logits and probabilities; forces ``reference``.

    Returns:
        ``(B, Hq, Lq, Dv)`` in q's dtype, or ``(output, probs)`` with ``return_probs``. Fully masked rows
        are 0 with zero gradient on every backend.
    """
    mask = _drop_full(mask)
    needs_probs = return_probs or processor is not None
    preferred = (os.environ.get(ENV_BACKEND) or None) if backend == "auto" and not needs_probs else None
    for name, where in ((backend, "backend"), (preferred, ENV_BACKEND)):
        if name is not None and name != "auto" and name not in BACKENDS:
            raise ValueError(f"unknown {where} {name!r}; expected 'auto' or one of {sorted(BACKENDS)}")
    problem = describe(
        q,
        k,
        v,
        mask,
        bias=bias,
        dropout_p=dropout_p,
        q_pos=q_pos,
        kv_pos=kv_pos,
        needs_probs=needs_probs,
        probe_xformers=backend == "xformers" or preferred == "xformers",
        measure_sparsity=backend == "auto",
    )
    if backend == "auto":
        backend = select_backend(problem)
        if preferred not in (None, "auto"):
            # The env var is a preference for the whole model: layers it cannot serve keep `auto`'s choice.
            reason = ineligibility(preferred, problem)
            if reason is None:
                backend = preferred
            else:
                message = f"{ENV_BACKEND}={preferred} cannot serve this call ({reason}); using {backend}"
                warnings.warn(message, stacklevel=2)
    else:
        reason = ineligibility(backend, problem)
        if reason is not None:
            raise ValueError(f"backend {backend!r} cannot serve this call: {reason}")
    _log_choice(name, problem, backend)

    args = AttentionArgs(
        mask=mask,
        bias=bias,
        scale=q.shape[-1] ** -0.5 if scale is None else float(scale),
        dropout_p=dropout_p,
        q_pos=q_pos,
        kv_pos=kv_pos,
        processor=processor,
    )
    if backend == "reference":
        out, probs = reference_backend.attention_with_probs(q, k, v, args)
        return (out, probs) if return_probs else out
    return BACKENDS[backend].forward(q, k, v, args)
