"""ByTheWay / BroadWay (arXiv 2410.06241; spec §8.2, §8.4) on a DiT's temporal layers, training-free.

After the softmax of the temporal attention, during the first ``active_fraction`` of each chunk's steps:

- **Temporal Self-Guidance** (target layers): ``A_m ← (1 − α)·A_m + α·A_anchor``, the anchor's vanilla map
  from the same forward (same branch, step and grid). A convex mix of causal row-stochastic maps stays both.
- **Fourier Motion Enhancement** (anchors and targets): every noisy row with ``n ≥ 2`` visible keys becomes
  ``a' = 1/n + β·(a − 1/n)`` on its visible keys: the high band is every non-DC bin (upstream's F = 16, τ = 7),
  where scaling the non-DC spectrum by β is exactly this closed form. Row sums stay 1, masked keys stay 0.
  Negative weights are kept (ByTheWay v3); ``clamp_negative`` zeroes them and renormalises (BroadWay v1).
  ``tau`` narrows the band to the spec's 2τ+1 bins around Nyquist (done with the FFT); ``fme_keys`` edits only
  the noisy or only the cached keys of a row, keeping the other part's weights.
- **Adaptive β** per sample, from the conditional branch, applied to both: with energies ``E = Σ_j a_j²``
  averaged over noisy rows (n ≥ 2), heads and positions, ``E₁`` before TSG, ``E₂`` after it, its DC part
  ``E₂_L = mean 1/n`` and the rest ``E₂_H = E₂ − E₂_L``: ``β = max(β₀, √((E₁ − E₂_L)/E₂_H))``, so ``E₃ ≥ E₁``.

A DiT has no decoder: its back half ``[⌊D/2⌋, D)`` plays it; the anchors are the first ``r = ⌈D/8⌉`` blocks of
it and target ``b`` pairs with anchor ``⌊D/2⌋ + ((b − ⌊D/2⌋) mod r)``. Clean rows, masked keys and cache writes
are never touched, so cached sampling stays exact with the plug-in on.

    BroadWay(depth=4).attach(model)   # anchors blocks.2, targets blocks.3
"""

from __future__ import annotations

import argparse
import math

import torch
from timeloom_kernels import set_processor
from timeloom_kernels.processors import AttentionContext, AttentionProcessor
from torch import Tensor, nn

from timeloom_generation.vstar import noisy_rows

__all__ = [
    "BroadWay",
    "broadway_arguments",
    "high_band",
    "high_band_energy",
    "motion_enhance",
    "noisy_keys",
    "part_energy",
    "row_energy",
    "temporal_layer",
]

# FME's keys: the whole visible row, only the keys of the frames being denoised, or only the cached frames' keys
FME_KEYS = ("all", "noisy", "cached")


def temporal_layer(block: int) -> str:
    return f"blocks.{block}.temporal.attend"


def row_energy(probs: Tensor) -> Tensor:
    """``Σ_j a_j²`` per row: ``(..., Lq, Lk) -> (..., Lq)``."""
    return probs.pow(2).sum(-1)


def high_band(n: int, tau: int | None, device=None) -> Tensor:
    """``(n,)`` bool: the FFT bins FME scales, ``min(k, n − k) ≥ ⌈n/2⌉ − τ`` (the 2τ+1 bins around Nyquist),
    never DC; every non-DC bin when ``tau`` is None (upstream's F = 16, τ = 7)."""
    k = torch.arange(n, device=device)
    folded = torch.minimum(k, n - k)
    if tau is None:
        return folded > 0
    return (folded > 0) & (folded >= math.ceil(n / 2) - tau)


def visible_keys_by_count(visible: Tensor):
    """For each count ``n ≥ 2`` of visible keys in a row: ``(n, rows, keys)``, the flat indices of the rows with
    ``n`` visible keys and, per row, its visible keys' indices in order (``(R,)``, ``(R, n)``)."""
    flat = visible.reshape(-1, visible.shape[-1])
    counts = flat.sum(-1)
    for n in counts.unique().tolist():
        if n >= 2:
            rows = (counts == n).nonzero().squeeze(-1)
            keys = flat[rows].float().argsort(dim=-1, descending=True, stable=True)[:, :n].sort(-1).values
            yield n, rows, keys


def motion_enhance(
    probs: Tensor,
    visible: Tensor,
    beta: Tensor | float,
    clamp_negative: bool = False,
    tau: int | None = None,
) -> Tensor:
    """Scale the high band of each row's spectrum over its ``n`` visible keys by β; other keys keep their
    weight, and rows with ``n < 2`` visible keys are kept.

    ``probs``/``visible`` ``(..., Lq, Lk)``; ``beta`` broadcasts to ``(..., 1, 1)``. With every non-DC bin in the
    band (``tau`` None) the edit is the closed form ``m/n + β·(a − m/n)``, ``m`` the visible keys' mass (1 on a
    whole row); with ``tau`` it is done with the FFT over the visible keys in order. DC is never scaled, so the
    mass is kept. ``clamp_negative`` (BroadWay v1) zeroes the negative weights and rescales the visible keys to
    their mass, so the row stays a distribution.
    """
    count = visible.sum(-1, keepdim=True).clamp(min=1)
    mass = torch.where(visible, probs, 0).sum(-1, keepdim=True)
    if tau is None:
        uniform = mass / count
        enhanced = torch.where(visible, uniform + beta * (probs - uniform), probs)
    else:
        scale = torch.as_tensor(beta, dtype=probs.dtype, device=probs.device).expand(probs.shape)
        scale = scale[..., 0].reshape(-1)  # one β per row
        flat = probs.reshape(-1, probs.shape[-1]).clone()
        for n, rows, keys in visible_keys_by_count(visible.expand_as(probs)):
            spectrum = torch.fft.fft(flat[rows.unsqueeze(-1), keys].double(), dim=-1)
            band = high_band(n, tau, probs.device)
            spectrum = torch.where(band, spectrum * scale[rows].double().unsqueeze(-1), spectrum)
            flat[rows.unsqueeze(-1), keys] = torch.fft.ifft(spectrum, dim=-1).real.to(probs.dtype)
        enhanced = flat.view_as(probs)
    if clamp_negative:  # the part's sum is its mass before the clamp, so at least that after it
        part = torch.where(visible, enhanced.clamp(min=0), 0)
        enhanced = torch.where(visible, part * mass / part.sum(-1, keepdim=True).clamp(min=1e-12), probs)
    return torch.where(count >= 2, enhanced, probs)


def high_band_energy(probs: Tensor, part: Tensor, tau: int | None) -> Tensor:
    """The high band's share of `part_energy` (Parseval, factor 1/n): ``(..., Lq, Lk) -> (..., Lq)``, 0 on rows
    with fewer than 2 keys in ``part``. Every non-DC bin (``tau`` None): the energy less its DC part ``1/n``."""
    count = part.sum(-1)
    if tau is None:
        return torch.where(count >= 2, part_energy(probs, part) - 1 / count.clamp(min=1), 0)
    weights = torch.where(part, probs, 0)
    weights = weights / weights.sum(-1, keepdim=True).clamp(min=1e-12)
    flat = weights.reshape(-1, weights.shape[-1])
    energy = torch.zeros(flat.shape[0], dtype=probs.dtype, device=probs.device)
    for n, rows, keys in visible_keys_by_count(part.expand_as(probs)):
        spectrum = torch.fft.fft(flat[rows.unsqueeze(-1), keys].double(), dim=-1)
        band = high_band(n, tau, probs.device)
        energy[rows] = (spectrum.abs().pow(2) * band).sum(-1).div(n).to(probs.dtype)
    return energy.view(weights.shape[:-1])


def part_energy(probs: Tensor, part: Tensor) -> Tensor:
    """``Σ_j (a_j / m)²`` over the keys in ``part``, ``m`` their mass: the energy of that part as a
    distribution (on a whole row, `row_energy`). ``(..., Lq, Lk) -> (..., Lq)``."""
    weights = torch.where(part, probs, 0)
    return row_energy(weights) / weights.sum(-1).pow(2).clamp(min=1e-12)


def noisy_keys(ctx: AttentionContext, q_len: int, k_len: int, device=None) -> Tensor:
    """``(1, Lk)`` bool: the keys of frames being denoised. They are the queries' noisy frames, which come last
    in the keys (after the cache's frames, or the clean history's)."""
    noisy = q_len - int(ctx.extra.get("clean_rows", 0))
    return (torch.arange(k_len, device=device) >= k_len - noisy).unsqueeze(0)


class BroadWay(AttentionProcessor):
    """ByTheWay's TSG + FME as one processor over a model's anchor and target temporal layers.

    Defaults are not the paper's. Its AnimateDiff values (α 0.6, β₀ 1.5, first 20% of steps) left the tiny VDM's
    motion unchanged (×0.97-0.98 on two prompt sets): a 4-block DiT sampled with 20 Euler steps gets 4 edited
    steps on one anchor and one target layer, against the paper's 3 up-blocks over 20% of 25+ DDIM steps. Ours
    (α 0.1, β₀ 5, first 40%) are VideoCrafter2's lighter α with a stronger β₀ over more steps, chosen by a sweep
    on one prompt set and measured on another (benchmarks/generation-quality.md). The paper's values stay one
    argument away: ``BroadWay(depth, alpha=0.6, beta0=1.5, active_fraction=0.2)``, or
    ``--broadway-with "alpha=0.6,beta0=1.5,active_fraction=0.2"`` on the commands.

    No form meets issue #5's bar (motion ×1.2 for ≤ 2 points of identity) on this model, so the default stays:
    on 192 held-out prompts it gives ×1.18 for −11.5 ± 3.6 points, most of the extra motion a jerk between a
    chunk's latent frames (its negative weights push the noisy frames away from the cached ones).
    ``clamp_negative=True`` on every block over every step (``alpha=0, beta0=10, active_fraction=1,
    anchors=[0], targets=[1, 2, 3]``) keeps identity and speeds the digit evenly, but by ×1.175 ± 0.016 for
    −2.0 ± 1.6 points pooled over two held-out sets (384 videos): short of ×1.2. FME on the noisy keys only
    (``fme_keys="noisy"``) or the cached keys only moves the digit less (×0.98–1.10), and a partial band
    (``tau``) slows it (generation-quality.md, stops 13 and 14).

    Args:
        depth: number of blocks ``D`` of the model.
        alpha: TSG weight α (0 turns TSG off).
        beta0: the floor β₀ of the adaptive FME scale (with α = 0 and β₀ = 1 the plug-in is the identity).
        active_fraction: steps ``k < ceil(fraction · S)`` of each chunk are edited.
        clamp_negative: BroadWay v1's FME, negative weights zeroed and rows renormalised (v3 keeps them).
        fme_keys: the keys FME edits: ``"all"`` visible ones (upstream), only the ``"noisy"`` keys of the frames
            being denoised, or only the ``"cached"`` (clean) ones; the rest of the row keeps its weights, and
            the adaptive β uses the edited part's energies.
        tau: the high band, the bins with ``min(k, n − k) ≥ ⌈n/2⌉ − τ``; None: every non-DC bin (upstream).
        anchors, targets: block indices overriding the default mapping; each target pairs with
            ``anchors[(b − anchors[0]) mod len(anchors)]``.
    """

    def __init__(
        self,
        depth: int,
        alpha: float = 0.1,
        beta0: float = 5.0,
        active_fraction: float = 0.4,
        clamp_negative: bool = False,
        fme_keys: str = "all",
        tau: int | None = None,
        anchors: list[int] | None = None,
        targets: list[int] | None = None,
    ) -> None:
        half = depth // 2
        anchors = list(range(half, half + math.ceil(depth / 8))) if anchors is None else list(anchors)
        targets = list(range(anchors[-1] + 1, depth)) if targets is None else list(targets)
        if not anchors or any(not 0 <= b < depth for b in anchors + targets) or set(anchors) & set(targets):
            raise ValueError(
                f"anchors {anchors} and targets {targets} must be disjoint blocks of a {depth}-block model"
            )
        if any(t <= max(anchors) for t in targets):
            raise ValueError(f"every target {targets} must come after the anchors {anchors} (same forward)")
        self.alpha, self.beta0, self.active_fraction = alpha, beta0, active_fraction
        if fme_keys not in FME_KEYS:
            raise ValueError(f"fme_keys must be one of {FME_KEYS}; got {fme_keys!r}")
        if tau is not None and tau < 0:
            raise ValueError(f"tau must be None (every non-DC bin) or >= 0; got {tau}")
        self.clamp_negative, self.fme_keys, self.tau = clamp_negative, fme_keys, tau
        self.anchor_of = {
            temporal_layer(b): temporal_layer(anchors[(b - anchors[0]) % len(anchors)]) for b in targets
        }
        self.anchors = [temporal_layer(b) for b in anchors]
        self._maps: dict[str, Tensor] = {}  # the anchors' vanilla maps of the current forward
        self._visible: Tensor | None = None

    def attach(self, model: nn.Module) -> list[str]:
        """Hook the anchor and target layers of ``model``; returns their names."""
        return [
            name
            for layer in self.anchors + list(self.anchor_of)
            for name in set_processor(model, layer, self)
        ]

    def active(self, ctx: AttentionContext) -> bool:
        if ctx.step is None or ctx.extra.get("write", False):
            return False
        return ctx.step < math.ceil(self.active_fraction * ctx.num_steps)

    def logits(self, ctx: AttentionContext, scores: Tensor) -> Tensor:
        self._visible = torch.isfinite(scores)  # exact visibility, for this call's `probs`
        return scores

    def probs(self, ctx: AttentionContext, probs: Tensor) -> Tensor:
        noisy = noisy_rows(ctx, probs.shape[-2], probs.device)
        visible = self._visible & noisy
        if ctx.name in self.anchors:
            self._maps[ctx.name] = probs
            mixed = probs
        else:
            mixed = (1 - self.alpha) * probs + self.alpha * self._maps[self.anchor_of[ctx.name]]
        if self.fme_keys != "all":  # the rest of the row keeps its weights
            denoised = noisy_keys(ctx, probs.shape[-2], probs.shape[-1], probs.device)
            visible = visible & (denoised if self.fme_keys == "noisy" else ~denoised)
        beta = self.adaptive_beta(ctx, probs, mixed, visible)
        enhanced = motion_enhance(mixed, visible, beta, self.clamp_negative, self.tau)
        return torch.where(noisy, enhanced, probs)

    def adaptive_beta(self, ctx: AttentionContext, before: Tensor, after: Tensor, visible: Tensor) -> Tensor:
        """β per sample from the conditional branch, as ``(B', 1, 1, 1)`` for the call's batch ``B'``."""
        counted = visible.sum(-1) >= 2  # (B', H, Lq): rows whose energies count
        cond = ctx.cfg_slice("cond") if ctx.cfg is not None else slice(None)
        branches = len(ctx.cfg) if ctx.cfg is not None else 1
        # The temporal layout is (videos · positions): the sampler says how many videos (else: one pool).
        videos = int(ctx.extra.get("videos", 1))

        def per_sample(values: Tensor) -> Tensor:  # mean over counted rows, per video: (B,)
            weights = counted[cond].float().reshape(videos, -1)
            values = values[cond].reshape(videos, -1)
            return (values * weights).sum(-1) / weights.sum(-1).clamp(min=1)

        e1 = per_sample(part_energy(before, visible))
        e2 = per_sample(part_energy(after, visible))
        e2_high = per_sample(high_band_energy(after, visible, self.tau))
        e2_low = e2 - e2_high
        ratio = ((e1 - e2_low).clamp(min=0) / e2_high.clamp(min=1e-8)).sqrt()
        beta = torch.where(e2_high < 1e-8, torch.full_like(e1, self.beta0), ratio.clamp(min=self.beta0))
        return (
            beta.repeat_interleave(before.shape[0] // len(beta) // branches)
            .repeat(branches)
            .view(-1, 1, 1, 1)
        )


def broadway_arguments(text: str) -> dict[str, float | bool | str | list[int]]:
    """``"beta0=10,clamp_negative=1,fme_keys=noisy,targets=1+3"`` -> ``{"beta0": 10.0, "clamp_negative": True,
    "fme_keys": "noisy", "targets": [1, 3]}``: BroadWay's floats, its flag (0/1), its FME keys, its band ``tau``
    and its block lists joined by ``+`` (``targets=`` empty: none)."""
    floats, flags, blocks = ("alpha", "beta0", "active_fraction"), ("clamp_negative",), ("anchors", "targets")
    known = floats + flags + blocks + ("fme_keys", "tau")
    arguments: dict[str, float | bool | str | list[int]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in known:
            raise argparse.ArgumentTypeError(f"unknown BroadWay argument {key!r} in {text!r}; known: {known}")
        try:
            if key in floats:
                arguments[key] = float(value)
            elif key in flags:
                arguments[key] = bool({"0": False, "1": True}[value])
            elif key == "fme_keys":
                if value not in FME_KEYS:
                    raise argparse.ArgumentTypeError(f"fme_keys={value!r} in {text!r}: one of {FME_KEYS}")
                arguments[key] = value
            elif key == "tau":
                arguments[key] = int(value)
            else:
                arguments[key] = [int(b) for b in value.split("+") if b]
        except (ValueError, KeyError):
            raise argparse.ArgumentTypeError(
                f"BroadWay argument {item!r} in {text!r} is not a number (flags: 0 or 1)"
            ) from None
    return arguments
