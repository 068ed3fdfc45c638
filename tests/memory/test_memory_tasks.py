"""Recall tasks (spec §7): labels only at the query positions, answers verified against the construction."""

import re

import numpy as np
import pytest
import torch
from timeloom_memory.tasks import IGNORE, MQAR, SNIAH, MQARDataModule, SelectiveCopying, SNIAHDataModule


@pytest.mark.parametrize("random_non_queries", [True, False])
def test_mqar_labels_are_the_values_of_the_queried_keys(random_non_queries):
    v, n, d = 256, 64, 4
    data = MQAR(vocab_size=v, seq_len=n, num_pairs=d, random_non_queries=random_non_queries, length=50)
    for i in range(len(data)):
        item = data[i]
        inputs, labels = item["input_ids"].numpy(), item["labels"].numpy()
        check_mqar_sequence(inputs, labels, v, n, d)
        if not random_non_queries:
            assert (inputs[2 * d :][labels[2 * d :] == IGNORE] == 0).all()


def check_mqar_sequence(inputs, labels, v, n, d):
    """One MQAR sequence follows the construction: D distinct pairs, then each key queried once, the value
    labelled at the query key and nowhere else."""
    assert inputs.shape == labels.shape == (n,)
    keys, values = inputs[0 : 2 * d : 2], inputs[1 : 2 * d : 2]
    assert len(set(keys)) == d and len(set(values)) == d
    assert ((keys >= 1) & (keys < v // 2)).all() and ((values >= v // 2) & (values < v)).all()
    where = np.flatnonzero(labels != IGNORE)
    assert len(where) == d and (where >= 2 * d).all()
    pairs = dict(zip(keys.tolist(), values.tolist()))
    assert sorted(inputs[where].tolist()) == sorted(keys.tolist())  # every key queried once
    for t in where:
        assert labels[t] == pairs[inputs[t]]  # the value is predicted at the query key


def test_mqar_mixture_batches_one_setting_each_in_equal_turns():
    v, settings = 256, [(128, 8), (64, 4), (32, 2)]
    module = MQARDataModule(vocab_size=v, seq_len=128, num_pairs=8, mix_with=[[64, 4], [32, 2]], train_length=48,
                            val_length=8, batch_size=4)  # fmt: skip
    module.setup("fit")
    data = module.dataset("train")
    assert len(data) == 12
    for i in range(len(data)):
        (n, d), batch = settings[i % 3], data[i]
        assert batch["meta"] == {"num_pairs": d, "seq_len": n}
        same = MQAR(vocab_size=v, seq_len=n, num_pairs=d, length=48, split="train")
        for row in range(4):
            inputs, labels = batch["input_ids"][row].numpy(), batch["labels"][row].numpy()
            check_mqar_sequence(inputs, labels, v, n, d)
            assert (inputs == same[4 * i + row]["input_ids"].numpy()).all()  # that setting's own sequence
    shapes = [tuple(batch["input_ids"].shape) for batch in module.train_dataloader()]  # a shuffled epoch
    assert (
        sorted(shapes) == sorted([(4, n) for n, _ in settings] * 4)
        and shapes != [(4, n) for n, _ in settings] * 4
    )
    assert module.val_names == ["seq128x8", "seq64x4", "seq32x2"]
    for loader, (n, d) in zip(module.val_dataloader(), settings):  # one validation set per setting
        batch = next(iter(loader))
        assert batch["input_ids"].shape == (4, n) and ((batch["labels"] != IGNORE).sum(1) == d).all()
    with pytest.raises(ValueError, match="vocab_size > seq_len"):
        MQARDataModule(vocab_size=128, seq_len=64, num_pairs=4, mix_with=[[128, 8]])


def test_mqar_is_deterministic_per_index_and_split():
    train, again = MQAR(length=4, seed=3), MQAR(length=4, seed=3)
    val = MQAR(length=4, seed=3, split="val")
    assert torch.equal(train[2]["input_ids"], again[2]["input_ids"])
    assert not torch.equal(train[2]["input_ids"], val[2]["input_ids"])
    assert not torch.equal(train[2]["input_ids"], train[3]["input_ids"])


def test_bad_task_configurations_name_the_problem():
    with pytest.raises(ValueError, match="vocab_size > seq_len"):
        MQAR(vocab_size=64, seq_len=64)
    with pytest.raises(ValueError, match="4·num_pairs"):
        MQARDataModule(seq_len=64, num_pairs=17)
    with pytest.raises(ValueError, match="too short"):
        SNIAH(kind="uuid", seq_len=60)
    with pytest.raises(ValueError, match="depths"):
        SNIAH(depths=(120,))
    with pytest.raises(IndexError):
        MQAR(length=2)[2]


def test_selective_copying_labels_are_the_tokens_in_order_at_the_markers():
    data = SelectiveCopying(noise_len=32, num_tokens=6, alphabet=10, length=20)
    for i in range(len(data)):
        inputs, labels = data[i]["input_ids"].numpy(), data[i]["labels"].numpy()
        assert len(inputs) == 32 + 12
        head, markers = inputs[: 32 + 6], inputs[32 + 6 :]
        assert (markers == 9).all() and ((head >= 0) & (head < 9)).all()
        tokens = head[head != 0]
        assert len(tokens) == 6
        assert (labels[:38] == IGNORE).all() and (labels[38:] == tokens).all()


@pytest.mark.parametrize("kind", ["passkey", "number", "uuid"])
def test_sniah_answer_is_the_needle_value_at_its_depth(kind):
    data = SNIAH(kind=kind, seq_len=128, length=10)
    for i in range(len(data)):
        item = data[i]
        inputs, labels, meta = item["input_ids"].numpy(), item["labels"].numpy(), item["meta"]
        assert len(inputs) == 128
        value = data.encode(meta["value"])
        where = np.flatnonzero(labels != IGNORE)
        assert list(where) == list(range(128 - len(value), 128))  # the last positions: the answer
        assert labels[where].tolist() == value
        needle = int(np.flatnonzero(inputs == SNIAH.MARK)[0])
        assert needle == meta["needle_at"] == round(meta["depth"] / 100 * data.haystack_len)
        key = inputs[needle + 1]
        assert inputs[needle + 2 : needle + 2 + len(value)].tolist() == value
        assert inputs[needle + 2 + len(value)] == SNIAH.SEP
        query = 128 - len(value)  # [Q] key, then the answer fed back shifted by one
        assert inputs[query - 1] == SNIAH.QUERY and inputs[query] == key
        assert meta["depth"] == data.depths[i % 5]
        if kind == "uuid":
            assert re.fullmatch(
                r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", meta["value"]
            )
        else:
            assert re.fullmatch(r"[0-9]{7}", meta["value"])
    if kind == "passkey":
        first = data[0]  # depth 0: the haystack follows the needle
        start = first["meta"]["needle_at"] + len(data.encode(first["meta"]["value"])) + 3
        hay = first["input_ids"].numpy()[start : start + 40]
        assert (hay[SNIAH.FILLER_PERIOD :] == hay[: -SNIAH.FILLER_PERIOD]).all()


def test_sniah_random_phase_shifts_only_the_filler():
    fixed = SNIAH(seq_len=96, length=40)
    shifted = SNIAH(seq_len=96, length=40, random_phase=True)
    phases = set()
    for i in range(40):
        item = shifted[i]
        inputs, labels, meta = item["input_ids"].numpy(), item["labels"].numpy(), item["meta"]
        value = shifted.encode(meta["value"])
        where = np.flatnonzero(labels != IGNORE)
        assert list(where) == list(range(96 - len(value), 96)) and labels[where].tolist() == value
        at = meta["needle_at"]
        assert at == fixed[i]["meta"]["needle_at"]  # same depth, same place
        needle = inputs[at : at + len(value) + 3]
        assert needle[0] == SNIAH.MARK and needle[2:-1].tolist() == value and needle[-1] == SNIAH.SEP
        assert inputs[96 - len(value)] == needle[1] and inputs[95 - len(value)] == SNIAH.QUERY
        hay = np.concatenate([inputs[:at], inputs[at + len(value) + 3 : 95 - len(value)]])
        assert len(hay) == shifted.haystack_len
        phase = int(hay[0]) - SNIAH.FIRST_FILLER
        period = np.arange(len(hay)) + phase
        assert (hay == SNIAH.FIRST_FILLER + period % SNIAH.FILLER_PERIOD).all()  # one period, shifted
        phases.add(phase)
        assert fixed[i]["input_ids"][0] == (SNIAH.MARK if at == 0 else SNIAH.FIRST_FILLER)  # default: phase 0
    assert phases == set(range(SNIAH.FILLER_PERIOD))


def test_sniah_length_mixture_batches_one_length_each_with_answers_at_the_query():
    lengths = [128, 64, 96]
    module = SNIAHDataModule(seq_len=128, mix_lengths=[64, 96], depths=[0, 50], random_phase=True,
                             train_length=48, val_length=4, batch_size=4)  # fmt: skip
    module.setup("fit")
    data = module.dataset("train")
    assert len(data) == 12
    for i in range(len(data)):
        n, batch = lengths[i % 3], data[i]
        assert batch["meta"] == {"seq_len": n} and batch["input_ids"].shape == (4, n)
        same = SNIAH(seq_len=n, depths=(0, 50), random_phase=True, length=48, split="train")
        for row in range(4):
            inputs, labels = batch["input_ids"][row].numpy(), batch["labels"][row].numpy()
            item = same[4 * i + row]
            assert (inputs == item["input_ids"].numpy()).all()  # that length's own sequence
            value = same.encode(item["meta"]["value"])
            assert list(np.flatnonzero(labels != IGNORE)) == list(range(n - 7, n))  # only the answer
            assert labels[n - 7 :].tolist() == value
            at = item["meta"]["needle_at"]
            assert (
                inputs[at] == SNIAH.MARK and inputs[at + 2 : at + 9].tolist() == value
            )  # the needle holds it
            assert inputs[n - 8] == SNIAH.QUERY and inputs[n - 7] == inputs[at + 1]  # queried by its key
    shapes = [tuple(batch["input_ids"].shape) for batch in module.train_dataloader()]  # a shuffled epoch
    assert sorted(shapes) == sorted([(4, n) for n in lengths] * 4)
    assert module.val_names == ["len128", "len64", "len96"]
    for loader, n in zip(module.val_dataloader(), lengths):  # one validation set per length
        assert next(iter(loader))["input_ids"].shape == (4, n)
    with pytest.raises(ValueError, match="too short"):
        SNIAHDataModule(seq_len=128, mix_lengths=[16])


def test_sniah_test_split_can_be_longer():
    module = SNIAHDataModule(seq_len=64, test_seq_len=256, train_length=8, val_length=4, test_length=4)
    assert len(module.dataset("train")[0]["input_ids"]) == 64
    assert len(module.dataset("test")[0]["input_ids"]) == 256


def test_datamodule_batches():
    module = MQARDataModule(train_length=16, val_length=8, test_length=8, batch_size=4)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 64)
    assert ((batch["labels"] != IGNORE).sum(1) == 4).all()
