"""Initialise a tokenizer stage from the previous stage's checkpoint (spec section 4).

Stage 2 starts from stage 1 with the video tubelet embedding and head *inflated* from the image (first-frame)
patch weights, and the 3-D video discriminator inflated from the 2-D image one; stage 3 starts from stage 2
with ``pre_quant`` re-initialised for the KL bottleneck. `transfer_state` does all three from one rule:
every weight of the new module comes from the checkpoint under the same name and shape, unless it is
inflated or explicitly listed to keep its fresh initialisation; anything else is an error naming the keys.

Tubelet inflation strategies (patches are flattened ``(time, row, column, channel)``, see
`timeloom_tokenizer.model.patchify`, so the weights are reshaped to ``(…, t, p, p, c)``):

- ``"static"`` (static-video-exact): the input LayerNorm's γ/β are repeated over ``t``, the Linear weight
  is repeated over ``t`` and divided by ``t`` (bias copied), the output LayerNorm copied; the head's rows and
  bias are repeated over ``t``. A tubelet of ``t`` identical frames then embeds exactly like the image patch
  (same LayerNorm statistics, ``Σ_t W x / t = W x``) and decodes to ``t`` copies.
- ``"upstream"``: OmniTokenizer's released rule, for reproduction only. It concatenates ``t`` flat copies
  of the image weights laid out ``(c, p, p)`` into a vector its tubelets lay out ``(c, t, p, p)``, so the
  copies land on the wrong channel and frame slots, and it divides the LayerNorm affine, the Linear weight
  and the head by ``t``. A static video then no longer embeds like its image.
- ``"first"``: the Linear weight in the first time slot and zeros elsewhere (LayerNorm repeated, as
  ``"static"``); the head decodes the image into the first frame of each tubelet and 0 (grey) elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DISCRIMINATOR_SLOTS",
    "INFLATION_STRATEGIES",
    "inflate_conv",
    "inflate_tubelet_weights",
    "transfer_state",
]

InflationStrategy = Literal["static", "upstream", "first"]
DiscriminatorSlot = Literal["center", "average", "first", "last"]
INFLATION_STRATEGIES = ("static", "upstream", "first")
DISCRIMINATOR_SLOTS = ("center", "average", "first", "last")

# Names inside an `OmniTokenizerModule` state dict.
_FIRST_FRAME_EMBEDDING = "model.first_frame_embedding."
_TUBELET_EMBEDDING = "model.tubelet_embedding."
_FIRST_FRAME_HEAD = "model.first_frame_head."
_TUBELET_HEAD = "model.tubelet_head."
_IMAGE_DISCRIMINATOR = "loss.image_discriminator."
_VIDEO_DISCRIMINATOR = "loss.video_discriminator."


def _repeat_over_time(
    values: Tensor, t: int, patch: int, channels: int, *, first_only: bool = False
) -> Tensor:
    """``(…, p·p·c) → (…, t·p·p·c)``: the image patch layout repeated along the tubelet's time axis
    (or placed in time slot 0 with zeros elsewhere when ``first_only``)."""
    grid = values.unflatten(-1, (1, patch, patch, channels))
    if first_only:
        zeros = grid.new_zeros(*grid.shape[:-4], t - 1, patch, patch, channels)
        return torch.cat((grid, zeros), dim=-4).flatten(-4)
    return grid.expand(*grid.shape[:-4], t, patch, patch, channels).flatten(-4)


def _upstream_layout(values: Tensor, t: int, patch: int, channels: int) -> Tensor:
    """Upstream's rule in our layout: ``t`` flat ``(c, p, p)`` copies read as a ``(c, t, p, p)`` tubelet,
    then brought to our ``(t, p, p, c)`` order, so every weight sits where upstream's model would use it."""
    image_cpp = values.unflatten(-1, (patch, patch, channels)).movedim(-1, -3).flatten(-3)
    concatenated = torch.cat([image_cpp] * t, dim=-1)
    tubelet_ctpp = concatenated.unflatten(-1, (channels, t, patch, patch))
    return tubelet_ctpp.movedim(-4, -1).flatten(-4)


def inflate_tubelet_weights(
    image: dict[str, Tensor],
    *,
    channels: int,
    patch: int,
    temporal_patch: int,
    strategy: InflationStrategy = "static",
) -> dict[str, Tensor]:
    """Tubelet embedding and head weights from the first-frame ones.

    Args:
        image: ``{"embedding.norm_in.weight", "embedding.norm_in.bias", "embedding.proj.weight",
            "embedding.proj.bias", "embedding.norm_out.weight", "embedding.norm_out.bias", "head.weight",
            "head.bias"}`` of the first-frame `PatchEmbedding` and head.
        channels, patch, temporal_patch: ``c``, ``p`` and ``t`` of the tokenizer.
        strategy: ``"static"``, ``"upstream"`` or ``"first"`` (module docstring).

    Returns:
        The same keys, sized for ``t·p·p·c`` tubelets.
    """
    if strategy not in INFLATION_STRATEGIES:
        raise ValueError(f"inflation strategy must be one of {INFLATION_STRATEGIES}, got {strategy!r}")
    t, p, c = temporal_patch, patch, channels

    def spread(values: Tensor, *, first_only: bool = False) -> Tensor:
        if strategy == "upstream":
            return _upstream_layout(values, t, p, c)
        return _repeat_over_time(values, t, p, c, first_only=first_only)

    # Upstream divides every inflated tensor by t; static only the Linear weight, which sums t slots.
    upstream_scale = 1 / t if strategy == "upstream" else 1.0
    proj = image["embedding.proj.weight"]
    if strategy == "first":
        proj_weight = spread(proj, first_only=True)
    else:
        proj_weight = spread(proj) / t
    head_weight = image["head.weight"]  # (p·p·c, d): rows are patch slots
    head_bias = image["head.bias"]
    return {
        "embedding.norm_in.weight": spread(image["embedding.norm_in.weight"]) * upstream_scale,
        "embedding.norm_in.bias": spread(image["embedding.norm_in.bias"]) * upstream_scale,
        "embedding.proj.weight": proj_weight,
        "embedding.proj.bias": image["embedding.proj.bias"].clone(),
        "embedding.norm_out.weight": image["embedding.norm_out.weight"].clone(),
        "embedding.norm_out.bias": image["embedding.norm_out.bias"].clone(),
        "head.weight": spread(head_weight.T, first_only=strategy == "first").T.contiguous() * upstream_scale,
        "head.bias": spread(head_bias, first_only=strategy == "first") * upstream_scale,
    }


def inflate_conv(weight: Tensor, temporal_kernel: int, slot: DiscriminatorSlot = "center") -> Tensor:
    """A 2-D conv weight ``(o, i, kh, kw)`` as a 3-D one ``(o, i, kt, kh, kw)``.

    ``center``/``first``/``last`` put it in that time tap (zeros elsewhere), so on a static clip every
    frame away from the temporal padding sees the 2-D response; ``average`` spreads it over all taps ÷ kt.
    """
    if slot not in DISCRIMINATOR_SLOTS:
        raise ValueError(f"discriminator inflation slot must be one of {DISCRIMINATOR_SLOTS}, got {slot!r}")
    if slot == "average":
        return weight.unsqueeze(2).expand(-1, -1, temporal_kernel, -1, -1) / temporal_kernel
    inflated = weight.new_zeros(weight.shape[0], weight.shape[1], temporal_kernel, *weight.shape[2:])
    tap = {"center": temporal_kernel // 2, "first": 0, "last": temporal_kernel - 1}[slot]
    inflated[:, :, tap] = weight
    return inflated


def transfer_state(
    source: dict[str, Tensor],
    target: dict[str, Tensor],
    *,
    channels: int,
    patch: int,
    temporal_patch: int,
    inflate: InflationStrategy | None = None,
    discriminator_slot: DiscriminatorSlot = "center",
    reinitialize: Sequence[str] = (),
) -> tuple[dict[str, Tensor], list[str]]:
    """The state to load into an `OmniTokenizerModule` whose current state is ``target``, from ``source``.

    - With ``inflate``, the tubelet embedding and head come from the source's first-frame weights.
    - A video discriminator the source lacks is inflated from the source's image discriminator.
    - Keys starting with a ``reinitialize`` prefix keep their ``target`` value.
    - Every other target key is copied from ``source``, which must hold it with the same shape.

    Returns:
        ``(state, unused)``: the full state for ``load_state_dict(strict=True)``, and the source keys that
        were not used (e.g. a VQ codebook when fine-tuning a KL bottleneck, a dropped image discriminator).

    Raises:
        KeyError: naming every target key the source cannot fill, with the shapes of mismatches.
    """
    state: dict[str, Tensor] = {}
    used: set[str] = set()
    if inflate is not None:
        image = {
            **_strip(source, _FIRST_FRAME_EMBEDDING, "embedding."),
            **_strip(source, _FIRST_FRAME_HEAD, "head."),
        }
        tubelet = inflate_tubelet_weights(
            image, channels=channels, patch=patch, temporal_patch=temporal_patch, strategy=inflate
        )
        for key, value in tubelet.items():
            prefix = _TUBELET_EMBEDDING if key.startswith("embedding.") else _TUBELET_HEAD
            state[prefix + key.split(".", 1)[1]] = value
    has_video_discriminator = any(k.startswith(_VIDEO_DISCRIMINATOR) for k in source)
    problems = []
    for key, current in target.items():
        if any(key.startswith(prefix) for prefix in reinitialize):
            state[key] = current
            continue
        if key in state:
            value = state[key]
        elif key.startswith(_VIDEO_DISCRIMINATOR) and not has_video_discriminator:
            image_key = _IMAGE_DISCRIMINATOR + key[len(_VIDEO_DISCRIMINATOR) :]
            value = source.get(image_key)
            if value is not None:
                used.add(image_key)
                if value.dim() == 4 and current.dim() == 5:
                    value = inflate_conv(value, current.shape[2], discriminator_slot)
        else:
            value = source.get(key)
            used.add(key)
        if value is None:
            problems.append(f"{key}: missing")
        elif value.shape != current.shape:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(current.shape)}")
        else:
            state[key] = value.to(current.dtype)
    if problems:
        raise KeyError(
            "the init checkpoint cannot fill these weights (list a prefix under `reinitialize` to keep "
            "their fresh initialisation):\n  " + "\n  ".join(problems)
        )
    if inflate is not None:
        used |= {k for k in source if k.startswith((_FIRST_FRAME_EMBEDDING, _FIRST_FRAME_HEAD))}
    unused = sorted(k for k in source if k not in used)
    return state, unused


def _strip(state: dict[str, Tensor], prefix: str, replacement: str) -> dict[str, Tensor]:
    return {replacement + k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
