"""PINE (spec §3.7, §11.8): multiple-choice scores invariant to option order, equal to a slow reference that
follows the definition query by query, head by head."""

import functools

import pytest
import torch
from timeloom_kernels.positions import apply_rope
from timeloom_understanding.data import ConversationCollator, TemporalQA
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import make_structure
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.pine import option_segments

ENCODER = vit_options()
OPTIONS = ["(A) the 4 moves left", "(B) right", "(C) it moves up and then down", "(D) no motion"]


@functools.cache
def tiny(family: str = "llama") -> VideoLLM:
    torch.manual_seed(0)
    llm = LLMConfig(family=family, hidden_size=32, layers=2, heads=4, kv_heads=2, attn_implementation="eager")
    return VideoLLM(VideoLLMConfig(encoder=ENCODER, llm=llm, max_length=256)).eval()


def mc_batch(model: VideoLLM, orders: list[list[int]], frames: int = 2):
    """One multiple-choice prompt per order of the options (the letters travel with their option)."""
    video = TemporalQA(length=1, frames=8, seed=5)[0][0]["video"][:, :frames]
    items, options = [], []
    for number, order in enumerate(orders):
        written = [OPTIONS[i] for i in order]
        question = "<video>\nWhich way does the 4 move?\n" + "\n".join(written) + "\nAnswer with the letter."
        items.append(
            {"id": f"mc{number}", "video": video, "conversations": [{"from": "human", "value": question}]}
        )
        options.append(written)
    tokens = model.visual_tokens_per_media(frames, 32, 32)
    batch = ConversationCollator(model.tokenizer, tokens, model.config.max_length, for_generation=True)(items)
    segments = option_segments(model.tokenizer, batch["input_ids"], batch["lengths"], options)
    return batch, segments


def letter_scores(model: VideoLLM, logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the letters a-d at the last position (the answer's first token)."""
    letters = [model.tokenizer.encode(letter)[0] for letter in "abcd"]
    return logits[:, -1].log_softmax(-1)[:, letters]


@pytest.mark.parametrize("structure", ["causal", "tc_llava"])
def test_pine_scores_do_not_depend_on_option_order(structure):
    model = tiny()
    model.structure = make_structure(structure)
    orders = [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]]
    batch, segments = mc_batch(model, orders)
    pine = letter_scores(model, model.pine_logits(batch, segments))
    for row in range(1, len(orders)):
        torch.testing.assert_close(pine[row], pine[0], rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        plain = letter_scores(model, model.logits(batch, "left"))
    # without PINE the order matters (a random tiny model's scores are nearly flat, hence the small gap)
    moved, kept = (plain[1:] - plain[0]).abs().amax(), (pine[1:] - pine[0]).abs().amax()
    assert moved > 1e-4 and moved > 20 * kept, (moved, kept)


def option_mass(q, k, queries, keys, owner, size, head_dim):
    """Σ over ``queries`` of the no-RoPE attention mass on each option's ``keys``, ÷ the option's length."""
    probs = (q[queries] @ k[keys].T / head_dim**0.5).softmax(-1)
    return {j: float(probs[:, owner == j].sum()) / size[j] for j in set(owner.tolist())}


def slow_pine_logits(model: VideoLLM, batch: dict, segments: torch.Tensor, sample: int) -> torch.Tensor:
    """The definition, one query and one head at a time, on one sample without padding."""
    length = int(batch["lengths"][sample])
    one = {key: batch[key][sample : sample + 1, :length] for key in ("input_ids", "labels", "role", "turn")}
    one |= {"video": batch["video"][sample : sample + 1], "lengths": batch["lengths"][sample : sample + 1]}
    embeds, layout, _ = model.build_inputs(one)
    # each text token moves right by the visual tokens spliced in before it
    ids, visual = one["input_ids"][0], model.visual_tokens_per_media(2, 32, 32)
    is_video = (ids == model.tokenizer.id("<video>")).long()
    spliced = torch.full((embeds.shape[1],), -1)
    spliced[torch.arange(length) + (torch.cumsum(is_video, 0) - is_video) * (visual - 1)] = segments[
        sample, :length
    ]
    positions = model.structure.position_ids(layout)[0].double()
    allowed = model.structure.allowed(layout)[0, 0]
    step = model.structure.decode_step()
    length = embeds.shape[1]
    options = sorted(set(spliced.tolist()) - {-1})
    tokens = {j: [n for n in range(length) if spliced[n] == j] for j in options}
    size = {j: len(tokens[j]) for j in options}
    first, last = min(min(t) for t in tokens.values()), max(max(t) for t in tokens.values())
    end = positions[first] + sum(size.values()) * step
    config = model.llm.config
    heads = config.num_attention_heads
    head_dim = config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    x = embeds[0]
    for layer in model.llm.model.layers:
        attention, h = layer.self_attn, layer.input_layernorm(x)
        q, k, v = (
            proj(h).unflatten(-1, (-1, head_dim)).transpose(0, 1)
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        k, v = (t.repeat_interleave(heads // t.shape[0], dim=0) for t in (k, v))
        out = torch.zeros(heads, length, head_dim)
        for head in range(heads):
            for i in range(length):
                option_of_i = int(spliced[i])
                if i < first:  # prefix: the structure as it is
                    keys_position, query_position, visible = positions, positions[i], allowed[i]
                else:
                    hidden = (
                        option_of_i if option_of_i >= 0 else None
                    )  # an option's queries skip its own keys
                    keys = [n for j in options if j != hidden for n in tokens[j]]
                    queries = tokens[option_of_i] if option_of_i >= 0 else [i]
                    importance = option_mass(q[head], k[head], queries, keys, spliced[keys], size, head_dim)
                    rank = sorted(importance, key=lambda j: -importance[j])
                    rank = [option_of_i, *rank] if option_of_i >= 0 else rank
                    keys_position = positions.clone()
                    for r, j in enumerate(rank):
                        closer = sum(size[o] for o in rank[: r + 1])
                        for offset, n in enumerate(tokens[j]):
                            keys_position[n] = end - closer * step + offset * step
                    query_position = keys_position[i]
                    visible = torch.zeros(length, dtype=torch.bool)
                    visible[:first] = allowed[i, :first] if option_of_i >= 0 else True
                    for n in range(first, length):
                        if option_of_i >= 0:
                            same = int(spliced[n]) == option_of_i
                            visible[n] = n <= last and (not same or n <= i)
                        else:
                            visible[n] = n <= i
                qi = apply_rope(q[head, i].view(1, 1, 1, -1), query_position.view(1), base=theta)[0, 0, 0]
                ks = apply_rope(k[head].unsqueeze(0).unsqueeze(0), keys_position, base=theta)[0, 0]
                scores = (ks @ qi) / head_dim**0.5
                out[head, i] = scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v[head]
        x = x + attention.o_proj(out.transpose(0, 1).flatten(-2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.llm.lm_head(model.llm.model.norm(x))


@pytest.mark.parametrize(
    "family, structure", [("llama", "causal"), ("llama", "tc_llava"), ("qwen2", "causal")]
)
def test_pine_equals_a_slow_reference(family, structure):
    model = tiny(family)
    model.structure = make_structure(structure)
    batch, segments = mc_batch(model, [[0, 1, 2, 3], [1, 3, 0, 2]])
    logits = model.pine_logits(batch, segments, side="left")
    embeds, layout, _ = model.build_inputs(batch, "left")
    with torch.no_grad():
        for sample in range(2):
            expected = slow_pine_logits(model, batch, segments, sample)
            torch.testing.assert_close(logits[sample, ~layout.pad[sample]], expected, rtol=1e-4, atol=1e-4)


def test_pine_errors_name_the_problem():
    model = tiny()
    model.structure = make_structure("causal")
    batch, segments = mc_batch(model, [[0, 1, 2, 3]])
    with pytest.raises(ValueError, match="option 1 '\\(E\\) sideways' is not in the prompt"):
        option_segments(model.tokenizer, batch["input_ids"], batch["lengths"], [[OPTIONS[0], "(E) sideways"]])
    with pytest.raises(ValueError, match="at least two options"):
        model.pine_logits(batch, segments.clamp(max=0))
    gap = segments.clone()
    gap[segments == 1] = -1  # option 1's tokens are no option: 0 and 2 no longer touch
    gap[segments > 1] -= 1
    with pytest.raises(ValueError, match="no token in between"):
        model.pine_logits(batch, gap)
    model.structure = make_structure("modality_mutual")
    with pytest.raises(ValueError, match="before the options see them"):
        model.pine_logits(batch, segments)
    model.structure = make_structure("causal")
