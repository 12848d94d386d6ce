"""Reproducible, stratified train/val/test splits, and the manifest (splits.csv) that records them.

A split depends only on the sorted file list (every listed file, readable or not), the labels, which
files are identical, `data.split` and `data.split_seed`; never on the training seed or the file
system's listing order, so every run of a sweep sees the same images. Also the fixed, stratified
subset that limited evaluation (`trainer.limit_val_batches`) scores.
"""

import csv
import hashlib
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from ..errors import UserError

SPLITS = ("train", "val", "test")
MANIFEST_FIELDS = ("split", "label", "class", "path")


def check_fractions(split: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(x) for x in split)
    if len(values) != 3 or min(values) <= 0 or abs(sum(values) - 1) > 1e-6:
        raise UserError(
            f"data.split={list(values)}: give three positive fractions [train, val, test] that sum to 1, e.g. [0.7,0.15,0.15]"
        )
    return values


def part_sizes(count: int, fractions: Sequence[float]) -> list[int]:
    """How many of `count` items of one class go to each part. Part 0 (train) keeps at least one; every
    other part gets at least one when the class has an item for each part."""
    sizes = [round(count * f) for f in fractions[1:]]
    if count >= len(fractions):
        sizes = [max(1, s) for s in sizes]
    while sum(sizes) > count - 1:  # give back from the largest part until train keeps one
        sizes[int(np.argmax(sizes))] -= 1
    return [count - sum(sizes), *sizes]


def class_members(labels: np.ndarray) -> dict[int, np.ndarray]:
    """Each class's item indices in ascending order, by label: one stable sort, O(n log n) (not a pass over
    every item per class)."""
    order = np.argsort(labels, kind="stable")
    classes, starts = np.unique(labels[order], return_index=True)
    return {int(label): members for label, members in zip(classes, np.split(order, starts[1:]))}


def shuffled_class(members: np.ndarray, label: int, seed: int) -> np.ndarray:
    """Class `label`'s item indices (`members`, ascending), shuffled by a generator of its own, seeded by (seed, label)."""
    return np.random.default_rng([seed, int(label)]).permutation(members)


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> np.ndarray:
    """The part (index into `fractions`) of each item. Each class is shuffled (`shuffled_class`) and
    cut by `part_sizes`; items keep their order within a part."""
    labels = np.asarray(labels)
    parts = np.zeros(len(labels), dtype=np.int64)
    for label, members in class_members(labels).items():
        shuffled = shuffled_class(members, label, seed)
        bounds = np.cumsum(part_sizes(len(shuffled), fractions))[:-1]
        for part, chunk in enumerate(np.split(shuffled, bounds)):
            parts[chunk] = part
    return parts


def assign_splits(
    labels: Sequence[int],
    given: Sequence[str | None],
    fractions: Sequence[float],
    seed: int,
    copies: Sequence[str | None] | None = None,
) -> list[str]:
    """The split of every item. Items that came without one (an unsplit folder) are split stratified by
    `fractions`. When some came split (a train/ val/ test/ tree, CIFAR's train and test sets), a
    missing val or test split is carved from train, stratified, by its fraction of `data.split`.
    `copies`: a key per item (its content hash; None when unknown); items with the same key are
    identical, and every copy whose split is chosen here takes the split of the first such copy, so
    the same image is never trained on and scored. Splits that came given are kept."""
    labels = np.asarray(labels)
    if all(g is None for g in given):
        result = [SPLITS[p] for p in stratified_split(labels, fractions, seed)]
        chosen = [True] * len(result)
    else:
        result = list(given)
        missing = [s for s in SPLITS[1:] if s not in result]
        chosen = [bool(missing) and g == "train" for g in given]
        if missing:
            train = np.flatnonzero(chosen)
            carve = [fractions[SPLITS.index(s)] for s in missing]
            parts = stratified_split(labels[train], [1 - sum(carve), *carve], seed)
            for index, part in zip(train, parts):
                result[index] = "train" if part == 0 else missing[part - 1]
    if copies is None:
        return result
    first: dict[str, int] = {}
    for index, key in enumerate(copies):
        if key is not None and chosen[index]:
            result[index] = result[first.setdefault(key, index)]
    return result


def copies_across_splits(splits: Sequence[str], copies: Sequence[str | None]) -> int:
    """How many groups of identical items (equal keys in `copies`) lie in more than one split."""
    known = [(key, SPLITS.index(split)) for key, split in zip(copies, splits) if key is not None]
    if not known:
        return 0
    keys, parts = np.array([key for key, _ in known]), np.array([part for _, part in known])
    groups, group_of = np.unique(keys, return_inverse=True)
    lowest, highest = np.full(len(groups), len(SPLITS)), np.full(len(groups), -1)
    np.minimum.at(lowest, group_of, parts)
    np.maximum.at(highest, group_of, parts)
    return int((lowest != highest).sum())


def stratified_subset(labels: Sequence[int], count: int, seed: int) -> list[int]:
    """The indices, in order, of `count` items (all when there are no more). Each class's share is
    proportional to its frequency, rounded by largest remainder (ties broken at random by `seed`, so
    with more classes than room the classes left out are not always the last ones); its members are
    drawn at random by (seed, label). The same items for the same labels and seed."""
    labels = np.asarray(labels)
    if count >= len(labels):
        return list(range(len(labels)))
    classes, sizes = np.unique(labels, return_counts=True)
    shares, remainders = np.divmod(count * sizes, len(labels))
    tie_break = np.random.default_rng(seed).permutation(len(classes))
    by_remainder = np.lexsort((tie_break, -remainders))
    shares[by_remainder[: count - shares.sum()]] += 1
    members = class_members(labels)
    chosen = [shuffled_class(members[int(label)], label, seed)[:share] for label, share in zip(classes, shares)]
    return sorted(np.concatenate(chosen).tolist())


class ManifestRow(NamedTuple):  # a tuple: a million of them are made in a second or two
    split: str
    label: int
    class_name: str
    path: str  # relative to the data set's folder, with forward slashes


def manifest_rows(
    splits: Sequence[str], labels: Sequence[int], classes: Sequence[str], paths: Sequence[str]
) -> list[ManifestRow]:
    """One row per item, sorted by split (train, val, test), then path."""
    if not paths:
        return []
    codes = {split: code for code, split in enumerate(SPLITS)}
    order = np.lexsort((np.array(paths), np.array([codes[split] for split in splits]))).tolist()
    labels = [int(label) for label in labels]
    return list(
        map(ManifestRow._make, ((splits[i], labels[i], classes[labels[i]], paths[i]) for i in order))
    )  # _make: a million rows in well under a second


def fingerprint(rows: Iterable[ManifestRow], contents: dict[str, str]) -> str:
    """What a data set is, as 16 hex digits: every image's split, label, class name, name and content hash
    (`contents`: name -> hash); the same for the same images however they are stored or where they lie."""
    text = "".join(
        f"{row.split}\t{row.label}\t{row.class_name}\t{row.path}\t{contents.get(row.path, '')}\n" for row in rows
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_manifest(path: Path, rows: Iterable[ManifestRow]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_FIELDS)
        for row in rows:
            writer.writerow((row.split, row.label, row.class_name, row.path))


def read_manifest(path: Path) -> list[ManifestRow]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if tuple(reader.fieldnames or ()) != MANIFEST_FIELDS:
                raise UserError(f"{path}: not a splits manifest (want the columns {','.join(MANIFEST_FIELDS)})")
            rows = [ManifestRow(r["split"], int(r["label"]), r["class"], r["path"]) for r in reader]
    except OSError as e:
        raise UserError(f"{path}: cannot read the splits manifest ({e.strerror or e})") from None
    except ValueError:
        raise UserError(f"{path}: a label is not an integer; was the manifest edited?") from None
    bad = sorted({r.split for r in rows} - set(SPLITS))
    if bad:
        raise UserError(f"{path}: unknown split {bad[0]!r}; allowed: {', '.join(SPLITS)}")
    return rows
