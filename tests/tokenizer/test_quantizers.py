"""Quantizers: shapes, straight-through gradients, the EMA update, losses, LFQ entropies (spec §2, §10.8–11)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from timeloom_tokenizer import DiagonalGaussian, EMAVectorQuantizer, LookupFreeQuantizer
from torch.distributions import Normal, kl_divergence

IMAGE_SPATIAL = (3, 5)
VIDEO_SPATIAL = (2, 3, 5)


def toy_vq(**kwargs) -> EMAVectorQuantizer:
    """2 codes on the axes of R², no normalisation or data init, so every number is easy by hand."""
    quantizer = EMAVectorQuantizer(2, 2, l2_normalize=False, data_init=False, **kwargs).double()
    with torch.no_grad():
        quantizer.codebook.copy_(torch.eye(2))
        quantizer.embedding_sum.copy_(torch.eye(2))
        quantizer.cluster_size.fill_(1.0)
    return quantizer


# Three vectors as a (B=1, C=2, W=3) latent; nearest codes 0, 0, 1.
TOY_VECTORS = torch.tensor([[0.9, 0.1], [0.8, -0.1], [0.2, 0.7]], dtype=torch.float64)
TOY_LATENT = TOY_VECTORS.t().unsqueeze(0)


@pytest.mark.parametrize("spatial", [IMAGE_SPATIAL, VIDEO_SPATIAL], ids=["image", "video"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_shapes(spatial, training):
    z = torch.randn(2, 4, *spatial)
    for quantizer, out_channels in [
        (EMAVectorQuantizer(16, 4), 4),
        (DiagonalGaussian(2), 2),
        (LookupFreeQuantizer(4), 4),
    ]:
        out = quantizer.train(training)(z)
        assert out.quantized.shape == (2, out_channels, *spatial)
        assert out.loss.shape == ()
        if isinstance(quantizer, DiagonalGaussian):
            assert out.indices is None
        else:
            assert out.indices.shape == (2, *spatial)
            assert out.indices.dtype == torch.int64
            if not training:  # in training the EMA step moves the codes after the lookup
                torch.testing.assert_close(quantizer.indices_to_codes(out.indices), out.quantized)
        assert all(value.shape == () for value in out.metrics.values())


@pytest.mark.parametrize(
    "quantizer",
    [EMAVectorQuantizer(8, 3, l2_normalize=False), LookupFreeQuantizer(3)],
    ids=["vq", "lfq"],
)
def test_straight_through_gradient_is_identity(quantizer):
    z = torch.randn(2, 3, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(z)
    (quantizer.double()(z).quantized * upstream).sum().backward()
    torch.testing.assert_close(z.grad, upstream, rtol=0, atol=0)


def test_straight_through_with_l2_normalisation_is_the_normalisation_jacobian():
    quantizer = EMAVectorQuantizer(8, 3).double()
    z = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn_like(z)
    (quantizer(z).quantized * upstream).sum().backward()
    (expected,) = torch.autograd.grad((F.normalize(z, dim=1) * upstream).sum(), z)
    torch.testing.assert_close(z.grad, expected)


def test_ema_update_matches_hand_computation():
    quantizer = toy_vq().train()
    out = quantizer(TOY_LATENT)
    assert out.indices.tolist() == [[0, 0, 1]]

    # n = (2, 1); s_0 = (0.9 + 0.8, 0.1 − 0.1), s_1 = (0.2, 0.7); γ = 0.99.
    cluster_size = torch.tensor([0.99 + 0.01 * 2, 0.99 + 0.01 * 1], dtype=torch.float64)
    embedding_sum = torch.tensor(
        [[0.99 + 0.01 * 1.7, 0.0], [0.01 * 0.2, 0.99 + 0.01 * 0.7]], dtype=torch.float64
    )
    eps, total = 1e-7, 2.01
    smoothed = (cluster_size + eps) / (total + 2 * eps) * total
    torch.testing.assert_close(quantizer.cluster_size, cluster_size, rtol=0, atol=1e-15)
    torch.testing.assert_close(quantizer.embedding_sum, embedding_sum, rtol=0, atol=1e-15)
    torch.testing.assert_close(quantizer.codebook, embedding_sum / smoothed[:, None], rtol=0, atol=1e-15)

    usage = torch.tensor([2 / 3, 1 / 3], dtype=torch.float64)
    assert float(out.metrics["perplexity"]) == pytest.approx(math.exp(-(usage * usage.log()).sum()))
    assert float(out.metrics["usage"]) == 1.0
    assert int(out.metrics["dead_codes"]) == 0


def test_commitment_loss_matches_hand_computation_and_its_weight_applies():
    # Squared errors to the nearest codes: 0.01 + 0.01, 0.04 + 0.01, 0.04 + 0.09 → 0.2 over 6 entries.
    for weight in (0.25, 1.0):
        loss = toy_vq(commitment=weight).eval()(TOY_LATENT).loss
        assert float(loss) == pytest.approx(weight * 0.2 / 6, rel=1e-12)


def test_eval_mode_leaves_codebook_untouched():
    quantizer = EMAVectorQuantizer(8, 3, restart_dead_codes=True).eval()
    before = {name: buffer.clone() for name, buffer in quantizer.named_buffers()}
    quantizer(torch.randn(2, 3, 4, 4))
    for name, buffer in quantizer.named_buffers():
        torch.testing.assert_close(buffer, before[name], rtol=0, atol=0, msg=name)
    assert not bool(quantizer.initialized)


def test_data_init_takes_distinct_batch_vectors():
    quantizer = EMAVectorQuantizer(8, 3)
    vectors = torch.randn(16, 3)
    quantizer._initialize_from(vectors)
    assert torch.unique(quantizer.codebook, dim=0).shape[0] == 8
    assert all(torch.isclose(code, vectors).all(-1).any() for code in quantizer.codebook)
    torch.testing.assert_close(quantizer.embedding_sum, quantizer.codebook)
    torch.testing.assert_close(quantizer.cluster_size, torch.ones(8))


def test_data_init_happens_on_the_first_training_batch_only_and_survives_resume(monkeypatch):
    quantizer = EMAVectorQuantizer(8, 3).train()
    calls = []
    initialize = quantizer._initialize_from
    monkeypatch.setattr(quantizer, "_initialize_from", lambda vectors: calls.append(1) or initialize(vectors))
    quantizer(torch.randn(1, 3, 4, 4))
    quantizer(torch.randn(1, 3, 4, 4))
    assert calls == [1]

    resumed = EMAVectorQuantizer(8, 3).train()
    resumed.load_state_dict(quantizer.state_dict())
    assert bool(resumed.initialized)
    monkeypatch.setattr(resumed, "_initialize_from", lambda vectors: pytest.fail("re-initialised on resume"))
    resumed(torch.randn(1, 3, 4, 4))


def test_dead_code_restart_moves_dead_codes_onto_batch_vectors():
    quantizer = EMAVectorQuantizer(
        4, 2, l2_normalize=False, data_init=False, restart_dead_codes=True
    ).double()
    with torch.no_grad():  # code 0 takes every vector; codes 1–3 are far away and fall below the threshold
        quantizer.codebook.copy_(torch.tensor([[0.5, 0.2], [50.0, 50.0], [-50.0, 50.0], [50.0, -50.0]]))
        quantizer.embedding_sum.copy_(quantizer.codebook)
    out = quantizer.train()(TOY_LATENT)
    assert out.indices.tolist() == [[0, 0, 0]]
    for code in quantizer.codebook[1:]:
        assert torch.isclose(code, TOY_VECTORS).all(-1).any(), code
    torch.testing.assert_close(quantizer.cluster_size[1:], torch.ones(3, dtype=torch.float64))


def test_restart_candidates_are_not_computed_when_restarts_are_off(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("restart candidates sampled")

    quantizer = toy_vq().train()
    with torch.no_grad():  # make code 1 dead
        quantizer.cluster_size.fill_(0.0)
    monkeypatch.setattr(quantizer, "_sample_batch_vectors", fail)
    quantizer(TOY_LATENT)
    quantizer.restart_dead_codes = True
    with pytest.raises(AssertionError, match="restart candidates"):
        quantizer(TOY_LATENT)


def test_diagonal_gaussian_kl_matches_torch_distributions():
    gaussian = DiagonalGaussian(3, kl_weight=1e-3).double()
    z = torch.randn(2, 6, 2, 4, 4, dtype=torch.float64)
    mean, logvar = z.chunk(2, dim=1)
    reference = (
        kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(-1).mean()
    )
    out = gaussian.eval()(z)
    torch.testing.assert_close(out.metrics["kl"], reference)
    torch.testing.assert_close(out.loss, 1e-3 * reference)
    torch.testing.assert_close(out.quantized, mean, rtol=0, atol=0)
    torch.testing.assert_close(gaussian.mode(z), mean, rtol=0, atol=0)


def test_diagonal_gaussian_samples_by_reparameterisation_in_training():
    gaussian = DiagonalGaussian(3).train()
    z = torch.randn(2, 6, 4, 4)
    z[:, 3:] = 100.0  # log-variance clamps to 20
    torch.manual_seed(0)
    sample = gaussian(z).quantized
    torch.manual_seed(0)
    noise = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(sample, z[:, :3] + math.exp(10.0) * noise)


def test_lfq_index_bits_round_trip():
    quantizer = LookupFreeQuantizer(5)
    indices = torch.arange(32).reshape(2, 1, 4, 4)
    codes = quantizer.indices_to_codes(indices)
    assert codes.shape == (2, 5, 1, 4, 4)
    assert set(codes.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(quantizer.codes_to_indices(codes), indices)
    out = quantizer(codes)
    assert torch.equal(out.indices, indices)
    assert torch.equal(out.quantized, codes)
    # bit i of the index is channel i
    assert quantizer.indices_to_codes(torch.tensor([[4]])).flatten().tolist() == [-1.0, -1.0, 1.0, -1.0, -1.0]


@pytest.mark.parametrize("bits", [1, 4, 7, 10])
def test_lfq_entropies_match_brute_force_over_all_codes(bits):
    quantizer = LookupFreeQuantizer(bits).double()
    vectors = 0.01 * torch.randn(6, bits, dtype=torch.float64)
    all_codes = torch.tensor(list(itertools.product([-1.0, 1.0], repeat=bits)), dtype=torch.float64)
    probs = torch.softmax(-quantizer.temperature * torch.cdist(vectors, all_codes).pow(2), dim=-1)

    brute_per_sample = -(probs * probs.log()).sum(-1)
    torch.testing.assert_close(quantizer.per_sample_entropy(vectors), brute_per_sample)

    mean_probs = probs.mean(0)
    brute_batch = -(mean_probs * mean_probs.log()).sum()
    exact_batch = quantizer.exact_batch_entropy(vectors)
    torch.testing.assert_close(exact_batch, brute_batch)
    torch.testing.assert_close(quantizer.batch_entropy(vectors), exact_batch)
    assert exact_batch <= quantizer.per_bit_batch_entropy(vectors) + 1e-12


def test_lfq_uses_the_per_bit_surrogate_above_the_threshold():
    quantizer = LookupFreeQuantizer(6, exact_entropy_max_bits=5).double()
    vectors = 0.01 * torch.randn(8, 6, dtype=torch.float64)
    torch.testing.assert_close(quantizer.batch_entropy(vectors), quantizer.per_bit_batch_entropy(vectors))


def lfq_codes_used_after_training(entropy_weight: float, steps: int = 40) -> tuple[int, int]:
    """Train a linear encoder whose bias collapses every input onto one code; codes used (first, last)."""
    torch.manual_seed(0)
    inputs = torch.randn(256, 8)
    encoder = torch.nn.Linear(8, 4)
    with torch.no_grad():
        encoder.weight.mul_(0.01)
        encoder.bias.fill_(0.02)
    quantizer = LookupFreeQuantizer(4, entropy_weight=entropy_weight)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=1e-3)
    used = []
    for _ in range(steps):
        out = quantizer(encoder(inputs).reshape(256, 4, 1, 1))
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        used.append(int(out.metrics["codes_used"]))
    return used[0], used[-1]


def test_lfq_entropy_loss_raises_codebook_usage():
    first, with_entropy = lfq_codes_used_after_training(entropy_weight=0.1)
    _, without_entropy = lfq_codes_used_after_training(entropy_weight=0.0)
    assert first == 1
    assert with_entropy > without_entropy
    assert with_entropy >= 12  # of 16


@pytest.mark.parametrize(
    ("quantizer", "z", "message"),
    [
        (EMAVectorQuantizer(8, 4), torch.randn(2, 3, 4, 4), "expects 4 channels"),
        (EMAVectorQuantizer(8, 4), torch.randn(2, 4), "at least one spatial dim"),
        (DiagonalGaussian(2), torch.randn(2, 2, 4, 4), "expects 4 channels"),
        (
            LookupFreeQuantizer(4),
            torch.randn(2, 5, 5, 4),
            "got shape \\(2, 5, 5, 4\\) with 5",
        ),  # channels-last
        (LookupFreeQuantizer(4), torch.ones(2, 4, 4, dtype=torch.int64), "floating-point"),
    ],
)
def test_bad_latents_raise_value_error(quantizer, z, message):
    with pytest.raises(ValueError, match=message):
        quantizer(z)


def test_bad_indices_and_arguments_raise_value_error():
    lfq = LookupFreeQuantizer(3)
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        lfq.indices_to_codes(torch.tensor([[8]]))
    with pytest.raises(ValueError, match="int32/int64"):
        lfq.indices_to_codes(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="decay"):
        EMAVectorQuantizer(8, 4, decay=1.0)
    with pytest.raises(ValueError, match="bits"):
        LookupFreeQuantizer(0)
