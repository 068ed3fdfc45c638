"""PINE: position-invariant inference for multiple choice (spec §3.7; wzq016/PINE, arXiv 2407.01100).

A multiple-choice prompt is ``prefix · option_1 … option_K · suffix``. A causal LM with RoPE reads the options
in order, so its answer can change when they are shuffled. PINE removes the order, per layer and head:

1. **Importance without RoPE.** From each query, the attention mass on each option (softmax over the option
   tokens only, computed without positions; an option's own tokens are hidden from its own queries), divided
   by the option's length. An option's queries sum theirs into one option-to-option importance.
2. **Rank.** An option ranks itself first and the others by descending importance; a token after the options
   (the suffix, generated tokens) ranks all options by its own importance.
3. **Place.** All options are right-aligned to the end ``E`` of the option span. From a query, a key of option
   ``j`` ranked ``r_j`` sits at ``E − Σ_{r_j' ≤ r_j} len_j' + offset`` (in units of the structure's text step):
   the more important an option, the closer it is. RoPE is applied there.
4. **Attend.** Options see each other in full, causal inside each option and in the prefix and suffix.

Nothing in this depends on where an option was written, so the scores are invariant to option order (up to
ties in importance). Vectorised over batch, heads, queries and options (upstream loops over options); it
drives the Hugging Face Llama/Qwen2 layers' own projections, norms and MLPs. Inference only.
"""

from __future__ import annotations

import torch
from timeloom_kernels import masks
from timeloom_kernels.masks import Mask
from timeloom_kernels.positions import rope_angles
from torch import Tensor, nn

__all__ = ["OptionSpans", "option_segments", "pine_hidden_states"]


class OptionSpans:
    """Where the options are in a padded batch: ``segment (B, L)`` option index or −1, checked and measured.

    Options must be contiguous runs that follow each other with no token in between, at least two per
    sample, numbered ``0 … K−1`` in any order.
    """

    def __init__(self, segment: Tensor, positions: Tensor, step: float) -> None:
        batch, length = segment.shape
        count = int(segment.max()) + 1
        if count < 2:
            raise ValueError("PINE needs at least two options per sample")
        index = torch.arange(length, device=segment.device).expand(batch, -1)
        inside = segment >= 0
        onehot = torch.nn.functional.one_hot(segment.clamp(min=0), count) * inside.unsqueeze(-1)
        self.onehot = onehot.float()  # (B, L, K)
        self.lengths = onehot.sum(1)  # (B, K) tokens per option
        for b in range(batch):
            where = torch.nonzero(inside[b]).flatten()
            if len(where) == 0 or (self.lengths[b] == 0).any():
                raise ValueError(f"sample {b}: every one of the {count} options needs tokens")
            if int(where[-1] - where[0]) + 1 != len(where):
                raise ValueError(f"sample {b}: the options must follow each other with no token in between")
            runs = (segment[b, where[1:]] != segment[b, where[:-1]]).sum()
            if int(runs) + 1 != count:
                raise ValueError(f"sample {b}: each option must be one contiguous run of tokens")
        self.segment, self.inside, self.count = segment, inside, count
        start = torch.where(inside, index, length).amin(1)
        self.prefix = index < start.unsqueeze(1)
        self.suffix = ~self.prefix & ~inside
        first = torch.where(inside, index, length)
        segment_start = torch.full((batch, count), length, device=segment.device)
        segment_start = segment_start.scatter_reduce(1, segment.clamp(min=0), first, "amin")
        offset = index - segment_start.gather(1, segment.clamp(min=0))  # offset within its option
        own_length = self.lengths.gather(1, segment.clamp(min=0))
        region_start = positions.gather(1, start.unsqueeze(1))
        end = region_start + self.lengths.sum(1, keepdim=True) * step  # E
        # right-aligned: the last token of every option sits just before E
        self.base = torch.where(inside, end - (own_length - offset) * step, positions)
        self.step = step

    def options_mask(self) -> Mask:
        """Causal, plus tokens of different options see each other (the kernels' PINE mask)."""
        return masks.segment_bidirectional(self.segment + 1)  # its ids start at 1; 0 is "no option"


def pine_hidden_states(llm: nn.Module, embeds: Tensor, allowed: Tensor, spans: OptionSpans) -> Tensor:
    """Final hidden states ``(B, L, D)`` of a Hugging Face Llama/Qwen2 under PINE.

    ``allowed (B, 1, L, L)`` is the structure's bool mask with the options seeing each other in full
    (`timeloom_kernels.masks.segment_bidirectional` over the option ids: `OptionSpans.options_mask`); ``spans``
    holds the options and the structure's positions. Prefix tokens must not see the options.
    """
    if (allowed[:, 0] & spans.prefix.unsqueeze(2) & ~spans.prefix.unsqueeze(1)).any():
        raise ValueError("PINE: tokens before the options see them under this structure (use a causal one)")
    config = llm.config
    rope = getattr(config, "rope_parameters", None) or {
        "rope_type": "default",
        "rope_theta": config.rope_theta,
    }
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"PINE supports plain RoPE; the LLM uses {rope['rope_type']!r}")
    x = embeds
    for layer in llm.model.layers:
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), allowed, spans, rope["rope_theta"])
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return llm.model.norm(x)


def _attention(attention: nn.Module, h: Tensor, allowed: Tensor, spans: OptionSpans, theta: float) -> Tensor:
    batch, length, _ = h.shape
    head_dim = attention.head_dim
    q, k, v = (
        proj(h).unflatten(-1, (-1, head_dim)).transpose(1, 2)
        for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
    )
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)  # grouped-query attention
    shift = _option_shifts(q, k, spans)  # (B, H, L, K) option j's distance from query i, in tokens
    # a key of option j from query i: score = rot(q, p_i + shift_ij·step) · rot(k, base_j), RoPE being relative;
    # one extra column with shift 0 serves every key outside the options
    shift = torch.cat((shift, shift.new_zeros(*shift.shape[:-1], 1)), dim=-1)
    query_at = spans.base[:, None, :, None] + shift * spans.step  # (B, H, L, K + 1)
    rotated_q = _rotate(q.unsqueeze(3).expand(-1, -1, -1, spans.count + 1, -1), query_at, theta)
    rotated_k = _rotate(k, spans.base.unsqueeze(1).expand(-1, q.shape[1], -1), theta)
    scores = torch.einsum("bhqgd,bhkd->bhqgk", rotated_q, rotated_k) * attention.scaling
    key_group = torch.where(spans.inside, spans.segment, spans.count)  # (B, L)
    index = key_group[:, None, None, None, :].expand(-1, q.shape[1], length, 1, -1)
    scores = scores.gather(3, index).squeeze(3)  # (B, H, L, L)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    out = scores.softmax(-1).to(v.dtype) @ v
    return attention.o_proj(out.transpose(1, 2).flatten(-2))


def _option_shifts(q: Tensor, k: Tensor, spans: OptionSpans) -> Tensor:
    """How far (in tokens) each option is moved back from the right-aligned end, per query and head."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # no RoPE
    # option queries: the other options' tokens; suffix queries: every option token
    visible = spans.inside.unsqueeze(1) & (spans.inside.unsqueeze(2) | spans.suffix.unsqueeze(2))
    visible &= ~(spans.inside.unsqueeze(2) & (spans.segment.unsqueeze(2) == spans.segment.unsqueeze(1)))
    visible = visible.unsqueeze(1)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)  # rows with none: 0
    onehot = spans.onehot.to(probs.dtype).unsqueeze(1)
    mass = probs @ onehot / spans.lengths[:, None, None, :]  # (B, H, L, K)
    by_option = onehot.transpose(-1, -2) @ mass  # (B, H, K, K): option i's queries → j
    importance = torch.where(
        spans.inside[:, None, :, None],
        by_option.gather(2, spans.segment.clamp(min=0)[:, None, :, None].expand(*mass.shape)),
        mass,
    )
    own = spans.inside[:, None, :, None] & (
        spans.segment[:, None, :, None] == torch.arange(spans.count, device=q.device)
    )
    importance = importance.masked_fill(own, float("inf"))  # an option ranks itself first
    order = importance.argsort(dim=-1, descending=True, stable=True)
    lengths = spans.lengths[:, None, None, :].expand_as(order).gather(-1, order)
    ahead = lengths.cumsum(-1) - lengths  # the options ranked before j (its own length is in the base)
    return torch.empty_like(ahead).scatter_(-1, order, ahead)


def _rotate(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """Half-split RoPE (Llama's convention) of ``x (…, D)`` at ``positions (…)``, any leading shape."""
    angles = rope_angles(positions, x.shape[-1] // 2, theta)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def option_segments(tokenizer, input_ids: Tensor, lengths: Tensor, options: list[list[str]]) -> Tensor:
    """``(B, L_text)`` option index of each text token (−1 elsewhere): each sample's option strings (as
    written in its prompt, e.g. ``"(A) left"``) are found in order as token runs."""
    segment = torch.full_like(input_ids, -1)
    for b, texts in enumerate(options):
        ids, start = input_ids[b, : int(lengths[b])].tolist(), 0
        for number, text in enumerate(texts):
            wanted = tokenizer.encode(text)
            found = next(
                (p for p in range(start, len(ids) - len(wanted) + 1) if ids[p : p + len(wanted)] == wanted),
                None,
            )
            if not wanted or found is None:
                raise ValueError(f"sample {b}: option {number} {text!r} is not in the prompt (in order)")
            segment[b, found : found + len(wanted)] = number
            start = found + len(wanted)
    return segment
