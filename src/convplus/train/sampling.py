"""Training samples with their own random seeds, so that augmentation does not depend on the process count.

``SeededSampler`` (a ``DistributedSampler``) yields ``(index, seed)`` with the seed a function of (run seed,
epoch, index); ``SeededDataset`` draws the sample's random transforms from that seed (torch's generator,
forked, so the process's own random stream is untouched). A sample is then augmented the same way whichever
rank or worker loads it: N processes see the batches one process does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import Dataset
from torch.utils.data.distributed import DistributedSampler


class SeededSampler(DistributedSampler):
    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in super().__iter__():
            yield index, hash((self.seed, self.epoch, index)) % 2**63


class SeededDataset(Dataset):
    """``dataset[index]`` computed under ``torch.manual_seed(seed)`` for a key ``(index, seed)``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]
