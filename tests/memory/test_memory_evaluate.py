"""`timeloom evaluate memory`: the scorer against construction-verified oracles, the report on a tiny model."""

import json

import pytest
import torch
from timeloom_memory import MemoryLMModule, NeuralMemoryConfig, TitansConfig
from timeloom_memory.evaluate import build_dataset, hidden_states, main, score
from timeloom_memory.tasks import IGNORE, SNIAH


def stacked(data, key):
    return torch.stack([data[i][key] for i in range(len(data))])


def mqar_oracle(input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A perfect recall model by lookup: at a query key, the value that followed that key in the context."""
    predictions = torch.full_like(labels, IGNORE)
    for b, row in enumerate(input_ids.tolist()):
        pairs = {}
        for t in range(len(row)):
            if labels[b, t] != IGNORE:
                predictions[b, t] = pairs[row[t]]
            elif t + 1 < len(row) and t % 2 == 0 and row[t] not in pairs:
                pairs[row[t]] = row[t + 1]
    return predictions


def test_mqar_lookup_oracle_scores_perfectly_and_each_mistake_counts():
    data = build_dataset("mqar", 64, None, 6, seed=0, vocab_size=128, num_pairs=4)
    ids, labels = stacked(data, "input_ids"), stacked(data, "labels")
    oracle = mqar_oracle(ids, labels)
    assert score(oracle, labels) == {"accuracy": 1.0, "exact_match": 1.0, "sequences": 6, "labelled": 24}
    wrong = oracle.clone()
    first = (labels[0] != IGNORE).nonzero()[0, 0]
    wrong[0, first] = (wrong[0, first] + 1) % 128  # one wrong value in sequence 0
    assert score(wrong, labels) == {"accuracy": 23 / 24, "exact_match": 5 / 6, "sequences": 6, "labelled": 24}
    # Unlabelled positions never count, whatever is predicted there.
    noisy = torch.where(labels == IGNORE, torch.randint_like(labels, 128), oracle)
    assert score(noisy, labels)["accuracy"] == 1.0


def test_sniah_answer_from_the_needle_text_scores_perfectly():
    data = build_dataset("sniah", 80, 0.5, 3, seed=0, kind="number", vocab_size=128)
    labels = stacked(data, "labels")
    oracle = torch.full_like(labels, IGNORE)
    for i in range(len(data)):
        value = SNIAH.encode(SNIAH, data[i]["meta"]["value"])  # the needle as generated, re-encoded
        oracle[i, -len(value) :] = torch.tensor(value)
        assert data[i]["meta"]["depth"] == 50.0
    assert score(oracle, labels)["exact_match"] == 1.0
    oracle[1, -1] += 1  # the last digit of one answer: 1 of 21 tokens, 1 of 3 answers
    result = score(oracle, labels)
    assert result["accuracy"] == pytest.approx(20 / 21) and result["exact_match"] == pytest.approx(2 / 3)


def test_score_rejects_mismatched_shapes_and_unlabelled_sequences():
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1] = 3
    with pytest.raises(ValueError, match="differ"):
        score(torch.zeros(2, 4, dtype=torch.long), labels)
    with pytest.raises(ValueError, match="at least one labelled"):
        score(torch.zeros(2, 5, dtype=torch.long), labels)


def tiny_module(block: str) -> MemoryLMModule:
    torch.manual_seed(0)
    memory = NeuralMemoryConfig(heads=2, head_dim=8, chunk_size=8, surprise_clip=1.0)
    config = TitansConfig(vocab_size=128, dim=16, heads=2, block=block, segment=16, window=16, ffn_mult=0,
                          memory=memory)  # fmt: skip
    return MemoryLMModule(config).eval()


@pytest.mark.parametrize("block", ["mac", "mag", "mal", "lmm", "hcam", "swa", "attention"])
def test_streamed_pieces_equal_one_pass(block):
    model = tiny_module(block).model
    ids = torch.randint(0, 128, (2, 72))
    with torch.no_grad():
        whole = model.features(ids)[0]
        streamed = hidden_states(model, ids, piece=20)  # MAC rounds to whole segments (16)
    torch.testing.assert_close(streamed, whole, atol=1e-5, rtol=1e-5)


def test_report_on_a_tiny_model(tmp_path):
    tiny_module("mac").save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["--checkpoint", str(tmp_path / "model"), "--lengths", "64,96", "--samples", "3", "--piece", "32"]
    assert main([*argv, "--task", "sniah", "--depths", "0,0.5,1", "--out", str(out)]) == 0
    report = json.loads((out / "memory-sniah.json").read_text())
    assert report["main_metric"] == "exact_match" and report["task_options"]["vocab_size"] == 128
    assert [(c["length"], c["depth"]) for c in report["cells"]] == [
        (n, d) for n in (64, 96) for d in (0.0, 0.5, 1.0)
    ]
    for cell in report["cells"]:
        assert cell["sequences"] == 3 and 0 <= cell["accuracy"] <= 1 and 0 <= cell["exact_match"] <= 1
    assert set(report["by_length"]) == {"64", "96"}
    table = (out / "memory-sniah.md").read_text()
    assert "| depth \\ length | 64 | 96 |" in table and "| 0.5 |" in table
    assert (out / "memory-sniah.png").stat().st_size > 1000
    # MQAR has no depth axis: one row over all positions.
    assert main([*argv, "--task", "mqar", "--num-pairs", "4", "--out", str(out)]) == 0
    report = json.loads((out / "memory-mqar.json").read_text())
    assert report["depths"] == [None] and len(report["cells"]) == 2
    assert report["cells"][0]["labelled"] == 3 * 4


def test_random_phase_follows_the_flag(tmp_path):
    tiny_module("mac").save_pretrained(tmp_path / "model")
    base = ["--checkpoint", str(tmp_path / "model"), "--task", "sniah", "--lengths", "64", "--depths", "0",
            "--samples", "2", "--piece", "32", "--out", str(tmp_path / "eval")]  # fmt: skip
    for flag, expected in (([], None), (["--random-phase"], True), (["--no-random-phase"], False)):
        assert main([*base, *flag]) == 0
        report = json.loads((tmp_path / "eval/memory-sniah.json").read_text())
        assert report["task_options"].get("random_phase") is expected
    fillers = {
        int(build_dataset("sniah", 64, 0.5, 30, 0, random_phase=True)[i]["input_ids"][0]) for i in range(30)
    }
    assert len(fillers) > 1  # the haystack's first token differs between sequences


def test_bad_arguments_are_named(tmp_path):
    tiny_module("swa").save_pretrained(tmp_path / "model")
    base = ["--checkpoint", str(tmp_path / "model"), "--task", "sniah", "--lengths", "64", "--samples", "1"]
    with pytest.raises(SystemExit, match="fractions in \\[0, 1\\]"):
        main([*base, "--depths", "0,50"])
    with pytest.raises(SystemExit, match="vocab_size is 128"):
        main([*base, "--vocab-size", "512"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["--checkpoint", str(tmp_path / "missing.ckpt"), "--task", "mqar"])
