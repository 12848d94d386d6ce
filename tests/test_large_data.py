"""Data sets at ImageNet's scale: a splitter that is not O(files x classes), a scan shared by torchrun's
processes and saved as it goes, image sizes recorded by the scan, and ImageNet's layout as it comes."""

import time
from datetime import timedelta

import numpy as np
import pytest
from omegaconf import OmegaConf

from rethink.data import splits

# ---------------------------------------------------------------- the splitter


def old_shuffled_class(labels: np.ndarray, label: int, seed: int) -> np.ndarray:
    """The implementation before class_members (O(files) per class), as the reference."""
    return np.random.default_rng([seed, int(label)]).permutation(np.flatnonzero(labels == label))


def old_stratified_split(labels, fractions, seed):
    labels = np.asarray(labels)
    parts = np.zeros(len(labels), dtype=np.int64)
    for label in np.unique(labels):
        shuffled = old_shuffled_class(labels, label, seed)
        bounds = np.cumsum(splits.part_sizes(len(shuffled), fractions))[:-1]
        for part, chunk in enumerate(np.split(shuffled, bounds)):
            parts[chunk] = part
    return parts


def old_stratified_subset(labels, count, seed):
    labels = np.asarray(labels)
    if count >= len(labels):
        return list(range(len(labels)))
    classes, sizes = np.unique(labels, return_counts=True)
    shares, remainders = np.divmod(count * sizes, len(labels))
    tie_break = np.random.default_rng(seed).permutation(len(classes))
    by_remainder = np.lexsort((tie_break, -remainders))
    shares[by_remainder[: count - shares.sum()]] += 1
    chosen = [old_shuffled_class(labels, label, seed)[:share] for label, share in zip(classes, shares)]
    return sorted(np.concatenate(chosen).tolist())


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_the_splitter_gives_exactly_what_the_per_class_scan_gave(seed):
    rng = np.random.default_rng(seed)
    for classes in (2, 13, 200):
        labels = rng.integers(0, classes, 3000).tolist()
        labels = [label for label in labels if label != 5]  # a gap in the labels
        fractions = (0.7, 0.15, 0.15)
        assert (splits.stratified_split(labels, fractions, seed) == old_stratified_split(labels, fractions, seed)).all()
        for count in (1, 17, 500, 2999):
            assert splits.stratified_subset(labels, count, seed) == old_stratified_subset(labels, count, seed)
    assert len(splits.stratified_split([], (0.7, 0.15, 0.15), seed)) == 0


def split_seconds(items: int, classes: int) -> float:
    labels = np.random.default_rng(0).integers(0, classes, items)
    started = time.perf_counter()
    parts = splits.stratified_split(labels, (0.7, 0.15, 0.15), seed=0)
    subset = splits.stratified_subset(labels, 50_000, seed=0)
    elapsed = time.perf_counter() - started
    assert np.bincount(parts).tolist() == pytest.approx([0.7 * items, 0.15 * items, 0.15 * items], rel=0.02)
    assert len(subset) == 50_000
    return elapsed


def test_a_million_items_in_a_thousand_classes_split_in_a_second():
    assert split_seconds(1_000_000, 1000) < 2  # 0.4 s here (2 cores)


@pytest.mark.slow
def test_a_million_items_in_twenty_thousand_classes_split_in_seconds_not_minutes():
    assert split_seconds(1_000_000, 20_000) < 8  # 3 s here; the per-class scan took 22 s (O(files x classes))


# ---------------------------------------------------------------- torchrun's start-up


def test_the_process_group_waits_trainer_dist_timeout_min_not_nccls_ten_minutes(monkeypatch):
    import torch.distributed

    from rethink.config import TrainerConfig
    from rethink.train import distributed

    joined = {}
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(
        torch.distributed, "init_process_group", lambda backend, **kw: joined.update(kw, backend=backend)
    )
    default = OmegaConf.structured(TrainerConfig).dist_timeout_min
    distributed.start(distributed.World(1, 2, 1), "cpu", default)
    assert joined["backend"] == "gloo" and joined["timeout"] == timedelta(minutes=60)
    distributed.start(distributed.World(1, 2, 1), "cpu", 240)
    assert joined["timeout"] == timedelta(hours=4)
