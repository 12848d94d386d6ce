"""Data sets, splits, transforms and loaders: config -> DataBundle -> DataLoaders.

    bundle = build_data(cfg.data, cfg.model)         # classes + train/val/test datasets of uint8 images
    bundle.write_run_files(run_dir)                   # classes.json, splits.csv, skipped_files.txt
    loader = make_loader(bundle.train, cfg.data, train=True, seed=cfg.seed)
    set_epoch(loader, epoch)                          # before each epoch: order and augmentation
    images = normalize(batch.to(device), cfg.model.mean, cfg.model.std)   # on the device
    eval_images(paths, cfg.model, cfg.data)[i]        # any file as the val/test splits present theirs

data=flowers (tf_flowers, the default), folder (any class-per-folder tree, or a pack of one: packed.py), imagenet (ImageNet-1k's
train/ and val/ as they come; val/ is the test split), synthetic (drawn in memory),
flowers102, cifar10, cifar100 (torchvision). File-based data sets are scanned once for unreadable
files, split reproducibly (splits.py), identical files kept in one split, and decoded once into an
on-disk cache (cache.py) that gives the same pixels as decoding every time (preprocess.py).
"""

import gc
import json
import logging
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from omegaconf.errors import MissingMandatoryValue
from torch.utils.data import Dataset

from ..config import value
from ..environment import cache_dir, data_root, free_space, torchrun_processes, torchrun_rank
from ..errors import UserError
from .cache import ImageCache, cache_decision, content_digest, estimate_cache_bytes
from .datasets import TensorImages
from .flowers import locate_flowers
from .folder import IMAGENET_SPLIT_FOLDERS, Listing, list_folder
from .images import load_image
from .loaders import make_loader, set_epoch
from .packed import Pack, is_pack, read_pack
from .preprocess import describe_eval_preprocessing, eval_images, file_images
from .scan import ALONE, Share, scan_images
from .splits import (
    SPLITS,
    ManifestRow,
    assign_splits,
    check_fractions,
    copies_across_splits,
    fingerprint,
    manifest_rows,
    read_manifest,
    write_manifest,
)
from .synthetic import generate_synthetic
from .torchvision_sets import CIFAR, cifar_tensors, flowers102_listing
from .transforms import batch_mixer, eval_transform, normalize, stored_size, train_transform

__all__ = [
    "file_listing",
    "DataBundle",
    "Share",
    "batch_mixer",
    "build_data",
    "describe_eval_preprocessing",
    "eval_images",
    "eval_transform",
    "load_image",
    "make_loader",
    "normalize",
    "set_epoch",
    "train_transform",
]

log = logging.getLogger("rethink")

CACHE_SAMPLE = 20_000  # cache entries looked at to judge what a large data set has cached

DATASETS = ("flowers", "folder", "imagenet", "synthetic", "flowers102", "cifar10", "cifar100")
DOWNLOADED = ("flowers", "flowers102", "cifar10", "cifar100")
T = TypeVar("T")


@dataclass
class DataBundle:
    classes: list[str]
    train: Dataset  # items: (uint8 3 x train_size x train_size, label), random train transforms
    val: Dataset  # items: (uint8 3 x eval_size x eval_size, label), eval transforms
    test: Dataset
    manifest: list[ManifestRow]  # every image's split; in-memory data sets name theirs <data set>/[part/]<index>
    skipped: list[str] = field(default_factory=list)  # "path: why" for each unreadable file the scan found
    fingerprint: str = (
        ""  # what the data set is: a hash of every image's split, label, name and content (splits.fingerprint)
    )
    test_names: list[str] = field(
        default_factory=list
    )  # the test split's images in its order, named as in the manifest

    def write_run_files(self, run_dir: Path) -> None:
        """classes.json (index -> name), splits.csv, skipped_files.txt (when any)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "classes.json").write_text(json.dumps(self.classes, indent=1) + "\n")
        write_manifest(run_dir / "splits.csv", self.manifest)
        if self.skipped:
            (run_dir / "skipped_files.txt").write_text("\n".join(self.skipped) + "\n")


def build_data(data_cfg, model_cfg, *, manifest: Path | None = None, share: Share = ALONE) -> DataBundle:
    """The data set `data_cfg` names, split, with the transforms `model_cfg`'s image sizes call for.
    `manifest`: a run's splits.csv, to rebuild exactly that run's splits of a file-based data set
    (without it the split is recomputed, which gives the same result while the files are unchanged);
    an in-memory data set is recomputed and checked against it. `share`: this process's place among
    torchrun's processes, which download first on rank 0 and share the scan (scan.Share)."""
    name = value(data_cfg.name)
    fractions = check_fractions(data_cfg.split)
    side = stored_size(model_cfg, data_cfg)  # also checks data.augment and data.crop_pct before anything is read
    seed = data_cfg.split_seed
    if name == "synthetic" or name in CIFAR:
        classes, images, labels, paths, given = _download_first(name, share, lambda: _in_memory(name, data_cfg))
        bundle = _tensor_bundle(
            classes, images, labels, paths, assign_splits(labels, given, fractions, seed), model_cfg, data_cfg
        )
        if manifest is not None and read_manifest(Path(manifest)) != bundle.manifest:
            raise UserError(
                f"{manifest}: the run's split is not the one data={name} gives now; was the manifest edited, or the data set's settings changed?"
            )
        return bundle
    with collection_paused():
        pack = read_pack(Path(data_cfg.root).expanduser()) if _packed(data_cfg) else None
        listing = pack.listing() if pack else _download_first(name, share, lambda: file_listing(data_cfg))
        if manifest is not None:
            listing = _listing_from_manifest(listing, read_manifest(Path(manifest)), manifest)
        return _file_bundle(
            listing, data_cfg, model_cfg, fractions, side, splits_given=manifest is not None, share=share, pack=pack
        )


@contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused: making a million small objects (names, hashes, manifest rows)
    otherwise sets it off thousands of times, each pass walking the objects made so far (at ImageNet's size,
    ~3x the time of the work itself)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _download_first(name: str, share: Share, work: Callable[[], T]) -> T:
    """work(), on rank 0 first where it may download (the others then find the files)."""
    return share.first(work) if name in DOWNLOADED else work()


def _in_memory(name: str, data_cfg) -> tuple[list[str], torch.Tensor, list[int], list[str], list[str | None]]:
    """(classes, uint8 images, labels, a name per image for splits.csv, the split each came in)."""
    if name == "synthetic":
        images, labels, classes = generate_synthetic(
            data_cfg.num_classes, data_cfg.images_per_class, data_cfg.image_size, data_cfg.split_seed
        )
        return classes, images, labels, [f"synthetic/{i:06d}" for i in range(len(labels))], [None] * len(labels)
    classes, parts = cifar_tensors(name, data_root(data_cfg.root))
    (train_images, train_labels), (test_images, test_labels) = parts["train"], parts["test"]
    paths = [f"{name}/train/{i:05d}" for i in range(len(train_labels))] + [
        f"{name}/test/{i:05d}" for i in range(len(test_labels))
    ]
    given = ["train"] * len(train_labels) + ["test"] * len(test_labels)
    return classes, torch.cat([train_images, test_images]), train_labels + test_labels, paths, given


def _packed(data_cfg) -> bool:
    """Whether data.root is a pack (task=pack) of a data=folder or data=imagenet tree."""
    root = _configured(data_cfg, "root") if value(data_cfg.name) in ("folder", "imagenet") else None
    return root is not None and is_pack(Path(root).expanduser())


def file_listing(data_cfg) -> Listing:
    """The image files of a file-based data set (data=flowers, folder, flowers102), before the scan."""
    name = value(data_cfg.name)
    if name == "flowers":
        return list_folder(locate_flowers(data_root(data_cfg.root)))
    if name == "folder":
        if _configured(data_cfg, "root") is None:
            raise UserError(
                "data=folder needs data.root=PATH: a folder with one folder of images per class (or train/ val/ test/ folders of those)"
            )
        return list_folder(Path(data_cfg.root).expanduser())
    if name == "imagenet":
        if _configured(data_cfg, "root") is None:
            raise UserError(
                "data=imagenet needs data.root=PATH: the folder holding ImageNet's train/ (class folders) and val/ "
                "(class folders, or flat with its label file)"
            )
        return list_folder(Path(data_cfg.root).expanduser(), IMAGENET_SPLIT_FOLDERS)
    if name == "flowers102":
        return flowers102_listing(data_root(data_cfg.root))
    if name in DATASETS:
        raise UserError(f"data={name} is held in memory, not in files; file-based: flowers, folder, flowers102")
    raise UserError(f"data.name={name}: allowed: {', '.join(DATASETS)}")


def _configured(node, key: str):
    """node[key], or None when it is null or ??? (missing)."""
    try:
        return node[key]
    except MissingMandatoryValue:
        return None


def _listing_from_manifest(listing: Listing, rows: list[ManifestRow], manifest: Path) -> Listing:
    """The files `rows` (a run's splits.csv) name, with the labels and splits they record; each must be listed."""
    root = listing.root
    names: dict[int, str] = {}
    for row in rows:
        if names.setdefault(row.label, row.class_name) != row.class_name:
            raise UserError(
                f"{manifest}: label {row.label} is both {names[row.label]!r} and {row.class_name!r}; was it edited?"
            )
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{manifest}: labels must number the classes 0..K-1; was it edited?")
    listed = set(listing.paths)
    missing = next((r.path for r in rows if r.path not in listed), None)
    if missing:
        raise UserError(
            f"{manifest}: lists {missing}, which is not in {root}; point data.root at the data set the run used"
        )
    return Listing(
        root,
        [names[k] for k in range(len(names))],
        [r.path for r in rows],
        [r.label for r in rows],
        [r.split for r in rows],
    )


def _file_bundle(
    listing: Listing, data_cfg, model_cfg, fractions, side: int, splits_given: bool, share: Share, pack: Pack | None
) -> DataBundle:
    root, classes = listing.root, listing.classes
    cache_root = cache_dir(data_cfg.cache_dir)
    scan = pack.scan_result() if pack else scan_images(root, listing.paths, cache_root, share)
    skipped = [f"{root / path}: {why}" for path, why in scan.skipped.items()]
    if skipped:
        shown = "; ".join(skipped[:10]) + (f"; and {len(skipped) - 10} more" if len(skipped) > 10 else "")
        log.warning(f"skipped {len(skipped)} unreadable image file(s) (listed in the run's skipped_files.txt): {shown}")
    # The split is made over every listed file, readable or not, and the unreadable ones then leave
    # their split: a file that fails to read (today only, perhaps) moves no other file.
    copies = [scan.digests.get(path) for path in listing.paths]
    all_splits = (
        listing.splits
        if splits_given
        else assign_splits(listing.labels, listing.splits, fractions, data_cfg.split_seed, copies)
    )
    kept = [i for i, path in enumerate(listing.paths) if path not in scan.skipped]
    paths, labels, splits, digests = (
        [values[i] for i in kept] for values in (listing.paths, listing.labels, all_splits, copies)
    )
    _require_training_images(root, classes, labels, splits, len(skipped))
    crossing = copies_across_splits(splits, digests)
    if crossing:
        log.warning(
            f"data.root={root}: {crossing} group{'s' if crossing > 1 else ''} of identical files lie in more than one of "
            "train/val/test (as given by its folders or splits.csv): those images are trained on and scored; remove the copies"
        )

    cache = _image_cache(data_cfg, cache_root, paths, digests, scan.sizes, side)

    def subset(split: str) -> Dataset:
        chosen = [i for i, s in enumerate(splits) if s == split]
        return file_images(
            root,
            [paths[i] for i in chosen],
            [labels[i] for i in chosen],
            model_cfg,
            data_cfg,
            train=split == "train",
            cache=cache,
            digests=[digests[i] for i in chosen],
            sizes=[scan.sizes[paths[i]] for i in chosen],
            pack=pack,
        )

    manifest = manifest_rows(splits, labels, classes, paths)
    test_names = [path for path, split in zip(paths, splits) if split == "test"]
    bundle = DataBundle(
        classes,
        subset("train"),
        subset("val"),
        subset("test"),
        manifest,
        skipped,
        fingerprint(manifest, dict(zip(paths, digests))),
        test_names,
    )
    _log_sizes(bundle, root)
    return bundle


def _image_cache(
    data_cfg, cache_root: Path, paths: list[str], digests: list[str], sizes: dict, side: int
) -> ImageCache | None:
    """The decoded-image cache as data.cache and data.cache_max_gb decide it (cache.cache_decision), said in one
    line: the entries this run still lacks, estimated from their images' sizes as the scan recorded them, against
    the free space and the cap. Past CACHE_SAMPLE distinct images, what is there and what is missing is judged from
    an even sample of the entries (a stat each: a million of them would take a while on every process)."""
    setting = value(data_cfg.cache)
    if setting is False:
        return None
    cache = ImageCache(cache_root)
    distinct = list(dict(zip(digests, paths)).items())  # identical files share one entry
    step = max(1.0, len(distinct) / CACHE_SAMPLE)
    sample = [distinct[int(k * step)] for k in range(min(len(distinct), CACHE_SAMPLE))]
    present_bytes, missing = 0, []
    for digest, path in sample:
        try:
            present_bytes += cache.entry(digest, side).stat().st_size
        except OSError:
            missing.append(path)
    scale = len(distinct) / max(1, len(sample))
    estimate = round(estimate_cache_bytes([sizes[path] for path in missing], side) * scale)
    present_bytes = round(present_bytes * scale)
    free_bytes, _ = free_space(cache.folder(side))
    cap = None if data_cfg.cache_max_gb is None else int(data_cfg.cache_max_gb * 1e9)
    on, line = cache_decision(
        setting,
        estimate,
        free_bytes,
        cap,
        present_bytes=present_bytes,
        images=round(len(missing) * scale),
        where=str(cache.folder(side)),
    )
    warn = setting is True and not on and not torchrun_rank()  # one line for a torchrun, not one per process
    (log.warning if warn else log.info)(line)
    # under torchrun each process decodes its own share of the images: each gets that share of the room
    room = None if cap is None else (cap - present_bytes) // torchrun_processes()
    return ImageCache(cache_root, room=room) if on else None


def _require_training_images(
    root: Path, classes: list[str], labels: list[int], splits: list[str], skipped: int
) -> None:
    if not labels:
        raise UserError(f"data.root={root}: no readable images ({skipped} unreadable skipped)")
    total = Counter(labels)
    train = Counter(label for label, split in zip(labels, splits) if split == "train")
    for why, count in (("no readable images", total), ("no training images", train)):
        empty = next((name for k, name in enumerate(classes) if count[k] == 0), None)
        if empty is not None:
            raise UserError(f"data.root={root}: class {empty!r} has {why}; add images to it or remove its folder")
    if len(classes) < 2:
        raise UserError(
            f"data.root={root}: holds one class folder ({classes[0]}/); a classifier needs at least 2, "
            "one folder of images per class"
        )


def _tensor_bundle(
    classes: list[str],
    images: torch.Tensor,
    labels: list[int],
    paths: list[str],
    splits: list[str],
    model_cfg,
    data_cfg,
) -> DataBundle:
    def subset(split: str, transform) -> TensorImages:
        chosen = [i for i, s in enumerate(splits) if s == split]
        return TensorImages(images[chosen], [labels[i] for i in chosen], transform)

    train, evaluation = train_transform(model_cfg, data_cfg), eval_transform(model_cfg, data_cfg)
    manifest = manifest_rows(splits, labels, classes, paths)
    test_names = [path for path, split in zip(paths, splits) if split == "test"]
    contents = {path: content_digest(image.numpy().tobytes()) for path, image in zip(paths, images)}
    bundle = DataBundle(
        classes,
        subset("train", train),
        subset("val", evaluation),
        subset("test", evaluation),
        manifest,
        fingerprint=fingerprint(manifest, contents),
        test_names=test_names,
    )
    _log_sizes(bundle, "memory")
    return bundle


def _log_sizes(bundle: DataBundle, where) -> None:
    """Log the sizes; an empty split is an error (a run would pick and score its model on nothing)."""
    log.info(
        f"data: {len(bundle.classes)} class{'es' if len(bundle.classes) != 1 else ''}, {len(bundle.train)} train / {len(bundle.val)} val / {len(bundle.test)} test images ({where})"
    )
    for split in SPLITS:
        if len(getattr(bundle, split)) == 0:
            raise UserError(
                f"data: the {split} split is empty ({len(bundle.train)} train / {len(bundle.val)} val / {len(bundle.test)} test "
                f"images); use more images per class, or a larger {split} fraction in data.split=[train,val,test]"
            )
