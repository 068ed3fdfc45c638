"""Synthetic recall tasks as DataModules (spec §7): MQAR, selective copying, S-NIAH.

Every item is ``{"input_ids": (N,), "labels": (N,), "meta": {...}}`` with labels ``-100`` everywhere except
the positions the model is scored at, where the label is the next token the model must produce there.
Items are deterministic per ``(seed, split, index)``; each split draws from its own random stream.
"""

from __future__ import annotations

import uuid
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from timeloom.data import TimeloomDataModule, collate_batch
from timeloom.data.loader import make_eval_loader, make_train_loader

__all__ = [
    "MQAR",
    "SNIAH",
    "IGNORE",
    "MQARDataModule",
    "BatchMixture",
    "MQARMixture",
    "SNIAHDataModule",
    "SelectiveCopying",
    "SelectiveCopyingDataModule",
]

IGNORE = -100
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


class _RecallDataset(Dataset):
    """Shared bookkeeping: length, split, and a generator per item."""

    def __init__(self, length: int, seed: int, split: str):
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}; got {split!r}")
        self.length, self.seed, self.split = length, seed, split

    def __len__(self) -> int:
        return self.length

    def rng(self, index: int) -> np.random.Generator:
        if not 0 <= index < self.length:
            raise IndexError(f"{type(self).__name__} index {index} out of range 0..{self.length - 1}")
        return np.random.default_rng([self.seed, _SPLIT_IDS[self.split], index])


class MQAR(_RecallDataset):
    """Multi-query associative recall, Zoology's recipe (Arora et al., ICLR 2024).

    ``D`` distinct keys from ``[1, V/2)`` and values from ``[V/2, V)`` form the context ``k1 v1 … kD vD``;
    key j is queried again at offset ``2·gap_j`` of the query region, with the gaps drawn without
    replacement with ``p(i) ∝ a·i^{a−1}``; the value is the label **at the query key**. Remaining zeros become
    uniform random tokens when ``random_non_queries`` (Zoology's current default).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 64,
        num_pairs: int = 4,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        length: int = 1000,
        seed: int = 0,
        split: str = "train",
    ):
        super().__init__(length, seed, split)
        if vocab_size <= seq_len:
            raise ValueError(f"MQAR needs vocab_size > seq_len; got {vocab_size} ≤ {seq_len}")
        if 4 * num_pairs > seq_len:
            raise ValueError(
                f"MQAR needs 4·num_pairs ≤ seq_len; got num_pairs={num_pairs}, seq_len={seq_len}"
            )
        self.vocab_size, self.seq_len, self.num_pairs = vocab_size, seq_len, num_pairs
        self.power_a, self.random_non_queries = power_a, random_non_queries

    def __getitem__(self, index: int) -> dict:
        rng, v, n, d = self.rng(index), self.vocab_size, self.seq_len, self.num_pairs
        keys = rng.choice(np.arange(1, v // 2), size=d, replace=False)
        values = rng.choice(np.arange(v // 2, v), size=d, replace=False)
        context = np.stack([keys, values], 1).reshape(-1)
        space = (n - 2 * d) // 2
        p = self.power_a * np.arange(1, space, dtype=np.float64) ** (self.power_a - 1)
        gaps = rng.choice(np.arange(1, space), size=d, replace=False, p=p / p.sum())
        queries = np.zeros(n - 2 * d + 1, dtype=np.int64)
        queries[gaps * 2] = keys
        sequence = np.concatenate([context, queries])
        labels = np.full(n + 1, IGNORE, dtype=np.int64)
        labels[gaps * 2 + 2 * d + 1] = values
        inputs, labels = sequence[:-1].copy(), labels[1:]
        if self.random_non_queries:
            zeros = inputs == 0
            inputs[zeros] = rng.integers(0, v, size=int(zeros.sum()))
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "meta": {"num_pairs": d},
        }


class BatchMixture(Dataset):
    """Several tasks in one training set, one whole batch at a time (Zoology's multi-setting training).

    Item i is a batch of ``batch_size`` sequences of task ``i mod len(tasks)`` (its items ``i·batch_size …``),
    so the tasks take equal turns and a batch of short sequences costs what they cost, not what the longest
    would (padding every sequence to it). ``meta`` names the task by its attributes ``meta_keys``.
    """

    def __init__(self, tasks: list[Dataset], batch_size: int, length: int, meta_keys: tuple[str, ...]):
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one setting")
        self.tasks, self.batch_size, self.length, self.meta_keys = tasks, batch_size, length, meta_keys

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"{type(self).__name__} index {index} out of range 0..{self.length - 1}")
        task = self.tasks[index % len(self.tasks)]
        items = [task[j] for j in range(index * self.batch_size, (index + 1) * self.batch_size)]
        return {
            "input_ids": torch.stack([item["input_ids"] for item in items]),
            "labels": torch.stack([item["labels"] for item in items]),
            "meta": {key: getattr(task, key) for key in self.meta_keys},
        }


class MQARMixture(BatchMixture):
    """`MQAR` at several ``(seq_len, num_pairs)`` settings, one setting per batch (`BatchMixture`)."""

    def __init__(
        self,
        settings: list[tuple[int, int]],
        batch_size: int,
        vocab_size: int = 256,
        length: int = 1000,
        seed: int = 0,
        split: str = "train",
        **task,
    ):
        tasks = [
            MQAR(vocab_size, seq_len, num_pairs, length=length * batch_size, seed=seed, split=split, **task)
            for seq_len, num_pairs in settings
        ]
        super().__init__(tasks, batch_size, length, meta_keys=("num_pairs", "seq_len"))


def _whole_batch(items: list[dict]) -> dict:
    """Collate for a loader whose items are already batches (`BatchMixture`, one item per batch)."""
    return items[0]


class SelectiveCopying(_RecallDataset):
    """Selective copying (Mamba; the s4 generator): ``M`` tokens from ``[1, A−1)`` at sorted random positions
    among the first ``L + M`` slots (0 = noise elsewhere), then ``M`` markers ``A−1``; at marker i the label
    is the i-th token. Vocabulary ``A``; length ``L + 2M``."""

    def __init__(
        self,
        noise_len: int = 64,
        num_tokens: int = 8,
        alphabet: int = 16,
        length: int = 1000,
        seed: int = 0,
        split: str = "train",
    ):
        super().__init__(length, seed, split)
        if alphabet < 3:
            raise ValueError(f"SelectiveCopying needs alphabet ≥ 3 (noise, data, marker); got {alphabet}")
        self.noise_len, self.num_tokens, self.alphabet = noise_len, num_tokens, alphabet

    @property
    def seq_len(self) -> int:
        return self.noise_len + 2 * self.num_tokens

    def __getitem__(self, index: int) -> dict:
        rng, m, a = self.rng(index), self.num_tokens, self.alphabet
        data = rng.integers(1, a - 1, size=m)
        slots = np.sort(rng.choice(self.noise_len + m, size=m, replace=False))
        inputs = np.zeros(self.seq_len, dtype=np.int64)
        inputs[slots] = data
        inputs[self.noise_len + m :] = a - 1
        labels = np.full(self.seq_len, IGNORE, dtype=np.int64)
        labels[self.noise_len + m :] = data
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "meta": {"num_tokens": m},
        }


class SNIAH(_RecallDataset):
    """Single needle in a haystack at token level (after RULER): ``[MARK] key value [SEP]`` at a depth of the
    haystack, then ``[Q] key`` and the value, scored on every value token (exact match = all of them).

    ``kind``: ``passkey`` (periodic filler, 7 digits), ``number`` (random filler, 7 digits), ``uuid``
    (random filler, a 36-character UUID). Depth cycles through ``depths`` (percent) with the index.
    ``random_phase`` (passkey): the periodic filler starts at a random point of its period in each sequence.
    Without it every passkey sequence of one length and depth has the same haystack, and a model trained at one
    length can learn that layout instead of the retrieval (stop 17: a filler shifted by one token at the
    training length took the exact match of a MAC trained at 1K from 0.89 to 0.33).
    """

    PAD, MARK, SEP, QUERY = 0, 1, 2, 3
    CHARS = "0123456789abcdef-"
    FIRST_CHAR = 4
    NUM_KEYS = 32
    FIRST_KEY = FIRST_CHAR + len(CHARS)
    FIRST_FILLER = FIRST_KEY + NUM_KEYS
    FILLER_PERIOD = 11

    def __init__(
        self,
        kind: Literal["passkey", "number", "uuid"] = "passkey",
        seq_len: int = 256,
        depths: tuple[float, ...] = (0, 25, 50, 75, 100),
        vocab_size: int = 128,
        length: int = 1000,
        seed: int = 0,
        split: str = "train",
        random_phase: bool = False,
    ):
        super().__init__(length, seed, split)
        if kind not in ("passkey", "number", "uuid"):
            raise ValueError(f"SNIAH kind must be passkey, number or uuid; got {kind!r}")
        if vocab_size <= self.FIRST_FILLER + self.FILLER_PERIOD:
            raise ValueError(
                f"SNIAH needs vocab_size > {self.FIRST_FILLER + self.FILLER_PERIOD}; got {vocab_size}"
            )
        if not depths or any(not 0 <= d <= 100 for d in depths):
            raise ValueError(f"SNIAH depths must be percentages in [0, 100]; got {depths}")
        self.kind, self.seq_len, self.depths, self.vocab_size = kind, seq_len, tuple(depths), vocab_size
        self.random_phase = random_phase
        self.value_len = 36 if kind == "uuid" else 7
        # inputs = full[:-1], full = haystack + [MARK key value SEP] + [Q key] + value
        self.haystack_len = seq_len + 1 - (3 + self.value_len) - 2 - self.value_len
        if self.haystack_len < 1:
            raise ValueError(f"SNIAH seq_len {seq_len} is too short for a {kind} needle")

    def encode(self, text: str) -> list[int]:
        return [self.FIRST_CHAR + self.CHARS.index(ch) for ch in text]

    def __getitem__(self, index: int) -> dict:
        rng = self.rng(index)
        depth = self.depths[index % len(self.depths)]
        filler = np.arange(self.FIRST_FILLER, self.vocab_size)
        if self.kind == "passkey":
            phase = int(rng.integers(0, self.FILLER_PERIOD)) if self.random_phase else 0
            haystack = filler[(np.arange(self.haystack_len) + phase) % self.FILLER_PERIOD]
        else:
            haystack = rng.choice(filler, size=self.haystack_len)
        if self.kind == "uuid":
            text = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        else:
            text = "".join(str(d) for d in rng.integers(0, 10, size=self.value_len))
        value = self.encode(text)
        key = self.FIRST_KEY + int(rng.integers(0, self.NUM_KEYS))
        at = round(depth / 100 * self.haystack_len)
        needle = [self.MARK, key, *value, self.SEP]
        full = np.concatenate([haystack[:at], needle, haystack[at:], [self.QUERY, key], value]).astype(
            np.int64
        )
        labels = np.full(len(full), IGNORE, dtype=np.int64)
        labels[-self.value_len :] = value
        return {
            "input_ids": torch.from_numpy(full[:-1].copy()),
            "labels": torch.from_numpy(labels[1:].copy()),
            "meta": {"depth": float(depth), "needle_at": at, "value": text},
        }


class _RecallDataModule(TimeloomDataModule):
    """Shared splits; a module that trains several settings at once (a `BatchMixture`) lists them in
    ``val_names`` and gives one validation set per setting (``val_sets``), the first its own."""

    val_names: tuple[str, ...] | list[str] = ()  # one setting: no named validation sets

    def __init__(self, train_length: int, val_length: int, test_length: int, **loader):
        super().__init__(**loader)
        self.lengths = {"train": train_length, "val": val_length, "test": test_length}

    def val_sets(self) -> list[Dataset]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        if len(self.val_names) < 2:
            return super().train_dataloader()
        return make_train_loader(self.dataset("train"), batch_size=1, seed=self.seed, num_workers=self.num_workers,
                                 collate_fn=_whole_batch, pin_memory=self.pin_memory)  # fmt: skip

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        if len(self.val_names) < 2:
            return super().val_dataloader()
        return [make_eval_loader(data, batch_size=self.batch_size, num_workers=self.num_workers,
                                 collate_fn=collate_batch, pin_memory=self.pin_memory) for data in self.val_sets()]  # fmt: skip


class MQARDataModule(_RecallDataModule):
    """`MQAR` splits; see that class for the task arguments.

    ``mix_with`` (Zoology's multi-setting training): more ``(seq_len, num_pairs)`` settings trained beside
    ``(seq_len, num_pairs)``, in equal turns, one setting per batch (`MQARMixture`; ``train_length`` counts
    sequences); the vocabulary is shared, so it must exceed every setting's length. Validation runs one set
    per setting, named in ``val_names`` (the first, this module's own setting, is what ``val/`` reports).
    """

    def __init__(
        self,
        vocab_size: int = 256,
        seq_len: int = 64,
        num_pairs: int = 4,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        mix_with: list[tuple[int, int]] = (),
        train_length: int = 20_000,
        val_length: int = 1000,
        test_length: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(train_length, val_length, test_length, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, pin_memory=pin_memory)  # fmt: skip
        self.save_hyperparameters()
        self.task = dict(vocab_size=vocab_size, power_a=power_a, random_non_queries=random_non_queries)
        self.settings = [(seq_len, num_pairs), *(tuple(setting) for setting in mix_with)]
        self.val_names = [f"seq{n}x{d}" for n, d in self.settings]
        for n, d in self.settings:  # reject a bad configuration now
            MQAR(seq_len=n, num_pairs=d, length=0, **self.task)

    def build_dataset(self, split: str) -> MQAR | MQARMixture:
        if split == "train" and len(self.settings) > 1:
            return MQARMixture(self.settings, self.batch_size, length=self.lengths["train"] // self.batch_size,
                               seed=self.seed, split="train", **self.task)  # fmt: skip
        (n, d), *_ = self.settings
        return MQAR(
            seq_len=n, num_pairs=d, length=self.lengths[split], seed=self.seed, split=split, **self.task
        )

    def val_sets(self) -> list[MQAR]:
        return [MQAR(seq_len=n, num_pairs=d, length=self.lengths["val"], seed=self.seed, split="val", **self.task)
                for n, d in self.settings]  # fmt: skip


class SelectiveCopyingDataModule(_RecallDataModule):
    """`SelectiveCopying` splits; see that class for the task arguments."""

    def __init__(
        self,
        noise_len: int = 64,
        num_tokens: int = 8,
        alphabet: int = 16,
        train_length: int = 20_000,
        val_length: int = 1000,
        test_length: int = 1000,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__(train_length, val_length, test_length, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, pin_memory=pin_memory)  # fmt: skip
        self.save_hyperparameters()
        self.task = dict(noise_len=noise_len, num_tokens=num_tokens, alphabet=alphabet)
        SelectiveCopying(length=0, **self.task)

    def build_dataset(self, split: str) -> SelectiveCopying:
        return SelectiveCopying(length=self.lengths[split], seed=self.seed, split=split, **self.task)


class SNIAHDataModule(_RecallDataModule):
    """`SNIAH` splits; ``test_seq_len`` (default ``seq_len``) sets the length of the test split.

    ``mix_lengths``: more lengths trained beside ``seq_len``, in equal turns, one length per batch
    (`BatchMixture`; ``train_length`` counts sequences). Validation runs one set per length, named
    ``len<n>`` in ``val_names`` (the first, ``seq_len``'s, is what ``val/`` reports).
    """

    def __init__(
        self,
        kind: Literal["passkey", "number", "uuid"] = "passkey",
        seq_len: int = 256,
        test_seq_len: int | None = None,
        depths: tuple[float, ...] = (0, 25, 50, 75, 100),
        vocab_size: int = 128,
        train_length: int = 20_000,
        val_length: int = 500,
        test_length: int = 500,
        batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        random_phase: bool = False,
        mix_lengths: list[int] = (),
    ):
        super().__init__(train_length, val_length, test_length, batch_size=batch_size, num_workers=num_workers,
                         seed=seed, pin_memory=pin_memory)  # fmt: skip
        self.save_hyperparameters()
        self.task = dict(kind=kind, depths=tuple(depths), vocab_size=vocab_size, random_phase=random_phase)
        self.seq_lens = {"train": seq_len, "val": seq_len, "test": test_seq_len or seq_len}
        self.mixed = [seq_len, *mix_lengths]
        self.val_names = [f"len{n}" for n in self.mixed]
        for n in {self.seq_lens["test"], *self.mixed}:  # reject a bad configuration now
            SNIAH(length=0, seq_len=n, **self.task)

    def build_dataset(self, split: str) -> SNIAH | BatchMixture:
        if split == "train" and len(self.mixed) > 1:
            count = self.lengths["train"] // self.batch_size
            tasks = [SNIAH(length=count * self.batch_size, seq_len=n, seed=self.seed, split="train", **self.task)
                     for n in self.mixed]  # fmt: skip
            return BatchMixture(tasks, self.batch_size, count, meta_keys=("seq_len",))
        return SNIAH(length=self.lengths[split], seq_len=self.seq_lens[split], seed=self.seed, split=split,
                     **self.task)  # fmt: skip

    def val_sets(self) -> list[SNIAH]:
        return [SNIAH(length=self.lengths["val"], seq_len=n, seed=self.seed, split="val", **self.task)
                for n in self.mixed]  # fmt: skip
