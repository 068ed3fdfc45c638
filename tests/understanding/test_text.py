"""Tokenizer and labels (spec §4): the bundled WordPiece, special tokens whole, labels hide everything but answers."""

import pytest
import torch
from timeloom_understanding.data import TemporalQA, temporal_qa_vocabulary
from timeloom_understanding.encoders import vit_options
from timeloom_understanding.hf_backbone import LLMConfig
from timeloom_understanding.layouts import ASSISTANT, USER
from timeloom_understanding.model import VideoLLMConfig
from timeloom_understanding.module import VideoLLMModule
from timeloom_understanding.text import (
    IGNORE_INDEX,
    SPECIAL_TOKENS,
    TextTokenizer,
    encode_conversation,
    resolve_tokenizer_path,
)

from timeloom.module import TimeloomModule


@pytest.fixture(scope="module")
def tokenizer():
    return TextTokenizer()


def test_bundled_vocabulary_with_special_tokens_whole(tokenizer):
    assert tokenizer.vocab_size == 30_522 + len(SPECIAL_TOKENS)
    ids = tokenizer.encode("<video> Which WAY?<|end|><t17>")
    assert ids == [tokenizer.id("<video>")] + tokenizer.encode("which way?") + [
        tokenizer.id("<|end|>"),
        tokenizer.id("<t17>"),
    ]
    assert tokenizer.decode(ids) == "<video> which way? <|end|> <t17>"
    long_prompt = " ".join(["left"] * 300)
    assert len(tokenizer.encode(long_prompt)) == 300  # the shipped JSON truncates at 128: switched off
    assert tokenizer.pad_id == 0 and tokenizer.eos_id == tokenizer.id("<|end|>")


def test_two_turn_labels_are_exact(tokenizer):
    item = {
        "id": "two-turns",
        "video": "clip.mp4",
        "conversations": [
            {"from": "human", "value": "Which way? <video>"},
            {"from": "gpt", "value": "left"},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "up"},
        ],
    }
    encoded = encode_conversation(item, tokenizer, visual_tokens_per_media=16, max_length=64)
    t = tokenizer.id
    user, assistant, end, video = t("<|user|>"), t("<|assistant|>"), t("<|end|>"), t("<video>")
    which_way, left, and_then, up = (tokenizer.encode(s) for s in ("which way?", "left", "and then?", "up"))
    expected_ids = (
        [user, video] + which_way + [end] + [assistant] + left + [end]
        + [user] + and_then + [end] + [assistant] + up + [end]
    )  # fmt: skip
    assert encoded.input_ids.tolist() == expected_ids  # the placeholder moved to the front of its turn
    ignored = lambda n: [IGNORE_INDEX] * n
    expected_labels = ignored(4 + len(which_way)) + left + [end] + ignored(3 + len(and_then)) + up + [end]
    assert encoded.labels.tolist() == expected_labels
    assert encoded.role.tolist() == (
        [USER] * (3 + len(which_way)) + [ASSISTANT] * (2 + len(left))
        + [USER] * (2 + len(and_then)) + [ASSISTANT] * (2 + len(up))
    )  # fmt: skip
    assert encoded.turn.tolist() == [0] * (5 + len(which_way) + len(left)) + [1] * (
        4 + len(and_then) + len(up)
    )


def test_generation_prompt_ends_with_the_assistant_header(tokenizer):
    item = {
        "id": "ask",
        "video": "v.mp4",
        "conversations": [{"from": "human", "value": "<video> which way?"}],
    }
    encoded = encode_conversation(
        item, tokenizer, visual_tokens_per_media=4, max_length=32, for_generation=True
    )
    assert encoded.input_ids[-1] == tokenizer.id("<|assistant|>") and (encoded.labels == IGNORE_INDEX).all()


@pytest.mark.parametrize(
    "item, message",
    [
        (
            {
                "id": "no-tag",
                "video": "a.mp4",
                "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}],
            },
            r"item 'no-tag': the conversation has no <video>/<image> placeholder for its 1 media item",
        ),
        (
            {
                "id": "two-tags",
                "video": ["a.mp4"],
                "conversations": [
                    {"from": "human", "value": "<video> <video>"},
                    {"from": "gpt", "value": "x"},
                ],
            },
            r"item 'two-tags': the conversation has 2 placeholder\(s\) but 1 media item",
        ),
        (
            {
                "id": "long",
                "video": "a.mp4",
                "conversations": [
                    {"from": "human", "value": "<video> " + "why " * 40},
                    {"from": "gpt", "value": "x"},
                ],
            },
            r"item 'long': 61 tokens \(45 text \+ 1 x 16 visual\) do not fit in the context of 48",
        ),
        (
            {"id": "who", "video": "a.mp4", "conversations": [{"from": "bot", "value": "<video>"}]},
            r"item 'who': turns come 'from' 'human' or 'gpt', got 'bot'",
        ),
    ],
)
def test_bad_conversations_name_the_item(tokenizer, item, message):
    with pytest.raises(ValueError, match=message):
        encode_conversation(item, tokenizer, visual_tokens_per_media=16, max_length=48)


def test_the_temporal_qa_vocabulary_is_the_one_trained_on_the_corpus():
    shipped = resolve_tokenizer_path("temporal_qa")
    assert shipped.read_text() == temporal_qa_vocabulary()  # the file is reproducible from the generator


def test_the_temporal_qa_vocabulary_holds_every_word_of_held_out_questions_whole():
    small = TextTokenizer("temporal_qa")
    assert small.vocab_size - len(SPECIAL_TOKENS) < 200  # MiniLM: 30,522
    dataset = TemporalQA("test", length=200, caption_share=0.5)
    words = set()
    for index in range(len(dataset)):
        for item in dataset[index]:
            for turn in item["conversations"]:
                words.update(turn["value"].replace("<video>", "").lower().split())
    pieces = {p for word in words for p in small._tokenizer.encode(word, add_special_tokens=False).tokens}
    assert "[UNK]" not in pieces and not any(p.startswith("##") for p in pieces), sorted(pieces)
    # text from elsewhere still encodes, letter by letter, and decodes back (uncased)
    ids = small.encode("Zebra crossing! <video>")
    assert small.decode(ids) == "zebra crossing! <video>" and small.id("[UNK]") not in ids


def test_a_model_on_a_bundled_vocabulary_reloads_with_it(tmp_path):
    torch.manual_seed(0)
    config = VideoLLMConfig(
        encoder=vit_options(), llm=LLMConfig(hidden_size=32, layers=1, heads=2), tokenizer_path="temporal_qa"
    )
    module = VideoLLMModule(config)
    assert module.model.llm.get_input_embeddings().weight.shape[0] == module.model.tokenizer.vocab_size < 300
    restored = TimeloomModule.from_pretrained(module.save_pretrained(tmp_path))
    assert restored.model.tokenizer.path == module.model.tokenizer.path
    batch = module.collate(TemporalQA("test", length=1)[0])
    torch.testing.assert_close(restored.model.logits(batch), module.model.logits(batch), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="'temporal-qa' is neither a file nor a bundled vocabulary"):
        resolve_tokenizer_path("temporal-qa")
