"""Shared fixture: random micro models. Every equivalence must hold for any weights, so the zero-initialised
projections are re-drawn at random (a fresh model's temporal layers would otherwise do nothing)."""

from pathlib import Path

import pytest
import torch
from timeloom_generation.model import CausalSTDiT, CausalSTDiTConfig
from timeloom_tokenizer import OmniTokenizerConfig, OmniTokenizerModule

MICRO = dict(in_channels=2, patch=2, width=32, depth=2, heads=2, text_tokens=4)


def build_random_model(seed: int = 0, **overrides) -> CausalSTDiT:
    torch.manual_seed(seed)
    model = CausalSTDiT(CausalSTDiTConfig(**{**MICRO, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model


@pytest.fixture
def random_model():
    """A factory: ``random_model(seed=0, **config_overrides)`` -> a `CausalSTDiT` with random weights."""
    return build_random_model


@pytest.fixture(scope="session")
def kl_tokenizer(tmp_path_factory) -> Path:
    """A random micro KL tokenizer (4 latent channels, patch 4, 2 frames per tubelet), saved like `timeloom export`."""
    torch.manual_seed(0)
    config = OmniTokenizerConfig.micro(quantizer="kl")
    directory = tmp_path_factory.mktemp("kl-tokenizer")
    OmniTokenizerModule(config).save_pretrained(directory)
    return directory
