"""Data loaders that resume exactly mid-epoch and shard across DDP ranks.

Lightning restores a loader's position when the loader implements ``state_dict``/``load_state_dict``
(its ``_Stateful`` protocol). The order of an epoch is a pure function of ``(seed, epoch)``, so the state is
two integers and a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class ResumableSampler(DistributedSampler):
    """Shuffles by ``(seed, epoch)``, gives each DDP rank its stride, and can start ``skip`` samples in.

    It subclasses ``DistributedSampler`` so Lightning keeps it instead of wrapping it in one of its own.
    Rank ``r`` of ``W`` gets ``perm[r::W]``, so ranks together see exactly the samples one process sees.
    """

    def __init__(self, dataset: Dataset, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        num_replicas, rank = _world()
        super().__init__(
            dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.skip = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        skip, self.skip = self.skip, 0  # only the first epoch after a resume starts mid-way
        return iter(indices[skip:])


class ResumableDataLoader(DataLoader):
    """A DataLoader whose ``state_dict`` records the epoch and how many batches it has handed out."""

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, **kwargs: Any):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self._batches_yielded = 0

    def __iter__(self) -> Iterator[Any]:
        self._batches_yielded = self.sampler.skip // self.batch_size
        for batch in super().__iter__():
            self._batches_yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_yielded": self._batches_yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["batches_yielded"] * self.batch_size


def make_train_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
    drop_last: bool = True,
) -> ResumableDataLoader:
    """The training loader: seeded shuffling, DDP sharding and exact mid-epoch resume."""
    sampler = ResumableSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
    return ResumableDataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def make_eval_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    num_workers: int = 0,
    collate_fn: Callable | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """An evaluation loader: fixed order, every sample once (Lightning shards it under DDP)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
