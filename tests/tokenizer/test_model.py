"""OmniTokenizer model: shapes, image = one-frame video, exact temporal causality, attention plumbing, size
and a few training steps (spec §1, §10.1–4, §10.7). A micro model keeps every test on CPU in a second or two."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from timeloom_kernels import Attend, name_attention_layers
from timeloom_kernels.attention import ENV_BACKEND
from timeloom_tokenizer import OmniTokenizer, OmniTokenizerConfig

PATCH, TUBELET, SIZE, FRAMES = 4, 2, 16, 5  # 5×16² pixels → 3×4×4 latents


def micro(quantizer: str = "vq", **overrides) -> OmniTokenizer:
    config = OmniTokenizerConfig.micro(
        channels=3,
        patch=PATCH,
        temporal_patch=TUBELET,
        encoder_spatial="tw",
        window=2,
        latent_dim=6 if quantizer == "lfq" else 8,
        quantizer=quantizer,
        **overrides,
    )
    torch.manual_seed(0)
    return OmniTokenizer(config)


def video(frames: int = FRAMES, batch: int = 2, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, SIZE, SIZE, generator=generator) * 2 - 1


@pytest.mark.parametrize("quantizer", ["vq", "kl", "lfq"])
@pytest.mark.parametrize("frames", [None, 1, 5, 9])
def test_round_trip_shapes(quantizer: str, frames: int | None) -> None:
    model = micro(quantizer)
    x = video(frames or 1)[:, :, 0] if frames is None else video(frames)
    quantized, output = model.encode(x)
    latent_frames, h, w = model.latent_shape(frames or 1, SIZE, SIZE)
    grid = (h, w) if frames is None else (latent_frames, h, w)
    assert quantized.shape == (2, model.config.latent_dim, *grid)
    assert output.indices is None if quantizer == "kl" else output.indices.shape == (2, *grid)
    assert output.loss.dim() == 0
    assert model.decode(quantized).shape == x.shape
    reconstruction, _ = model(x)
    assert reconstruction.shape == x.shape


@pytest.mark.parametrize("quantizer", ["vq", "kl", "lfq"])
def test_image_equals_one_frame_video(quantizer: str) -> None:
    model = micro(quantizer).eval()
    clip = video(1)
    image_latent, image_output = model.encode(clip[:, :, 0])
    video_latent, video_output = model.encode(clip)
    assert torch.equal(image_latent, video_latent[:, :, 0])
    if quantizer != "kl":
        assert torch.equal(image_output.indices, video_output.indices[:, 0])
    assert torch.equal(model.decode(image_latent), model.decode(video_latent)[:, :, 0])


@pytest.mark.parametrize("first_changed", [1, 2, 3, 4])
def test_encoder_is_exactly_causal(first_changed: int) -> None:
    model = micro().eval()
    x = video()
    perturbed = x.clone()
    perturbed[:, :, first_changed:] = -perturbed[:, :, first_changed:]
    # Latent frame j covers pixel frames 1 + (j−1)·t … j·t, so these see only unchanged pixels.
    unchanged = 1 + (first_changed - 1) // TUBELET
    latent, perturbed_latent = model.encode_latent(x), model.encode_latent(perturbed)
    assert torch.equal(latent[:, :, :unchanged], perturbed_latent[:, :, :unchanged])
    assert not torch.allclose(latent[:, :, unchanged:], perturbed_latent[:, :, unchanged:])
    codes, perturbed_codes = model.encode(x)[1].indices, model.encode(perturbed)[1].indices
    assert torch.equal(codes[:, :unchanged], perturbed_codes[:, :unchanged])


def test_first_latent_frame_is_the_image_latent() -> None:
    model = micro().eval()
    x = video()
    torch.testing.assert_close(
        model.encode_latent(x)[:, :, 0], model.encode_latent(x[:, :, 0]), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("changed_latent_frame", [1, 2])
def test_decoder_is_exactly_causal(changed_latent_frame: int) -> None:
    model = micro().eval()
    latent = torch.randn(2, 8, 3, SIZE // PATCH, SIZE // PATCH, generator=torch.Generator().manual_seed(2))
    perturbed = latent.clone()
    perturbed[:, :, changed_latent_frame] += 1.0
    kept_pixels = 1 + (changed_latent_frame - 1) * TUBELET
    decoded, perturbed_decoded = model.decode(latent), model.decode(perturbed)
    assert torch.equal(decoded[:, :, :kept_pixels], perturbed_decoded[:, :, :kept_pixels])
    assert not torch.allclose(decoded[:, :, kept_pixels:], perturbed_decoded[:, :, kept_pixels:])


def test_attention_goes_through_attend_and_window_blocks_train_the_swin_table() -> None:
    model = micro()
    names = name_attention_layers(model)
    blocks = 2 + 1 + 1 + 1  # encoder "tw" + temporal 1, decoder temporal 1 + spatial 1
    assert len(names) == blocks == sum(isinstance(m, Attend) for m in model.modules())
    assert "encoder_spatial.blocks.1.attn.attend" in names
    window_attention = model.encoder_spatial.blocks[1].attn
    assert window_attention.kind == "window" and model.encoder_spatial.blocks[1].peg is None
    reconstruction, output = model(video(batch=1))
    (F.l1_loss(reconstruction, video(batch=1)) + output.loss).backward()
    table_grad = window_attention.relative_position.table.grad
    assert table_grad is not None and table_grad.abs().sum() > 0


def test_biases_apply_on_reference_and_sdpa(monkeypatch: pytest.MonkeyPatch) -> None:
    model = micro().eval()
    x = video()
    latents = {}
    for backend in ("reference", "sdpa"):
        monkeypatch.setenv(ENV_BACKEND, backend)
        latents[backend] = model.encode_latent(x)
    torch.testing.assert_close(latents["reference"], latents["sdpa"], atol=1e-5, rtol=1e-5)
    # The window table is really applied: changing it changes the latents.
    with torch.no_grad():
        model.encoder_spatial.blocks[1].attn.relative_position.table[0, 0] += 3.0
    assert not torch.allclose(model.encode_latent(x), latents["sdpa"])


# OmniTokenizer's size as VidTok's Table 1 lists it (spec §8); the paper gives no exact count.
PAPER_PARAMETERS = 51e6
BASE_CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "configs/tokenizer").glob("omnitokenizer-base-*.yaml")
)


def test_paper_size_parameter_count() -> None:
    with torch.device("meta"):
        model = OmniTokenizer(OmniTokenizerConfig())
    count = sum(p.numel() for p in model.parameters())
    print(f"OmniTokenizer base: {count:,} parameters")
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.1


def test_there_is_a_base_config_per_stage() -> None:
    assert [p.stem for p in BASE_CONFIGS] == [
        "omnitokenizer-base-stage1",
        "omnitokenizer-base-stage2",
        "omnitokenizer-base-stage3-kl",
    ]


@pytest.mark.parametrize("path", BASE_CONFIGS, ids=lambda p: p.stem)
def test_every_base_config_builds_paper_size_on_the_meta_device(path: Path) -> None:
    config = yaml.safe_load(path.read_text())["model"]["init_args"]["config"]
    with torch.device("meta"):
        model = OmniTokenizer(OmniTokenizerConfig(**config))
    count = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    print(f"{path.stem}: {count:,} parameters (paper: {PAPER_PARAMETERS:,.0f})")
    # 51.55 M (VQ) / 51.55 M (KL: pre_quant d → 16): within 2 % of the published 51 M.
    assert abs(count - PAPER_PARAMETERS) / PAPER_PARAMETERS < 0.02


@pytest.mark.parametrize(
    "shape",
    [
        (2, 3, 4, SIZE, SIZE),  # T is not 1 + k·2
        (2, 3, 0, SIZE, SIZE),  # no frames
        (2, 3, 5, 18, SIZE),  # H not divisible by the patch
        (2, 3, 5, SIZE, 20),  # W divisible by the patch, not by patch × window
        (2, 4, 5, SIZE, SIZE),  # wrong channel count
        (2, 3, 1, 1, SIZE, SIZE),  # 6-D
    ],
)
def test_bad_input_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected"):
        micro().encode(torch.zeros(shape))


def test_bad_latent_and_config_raise() -> None:
    model = micro()
    with pytest.raises(ValueError, match="latent channels"):
        model.decode(torch.zeros(1, 7, 2, 4, 4))
    with pytest.raises(ValueError, match="encoder_spatial"):
        OmniTokenizerConfig(encoder_spatial="tx")
    with pytest.raises(ValueError, match="quantizer"):
        OmniTokenizerConfig(quantizer="fsq")


def test_a_few_steps_lower_the_reconstruction_loss() -> None:
    model = micro()
    x = video(batch=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        reconstruction, output = model(x)
        reconstruction_loss = F.l1_loss(reconstruction, x)
        optimizer.zero_grad()
        (reconstruction_loss + output.loss).backward()
        optimizer.step()
        losses.append(reconstruction_loss.item())
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
