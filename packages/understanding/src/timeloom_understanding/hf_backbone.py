"""The language model: a Hugging Face causal LM, the only place that calls transformers (spec §2.2).

Built from a config with random weights (`AutoModelForCausalLM.from_config`, tiny Llama or Qwen2) or loaded from
a local folder (``local_files_only``: nothing is downloaded). It is driven by ``inputs_embeds``, explicit
``position_ids`` and a 4-D *additive* float mask ``(B, 1, L, L)`` in the model dtype: transformers passes a
4-D mask through unchanged, and its `eager` attention adds whatever mask it gets, so a bool mask would be
silently wrong there (checked on transformers 5.24).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LLMConfig",
    "build_causal_lm",
    "cache_length",
    "crop_cache",
    "decoder_hidden_states",
    "new_cache",
]

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
    model: nn.Module,
    inputs_embeds: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor,
    cache: Any = None,
) -> Tensor:
    """Final hidden states ``(B, L, D)`` of the decoder (no LM head: the loss applies it where needed).

    With a ``cache`` (from `new_cache`) the ``L`` new tokens' keys and values are appended to it, and
    ``attention_mask`` is ``(B, 1, L, cached + L)``: the new rows over every cached key and the new ones.
    """
    if attention_mask.dim() != 4 or attention_mask.dtype != inputs_embeds.dtype:
        raise ValueError(
            f"the LLM takes a 4-D additive mask in the model dtype {inputs_embeds.dtype}; got "
            f"{attention_mask.dim()}-D {attention_mask.dtype}"
        )
    keys = inputs_embeds.shape[1] + (cache_length(cache) if cache is not None else 0)
    if attention_mask.shape[-1] != keys:
        raise ValueError(f"the mask covers {attention_mask.shape[-1]} keys; the cache and input hold {keys}")
    output = model.model(
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=cache is not None,
        **{_cache_argument(type(model.model)): cache},
    )
    return output.last_hidden_state


@functools.cache
def _cache_argument(decoder: type) -> str:
    """The name a decoder's ``forward`` takes its cache by: ``cache`` in recent transformers (5.24 here),
    ``past_key_values`` before (5.17 has it). A wrong name is swallowed by ``**kwargs`` and the cache silently
    stays empty, so it is read from the signature."""
    parameters = inspect.signature(decoder.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def new_cache(model: nn.Module) -> Any:
    """An empty key/value cache for ``model`` (transformers' own `DynamicCache`: it owns the layout)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def cache_length(cache: Any) -> int:
    """How many tokens ``cache`` holds."""
    return cache.get_seq_length()


def crop_cache(cache: Any, length: int) -> None:
    """Roll ``cache`` back to its first ``length`` tokens, in place (transformers takes a negative count)."""
    extra = cache_length(cache) - length
    if extra < 0:
        raise ValueError(f"cannot crop a cache of {cache_length(cache)} tokens to {length}")
    cache.crop(-extra)
