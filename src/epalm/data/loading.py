"""Parallel, exactly resumable data loading: a torch ``DataLoader`` over an epoch order.

* :class:`EpochBatchSampler` walks the trainer's seeded epoch order (``EpochOrder``) from any batch,
  and gives each process its slice of every global micro-batch;
* :class:`SeededSamples` draws every sample's randomness (augmentation, answer choice) from a
  ``torch.Generator`` seeded by ``(seed, epoch, sample index)``, so what a sample looks like does
  not depend on which worker process loads it, on how many there are, or on what ran before;
* :func:`default_num_workers`: ``min(8, cores per process - 1)``; 0 for datasets so small that
  starting worker processes costs more than it saves.
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["sample_seed", "SeededSamples", "EpochBatchSampler", "default_num_workers", "make_loader",
           "SMALL_DATASET"]

SMALL_DATASET = 256  # samples: below this, auto num_workers is 0 (worker start-up dominates)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixing (seed, epoch, index) through numpy's SeedSequence (no collisions in practice)."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index)]).generate_state(
        1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF)


def _takes_generator(fn: Callable | None) -> bool:
    if fn is None:
        return False
    try:
        return "generator" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class SeededSamples(Dataset):
    """``samples[(epoch, index)]`` = ``dataset.get(index, generator=g)`` with ``g`` seeded by
    :func:`sample_seed`. A dataset without such a ``get`` is read as ``dataset[index]`` with the
    global torch RNG seeded the same way (and restored afterwards)."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed
        get = getattr(dataset, "get", None)
        self._get = get if _takes_generator(get) else None

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        if self._get is not None:
            return self._get(index, generator=torch.Generator().manual_seed(s))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            return self.dataset[index]


class EpochBatchSampler(Sampler):
    """Batches of ``(epoch, index)`` keys for this process, from ``order.indices(epoch, start_batch)``.

    Every process walks the same global order and takes ``chunk[rank::world]`` of each global
    micro-batch (a process left without a sample takes the chunk's first one, so that processes stay
    in lock-step; the trainer masks its labels). :meth:`global_sizes` are the global micro-batch sizes.
    """

    def __init__(self, order, rank: int = 0, world: int = 1) -> None:
        self.order, self.rank, self.world = order, rank, world
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def _chunks(self) -> list[list[int]]:
        indices = self.order.indices(self.epoch, self.start_batch)
        b = self.order.batch_size
        return [indices[i:i + b] for i in range(0, len(indices), b)]

    def global_sizes(self) -> list[int]:
        return [len(c) for c in self._chunks()]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for chunk in self._chunks():
            mine = chunk[self.rank::self.world] or chunk[:1]
            yield [(self.epoch, i) for i in mine]

    def __len__(self) -> int:
        return max(0, self.order.batches_per_epoch() - self.start_batch)


def default_num_workers(num_samples: int | None = None) -> int:
    """``min(8, cores of this process - 1)``, the cores shared by the processes of this node; 0 for
    fewer than :data:`SMALL_DATASET` samples."""
    if num_samples is not None and num_samples < SMALL_DATASET:
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(0, min(8, cores // max(1, local) - 1))


def make_loader(dataset: Dataset, *, collate_fn: Callable, num_workers: int, pin_memory: bool,
                batch_sampler: Sampler | None = None, batch_size: int | None = None,
                prefetch_factor: int = 4, persistent: bool = True) -> DataLoader:
    """The one ``DataLoader`` recipe of training and evaluation (workers, pinning, prefetching)."""
    # a generator of its own: creating an iterator draws a base seed from it, and drawing it from the
    # global RNG would make the training's random stream depend on where a run was resumed
    kwargs: dict[str, Any] = dict(collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                                  generator=torch.Generator().manual_seed(0))
    if batch_sampler is not None:
        kwargs["batch_sampler"] = batch_sampler
    else:
        kwargs["batch_size"] = batch_size
    if num_workers > 0:
        kwargs.update(prefetch_factor=prefetch_factor, persistent_workers=persistent)
    return DataLoader(dataset, **kwargs)
