"""The language model: a Hugging Face causal LM, the only place that calls transformers (spec §2.2).

Built from a config with random weights (`AutoModelForCausalLM.from_config`, tiny Llama or Qwen2) or loaded from
a local folder (``local_files_only``: nothing is downloaded). It is driven by ``inputs_embeds``, explicit
``position_ids`` and a 4-D *additive* float mask ``(B, 1, L, L)`` in the model dtype: transformers passes a
4-D mask through unchanged, and its `eager` attention adds whatever mask it gets, so a bool mask would be
silently wrong there (checked on transformers 5.24).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LLMConfig", "build_causal_lm", "decoder_hidden_states"]

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass
class LLMConfig:
    """A tiny LLM from a config, or ``pretrained_path`` (a local folder) for a real one.

    ``intermediate_size`` defaults to twice the hidden size; ``kv_heads`` to ``heads`` (no GQA).
    """

    family: str = "llama"
    hidden_size: int = 128
    layers: int = 3
    heads: int = 4
    kv_heads: int | None = None
    intermediate_size: int | None = None
    max_positions: int = 1024
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    attn_implementation: str = "sdpa"
    pretrained_path: str | None = None


def build_causal_lm(config: LLMConfig, vocab_size: int) -> nn.Module:
    """A causal LM whose vocabulary holds at least ``vocab_size`` tokens.

    A pretrained model that lacks our added tokens grows new embedding rows, each the mean of the old rows.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if config.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {config.attn_implementation!r}: use one of {ATTENTION_IMPLEMENTATIONS} "
            "(the structures need a 4-D mask, which flash_attention_2 ignores)"
        )
    if config.pretrained_path:
        model = AutoModelForCausalLM.from_pretrained(
            config.pretrained_path, local_files_only=True, attn_implementation=config.attn_implementation
        )
        old = model.get_input_embeddings().weight.shape[0]
        if vocab_size > old:
            model.resize_token_embeddings(vocab_size)
            with torch.no_grad():
                rows = model.get_input_embeddings().weight
                rows[old:] = rows[:old].mean(0)
        return model
    families = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if config.family not in families:
        raise ValueError(f"unknown LLM family {config.family!r}; choose one of {sorted(families)}")
    hf_config = families[config.family](
        vocab_size=vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size or 2 * config.hidden_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads or config.heads,
        max_position_embeddings=config.max_positions,
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        attn_implementation=config.attn_implementation,
    )
    return AutoModelForCausalLM.from_config(hf_config)


def decoder_hidden_states(
    model: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor
) -> Tensor:
    """Final hidden states ``(B, L, D)`` of the decoder (no LM head: the loss applies it where needed)."""
    if attention_mask.dim() != 4 or attention_mask.dtype != inputs_embeds.dtype:
        raise ValueError(
            f"the LLM takes a 4-D additive mask in the model dtype {inputs_embeds.dtype}; got "
            f"{attention_mask.dim()}-D {attention_mask.dtype}"
        )
    output = model.model(
        inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids
    )
    return output.last_hidden_state
