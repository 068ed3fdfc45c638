"""Tokenizer training losses: PatchGAN discriminators, GAN losses, LPIPS-style perceptual loss.

`TokenizerLoss` combines them as in spec section 3:

    L_G = w_rec·L_rec(x̂, x) + w_p·LPIPS(x̂_f, x_f) + L_quant + d_weight·Σ_n w_n·G_n(x̂)
    L_D = Σ_n D-loss_n(x, sg(x̂))

where `n` ranges over the image (2-D, one random frame per video) and video (3-D, whole clip)
discriminators, and `d_weight = 1[step ≥ disc_start]`, times VQGAN's adaptive ratio when enabled.
Nothing here downloads weights: the perceptual network is read from a local file or is off.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# torchvision's VGG16 `features` layout ("D"): conv widths, "M" for max-pool.
# The fifth block's pool is left out: LPIPS's last tap is relu5_3.
_VGG16_LAYOUT: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512
)  # fmt: skip
# LPIPS taps relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3: the ReLU after these conv indices.
_LPIPS_TAP_CONVS = (2, 4, 7, 10, 13)
# LPIPS's input normalisation for [-1, 1] images (its `ScalingLayer`).
_LPIPS_SHIFT = (-0.030, -0.088, -0.188)
_LPIPS_SCALE = (0.458, 0.448, 0.450)


# --------------------------------------------------------------------------------------------------
# Discriminators
# --------------------------------------------------------------------------------------------------


class _PatchDiscriminator(nn.Module):
    """Shared PatchGAN body: `n_layers` stride-2 blocks, one stride-1 block, a 1-channel head."""

    spatial_dims: int

    def __init__(
        self,
        *,
        in_channels: int,
        base_channels: int,
        n_layers: int,
        use_norm: bool,
        kernel_size: tuple[int, ...],
        padding: tuple[int, ...],
        downsample_stride: tuple[int, ...],
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("base_channels", base_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        conv = nn.Conv2d if len(kernel_size) == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if len(kernel_size) == 2 else nn.BatchNorm3d
        self.in_channels = in_channels
        self.n_layers = n_layers
        # Spatial side (H, W) below which the head would have no output; the last two dims of the
        # kernel are always the spatial ones.
        self.min_spatial_size = _min_input_size(
            [(kernel_size[-1], downsample_stride[-1], padding[-1])] * n_layers
            + [(kernel_size[-1], 1, padding[-1])] * 2
        )

        widths = [in_channels] + [base_channels * min(2**i, 8) for i in range(n_layers + 1)]
        blocks = []
        for i in range(n_layers + 1):
            stride = downsample_stride if i < n_layers else 1
            # BatchNorm follows every conv but the first (pix2pix); the conv before it needs no bias.
            normed = use_norm and i > 0
            layers: list[nn.Module] = [
                conv(widths[i], widths[i + 1], kernel_size, stride=stride, padding=padding, bias=not normed)
            ]
            if normed:
                layers.append(norm(widths[i + 1]))
            layers.append(nn.LeakyReLU(0.2))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.ModuleList(blocks)
        self.head = conv(widths[-1], 1, kernel_size, stride=1, padding=padding)
        self.apply(_init_gan_weights)

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Return the patch logits and every block's activation (for feature matching)."""
        self._check_input(x)
        features = []
        for block in self.blocks:
            x = block(x)
            features.append(x)
        return self.head(x), features

    def forward(self, x: Tensor) -> Tensor:
        """Return patch logits, one per receptive field, with one channel."""
        return self.forward_features(x)[0]

    def _check_input(self, x: Tensor) -> None:
        expected_ndim = self.spatial_dims + 2
        layout = "(B, C, H, W)" if self.spatial_dims == 2 else "(B, C, T, H, W)"
        if x.ndim != expected_ndim:
            raise ValueError(f"{type(self).__name__} expects {layout}, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} channels, got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )
        if min(x.shape[-2:]) < self.min_spatial_size:
            raise ValueError(
                f"{type(self).__name__} with {self.n_layers} layers needs H, W >= {self.min_spatial_size}, "
                f"got {tuple(x.shape[-2:])}"
            )


class PatchDiscriminator2D(_PatchDiscriminator):
    """PatchGAN for images and single frames (taming-transformers' `NLayerDiscriminator` design).

    4×4 convolutions, LeakyReLU 0.2, BatchNorm after every conv but the first (`use_norm=False`
    drops it). Widths double per layer from `base_channels`, capped at 8×. Under DDP, convert the
    BatchNorms with Lightning's `sync_batchnorm=True`.

    Input `(B, C, H, W)` in [-1, 1] with `H, W >= 3·2**n_layers`; output `(B, 1, H', W')` logits.
    """

    spatial_dims = 2

    def __init__(
        self, in_channels: int = 3, base_channels: int = 64, n_layers: int = 3, use_norm: bool = True
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            base_channels=base_channels,
            n_layers=n_layers,
            use_norm=use_norm,
            kernel_size=(4, 4),
            padding=(1, 1),
            downsample_stride=(2, 2),
        )


class PatchDiscriminator3D(_PatchDiscriminator):
    """PatchGAN for clips: the 2-D design with 3-D convolutions.

    Spatially identical to `PatchDiscriminator2D` (4×4, stride 2, padding 1). In time the kernel has
    odd size `temporal_kernel_size` with padding `temporal_kernel_size // 2`, so a stride-2 layer maps
    `T` to `ceil(T / 2)` and a stride-1 layer keeps `T`: every `T >= 1`, including one-frame clips,
    gives at least one logit in time. (A 4-frame temporal kernel with padding 1, as in MAGVIT-style
    3-D discriminators, would need `T >= 18` at 3 layers and reject images.)

    Input `(B, C, T, H, W)` in [-1, 1]; output `(B, 1, T', H', W')` logits.
    """

    spatial_dims = 3

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        n_layers: int = 3,
        use_norm: bool = True,
        temporal_kernel_size: int = 3,
    ) -> None:
        if temporal_kernel_size < 1 or temporal_kernel_size % 2 == 0:
            raise ValueError(
                f"temporal_kernel_size must be odd and >= 1 so that T=1 clips keep a frame, "
                f"got {temporal_kernel_size}"
            )
        super().__init__(
            in_channels=in_channels,
            base_channels=base_channels,
            n_layers=n_layers,
            use_norm=use_norm,
            kernel_size=(temporal_kernel_size, 4, 4),
            padding=(temporal_kernel_size // 2, 1, 1),
            downsample_stride=(2, 2, 2),
        )


def _min_input_size(layers: list[tuple[int, int, int]]) -> int:
    """Smallest input side for which a conv stack `[(kernel, stride, padding), ...]` outputs >= 1."""
    size = 1
    for kernel, stride, padding in reversed(layers):
        size = (size - 1) * stride + kernel - 2 * padding
    return max(size, 1)


def _init_gan_weights(module: nn.Module) -> None:
    """DCGAN initialisation, which PatchGAN training recipes assume."""
    if isinstance(module, nn.Conv2d | nn.Conv3d):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d | nn.BatchNorm3d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


# --------------------------------------------------------------------------------------------------
# GAN losses and the adaptive weight
# --------------------------------------------------------------------------------------------------


def hinge_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator hinge loss `½(E[relu(1 − D(x))] + E[relu(1 + D(x̂))])`."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator hinge loss `−E[D(x̂)]`."""
    return -logits_fake.mean()


def vanilla_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """Discriminator non-saturating loss `½(E[softplus(−D(x))] + E[softplus(D(x̂))])`."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def vanilla_g_loss(logits_fake: Tensor) -> Tensor:
    """Generator non-saturating loss `E[softplus(−D(x̂))]`."""
    return F.softplus(-logits_fake).mean()


def adaptive_weight(nll_loss: Tensor, g_loss: Tensor, last_layer: Tensor, max_weight: float = 1e4) -> Tensor:
    """VQGAN's adaptive GAN weight `‖∇_W L_rec‖ / (‖∇_W L_GAN‖ + 1e-4)` at the decoder's last layer.

    Both gradients are taken with respect to `last_layer` (a parameter both losses depend on) while
    keeping the graph for the real backward pass. The result is detached and clamped to
    `[0, max_weight]`.
    """
    if not last_layer.requires_grad:
        raise ValueError("adaptive_weight needs a last_layer that requires grad, got one that does not")
    for name, loss in (("nll_loss", nll_loss), ("g_loss", g_loss)):
        if loss.ndim != 0:
            raise ValueError(f"{name} must be a scalar, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError(f"{name} must require grad (is gradient tracking off?), got a constant")
    (nll_grad,) = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return weight.clamp(0.0, max_weight).detach()


# --------------------------------------------------------------------------------------------------
# Perceptual loss
# --------------------------------------------------------------------------------------------------


class PerceptualLoss(nn.Module):
    """LPIPS-style distance over a VGG16 feature stack, with weights read only from a local file.

    The file is one state dict (`torch.load(path, weights_only=True)`) holding torchvision's VGG16
    keys `features.<i>.weight/bias` (extra keys such as `classifier.*` are ignored) and the LPIPS
    linear heads `lin<k>.model.1.weight` of shape `(1, C_k, 1, 1)`, as in LPIPS's `vgg.pth`. Merge
    the two published files once: `torch.save({**vgg16_state, **lpips_state}, path)`. Conv widths
    are read from the file, so a narrow VGG16-shaped network loads too.

    With `weights_path=None` the loss is off: it returns zeros and warns once. Nothing is downloaded.

    Input: two `(B, 3, H, W)` batches in [-1, 1], `H, W >= 16`; output: `(B,)` distances.
    """

    def __init__(self, weights_path: str | None) -> None:
        super().__init__()
        self.weights_path = weights_path
        self._warned_off = False
        self.features: nn.ModuleList | None = None
        self.heads: nn.ParameterList | None = None
        if weights_path is None:
            return
        state = _load_state_dict(weights_path)
        self.features, self.heads = _build_vgg_lpips(state, weights_path)
        self.register_buffer("shift", torch.tensor(_LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(_LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    @property
    def enabled(self) -> bool:
        """Whether weights were loaded (otherwise the loss is identically zero)."""
        return self.features is not None

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Keep the frozen network in eval mode whatever the parent module does."""
        return super().train(False)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Per-sample distance between image batches `x` and `y`, shape `(B,)`."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"PerceptualLoss expects (B, 3, H, W) images, got shape {tuple(x.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"PerceptualLoss inputs must match, got {tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(
                f"PerceptualLoss needs H, W >= 16 (four VGG poolings), got {tuple(x.shape[-2:])}"
            )
        if self.features is None or self.heads is None:
            if not self._warned_off:
                warnings.warn("PerceptualLoss is off (weights_path=None): returning 0", stacklevel=2)
                self._warned_off = True
            return x.new_zeros(x.shape[0])
        both = torch.cat([x, y]).sub(self.shift).div(self.scale)
        distance = x.new_zeros(x.shape[0])
        for stage, head in zip(self.features, self.heads):
            both = stage(both)
            fx, fy = _unit_channels(both).chunk(2)
            distance = distance + ((fx - fy) ** 2 * head).sum(dim=1).mean(dim=(1, 2))
        return distance


def _load_state_dict(path: str) -> dict[str, Tensor]:
    if not Path(path).is_file():
        raise ValueError(f"perceptual weights file not found: {path!r} (nothing is downloaded)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for corrupt or non-tensor files
        raise ValueError(f"could not read perceptual weights from {path!r}: {error}") from error
    if not isinstance(state, dict):
        raise ValueError(f"perceptual weights at {path!r} must be a state dict, got {type(state).__name__}")
    return state


def _vgg16_layers() -> list[tuple[int, int | None]]:
    """`(features index, conv width or None for a max-pool)` for VGG16 up to relu5_3."""
    layers = []
    index = 0
    for entry in _VGG16_LAYOUT:
        layers.append((index, None if entry == "M" else int(entry)))
        index += 1 if entry == "M" else 2  # a conv is followed by its ReLU
    return layers


def _build_vgg_lpips(state: dict[str, Tensor], path: str) -> tuple[nn.ModuleList, nn.ParameterList]:
    """Build VGG16 `features` up to relu5_3, split at the LPIPS taps, plus the LPIPS heads."""
    layers = _vgg16_layers()
    head_keys = [f"lin{k}.model.1.weight" for k in range(len(_LPIPS_TAP_CONVS))]
    needed = [f"features.{index}.{kind}" for index, width in layers if width for kind in ("weight", "bias")]
    missing = [key for key in needed + head_keys if key not in state]
    if missing:
        raise ValueError(
            f"perceptual weights at {path!r} lack {len(missing)} keys, e.g. {missing[:3]}; expected "
            f"torchvision VGG16 `features.*` and LPIPS `lin*.model.1.weight` keys"
        )

    stages: list[nn.Sequential] = []
    current: list[nn.Module] = []
    in_channels = 3
    conv_count = 0
    for index, width in layers:
        if width is None:
            current.append(nn.MaxPool2d(2, 2))
            continue
        weight = state[f"features.{index}.weight"]
        if weight.ndim != 4 or weight.shape[1] != in_channels or weight.shape[2:] != (3, 3):
            raise ValueError(
                f"perceptual weights at {path!r}: features.{index}.weight should be "
                f"(C_out, {in_channels}, 3, 3), got {tuple(weight.shape)}"
            )
        # Widths come from the file, not the layout, so narrow VGG16-shaped networks load too.
        conv = nn.Conv2d(in_channels, weight.shape[0], 3, padding=1)
        conv.weight.data.copy_(weight)
        conv.bias.data.copy_(state[f"features.{index}.bias"])
        current += [conv, nn.ReLU()]
        in_channels = weight.shape[0]
        conv_count += 1
        if conv_count in _LPIPS_TAP_CONVS:
            stages.append(nn.Sequential(*current))
            current = []

    heads = []
    for key, stage in zip(head_keys, stages):
        width = stage[-2].out_channels
        head = state[key]
        if head.shape != (1, width, 1, 1):
            raise ValueError(
                f"perceptual weights at {path!r}: {key} should be (1, {width}, 1, 1), got {tuple(head.shape)}"
            )
        heads.append(nn.Parameter(head.float().clone()))
    return nn.ModuleList(stages), nn.ParameterList(heads)


def _unit_channels(features: Tensor) -> Tensor:
    """Normalise each spatial position's feature vector to unit length (LPIPS's `normalize_tensor`)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10)


# --------------------------------------------------------------------------------------------------
# The combined objective
# --------------------------------------------------------------------------------------------------


class TokenizerLoss(nn.Module):
    """Generator and discriminator objectives of the tokenizer (spec section 3).

    Lightning manual optimisation calls `generator_step` then `discriminator_step` each batch.
    Inputs are videos `(B, C, T, H, W)` in [-1, 1]; an image is a one-frame video.

    - Reconstruction: mean L1 (default, as upstream) or L2 over the whole clip, × `reconstruction_weight`.
    - Perceptual: `PerceptualLoss` on one random frame per video (or every frame with
      `perceptual_all_frames`), × `perceptual_weight`. A weight > 0 needs `perceptual_weights_path`.
    - Adversarial: a 2-D discriminator on one random frame per video (weight `image_gan_weight`) and
      a 3-D one on the clip (`video_gan_weight`); a discriminator is built only when its weight is
      > 0. From step `disc_start` on the generator term is scaled by `d_weight`: 1 (fixed) or the
      adaptive ratio (`adaptive_gan_weight`); before it, `d_weight = 0`, no discriminator runs and
      the discriminator step returns a constant zero (the caller skips its backward and step).
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        reconstruction: Literal["l1", "l2"] = "l1",
        reconstruction_weight: float = 4.0,
        perceptual_weight: float = 0.0,
        perceptual_weights_path: str | None = None,
        perceptual_all_frames: bool = False,
        image_gan_weight: float = 0.01,
        video_gan_weight: float = 0.0,
        adaptive_gan_weight: bool = False,
        max_adaptive_weight: float = 1e4,
        disc_start: int = 0,
        disc_loss: Literal["hinge", "vanilla"] = "hinge",
        disc_channels: int = 64,
        disc_layers: int = 3,
        disc_use_norm: bool = True,
        disc_temporal_kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if reconstruction not in ("l1", "l2"):
            raise ValueError(f"reconstruction must be 'l1' or 'l2', got {reconstruction!r}")
        if disc_loss not in ("hinge", "vanilla"):
            raise ValueError(f"disc_loss must be 'hinge' or 'vanilla', got {disc_loss!r}")
        weights = {
            "reconstruction_weight": reconstruction_weight,
            "perceptual_weight": perceptual_weight,
            "image_gan_weight": image_gan_weight,
            "video_gan_weight": video_gan_weight,
            "max_adaptive_weight": max_adaptive_weight,
        }
        for name, value in weights.items():
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if disc_start < 0:
            raise ValueError(f"disc_start must be >= 0, got {disc_start}")
        if perceptual_weight > 0 and perceptual_weights_path is None:
            raise ValueError(
                f"perceptual_weight={perceptual_weight} needs perceptual_weights_path (a local VGG16 + "
                "LPIPS state dict); set the weight to 0 to train without it"
            )
        self.reconstruction = reconstruction
        self.reconstruction_weight = reconstruction_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_all_frames = perceptual_all_frames
        self.image_gan_weight = image_gan_weight
        self.video_gan_weight = video_gan_weight
        self.adaptive_gan_weight = adaptive_gan_weight
        self.max_adaptive_weight = max_adaptive_weight
        self.disc_start = disc_start
        self.disc_loss = disc_loss
        self.perceptual = PerceptualLoss(perceptual_weights_path) if perceptual_weight > 0 else None
        self.image_discriminator = (
            PatchDiscriminator2D(in_channels, disc_channels, disc_layers, disc_use_norm)
            if image_gan_weight > 0
            else None
        )
        self.video_discriminator = (
            PatchDiscriminator3D(
                in_channels, disc_channels, disc_layers, disc_use_norm, disc_temporal_kernel_size
            )
            if video_gan_weight > 0
            else None
        )

    def is_discriminator_active(self, step: int) -> bool:
        """Whether the adversarial terms apply (and the discriminator trains) at training step `step`."""
        has_discriminator = self.image_discriminator is not None or self.video_discriminator is not None
        return has_discriminator and step >= self.disc_start

    def generator_step(
        self,
        inputs: Tensor,
        reconstructions: Tensor,
        *,
        step: int,
        last_layer: Tensor | None = None,
        quant_loss: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Generator loss and detached metrics `rec`, `perceptual`, `quant`, `g_adv`, `d_weight`, `total`.

        `last_layer` is the decoder's output weight, needed for the adaptive weight; `quant_loss`
        is the quantizer's (already weighted) loss, added as is. `g_adv` is the weighted sum of the
        generator terms before `d_weight`. Discriminator parameters receive gradients from this
        loss: the caller zeroes them before the discriminator step (Lightning's `toggle_optimizer`).
        """
        _check_videos(inputs, reconstructions)
        zero = inputs.new_zeros(())
        if self.reconstruction == "l1":
            rec = F.l1_loss(reconstructions, inputs)
        else:
            rec = F.mse_loss(reconstructions, inputs)
        nll = self.reconstruction_weight * rec

        frame_index = _random_frames(inputs)
        perceptual = zero
        if self.perceptual is not None:
            if self.perceptual_all_frames:
                perceptual = self.perceptual(_all_frames(reconstructions), _all_frames(inputs)).mean()
            else:
                perceptual = self.perceptual(
                    _pick_frames(reconstructions, frame_index), _pick_frames(inputs, frame_index)
                ).mean()
            nll = nll + self.perceptual_weight * perceptual

        g_adv = zero
        d_weight = zero
        if self.is_discriminator_active(step):
            g_terms = [
                (weight, self._generator_term(logits))
                for _, weight, logits in self._logits(reconstructions, frame_index)
            ]
            g_adv = sum((weight * term for weight, term in g_terms), zero)
            if self.adaptive_gan_weight and torch.is_grad_enabled():
                if last_layer is None:
                    raise ValueError(
                        "adaptive_gan_weight needs last_layer (the decoder's output weight), got None"
                    )
                # VQGAN measures the ratio against the unweighted GAN term, so the weights still scale it.
                unweighted = sum((term for _, term in g_terms), zero)
                d_weight = adaptive_weight(nll, unweighted, last_layer, self.max_adaptive_weight)
            elif self.adaptive_gan_weight:
                # No gradients (validation): the ratio cannot be measured, so the term is left out.
                d_weight = zero
            else:
                d_weight = torch.ones_like(zero)

        total = nll + d_weight * g_adv
        if quant_loss is not None:
            total = total + quant_loss
        metrics = {
            "rec": rec,
            "perceptual": perceptual,
            "quant": quant_loss if quant_loss is not None else zero,
            "g_adv": g_adv,
            "d_weight": d_weight,
            "total": total,
        }
        return total, {name: value.detach() for name, value in metrics.items()}

    def discriminator_step(
        self, inputs: Tensor, reconstructions: Tensor, *, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Discriminator loss on real `inputs` and detached `reconstructions`, with metrics
        `d_loss`, `logits_real`, `logits_fake` (means over the active discriminators) and the same
        keys suffixed `_image` / `_video` per discriminator.

        Before `disc_start` (or with no discriminator) the loss is a constant zero without a graph.
        """
        _check_videos(inputs, reconstructions)
        zero = inputs.new_zeros(())
        if not self.is_discriminator_active(step):
            return zero, {"d_loss": zero, "logits_real": zero, "logits_fake": zero}
        fakes = reconstructions.detach()
        frame_index = _random_frames(inputs)
        real_logits = self._logits(inputs, frame_index)
        fake_logits = self._logits(fakes, frame_index)
        d_loss_fn = hinge_d_loss if self.disc_loss == "hinge" else vanilla_d_loss
        metrics: dict[str, Tensor] = {}
        d_loss = zero
        for (name, _, real), (_, _, fake) in zip(real_logits, fake_logits):
            loss = d_loss_fn(real, fake)
            d_loss = d_loss + loss
            metrics[f"d_loss_{name}"] = loss.detach()
            metrics[f"logits_real_{name}"] = real.detach().mean()
            metrics[f"logits_fake_{name}"] = fake.detach().mean()
        metrics["d_loss"] = d_loss.detach()
        metrics["logits_real"] = torch.stack([real.detach().mean() for *_, real in real_logits]).mean()
        metrics["logits_fake"] = torch.stack([fake.detach().mean() for *_, fake in fake_logits]).mean()
        return d_loss, metrics

    def _generator_term(self, logits_fake: Tensor) -> Tensor:
        return hinge_g_loss(logits_fake) if self.disc_loss == "hinge" else vanilla_g_loss(logits_fake)

    def _logits(self, videos: Tensor, frame_index: Tensor) -> list[tuple[str, float, Tensor]]:
        """`(name, weight, logits)` of each built discriminator: the 2-D one sees `frame_index`."""
        results = []
        if self.image_discriminator is not None:
            frames = _pick_frames(videos, frame_index)
            results.append(("image", self.image_gan_weight, self.image_discriminator(frames)))
        if self.video_discriminator is not None:
            results.append(("video", self.video_gan_weight, self.video_discriminator(videos)))
        return results


def _check_videos(inputs: Tensor, reconstructions: Tensor) -> None:
    if inputs.ndim != 5:
        raise ValueError(
            f"TokenizerLoss expects videos (B, C, T, H, W), got inputs of shape {tuple(inputs.shape)}"
        )
    if reconstructions.shape != inputs.shape:
        raise ValueError(
            f"reconstructions must match inputs {tuple(inputs.shape)}, got {tuple(reconstructions.shape)}"
        )


def _random_frames(videos: Tensor) -> Tensor:
    """One random frame index per video."""
    return torch.randint(videos.shape[2], (videos.shape[0],), device=videos.device)


def _pick_frames(videos: Tensor, frame_index: Tensor) -> Tensor:
    """`(B, C, T, H, W)` → `(B, C, H, W)`, frame `frame_index[b]` of video `b`."""
    batch = torch.arange(videos.shape[0], device=videos.device)
    return videos.permute(0, 2, 1, 3, 4)[batch, frame_index]


def _all_frames(videos: Tensor) -> Tensor:
    """`(B, C, T, H, W)` → `(B·T, C, H, W)`."""
    return videos.transpose(1, 2).flatten(0, 1)
