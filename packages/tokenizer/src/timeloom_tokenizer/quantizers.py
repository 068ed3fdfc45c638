"""Swappable latent bottlenecks: EMA vector quantisation, a diagonal Gaussian (KL) and lookup-free quantisation.

All three take channels-first latents `(B, C, *spatial)` — `(B, C, T, H, W)` for video, `(B, C, H, W)` for
images — and return a `QuantizerOutput`, so the tokenizer can swap them without touching its forward pass.
They compute in the dtype of their own parameters/buffers (fp32 by default, also under bf16 autocast) and
hand the quantised latent back in the input's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DiagonalGaussian",
    "EMAVectorQuantizer",
    "LookupFreeQuantizer",
    "Quantizer",
    "QuantizerOutput",
    "binary_entropy_from_logits",
]


class QuantizerOutput(NamedTuple):
    """What every quantiser returns.

    Attributes:
        quantized: the bottleneck output, same layout as the latent it came from (for `DiagonalGaussian`,
            half the channels of its input).
        loss: the quantiser's weighted scalar loss (commitment, KL or entropy terms), ready to add.
        indices: integer token ids `(B, *spatial)`, or `None` for continuous bottlenecks.
        metrics: detached scalars to log (perplexity, usage, KL, entropies …).
    """

    quantized: Tensor
    loss: Tensor
    indices: Tensor | None
    metrics: dict[str, Tensor]


class Quantizer(nn.Module):
    """Common interface: `forward(z) -> QuantizerOutput` on channels-first latents `(B, C, *spatial)`."""

    #: Number of channels `forward` expects on dim 1.
    in_channels: int

    def forward(self, z: Tensor) -> QuantizerOutput:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise ValueError(f"{type(self).__name__} expects a floating-point tensor, got {_describe(z)}")
        if z.dim() < 3:
            raise ValueError(
                f"{type(self).__name__} expects a channels-first latent (B, C, *spatial) with at least one "
                f"spatial dim, got shape {tuple(z.shape)}"
            )
        if z.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects {self.in_channels} channels on dim 1 of (B, C, *spatial), "
                f"got shape {tuple(z.shape)} with {z.shape[1]}"
            )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _to_vectors(z: Tensor) -> Tensor:
    """`(B, C, *spatial)` → `(B·∏spatial, C)`."""
    return z.movedim(1, -1).reshape(-1, z.shape[1])


def _from_vectors(vectors: Tensor, like: Tensor) -> Tensor:
    """Inverse of `_to_vectors` for a latent shaped like `like` (channel count taken from `vectors`)."""
    batch, *spatial = like.shape[:1] + like.shape[2:]
    return vectors.reshape(batch, *spatial, vectors.shape[-1]).movedim(-1, 1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _perplexity(counts: Tensor) -> Tensor:
    """`exp(−Σ p log p)` of a usage histogram; `exp(H)` is the effective number of codes used."""
    probs = counts / counts.sum().clamp_min(1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-12))).sum())


def binary_entropy_from_logits(logits: Tensor) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(σ(logits)), finite with finite gradients even when saturated."""
    # H = p·softplus(−x) + (1 − p)·softplus(x), since log p = −softplus(−x) and log(1 − p) = −softplus(x).
    p = torch.sigmoid(logits)
    return p * F.softplus(-logits) + (1 - p) * F.softplus(logits)


def _entropy(probs: Tensor) -> Tensor:
    """`−Σ p log p` (nats); the clamp keeps the gradient finite where a probability is exactly 0."""
    return -(probs * torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny))).sum()


class EMAVectorQuantizer(Quantizer):
    """Nearest-code vector quantiser whose codebook follows an exponential moving average (VQ-VAE-2).

    Lookup is by squared Euclidean distance; with `l2_normalize` both `z` and the codes are unit-normalised
    first (so the lookup is by cosine similarity, as in ViT-VQGAN) and the output lies on the sphere. The
    stored EMA codebook itself is not re-normalised. The output uses the straight-through estimator
    `ẑ = z + sg(e − z)`, and the loss is the commitment term only, `commitment · mean‖z − sg(e)‖²` (the
    codebook term is replaced by the EMA update).

    In training mode each step updates, over the batch's one-hot assignments (summed across DDP ranks):
    `N ← γN + (1−γ)n`, `M ← γM + (1−γ)s`, `Ñ = (N + ε)/(ΣN + Kε)·ΣN` (Laplace smoothing), `e = M/Ñ`.
    The first training batch initialises the codebook from its vectors (`data_init`); whether that happened
    is a persistent buffer, so a resumed run never re-initialises. Eval mode never touches the buffers.

    Args:
        num_codes: codebook size K.
        code_dim: code dimension, the latent's channel count.
        decay: EMA decay γ.
        eps: Laplace smoothing ε.
        commitment: weight of the commitment loss.
        l2_normalize: unit-normalise latents and codes before lookup.
        restart_dead_codes: re-seed codes whose EMA count `N_k` fell below `dead_threshold` with random
            vectors of the current batch. Off by default, as in the released OmniTokenizer scripts.
        dead_threshold: EMA count under which a code is dead (for the restart and the metrics).
        data_init: initialise the codebook from the first training batch.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        decay: float = 0.99,
        eps: float = 1e-7,
        commitment: float = 0.25,
        l2_normalize: bool = True,
        restart_dead_codes: bool = False,
        dead_threshold: float = 1.0,
        data_init: bool = True,
    ) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be ≥ 1, got {num_codes} and {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.in_channels = code_dim
        self.decay = decay
        self.eps = eps
        self.commitment = commitment
        self.l2_normalize = l2_normalize
        self.restart_dead_codes = restart_dead_codes
        self.dead_threshold = dead_threshold
        self.data_init = data_init

        codebook = torch.randn(num_codes, code_dim)
        if l2_normalize:
            codebook = F.normalize(codebook, dim=-1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(num_codes))  # N
        self.register_buffer("embedding_sum", codebook.clone())  # M
        self.register_buffer("initialized", torch.tensor(not data_init))

    def lookup_codes(self) -> Tensor:
        """The codes as used for lookup and output: `(K, code_dim)`, unit-normalised with `l2_normalize`."""
        return F.normalize(self.codebook, dim=-1) if self.l2_normalize else self.codebook

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Token ids `(B, *spatial)` → quantised latent `(B, code_dim, *spatial)`."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an int32/int64 tensor, got {_describe(indices)}")
        return self.lookup_codes()[indices].movedim(-1, 1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise `z` `(B, code_dim, *spatial)`; in training mode also update the EMA codebook."""
        self._check_latent(z)
        with torch.autocast(device_type=z.device.type, enabled=False):
            vectors = _to_vectors(z).to(self.codebook.dtype)
            if self.l2_normalize:
                vectors = F.normalize(vectors, dim=-1)
            if self.training and not bool(self.initialized):
                self._initialize_from(vectors.detach())

            codes = self.lookup_codes()
            distances = (
                vectors.detach().pow(2).sum(-1, keepdim=True)
                - 2 * vectors.detach() @ codes.t()
                + codes.pow(2).sum(-1)
            )
            indices = distances.argmin(dim=-1)
            nearest = codes[indices]

            loss = self.commitment * F.mse_loss(vectors, nearest.detach())
            straight_through = vectors + (nearest - vectors).detach()

            counts = torch.bincount(indices, minlength=self.num_codes).to(vectors.dtype)
            if self.training:
                counts = self._update_ema(vectors.detach(), indices, counts)
                if self.restart_dead_codes:
                    self._restart_dead_codes(vectors.detach())

        metrics = {
            "perplexity": _perplexity(counts),
            "usage": (self.cluster_size >= self.dead_threshold).to(counts.dtype).mean(),
            "dead_codes": (self.cluster_size < self.dead_threshold).sum(),
        }
        quantized = _from_vectors(straight_through, z).to(z.dtype)
        return QuantizerOutput(quantized, loss, indices.reshape(z.shape[:1] + z.shape[2:]), metrics)

    @torch.no_grad()
    def _update_ema(self, vectors: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """One EMA step; returns the batch counts summed over ranks (for the perplexity)."""
        sums = torch.zeros_like(self.embedding_sum).index_add_(0, indices, vectors)
        if _distributed():
            # Same statistics on every rank keep the replicas' codebooks identical.
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embedding_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total
        self.codebook.copy_(self.embedding_sum / smoothed.unsqueeze(-1))
        return counts

    @torch.no_grad()
    def _initialize_from(self, vectors: Tensor) -> None:
        codes = self._sample_batch_vectors(vectors, self.num_codes)
        self.codebook.copy_(codes)
        self.embedding_sum.copy_(codes)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)

    @torch.no_grad()
    def _restart_dead_codes(self, vectors: Tensor) -> None:
        dead = self.cluster_size < self.dead_threshold
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        replacements = self._sample_batch_vectors(vectors, num_dead)
        self.codebook[dead] = replacements
        # A restarted code starts at the threshold, so it is restarted again unless the data uses it.
        self.cluster_size[dead] = self.dead_threshold
        self.embedding_sum[dead] = replacements * self.dead_threshold

    def _sample_batch_vectors(self, vectors: Tensor, count: int) -> Tensor:
        """`count` random batch vectors, tiled with small noise if the batch is smaller; rank 0's choice wins."""
        if vectors.shape[0] < count:
            repeats = math.ceil(count / vectors.shape[0])
            noise_std = 0.01 / math.sqrt(self.code_dim)
            vectors = vectors.repeat(repeats, 1)
            vectors = vectors + noise_std * torch.randn_like(vectors)
        sample = vectors[torch.randperm(vectors.shape[0], device=vectors.device)[:count]].contiguous()
        if _distributed():
            dist.broadcast(sample, src=0)
        return sample


class DiagonalGaussian(Quantizer):
    """Continuous KL bottleneck: `z` carries `2·channels` (mean, log-variance) on dim 1.

    Training mode samples `μ + σ·ε` (reparameterisation); eval mode returns `μ`. The loss is
    `kl_weight · KL(N(μ, σ²) ‖ N(0, I))`, the closed form `½·Σ(μ² + σ² − 1 − log σ²)` summed over channels
    and positions and averaged over the batch. The log-variance is clamped to `[−30, 20]` for stability.

    Args:
        channels: latent channels after sampling (the input has twice as many).
        kl_weight: weight of the KL loss.
    """

    logvar_range = (-30.0, 20.0)

    def __init__(self, channels: int, kl_weight: float = 1e-6) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be ≥ 1, got {channels}")
        self.channels = channels
        self.in_channels = 2 * channels
        self.kl_weight = kl_weight

    def moments(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Split `z` `(B, 2·channels, *spatial)` into mean and clamped log-variance `(B, channels, *spatial)`."""
        self._check_latent(z)
        mean, logvar = z.chunk(2, dim=1)
        return mean, logvar.clamp(*self.logvar_range)

    def mode(self, z: Tensor) -> Tensor:
        """The distribution's mode, i.e. its mean `(B, channels, *spatial)`."""
        return self.moments(z)[0]

    def kl(self, mean: Tensor, logvar: Tensor) -> Tensor:
        """Closed-form `KL(N(μ, σ²) ‖ N(0, I))` per sample, summed over all non-batch dims: `(B,)`."""
        return 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(-1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Sample (training) or take the mean (eval) of the Gaussian that `z` parameterises."""
        mean, logvar = self.moments(z)
        if self.training:
            sample = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        else:
            sample = mean
        kl = self.kl(mean, logvar).mean()
        metrics = {"kl": kl.detach(), "std": torch.exp(0.5 * logvar).mean().detach()}
        return QuantizerOutput(sample, self.kl_weight * kl, None, metrics)


class LookupFreeQuantizer(Quantizer):
    """MAGVIT-v2 lookup-free quantisation: each of `bits` channels is quantised to `sign(z_i) ∈ {−1, +1}`.

    The implicit codebook is `{−1, +1}^bits`; the token id is `Σ_i 2^i·1[z_i > 0]` (so `z_i = 0` maps to −1).
    The output uses the straight-through estimator. The loss is
    `commitment · mean‖z − sg(q)‖² + entropy_weight · (E[H(p(c|z))] − γ·H(E[p(c|z)]))` with
    `p(c|z) = softmax_c(−τ‖z − c‖²)`. Since `‖z − c‖² = ‖z‖² − 2z·c + bits`, `p(c|z)` factorises over bits
    with `p(c_i = +1 | z) = σ(4τ·z_i)`, which makes the per-sample entropy exactly `Σ_i H_bin(σ(4τ·z_i))`.

    The batch entropy `H(E[p(c|z)])` does not factorise. Up to `exact_entropy_max_bits` it is computed
    exactly over all `2^bits` codes: the bits are split in two halves, so `E[p(c|z)]` is one
    `(2^{bits_lo} × N) @ (N × 2^{bits_hi})` product and memory stays `O(N·2^{bits/2} + 2^bits)`; the cost is
    `O(N·2^bits)`. Above the threshold the per-bit surrogate `Σ_i H_bin(E[p(c_i = +1 | z)])` is used; it is an
    upper bound on the exact entropy (joint ≤ sum of marginals) and is blind to correlations between bits,
    but it is linear in `bits` — what 2^18-code vocabularies need.

    Args:
        bits: number of binary channels (`log₂` of the vocabulary).
        commitment: weight of the commitment loss.
        entropy_weight: weight of the entropy loss.
        diversity_gamma: γ, the weight of the batch-entropy (diversity) term.
        temperature: τ of `p(c|z)`.
        exact_entropy_max_bits: largest `bits` for which the batch entropy is exact.
    """

    def __init__(
        self,
        bits: int,
        commitment: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_gamma: float = 1.0,
        temperature: float = 100.0,
        exact_entropy_max_bits: int = 14,
    ) -> None:
        super().__init__()
        if bits < 1:
            raise ValueError(f"bits must be ≥ 1, got {bits}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.bits = bits
        self.in_channels = bits
        self.commitment = commitment
        self.entropy_weight = entropy_weight
        self.diversity_gamma = diversity_gamma
        self.temperature = temperature
        self.exact_entropy_max_bits = exact_entropy_max_bits
        self.register_buffer("powers_of_two", 2 ** torch.arange(bits), persistent=False)

    @property
    def num_codes(self) -> int:
        """Vocabulary size `2^bits`."""
        return 2**self.bits

    def codes_to_indices(self, codes: Tensor) -> Tensor:
        """Latent `(B, bits, *spatial)` (any real values; only signs count) → token ids `(B, *spatial)`."""
        self._check_latent(codes)
        positive = (codes > 0).long().movedim(1, -1)
        return (positive * self.powers_of_two).sum(-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Token ids `(B, *spatial)` → ±1 codes `(B, bits, *spatial)` in the default float dtype."""
        if indices.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"indices must be an int32/int64 tensor, got {_describe(indices)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices must lie in [0, {self.num_codes}), got values outside it")
        bit_set = (indices.unsqueeze(-1).long() // self.powers_of_two) % 2
        return (2.0 * bit_set - 1.0).to(torch.get_default_dtype()).movedim(-1, 1)

    def bit_logits(self, vectors: Tensor) -> Tensor:
        """Logits `4τ·z_i` of `p(c_i = +1 | z)` for vectors `(N, bits)`."""
        return 4 * self.temperature * vectors

    def per_sample_entropy(self, vectors: Tensor) -> Tensor:
        """`H(p(c|z))` per vector `(N, bits)` → `(N,)`, in the exact factorised form."""
        return binary_entropy_from_logits(self.bit_logits(vectors)).sum(-1)

    def batch_entropy(self, vectors: Tensor) -> Tensor:
        """`H(E[p(c|z)])` over vectors `(N, bits)`: exact up to `exact_entropy_max_bits`, else the surrogate."""
        if self.bits <= self.exact_entropy_max_bits:
            return self.exact_batch_entropy(vectors)
        return self.per_bit_batch_entropy(vectors)

    def exact_batch_entropy(self, vectors: Tensor) -> Tensor:
        """Exact `H(E[p(c|z)])` over all `2^bits` codes (cost `O(N·2^bits)`)."""
        scaled = self.bit_logits(vectors)
        log_plus, log_minus = F.logsigmoid(scaled), F.logsigmoid(-scaled)
        low_bits = self.bits // 2
        low = self._code_probabilities(log_plus[:, :low_bits], log_minus[:, :low_bits])
        high = self._code_probabilities(log_plus[:, low_bits:], log_minus[:, low_bits:])
        # p(c|z) = p(c_lo|z)·p(c_hi|z), so the batch mean over all codes is one matrix product.
        mean_probs = low.t() @ high / vectors.shape[0]
        return _entropy(mean_probs)

    def per_bit_batch_entropy(self, vectors: Tensor) -> Tensor:
        """Surrogate `Σ_i H_bin(E[p(c_i = +1 | z)])`, an upper bound on the exact batch entropy."""
        # Mean bit probabilities as logits, from log-means, so saturated bits keep finite gradients.
        logits = self.bit_logits(vectors)
        log_mean_plus = torch.logsumexp(F.logsigmoid(logits), dim=0)
        log_mean_minus = torch.logsumexp(F.logsigmoid(-logits), dim=0)
        return binary_entropy_from_logits(log_mean_plus - log_mean_minus).sum()

    def _code_probabilities(self, log_plus: Tensor, log_minus: Tensor) -> Tensor:
        """Probabilities `(N, 2^k)` of all codes on `k` bits from per-bit log-probabilities `(N, k)`."""
        num_bits = log_plus.shape[-1]
        code_bits = (
            torch.arange(2**num_bits, device=log_plus.device).unsqueeze(-1)
            >> torch.arange(num_bits, device=log_plus.device)
        ) & 1
        code_bits = code_bits.to(log_plus.dtype).t()  # (k, 2^k)
        return torch.exp(log_plus @ code_bits + log_minus @ (1 - code_bits))

    def forward(self, z: Tensor) -> QuantizerOutput:
        """Quantise `z` `(B, bits, *spatial)` to ±1 per bit, with token ids and the LFQ losses."""
        self._check_latent(z)
        vectors = _to_vectors(z)
        signs = torch.where(vectors > 0, 1.0, -1.0).to(vectors.dtype)
        straight_through = vectors + (signs - vectors).detach()
        indices = ((vectors > 0).long() * self.powers_of_two).sum(-1)

        commitment_loss = F.mse_loss(vectors, signs)
        per_sample_entropy = self.per_sample_entropy(vectors).mean()
        batch_entropy = self.batch_entropy(vectors)
        entropy_loss = per_sample_entropy - self.diversity_gamma * batch_entropy
        loss = self.commitment * commitment_loss + self.entropy_weight * entropy_loss

        _, counts = torch.unique(indices, return_counts=True)
        metrics = {
            "commitment": commitment_loss.detach(),
            "per_sample_entropy": per_sample_entropy.detach(),
            "batch_entropy": batch_entropy.detach(),
            "perplexity": _perplexity(counts.to(vectors.dtype)),
            "codes_used": torch.tensor(counts.numel(), device=z.device),
        }
        quantized = _from_vectors(straight_through, z)
        return QuantizerOutput(quantized, loss, indices.reshape(z.shape[:1] + z.shape[2:]), metrics)
