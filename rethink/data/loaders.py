"""DataLoaders whose order and augmentation are decided in the main process by (seed, epoch).

`SeededSampler` yields (index, sample_seed) pairs; the datasets seed each sample's transform with its
sample_seed. So the batches of epoch k are the same with 0 or 8 workers, with persistent workers, and
in a run resumed at epoch k: call `set_epoch(loader, k)` before iterating.

Evaluation keeps the data set's order, which is sorted by class: limited evaluation (`limit_batches`)
therefore scores a fixed stratified subset, not the first batches (which would be the first classes).
"""

import multiprocessing
import random
import signal
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..environment import available_cpus
from ..errors import UserError
from .splits import stratified_subset


class SeededSampler(Sampler):
    """The data set indices `indices` (all of them: range(len(dataset))), shuffled or in order.

    Under DDP (`shard=(rank, world_size)`) each process takes every world_size-th sample of the same
    order, from its rank on: in training each takes the same number (the remainder is left out, so
    every process steps equally often), in evaluation every sample goes to exactly one process."""

    def __init__(self, indices: Sequence[int], seed: int, shuffle: bool, shard: tuple[int, int] = (0, 1)):
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = shard
        self.epoch = 0
        self.start = 0  # samples of the epoch to leave out: those a resumed epoch already trained on

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _shard_size(self) -> int:
        if self.shuffle:  # training
            return len(self.indices) // self.world_size
        return len(range(self.rank, len(self.indices), self.world_size))

    def __len__(self) -> int:
        return self._shard_size() - self.start

    def __iter__(self):
        rng = np.random.default_rng([self.seed & (2**63 - 1), self.epoch])
        order = rng.permutation(self.indices) if self.shuffle else self.indices
        sample_seeds = rng.integers(0, 2**63 - 1, size=len(self.indices))
        pairs = list(zip(order.tolist(), sample_seeds.tolist()))[self.rank :: self.world_size][: self._shard_size()]
        return iter(pairs[self.start :])


def default_num_workers() -> int:
    return min(8, available_cpus())


def make_loader(
    dataset: Dataset,
    data_cfg,
    *,
    train: bool,
    seed: int,
    pin_memory: bool = False,
    batch_size: int | None = None,
    limit_batches: int | None = None,
    shard: tuple[int, int] = (0, 1),
    collate_fn=None,
) -> DataLoader:
    """Shuffled, augmented batches for training (the last incomplete batch dropped, unless the data
    set is smaller than one batch); the data set's order for evaluation. `limit_batches` (evaluation
    only; a training loop stops after its own count): the loader covers limit_batches * batch_size
    items (all of them when there are fewer), a stratified subset fixed by `data.split_seed`, the
    same every epoch and for every training seed. The data set needs `.labels` for it. `shard`:
    (rank, world_size) under DDP, `batch_size` being per process (see SeededSampler). `collate_fn`: DataLoader's
    (default: its default_collate)."""
    batch_size = batch_size or data_cfg.batch_size
    if batch_size < 1:
        raise UserError(f"data.batch_size={batch_size}: must be at least 1")
    workers = default_num_workers() if data_cfg.num_workers is None else data_cfg.num_workers
    if workers < 0:
        raise UserError(
            f"data.num_workers={workers}: must be 0 (load in the main process) or more; null picks min(8, CPUs)"
        )
    indices = range(len(dataset))
    if limit_batches is not None and not train:
        indices = stratified_subset(dataset.labels, limit_batches * batch_size, data_cfg.split_seed)
    sampler = SeededSampler(indices, seed, shuffle=train, shard=shard)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        drop_last=train and len(sampler) >= batch_size,
        collate_fn=collate_fn,
        worker_init_fn=_seed_worker,
        generator=torch.Generator().manual_seed(seed),
        multiprocessing_context=_worker_context() if workers > 0 else None,
    )


def _worker_context():
    """Python's own way of starting the workers. A job run by a parallel launcher (joblib's loky
    processes) inherits a start method that DataLoader workers cannot use, and one that a fork server
    or a spawned child cannot restore either: fork them there (POSIX), as Linux does by default."""
    method = multiprocessing.get_start_method(allow_none=True)
    if method in (None, "fork", "spawn", "forkserver") or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return multiprocessing.get_context("fork")


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Make `loader` produce epoch `epoch`'s order and augmentation (call it before each epoch), from
    batch `start_batch` on (a resumed epoch continues with exactly the batches it had not trained on)."""
    sampler = getattr(loader, "sampler", None)
    if not hasattr(sampler, "set_epoch"):
        raise TypeError("set_epoch needs a loader made by rethink.data.make_loader")
    sampler.set_epoch(epoch, start_batch * loader.batch_size)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (base seed + id); numpy and random, for user transforms, follow it
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    # A stop signal sent to the whole process group (SLURM, `timeout`, a container stop, Ctrl-C) is the
    # main process's to handle: it saves a checkpoint and then shuts the workers down. A worker that died
    # of it first would turn that save into a DataLoader crash. (Workers still exit with their parent.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def shut_down_workers(loader) -> None:
    """Stop a loader's persistent workers now (they would otherwise live, with their copy of the data set,
    until the loader is garbage-collected)."""
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None
