"""CausalSTDiT: shapes, exact temporal causality, cached forward == full forward, named attention layers and
input errors (spec §3, §11.1, §11.3). Random 2-block, width-32 models: every equivalence holds for any weights,
so the zero-initialised projections are re-drawn at random first."""

import pytest
import torch
from timeloom_generation.model import CausalSTDiT
from timeloom_kernels import masks

CHANNELS, SIZE, TEXT, FRAMES = 2, 8, 4, 6  # the micro model of conftest.py


def inputs(batch: int = 2, frames: int = FRAMES, seed: int = 1, per_frame_text: bool = False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, CHANNELS, frames, SIZE, SIZE, generator=generator)
    tau = torch.rand(batch, frames, generator=generator)
    text_shape = (batch, frames, TEXT, 32) if per_frame_text else (batch, TEXT, 32)
    return x, tau, torch.randn(*text_shape, generator=generator)


def test_output_is_a_velocity_per_latent(random_model):
    model = random_model()
    x, tau, text = inputs()
    assert model(x, tau, text).shape == x.shape
    # A fresh model starts at zero output (adaLN-zero style final layer).
    fresh = CausalSTDiT(model.config)
    assert fresh(x, tau, text).abs().max() == 0


@pytest.mark.parametrize("frame", range(FRAMES))
def test_outputs_up_to_t_ignore_later_values_levels_and_text(frame, random_model):
    model = random_model()
    x, tau, text = inputs(per_frame_text=True)
    x2, tau2, text2 = x.clone(), tau.clone(), text.clone()
    later, _, _ = inputs(seed=7, per_frame_text=True)
    x2[:, :, frame + 1 :] = later[:, :, frame + 1 :]
    tau2[:, frame + 1 :] = torch.rand_like(tau2[:, frame + 1 :])
    text2[:, frame + 1 :] = torch.randn_like(text2[:, frame + 1 :])
    with torch.no_grad():
        out, out2 = model(x, tau, text), model(x2, tau2, text2)
    torch.testing.assert_close(out2[:, :, : frame + 1], out[:, :, : frame + 1], atol=1e-6, rtol=0)
    if frame + 1 < FRAMES:
        assert (out2[:, :, frame + 1 :] - out[:, :, frame + 1 :]).abs().max() > 1e-3


def test_jacobian_has_no_block_above_the_diagonal(random_model):
    model = random_model()
    x, tau, text = inputs(batch=1, frames=4)
    jacobian = torch.autograd.functional.jacobian(lambda v: model(v, tau, text), x)  # out dims, then in dims
    per_frame = jacobian.abs().sum(dim=(0, 1, 3, 4, 5, 6, 8, 9))  # (F_out, F_in)
    assert per_frame.triu(1).abs().max() == 0  # no output frame reads a later input frame
    assert (per_frame.diagonal() > 0).all() and (per_frame.diagonal(-1) > 0).all()


@pytest.mark.parametrize("prefix", [1, 3, 5])
def test_cached_forward_equals_the_last_rows_of_the_full_forward(prefix, random_model):
    model = random_model()
    x, tau, text = inputs()
    with torch.no_grad():
        full = model(x, tau, text)
        cache = model.new_cache(2, (SIZE, SIZE), frames=FRAMES)
        model(x[:, :, :prefix], tau[:, :prefix], text, cache=cache, write=True)
        with cache.frozen():
            rest = model(
                x[:, :, prefix:], tau[:, prefix:], text, positions=torch.arange(prefix, FRAMES), cache=cache
            )
    torch.testing.assert_close(rest, full[:, :, prefix:], atol=1e-5, rtol=0)


def test_positions_beyond_the_training_length_shift_consistently(random_model):
    """RoPE on absolute frame indices: a common offset leaves every temporal score unchanged."""
    model = random_model()
    x, tau, text = inputs()
    with torch.no_grad():
        near = model(x, tau, text)
        far = model(x, tau, text, positions=torch.arange(500, 500 + FRAMES))
    torch.testing.assert_close(far, near, atol=2e-4, rtol=0)


def test_every_attention_is_named_for_processors(random_model):
    model = random_model()
    assert model.layer_names == [
        f"blocks.{i}.{kind}.attend" for i in range(2) for kind in ("spatial", "temporal", "cross")
    ]


@pytest.mark.parametrize(
    "x_shape, tau_shape, text_shape, match",
    [
        ((2, 3, FRAMES, SIZE, SIZE), (2, FRAMES), (2, TEXT, 32), "latents must be"),
        ((2, CHANNELS, FRAMES, 7, SIZE), (2, FRAMES), (2, TEXT, 32), "multiples of the patch"),
        ((2, CHANNELS, FRAMES, SIZE, SIZE), (2,), (2, TEXT, 32), "tau must be per frame"),
        ((2, CHANNELS, FRAMES, SIZE, SIZE), (2, FRAMES), (2, TEXT + 1, 32), "text must be"),
    ],
)
def test_bad_shapes_are_named(x_shape, tau_shape, text_shape, match, random_model):
    model = random_model()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(x_shape), torch.zeros(tau_shape), torch.zeros(text_shape))


def test_full_mask_default_is_plain_causal(random_model):
    model = random_model()
    x, tau, text = inputs()
    with torch.no_grad():
        default = model(x, tau, text)
        explicit = model(x, tau, text, mask=masks.causal())
    assert torch.equal(default, explicit)
