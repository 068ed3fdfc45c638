"""The video-LLM (spec §2, §3.1): projectors, the HF backbone under our masks and positions, the loss."""

import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from timeloom_kernels.positions import apply_rope
from timeloom_understanding.data import ConversationCollator, TemporalQA
from timeloom_understanding.encoders import TimmEncoder, vit_options
from timeloom_understanding.hf_backbone import LLMConfig, _cache_argument
from timeloom_understanding.layouts import QUERY, VISUAL, make_structure
from timeloom_understanding.model import VideoLLM, VideoLLMConfig
from timeloom_understanding.projectors import CCAMProjector, MLPProjector

ENCODER = vit_options()


@functools.cache
def shared_model(projector: str, attn: str, family: str = "llama") -> VideoLLM:
    """One model per projector and attention implementation; tests set its structure (a pure function)."""
    return tiny_model(projector=projector, attn=attn, family=family)


def with_structure(model: VideoLLM, name: str) -> VideoLLM:
    model.structure = make_structure(name)
    return model


def tiny_model(
    structure="causal", projector="mlp", attn="sdpa", family="llama", **projector_options
) -> VideoLLM:
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=ENCODER,
        projector=projector,
        projector_options=projector_options
        or ({"num_queries": 8, "width": 32} if projector == "ccam" else {}),
        llm=LLMConfig(family=family, hidden_size=32, layers=2, heads=4, kv_heads=2, attn_implementation=attn),
        structure=structure,
        max_length=256,
    )
    return VideoLLM(config).eval()


def qa_batch(model: VideoLLM, groups: int = 2, frames: int = 8) -> dict:
    dataset = TemporalQA(length=groups, frames=frames, seed=5)
    tokens = model.visual_tokens_per_media(frames, 32, 32)
    return ConversationCollator(model.tokenizer, tokens, model.config.max_length)(
        [dataset[i] for i in range(groups)]
    )


# ---- projectors -------------------------------------------------------------------------------------------
def test_ccam_gives_q_tokens_for_any_frame_count():
    torch.manual_seed(0)
    projector = CCAMProjector(in_dim=16, out_dim=24, num_queries=32, width=32, heads=4)
    for frames in (1, 4, 8, 16, 32):
        tokens, visual = projector(torch.randn(2, frames, 9, 16), (3, 3))
        assert tokens.shape == (2, 32, 24) and projector.num_tokens(frames, (3, 3)) == 32
        assert (visual.kind == QUERY).all() and visual.frame.tolist() == [i * frames // 32 for i in range(32)]
    with pytest.raises(ValueError, match="33 frames > 32 queries"):
        projector(torch.randn(1, 33, 9, 16), (3, 3))


def test_ccam_queries_never_read_later_frames():
    torch.manual_seed(0)
    projector = CCAMProjector(in_dim=16, out_dim=24, num_queries=8, width=32, heads=4)
    features = torch.randn(1, 4, 9, 16)
    tokens, visual = projector(features, (3, 3))
    for frame in range(4):
        changed = features.clone()
        changed[:, frame] += torch.randn(9, 16)
        perturbed, _ = projector(changed, (3, 3))
        before = visual.frame < frame  # blocks before the changed frame: bit-for-bit the same
        torch.testing.assert_close(perturbed[:, before], tokens[:, before], rtol=0, atol=0)
        assert (perturbed[:, ~before] - tokens[:, ~before]).abs().amax() > 1e-4


def test_mlp_projector_pools_each_frame():
    projector = MLPProjector(in_dim=16, out_dim=24, pool=2)
    tokens, visual = projector(torch.randn(3, 5, 16, 16), (4, 4))
    assert tokens.shape == (3, 5 * 4, 24) == (3, projector.num_tokens(5, (4, 4)), 24)
    assert (visual.kind == VISUAL).all() and visual.frame.tolist() == [f for f in range(5) for _ in range(4)]
    assert visual.row.tolist()[:4] == [0, 0, 1, 1] and visual.col.tolist()[:4] == [0, 1, 0, 1]


def test_timm_encoder_returns_the_frame_grid():
    torch.manual_seed(0)
    encoder = TimmEncoder(**ENCODER)
    video = torch.randn(2, 1, 3, 32, 32)
    tokens, grid = encoder(video)
    assert grid == (4, 4) and tokens.shape == (2, 3, 16, 32)
    frames = video.transpose(1, 2).reshape(6, 1, 32, 32)
    torch.testing.assert_close(tokens.reshape(6, 16, 32), encoder.vit.forward_features(frames))
    with pytest.raises(ValueError, match="1-channel frames; got 3"):
        encoder(torch.randn(1, 3, 2, 32, 32))


def test_side_encoder_tokens_join_the_pooled_encoder_tokens():
    torch.manual_seed(0)
    fine = vit_options(patch_size=4, embed_dim=16, num_heads=2)  # an 8x8 grid beside ENCODER's 4x4
    config = VideoLLMConfig(
        encoder=fine, side_encoder=ENCODER, llm=LLMConfig(hidden_size=32, layers=1, heads=2)
    )
    model = VideoLLM(config).eval()
    video = torch.randn(2, 1, 3, 32, 32)
    features, grid = model.encode_frames(video)
    fine_tokens, _ = model.encoder(video)
    side_tokens, _ = model.side_encoder(video)
    # reference: each 2x2 block of fine tokens averaged by hand, in raster order of the coarse grid
    blocks = fine_tokens.reshape(2, 3, 4, 2, 4, 2, 16).mean((3, 5)).reshape(2, 3, 16, 16)
    assert grid == (4, 4) and features.shape == (2, 3, 16, 16 + 32)
    torch.testing.assert_close(features, torch.cat((blocks, side_tokens), -1))
    assert model.visual_tokens_per_media(3, 32, 32) == 3 * 16 == model.encode_media(video)[0].shape[1]
    odd = VideoLLMConfig(  # 6x6 beside 4x4 tokens
        encoder=vit_options(patch_size=16, img_size=96), side_encoder=vit_options(patch_size=24, img_size=96)
    )
    with pytest.raises(ValueError, match="differ by no integer factor"):
        VideoLLM(odd).encode_frames(torch.randn(1, 1, 1, 96, 96))


def test_a_side_projector_adds_its_tokens_and_starts_at_zero():
    torch.manual_seed(0)
    fine = vit_options(patch_size=4, embed_dim=16, num_heads=2)  # an 8x8 grid, pooled to ENCODER's 4x4
    config = VideoLLMConfig(
        encoder=ENCODER,
        side_encoder=fine,
        side_join="projector",
        projector="ccam",
        projector_options={"num_queries": 8, "width": 32},
        llm=LLMConfig(hidden_size=32, layers=1, heads=2),
    )
    model = VideoLLM(config).eval()
    assert model.projector.frames_in.in_features == 32 and model.side_projector.frames_in.in_features == 16
    video = torch.randn(2, 1, 4, 32, 32)
    features, grid = model.encode_frames(video)
    main_only = model.projector(features[..., :32], grid)
    tokens, visual = model.encode_media(video)
    assert torch.equal(tokens, main_only[0])  # the zeroed side output adds exactly nothing
    for name in ("kind", "frame", "row", "col"):
        assert torch.equal(getattr(visual, name), getattr(main_only[1], name))
    torch.nn.init.normal_(model.side_projector.out.weight)
    side = model.side_projector(features[..., 32:], grid)[0]
    torch.testing.assert_close(model.encode_media(video)[0], main_only[0] + side)
    for frames in (2, 4, 8):  # CCAM: as many tokens whatever the frame count, both paths alike
        tokens, _ = model.encode_media(torch.randn(1, 1, frames, 32, 32))
        assert tokens.shape[1] == model.visual_tokens_per_media(frames, 32, 32) == 8
    with pytest.raises(ValueError, match="side_join must be one of"):
        VideoLLM(VideoLLMConfig(encoder=ENCODER, side_encoder=ENCODER, side_join="sum"))


# ---- the HF backbone under our masks ----------------------------------------------------------------------
def reference_logits(model: VideoLLM, batch: dict, side: str) -> torch.Tensor:
    """A hand-written Llama forward: explicit softmax over our bool mask, RoPE at our positions."""
    embeds, layout, _ = model.build_inputs(batch, side)
    positions = model.structure.position_ids(layout).double()
    allowed = model.structure.allowed(layout)
    llm, config = model.llm, model.llm.config
    heads, head_dim = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    x = embeds
    for layer in llm.model.layers:
        attention = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (
            proj(h).unflatten(-1, (-1, head_dim)).transpose(1, 2)
            for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))  # grouped-query attention
        q, k = (
            apply_rope(q, positions, base=config.rope_parameters["rope_theta"]),
            apply_rope(k, positions, base=config.rope_parameters["rope_theta"]),
        )
        scores = (q @ k.transpose(-1, -2)) / head_dim**0.5
        probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        x = x + attention.o_proj((probs @ v).transpose(1, 2).flatten(-2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return llm.lm_head(llm.model.norm(x))


HF_CASES = [
    ("llama", attn, structure, side)
    for attn in ("eager", "sdpa")
    for structure in ("causal", "tc_llava", "modality_mutual", "concentric")
    for side in ("right", "left")
] + [("qwen2", attn, "tc_llava", "left") for attn in ("eager", "sdpa")]


@pytest.mark.parametrize("family, attn, structure, side", HF_CASES)
def test_hf_logits_under_our_mask_equal_a_reference_loop(family, attn, structure, side):
    model = with_structure(shared_model("mlp", attn, family), structure)
    batch = qa_batch(model, groups=1)
    with torch.no_grad():
        logits = model.logits(batch, side)
        expected = reference_logits(model, batch, side)
    _, layout, _ = model.build_inputs(batch, side)
    real = ~layout.pad  # pad rows see only themselves: compare the tokens that matter
    torch.testing.assert_close(logits[real], expected[real], rtol=1e-4, atol=1e-4)


def test_causal_structure_equals_hf_own_causal_path():
    model = with_structure(shared_model("mlp", "sdpa"), "causal")
    batch = qa_batch(model, groups=1)
    with torch.no_grad():
        embeds, layout, _ = model.build_inputs(batch)
        ours = model.logits(batch)
        for b in range(embeds.shape[0]):
            real = ~layout.pad[b]
            own = model.llm(inputs_embeds=embeds[b : b + 1, real]).logits[0]  # no mask, no positions given
            torch.testing.assert_close(ours[b, real], own, rtol=1e-5, atol=1e-5)


def test_padding_side_does_not_change_the_answer():
    model = with_structure(shared_model("ccam", "sdpa"), "tc_llava")
    batch = qa_batch(model)
    with torch.no_grad():
        right, layout_right = model.logits(batch, "right"), model.build_inputs(batch, "right")[1]
        left, layout_left = model.logits(batch, "left"), model.build_inputs(batch, "left")[1]
    torch.testing.assert_close(right[~layout_right.pad], left[~layout_left.pad], rtol=1e-5, atol=1e-5)


def test_loss_on_supervised_positions_equals_full_logit_cross_entropy():
    model = tiny_model("tc_llava")
    batch = qa_batch(model)
    loss, count = model.loss(batch)
    logits = model.logits(batch)
    _, _, labels = model.build_inputs(batch)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert count == (batch["labels"] != -100).sum()  # every answer token and its <|end|>, nothing else
    loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_bad_structure_and_attention_names():
    with pytest.raises(ValueError, match="flash_attention_2"):
        tiny_model(attn="flash_attention_2")
    with pytest.raises(ValueError, match="unknown projector 'qformer'"):
        tiny_model(projector="qformer")


def prompts(model: VideoLLM, groups: int) -> dict:
    dataset = TemporalQA(length=groups, seed=6)
    items = [
        dict(item, conversations=item["conversations"][:1]) for i in range(groups) for item in dataset[i]
    ]
    tokens = model.visual_tokens_per_media(8, 32, 32)
    collate = ConversationCollator(model.tokenizer, tokens, model.config.max_length, for_generation=True)
    return collate(items)


@pytest.mark.parametrize("structure", ["causal", "tc_llava"])
def test_greedy_generation_is_batch_invariant(structure):
    model = with_structure(shared_model("ccam", "sdpa"), structure)
    batch = prompts(model, groups=2)
    together = model.generate(batch, max_new_tokens=4)
    for b in range(len(together)):
        length = int(batch["lengths"][b])
        alone = {key: batch[key][b : b + 1, :length] for key in ("input_ids", "labels", "role", "turn")}
        alone |= {"video": batch["video"][b : b + 1], "lengths": batch["lengths"][b : b + 1]}
        assert model.generate(alone, max_new_tokens=4) == [together[b]]
    first = model.logits(batch, "left")[:, -1].argmax(-1)  # the first greedy token, teacher-forced
    assert [reply[0] for reply in together] == first.tolist()


@pytest.mark.parametrize("side", ["right", "left"])
def test_splice_puts_each_token_where_its_placeholder_was(side):
    model = shared_model("mlp", "sdpa")
    batch = qa_batch(model)
    with torch.no_grad():
        embeds, layout, labels = model.build_inputs(batch, side)
        media, _ = model.encode_media(batch["video"])
        text = model.llm.get_input_embeddings()(batch["input_ids"])
    placeholder = model.tokenizer.id("<video>")
    for b in range(embeds.shape[0]):
        length = int(batch["lengths"][b])
        ids, real = batch["input_ids"][b, :length], ~layout.pad[b]
        visual = layout.visual[b][real]
        where = int(torch.nonzero(ids == placeholder)[0])  # one video per item, moved to the turn's front
        assert torch.nonzero(visual).flatten().tolist() == list(range(where, where + media.shape[1]))
        torch.testing.assert_close(embeds[b, real][visual], media[b], rtol=0, atol=0)
        keep = ids != placeholder
        torch.testing.assert_close(embeds[b, real][~visual], text[b, :length][keep], rtol=0, atol=0)
        assert labels[b, real][~visual].tolist() == batch["labels"][b, :length][keep].tolist()
        assert (labels[b, real][visual] == -100).all() and (embeds[b, ~real] == 0).all()


CACHE_CASES = [
    ("mlp", "sdpa", "causal", {}),
    ("mlp", "eager", "causal", {}),
    ("mlp", "sdpa", "tc_llava", {}),
    ("mlp", "sdpa", "tad_rope", {"gamma": 0.5}),  # float positions
    ("mlp", "sdpa", "modality_mutual", {}),
    ("mlp", "eager", "concentric", {}),
    ("ccam", "sdpa", "tc_llava", {}),
]


@pytest.mark.parametrize("projector, attn, structure, options", CACHE_CASES)
def test_cached_greedy_decoding_equals_recomputing_the_sequence(projector, attn, structure, options):
    model = shared_model(projector, attn)
    model.structure = make_structure(structure, **options)
    batch = prompts(model, groups=2)  # four prompts of different lengths, left-padded
    cached, cached_logits = model.generate(batch, max_new_tokens=6, return_logits=True)
    recomputed, logits = model.generate(batch, max_new_tokens=6, use_cache=False, return_logits=True)
    assert cached == recomputed
    assert cached_logits.shape == logits.shape == (4, 6, model.tokenizer.vocab_size)
    torch.testing.assert_close(cached_logits, logits, rtol=1e-5, atol=1e-5)


# ---- paper-size configs -----------------------------------------------------------------------------------
BASE_CONFIGS = sorted(
    (Path(__file__).resolve().parents[2] / "configs/understanding").glob("videollm-base*.yaml")
)
# (visual tokens per video, LLM parameters of the published decoder it is shaped like, encoder parameters)
PAPER_SIZES = {
    "videollm-base-ccam": (1024, 3.82e9, 413e6),  # Phi-3-mini; SigLIP-SO400M without its pooling head
    "videollm-base-tcllava": (16 * 144, 6.74e9, 303e6),  # Vicuna-7B; CLIP ViT-L/14
    "videollm-base-lita": (100 + 256, 6.74e9, 303e6),  # Vicuna-7B; CLIP ViT-L/14; LITA's 356 SlowFast tokens
}


def test_there_is_a_base_config_per_method():
    assert [p.stem for p in BASE_CONFIGS] == sorted(PAPER_SIZES)


@pytest.mark.parametrize("path", BASE_CONFIGS, ids=lambda p: p.stem)
def test_base_configs_build_paper_size_on_the_meta_device(path: Path):
    document = yaml.safe_load(path.read_text())
    data, config = document["data"]["init_args"], document["model"]["init_args"]["config"]
    encoder = dict(config["encoder"], img_size=data["size"], in_chans=data["channels"])  # the ${data.…} links
    with torch.device("meta"):
        model = VideoLLM(VideoLLMConfig(**dict(config, encoder=encoder, llm=LLMConfig(**config["llm"]))))
    assert all(p.is_meta for p in model.parameters())
    count = {name: sum(p.numel() for p in getattr(model, name).parameters()) for name in ("encoder", "llm")}
    tokens, llm_size, encoder_size = PAPER_SIZES[path.stem]
    print(f"{path.stem}: {sum(p.numel() for p in model.parameters()):,} parameters, {count}")
    assert model.visual_tokens_per_media(data["frames"], data["size"], data["size"]) == tokens
    assert tokens + 64 <= config["max_length"]  # room for the question and the answer
    # our vocabulary (30,626 entries) is a little smaller than the published models' 32k
    assert abs(count["llm"] - llm_size) / llm_size < 0.01
    assert abs(count["encoder"] - encoder_size) / encoder_size < 0.01


def test_the_cache_goes_by_the_name_the_decoder_takes():
    # transformers renamed `past_key_values` to `cache`; a wrong name vanishes into **kwargs, leaving it empty
    class Recent(torch.nn.Module):
        def forward(self, inputs_embeds=None, cache=None, **kwargs): ...

    class Older(torch.nn.Module):
        def forward(self, inputs_embeds=None, past_key_values=None, **kwargs): ...

    assert _cache_argument(Recent) == "cache"
    assert _cache_argument(Older) == "past_key_values"
