"""The base module: optimiser/scheduler defaults, export, shape errors, throughput, W&B offline default."""

import math

import pytest
import torch

from timeloom.logging import WandbLogger, wandb_has_api_key
from timeloom.models import VideoAutoencoder, VideoAutoencoderConfig
from timeloom.module import TimeloomModule, WarmupCosine
from timeloom.throughput import measure_matmul_peak


def tiny_module(**kwargs) -> VideoAutoencoder:
    return VideoAutoencoder(config=VideoAutoencoderConfig(width=8, latent_channels=4, levels=1), **kwargs)


def test_warmup_cosine_shape():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    factors = [schedule.factor(step) for step in range(120)]
    assert factors[0] < factors[5] < factors[10] == pytest.approx(1.0)
    assert factors[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[110] == factors[119] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_warmup_cosine_without_a_horizon_holds_the_rate():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(optimizer, warmup_steps=4)
    assert [schedule.factor(step) for step in (4, 100, 10**6)] == [1.0, 1.0, 1.0]


def test_save_and_load_pretrained_roundtrip(tmp_path):
    module = tiny_module()
    video = torch.rand(2, 1, 3, 8, 8) * 2 - 1
    expected = module.model(video)
    module.save_pretrained(tmp_path / "export")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    loaded = TimeloomModule.from_pretrained(tmp_path / "export")
    assert isinstance(loaded, VideoAutoencoder) and loaded.config == module.config
    torch.testing.assert_close(loaded.model(video), expected, rtol=0, atol=0)


def test_from_pretrained_refuses_another_class(tmp_path):
    tiny_module().save_pretrained(tmp_path / "export")

    class Other(TimeloomModule):
        pass

    with pytest.raises(ValueError, match="not a Other"):
        Other.from_pretrained(tmp_path / "export")


@pytest.mark.parametrize("shape", [(2, 3, 4, 8, 8), (2, 1, 4, 7, 8), (1, 4, 8, 8)])
def test_wrong_shape_is_a_clear_value_error(shape):
    with pytest.raises(ValueError, match=r"expected a video \(B, C=1, T, H, W\).*got shape"):
        tiny_module().model(torch.zeros(shape))


def test_reconstruction_is_causal_in_time():
    model = tiny_module().model
    video = torch.rand(1, 1, 5, 8, 8) * 2 - 1
    changed = video.clone()
    changed[:, :, 3:] = 0
    torch.testing.assert_close(model(video)[:, :, :3], model(changed)[:, :, :3], rtol=0, atol=0)


def test_matmul_peak_is_a_positive_rate():
    assert measure_matmul_peak("cpu", torch.float32, n=256) > 1e6


def test_wandb_goes_offline_without_an_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_has_api_key()
    logger = WandbLogger(save_dir=str(tmp_path / "runs"))
    try:
        run = logger.experiment
        assert run.settings.mode == "offline" or run.offline
    finally:
        import wandb

        wandb.finish()
    assert (tmp_path / "runs" / "wandb").exists()
