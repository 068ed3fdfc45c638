"""Cached latents (spec §2): a split is encoded once per (tokenizer bytes, data arguments), served with its
captions and metadata, and trains exactly as encoding the pixels on the fly would."""

from __future__ import annotations

import pytest
import torch
from timeloom_generation import CausalSTDiTConfig, CausalVDM
from timeloom_generation.codec import TokenizerCodec
from timeloom_generation.latents import MovingDigitsLatentsDataModule

from timeloom.data import MovingDigits


def data_module(tokenizer, cache_dir, **overrides) -> MovingDigitsLatentsDataModule:
    settings = dict(size=16, frames=9, train_length=6, val_length=2, test_length=2, batch_size=3)
    return MovingDigitsLatentsDataModule(str(tokenizer), str(cache_dir), **{**settings, **overrides})


def test_latents_are_the_tokenizer_means_of_the_same_videos_with_their_captions(kl_tokenizer, tmp_path):
    latents = data_module(kl_tokenizer, tmp_path).dataset("train")
    videos = MovingDigits(size=16, frames=9, directions="cardinal", length=6, split="train")
    expected = TokenizerCodec(kl_tokenizer).encode(torch.stack([videos[i]["video"] for i in range(6)]))
    assert torch.allclose(torch.stack([latents[i]["latents"] for i in range(6)]), expected, atol=1e-6)
    for index in range(6):
        assert latents[index]["caption"] == videos[index]["caption"]
        assert latents[index]["meta"]["labels"].tolist() == videos[index]["meta"]["labels"].tolist()


def test_a_split_is_encoded_once_and_again_when_the_data_or_tokenizer_changes(kl_tokenizer, tmp_path):
    first = data_module(kl_tokenizer, tmp_path)
    first.dataset("train")
    assert [p.name for p in tmp_path.iterdir()] == [first.cache_path("train").name]
    modified = first.cache_path("train").stat().st_mtime_ns
    data_module(kl_tokenizer, tmp_path).dataset("train")  # read back, not re-encoded
    assert first.cache_path("train").stat().st_mtime_ns == modified
    assert data_module(kl_tokenizer, tmp_path, speed=2.0).cache_path("train") != first.cache_path("train")
    with pytest.raises(FileNotFoundError, match="no tokenizer checkpoint or exported folder at"):
        data_module(tmp_path / "missing", tmp_path)


def test_cached_latents_give_the_loss_of_encoding_the_pixels(kl_tokenizer, tmp_path):
    config = CausalSTDiTConfig(in_channels=4, patch=1, width=32, depth=2, heads=2, text_tokens=8)
    module = CausalVDM(config, "vocab", str(kl_tokenizer), latent_scale=2.0, chunk_frames=2, cache_frames=3)
    cached = next(iter(data_module(kl_tokenizer, tmp_path).train_dataloader()))
    videos = MovingDigits(size=16, frames=9, directions="cardinal", length=6, split="train")
    pixels = {"video": torch.stack([videos[int(i)]["video"] for i in cached["meta"]["index"]])}
    from_cache, from_pixels = module.batch_latents(cached), module.batch_latents(pixels)
    assert torch.allclose(from_cache, from_pixels, atol=1e-5)
    assert module.count_tokens(cached) == module.count_tokens(pixels) == 3 * 5 * 16
    assert module.count_samples(cached) == module.count_samples(pixels) == 3
