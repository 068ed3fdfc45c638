"""Attention processors: read or edit the attention of named layers (spec §7).

How a layer finds its processor: a model computes attention through an `Attend` module (parameter-free,
one per attention layer) instead of calling `attend` directly::

    class SelfAttention(nn.Module):
        def __init__(self, ...):
            ...
            self.attend = Attend()

        def forward(self, x, mask):
            q, k, v = ...
            return self.attend(q, k, v, mask)  # same arguments as `attend`

``name_attention_layers(model)`` (call it at the end of the model's ``__init__``) gives every `Attend` its
qualified name, e.g. ``"blocks.3.attn.attend"``; ``set_processor(model, "blocks.*", proc)`` attaches a
processor to the matching ones. Processors live on the modules, so two models never share state, and a
layer without one pays nothing. A sampler describes the current call (denoising step, CFG batch layout,
grids) with ``with attention_context(step=..., num_steps=..., cfg=("uncond", "cond")):``.

Only layers whose processor is *active* for the current context switch to the ``reference`` backend (the
one that exposes logits and probabilities); all others keep the fast path. If a caller names another
backend explicitly while a processor is active, `attend` raises rather than dropping the edit.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fnmatch
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from torch import Tensor, nn

from timeloom_kernels.attention import attend

__all__ = [
    "Attend",
    "AttentionContext",
    "AttentionProcessor",
    "AttentionStore",
    "ProcessorProtocol",
    "attention_context",
    "clear_processors",
    "current_context",
    "name_attention_layers",
    "set_processor",
]


@dataclass(frozen=True)
class AttentionContext:
    """What a processor knows about the call: the layer, the sampling step, shapes, grids, CFG layout.

    ``cfg`` lists the batch blocks in order, e.g. ``("uncond", "cond")``: the batch is split into
    ``len(cfg)`` equal blocks, and `cfg_slice` finds one by label, never by ``reshape(2, ...)``.
    ``frames`` is the video token grid ``(T, H, W)``; ``extra`` carries anything model-specific.
    """

    name: str = ""
    index: int | None = None
    step: int | None = None
    num_steps: int | None = None
    q_shape: tuple[int, ...] | None = None
    kv_shape: tuple[int, ...] | None = None
    frames: tuple[int, int, int] | None = None
    cfg: tuple[str, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def progress(self) -> float | None:
        """``step / num_steps`` in [0, 1), or None outside a sampling loop."""
        if self.step is None or not self.num_steps:
            return None
        return self.step / self.num_steps

    def cfg_slice(self, label: str) -> slice:
        """The batch rows of CFG block ``label`` (e.g. ``"cond"``)."""
        if self.cfg is None or label not in self.cfg:
            raise ValueError(f"CFG block {label!r} is not in the context's layout {self.cfg}")
        if self.q_shape is None:
            raise ValueError("cfg_slice needs the call's shapes; it is available inside a processor hook")
        batch, blocks = self.q_shape[0], len(self.cfg)
        if batch % blocks:
            raise ValueError(f"batch {batch} does not split into the {blocks} CFG blocks {self.cfg}")
        size = batch // blocks
        start = self.cfg.index(label) * size
        return slice(start, start + size)


_context: contextvars.ContextVar[AttentionContext | None] = contextvars.ContextVar(
    "timeloom_attention_context", default=None
)


def current_context() -> AttentionContext:
    """The context set by the innermost `attention_context` (empty outside any)."""
    return _context.get() or AttentionContext()


@contextlib.contextmanager
def attention_context(**fields: Any) -> Iterator[AttentionContext]:
    """Set context fields (``step``, ``num_steps``, ``cfg``, ``frames``, ``extra`` …) for the block.

    Nested contexts inherit the outer fields and override the ones they name.
    """
    unknown = set(fields) - {f.name for f in dataclasses.fields(AttentionContext)}
    if unknown:
        raise ValueError(f"unknown attention context fields {sorted(unknown)}")
    if "cfg" in fields and fields["cfg"] is not None:
        fields["cfg"] = tuple(fields["cfg"])
    ctx = dataclasses.replace(current_context(), **fields)
    token = _context.set(ctx)
    try:
        yield ctx
    finally:
        _context.reset(token)


@runtime_checkable
class ProcessorProtocol(Protocol):
    """What `set_processor` accepts. ``positions(ctx, q, k) -> (q_pos, kv_pos)`` may also be defined."""

    def active(self, ctx: AttentionContext) -> bool: ...

    def logits(self, ctx: AttentionContext, scores: Tensor) -> Tensor: ...

    def probs(self, ctx: AttentionContext, probs: Tensor) -> Tensor: ...


class AttentionProcessor:
    """Base processor: active everywhere, edits nothing. Override what you need.

    ``logits`` sees the scores ``(B, Hq, Lq, Lk)`` after scale, bias and mask (masked entries are ``-inf``);
    ``probs`` sees the post-softmax probabilities before they weight ``v``. Both run in fp32 (fp64 inputs
    stay fp64). A subclass may add ``positions(ctx, q, k) -> (q_pos, kv_pos)`` to re-position the call.
    """

    def active(self, ctx: AttentionContext) -> bool:
        return True

    def logits(self, ctx: AttentionContext, scores: Tensor) -> Tensor:
        return scores

    def probs(self, ctx: AttentionContext, probs: Tensor) -> Tensor:
        return probs


@dataclass(frozen=True)
class _BoundProcessor:
    """A processor with its context: the `ScoreHook` the reference backend calls."""

    processor: ProcessorProtocol
    ctx: AttentionContext

    def logits(self, scores: Tensor) -> Tensor:
        return self.processor.logits(self.ctx, scores)

    def probs(self, probs: Tensor) -> Tensor:
        return self.processor.probs(self.ctx, probs)


class Attend(nn.Module):
    """One attention layer's call to `attend`: where its name and processor live. No parameters.

    ``forward`` takes `attend`'s arguments. When the processor is active for the current context, the
    call runs on ``reference`` with the processor's hooks (and its ``positions``, if it defines them).
    """

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None
        self.index: int | None = None
        self.processor: ProcessorProtocol | None = None

    def forward(
        self, q: Tensor, k: Tensor, v: Tensor, mask=None, **kwargs: Any
    ) -> Tensor | tuple[Tensor, Tensor]:
        if self.processor is not None:
            ctx = dataclasses.replace(
                current_context(),
                name=self.name or "",
                index=self.index,
                q_shape=tuple(q.shape),
                kv_shape=tuple(k.shape),
            )
            if self.processor.active(ctx):
                reposition = getattr(self.processor, "positions", None)
                if reposition is not None:
                    kwargs["q_pos"], kwargs["kv_pos"] = reposition(ctx, q, k)
                kwargs["processor"] = _BoundProcessor(self.processor, ctx)
        return attend(q, k, v, mask, name=self.name, **kwargs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, processor={type(self.processor).__name__ if self.processor else None}"


def name_attention_layers(model: nn.Module) -> list[str]:
    """Give every `Attend` in ``model`` its qualified name and index; returns the names in order."""
    names = []
    for index, (name, module) in enumerate((n, m) for n, m in model.named_modules() if isinstance(m, Attend)):
        module.name, module.index = name, index
        names.append(name)
    return names


def _matching(model: nn.Module, glob: str) -> list[Attend]:
    layers = [m for m in model.modules() if isinstance(m, Attend)]
    if any(layer.name is None for layer in layers):
        name_attention_layers(model)
    return [layer for layer in layers if fnmatch.fnmatchcase(layer.name, glob)]


def set_processor(model: nn.Module, glob: str, processor: ProcessorProtocol) -> list[str]:
    """Attach ``processor`` to every attention layer whose name matches ``glob``; returns their names.

    Raises ``ValueError`` when nothing matches (a typo would otherwise silently do nothing).
    """
    if not isinstance(processor, ProcessorProtocol):
        raise ValueError(
            f"a processor needs active(ctx), logits(ctx, S) and probs(ctx, A); got {processor!r}"
        )
    layers = _matching(model, glob)
    if not layers:
        names = [m.name for m in model.modules() if isinstance(m, Attend)]
        raise ValueError(f"no attention layer matches {glob!r}; layers are {names}")
    for layer in layers:
        layer.processor = processor
    return [layer.name for layer in layers]


def clear_processors(model: nn.Module, glob: str = "*") -> None:
    """Detach the processors of the layers matching ``glob`` (all by default)."""
    for layer in _matching(model, glob):
        layer.processor = None


class AttentionStore(AttentionProcessor):
    """Collects attention maps of the layers matching ``glob`` (for figures), without editing them.

    ``maps[name]`` is a list with one entry per call, detached: ``(B, Lq, Lk)`` averaged over heads
    (``reduce="mean_heads"``) or ``(B, H, Lq, Lk)`` (``reduce="none"``). ``cfg`` keeps only that CFG block.
    """

    def __init__(
        self, glob: str = "*", reduce: Literal["mean_heads", "none"] = "mean_heads", cfg: str | None = None
    ) -> None:
        if reduce not in ("mean_heads", "none"):
            raise ValueError(f"reduce must be 'mean_heads' or 'none'; got {reduce!r}")
        self.glob, self.reduce, self.cfg = glob, reduce, cfg
        self.maps: dict[str, list[Tensor]] = {}

    def active(self, ctx: AttentionContext) -> bool:
        return fnmatch.fnmatchcase(ctx.name, self.glob)

    def probs(self, ctx: AttentionContext, probs: Tensor) -> Tensor:
        kept = probs if self.cfg is None else probs[ctx.cfg_slice(self.cfg)]
        kept = kept.mean(dim=1) if self.reduce == "mean_heads" else kept
        self.maps.setdefault(ctx.name, []).append(kept.detach())
        return probs

    def clear(self) -> None:
        self.maps.clear()
