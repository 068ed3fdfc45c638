"""Tokenizer losses: discriminators, GAN losses, adaptive weight, perceptual loss, disc_start gating."""

import math
import warnings

import pytest
import torch
from timeloom_tokenizer.losses import (
    PatchDiscriminator2D,
    PatchDiscriminator3D,
    PerceptualLoss,
    TokenizerLoss,
    adaptive_weight,
    hinge_d_loss,
    hinge_g_loss,
    vanilla_d_loss,
    vanilla_g_loss,
)
from torch import nn
from torchvision.models.vgg import make_layers

# VGG16's layout with tiny widths: torchvision's own builder, so the keys are torchvision's.
TINY_VGG16 = [2, 2, "M", 3, 3, "M", 4, 4, 4, "M", 5, 5, 5, "M", 5, 5, 5, "M"]
TINY_TAP_WIDTHS = (2, 3, 4, 5, 5)


@pytest.fixture
def tiny_vgg_path(tmp_path):
    torch.manual_seed(0)
    features = make_layers(TINY_VGG16)
    state = {f"features.{key}": value for key, value in features.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(1, 1)  # extra keys, as in a full VGG16 file, are ignored
    for k, width in enumerate(TINY_TAP_WIDTHS):
        state[f"lin{k}.model.1.weight"] = torch.rand(1, width, 1, 1)
    path = tmp_path / "vgg_lpips.pt"
    torch.save(state, path)
    return str(path)


def videos(batch=2, frames=3, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, size, size, generator=generator) * 2 - 1


# ------------------------------------------------------------------ discriminators


def test_discriminator_2d_output_shape_and_features():
    disc = PatchDiscriminator2D(base_channels=4, n_layers=2)
    logits, features = disc.forward_features(torch.randn(2, 3, 32, 32))
    # two stride-2 blocks 32→16→8, then two stride-1 4×4 convs 8→7→6
    assert logits.shape == (2, 1, 6, 6)
    assert [f.shape[1] for f in features] == [4, 8, 16]
    assert disc.min_spatial_size == 12
    assert disc(torch.randn(2, 3, 12, 12)).shape == (2, 1, 1, 1)


@pytest.mark.parametrize(("frames", "out_frames"), [(1, 1), (5, 2), (9, 3)])
def test_discriminator_3d_output_shape_including_one_frame(frames, out_frames):
    disc = PatchDiscriminator3D(base_channels=4, n_layers=2)
    logits = disc(torch.randn(2, 3, frames, 16, 16))
    # time: ceil(T/2) per stride-2 layer, kept by the stride-1 ones; space: 16→8→4→3→2
    assert logits.shape == (2, 1, out_frames, 2, 2)


def test_discriminators_reject_bad_inputs():
    disc2d = PatchDiscriminator2D(base_channels=4, n_layers=2)
    disc3d = PatchDiscriminator3D(base_channels=4, n_layers=2)
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\)"):
        disc2d(torch.randn(2, 3, 1, 16, 16))
    with pytest.raises(ValueError, match=r"expects \(B, C, T, H, W\)"):
        disc3d(torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="expects 3 channels, got 1"):
        disc2d(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="needs H, W >= 12"):
        disc3d(torch.randn(2, 3, 1, 8, 16))
    with pytest.raises(ValueError, match="temporal_kernel_size must be odd"):
        PatchDiscriminator3D(temporal_kernel_size=4)
    with pytest.raises(ValueError, match="n_layers must be >= 1"):
        PatchDiscriminator2D(n_layers=0)


# ------------------------------------------------------------------ GAN losses


def test_hinge_losses_match_hand_values():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - real) = [0, 0.5, 2]
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + fake) = [0, 1, 2]
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert hinge_g_loss(fake).item() == pytest.approx(1 / 3)
    zeros = torch.zeros(4)
    assert vanilla_d_loss(zeros, zeros).item() == pytest.approx(math.log(2))
    assert vanilla_g_loss(torch.tensor([math.log(3.0)])).item() == pytest.approx(math.log(4 / 3))


def test_adaptive_weight_is_the_gradient_norm_ratio():
    weight = nn.Parameter(torch.ones(2, 3))
    x = torch.tensor([1.0, 2.0, 2.0])  # ‖x‖ = 3
    out = weight @ x
    nll = (torch.tensor([3.0, 4.0]) * out).sum()  # ∇_W = a xᵀ, norm ‖a‖‖x‖ = 5·3
    g_loss = (torch.tensor([0.0, 1.0]) * out).sum()  # norm 1·3
    ratio = adaptive_weight(nll, g_loss, weight)
    assert ratio.item() == pytest.approx(15 / (3 + 1e-4), rel=1e-6)
    assert not ratio.requires_grad
    nll.backward()  # the graph was kept for the real backward pass
    tiny_g = (torch.tensor([0.0, 1e-9]) * (weight @ x)).sum()
    assert adaptive_weight((weight @ x).sum() * 1e3, tiny_g, weight, max_weight=7.0).item() == 7.0
    with pytest.raises(ValueError, match="must be a scalar"):
        adaptive_weight(weight @ x, g_loss, weight)


# ------------------------------------------------------------------ perceptual loss


def test_perceptual_loss_from_local_file(tiny_vgg_path):
    loss = PerceptualLoss(tiny_vgg_path)
    assert loss.enabled
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    noise = torch.randn(2, 3, 16, 16, generator=generator)
    assert torch.equal(loss(x, x), torch.zeros(2))
    distances = [loss(x, x + scale * noise).mean().item() for scale in (0.05, 0.2, 0.8)]
    assert 0 < distances[0] < distances[1] < distances[2]
    assert all(not p.requires_grad for p in loss.parameters())


def test_perceptual_loss_bad_files_name_the_path(tmp_path):
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ValueError, match="nowhere.pt"):
        PerceptualLoss(str(missing))
    incomplete = tmp_path / "incomplete.pt"
    torch.save({"features.0.weight": torch.zeros(2, 3, 3, 3)}, incomplete)
    with pytest.raises(ValueError, match="incomplete.pt.*lack"):
        PerceptualLoss(str(incomplete))
    garbage = tmp_path / "garbage.pt"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="could not read.*garbage.pt"):
        PerceptualLoss(str(garbage))


def test_perceptual_loss_off_returns_zero_and_warns_once():
    loss = PerceptualLoss(None)
    x = torch.rand(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="off"):
        assert torch.equal(loss(x, -x), torch.zeros(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss(x, -x)


def test_perceptual_loss_rejects_bad_shapes(tiny_vgg_path):
    loss = PerceptualLoss(tiny_vgg_path)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        loss(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match="must match"):
        loss(torch.rand(2, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="H, W >= 16"):
        loss(torch.rand(2, 3, 8, 8), torch.rand(2, 3, 8, 8))


# ------------------------------------------------------------------ combined objective


def tiny_loss(**overrides):
    options = dict(disc_channels=4, disc_layers=2, disc_start=10, image_gan_weight=0.5)
    options.update(overrides)
    return TokenizerLoss(**options)


def test_disc_start_gates_generator_and_discriminator():
    torch.manual_seed(0)
    objective = tiny_loss(video_gan_weight=0.25)
    real = videos()
    fake = videos(seed=1).requires_grad_()
    discriminator_params = list(objective.image_discriminator.parameters()) + list(
        objective.video_discriminator.parameters()
    )

    g_loss, g_metrics = objective.generator_step(real, fake, step=9)
    assert g_metrics["d_weight"] == 0 and g_metrics["g_adv"] == 0
    assert g_loss.item() == pytest.approx(4 * (fake - real).abs().mean().item())
    g_loss.backward()
    assert all(p.grad is None for p in discriminator_params)
    d_loss, d_metrics = objective.discriminator_step(real, fake, step=9)
    assert d_loss.item() == 0 and not d_loss.requires_grad and d_metrics["d_loss"] == 0

    g_loss, g_metrics = objective.generator_step(real, fake, step=10)
    assert g_metrics["d_weight"] == 1 and g_metrics["g_adv"] != 0
    assert g_loss.item() == pytest.approx((g_metrics["rec"] * 4 + g_metrics["g_adv"]).item())
    d_loss, d_metrics = objective.discriminator_step(real, fake, step=10)
    assert d_loss.item() > 0
    assert d_metrics["d_loss"] == pytest.approx(
        (d_metrics["d_loss_image"] + d_metrics["d_loss_video"]).item()
    )
    assert {"logits_real", "logits_fake", "logits_real_video", "logits_fake_image"} <= d_metrics.keys()
    for p in discriminator_params:
        p.grad = None
    fake.grad = None
    d_loss.backward()
    assert fake.grad is None  # the discriminator step never reaches the generator
    assert all(p.grad is not None for p in discriminator_params)
    # (the head biases' gradients cancel exactly while every logit is inside the hinge margin)
    weights = [p for p in discriminator_params if p.ndim > 1]
    assert all(p.grad.abs().sum() > 0 for p in weights)


def test_adaptive_weight_in_tokenizer_loss_matches_hand_computation():
    torch.manual_seed(0)
    objective = tiny_loss(adaptive_gan_weight=True, disc_start=0)
    decoder = nn.Conv3d(3, 3, kernel_size=1)
    real = videos(frames=1)
    latent = videos(frames=1, seed=2)
    fake = decoder(latent)
    _, metrics = objective.generator_step(real, fake, step=0, last_layer=decoder.weight)

    # one frame, so the image discriminator sees frame 0; BatchNorm in train mode is deterministic
    rec = 4 * (fake - real).abs().mean()
    g = -objective.image_discriminator(fake[:, :, 0]).mean()
    (rec_grad,) = torch.autograd.grad(rec, decoder.weight, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g, decoder.weight)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)
    assert metrics["d_weight"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["g_adv"].item() == pytest.approx(0.5 * g.item(), rel=1e-5)
    with pytest.raises(ValueError, match="needs last_layer"):
        objective.generator_step(real, fake, step=0)


def test_perceptual_term_in_tokenizer_loss(tiny_vgg_path):
    with pytest.raises(ValueError, match="perceptual_weights_path"):
        tiny_loss(perceptual_weight=1.0)
    objective = tiny_loss(perceptual_weight=2.0, perceptual_weights_path=tiny_vgg_path, image_gan_weight=0.0)
    real = videos()
    fake = videos(seed=1).requires_grad_()
    loss, metrics = objective.generator_step(real, fake, step=0)
    assert metrics["perceptual"] > 0
    assert loss.item() == pytest.approx((4 * metrics["rec"] + 2 * metrics["perceptual"]).item())
    loss.backward()
    assert fake.grad is not None
    assert all(p.grad is None for p in objective.perceptual.parameters())


def test_tokenizer_loss_rejects_bad_inputs():
    objective = tiny_loss()
    with pytest.raises(ValueError, match=r"expects videos \(B, C, T, H, W\)"):
        objective.generator_step(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16), step=0)
    with pytest.raises(ValueError, match="must match inputs"):
        objective.discriminator_step(videos(), videos(frames=2), step=20)
    with pytest.raises(ValueError, match="reconstruction must be"):
        tiny_loss(reconstruction="l3")
    with pytest.raises(ValueError, match="image_gan_weight must be finite and >= 0"):
        tiny_loss(image_gan_weight=-1.0)
