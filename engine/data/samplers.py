"""Index orders for one rank: exact evaluation shards, resumable single-process shuffles, stratified hold-outs.

Training with world_size > 1 uses torch's DistributedSampler (shuffled, seeded, drop_last) so every rank takes the
same number of steps; evaluation uses `ShardSampler`, which deals indices rank::world_size without padding, so
summing correct and total over ranks gives exact metrics.

Both training samplers can start their next pass part-way (``skip_next``): a run resumed from a mid-epoch checkpoint
skips the samples the interrupted epoch already consumed without loading them, and sees the rest in the same order.
"""

from __future__ import annotations

import itertools
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DistributedSampler, Sampler


class _SkipNext:
    """``skip_next(n)``: the next pass over the sampler leaves out its first n indices; later passes are whole."""

    _skip = 0

    def skip_next(self, samples: int) -> None:
        """Called on resume with the samples this rank consumed in the interrupted epoch (whole batches)."""
        if samples < 0:
            raise ValueError(f"cannot skip a negative number of samples ({samples})")
        self._skip = samples

    def _after_skip(self, indices: Iterator[int]) -> Iterator[int]:
        skip, self._skip = self._skip, 0
        return itertools.islice(indices, skip, None) if skip else indices


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world_size, ... in order, without padding: ranks are disjoint and cover every index once,
    so metrics summed over ranks are exact (DistributedSampler pads by repeating samples)."""

    def __init__(self, size: int, rank: int = 0, world_size: int = 1) -> None:
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


class EpochShuffleSampler(_SkipNext, Sampler[int]):
    """Single-process shuffle whose order depends only on (seed, epoch), like DistributedSampler, so a run resumed
    at epoch k sees the same order as one that never stopped (a RandomSampler's generator state would be lost)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the trainer at the start of every epoch; without it every epoch repeats the same order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return self._after_skip(iter(torch.randperm(self.size, generator=gen).tolist()))

    def __len__(self) -> int:
        return self.size


class EpochDistributedSampler(_SkipNext, DistributedSampler):
    """torch's DistributedSampler (seeded by (seed, epoch), drop_last evens ranks) that can resume mid-epoch."""

    def __iter__(self) -> Iterator[int]:
        return self._after_skip(super().__iter__())


def stratified_split(targets: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(keep, held_out) index arrays: round(fraction * n) random samples held out, shared among classes in
    proportion to their size (largest remainders get the leftover samples, ties broken by the seeded generator)."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(targets))
    shuffled = np.asarray(targets)[order]
    classes, counts = np.unique(shuffled, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    leftover = int(round(fraction * len(targets))) - int(take.sum())
    by_remainder = np.lexsort((rng.random(len(classes)), -(quota - take)))
    take[by_remainder[:leftover]] += 1
    held = [order[shuffled == c][:k] for c, k in zip(classes, take)]
    held_out = np.sort(np.concatenate(held)) if held else np.empty(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(targets)), held_out)
    return keep, held_out
