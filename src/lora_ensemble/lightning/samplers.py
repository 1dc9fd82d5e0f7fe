"""Data order for ensemble training: a per-epoch shuffle that every rank agrees on, unpadded evaluation shards,
and sample ids in batches for the trunk cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

SAMPLE_IDS = "sample_ids"  # (B,) training-set indices, in batches of a run with a trunk cache



class IndexedDataset(Dataset):
    """`dataset[i]` as `(i, dataset[i])`, so that batches can name their samples (for `WithSampleIds`)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]



class WithSampleIds:
    """A collate function over `IndexedDataset` items: `collate(items)` plus `sample_ids: (B,)` int64."""

    def __init__(self, collate: Callable[[list[Any]], dict[str, Tensor]]):
        self.collate = collate

    def __call__(self, items: list[tuple[int, Any]]) -> dict[str, Tensor]:
        batch = self.collate([item for _, item in items])
        if SAMPLE_IDS in batch:
            raise ValueError(f"the collate function already makes a `{SAMPLE_IDS}` entry")
        return {**batch, SAMPLE_IDS: torch.tensor([index for index, _ in items], dtype=torch.long)}



class EpochShuffleSampler(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch) alone, so a resumed run sees the same order
    as an uninterrupted one. Lightning calls `set_epoch` before every epoch. Under DDP each of the
    `num_replicas` processes takes every num_replicas-th index, padded to equal length by repeating the first
    indices (every process must run the same number of training steps). For training only: evaluation uses
    `EvaluationSampler`, which counts every sample once."""

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        else:
            order = list(range(self.length))
        per_replica = math.ceil(self.length / self.num_replicas)
        order += order[: per_replica * self.num_replicas - len(order)]
        return iter(order[self.rank::self.num_replicas])

    def __len__(self) -> int:
        return math.ceil(self.length / self.num_replicas)



class EvaluationSampler(Sampler[int]):
    """Evaluation order without padding: process r of W takes the contiguous block [r N // W, (r+1) N // W)
    of the N samples, in order (blocks differ in length by at most one). Concatenating the blocks in rank
    order, as `EnsembleModule.all_gather_cat` does, gives every sample exactly once, in dataset order."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in 0..{num_replicas - 1} for num_replicas={num_replicas}, got {rank}")
        if length < num_replicas:
            raise ValueError(f"an evaluation split of {length} sample(s) cannot be shared by {num_replicas} "
                             f"processes (each needs at least one); use at least {num_replicas} samples or fewer devices")
        self.start, self.stop = rank * length // num_replicas, (rank + 1) * length // num_replicas

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return self.stop - self.start

