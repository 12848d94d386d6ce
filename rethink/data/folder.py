"""Class-per-folder image trees, split or not.

    root/daisy/*.jpg, root/roses/*.jpg, ...                 one folder per class (split by data.split)
    root/train/daisy/*.jpg, root/val/..., root/test/...    already split: used as it is
                                                           (valid/ or validation/ for val/; a missing
                                                           val/ or test/ is carved from train/)
    root/train/n01440764/*.JPEG, root/val/*.JPEG           ImageNet's layout: a split folder without class
                                                           folders is labelled by a label file (labels.py)
Class names are the folder names, sorted. Files whose extension is not an image's are ignored.
"""

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .images import IMAGE_EXTENSIONS, is_image_file
from .labels import DEVKIT_FOLDER, flat_folder_labels

SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
# data=imagenet: val/ is the split the papers report, so it is the test split (val is carved from train/);
# test/ (ImageNet's, without public labels) is left out
IMAGENET_SPLIT_FOLDERS = {"train": "train", "val": "test", "test": None}


@dataclass(frozen=True)
class Listing:
    """The image files of a data set, before the scan. Paths are relative to `root`."""

    root: Path
    classes: list[str]
    paths: list[str]
    labels: list[int]
    splits: list[str | None]  # the split a file came in; None when the data set is not split


def list_folder(root: Path, split_folders_mean: dict[str, str | None] = SPLIT_FOLDERS) -> Listing:
    """`split_folders_mean`: the split each split folder's name gives its images (None: left out)."""
    if not root.is_dir():
        raise UserError(f"data.root={root}: no such folder")
    folders = _subfolders(root)
    split_folders = [f for f in folders if f.lower() in split_folders_mean]
    if not split_folders:
        return _list_classes(root, "", split=None)
    others = [f for f in folders if f not in split_folders and f != DEVKIT_FOLDER.split("/")[0]]
    split_folders = [f for f in split_folders if split_folders_mean[f.lower()] is not None]
    splits = [split_folders_mean[f.lower()] for f in split_folders]
    if "train" not in splits or others:
        raise UserError(
            f"data.root={root}: holds {', '.join(f + '/' for f in folders)}; give either one folder per class, "
            "or train/ (required), val/ and test/ folders that each hold one folder per class"
        )
    duplicate = next((s for s in splits if splits.count(s) > 1), None)
    if duplicate:
        raise UserError(
            f"data.root={root}: more than one folder means {duplicate} ({', '.join(f for f, s in zip(split_folders, splits) if s == duplicate)})"
        )
    train = _list_classes(root, split_folders[splits.index("train")], split="train")
    parts = [train] + [
        _list_classes(root, folder, split=split, known=train.classes)
        for folder, split in zip(split_folders, splits)
        if split != "train"
    ]
    return Listing(
        root,
        train.classes,
        paths=[p for part in parts for p in part.paths],
        labels=[label for part in parts for label in part.labels],
        splits=[s for part in parts for s in part.splits],
    )


def _list_classes(root: Path, folder: str, split: str | None, known: list[str] | None = None) -> Listing:
    """The class folders in root/folder and their images; `known` fixes the classes (those of train/)."""
    where = root / folder
    prefix = f"{folder}/" if folder else ""
    found_classes = _subfolders(where)
    if not found_classes and known is not None:
        return _list_flat(root, folder, split, known)
    if not found_classes:
        raise UserError(
            f"data.root={root}: {where} holds no class folders; put the images of each class in a folder named for it"
        )
    classes = known or found_classes
    index = {name: i for i, name in enumerate(classes)}
    strangers = [c for c in found_classes if c not in index]
    if strangers:
        raise UserError(
            f"data.root={root}: {prefix}{strangers[0]}/ is a class that train/ does not have; every class needs training images"
        )
    paths, labels = [], []
    for name in found_classes:
        images = _image_files(where / name)
        paths += [f"{prefix}{name}/{rel}" for rel in images]
        labels += [index[name]] * len(images)
    if not paths:
        raise UserError(f"data.root={root}: no images in {where} (looked for {' '.join(IMAGE_EXTENSIONS)})")
    return Listing(root, list(classes), paths, labels, [split] * len(paths))


def _list_flat(root: Path, folder: str, split: str | None, classes: list[str]) -> Listing:
    """A split folder of images without class folders (ImageNet's val/), labelled by its label file."""
    files = [name for name in _image_files(root / folder) if "/" not in name]
    if not files:
        raise UserError(
            f"data.root={root}: {root / folder} holds no class folders; put the images of each class in a folder named for it"
        )
    index = {name: i for i, name in enumerate(classes)}
    class_of = flat_folder_labels(root, folder, files)
    stranger = next((c for c in class_of.values() if c not in index), None)
    if stranger is not None:
        raise UserError(
            f"data.root={root}: {folder}/'s label file names class {stranger}, which train/ does not have; every class needs training images"
        )
    return Listing(
        root, list(classes), [f"{folder}/{f}" for f in files], [index[class_of[f]] for f in files], [split] * len(files)
    )


def _subfolders(folder: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def _image_files(folder: Path) -> list[str]:
    """Image files anywhere under `folder`, relative to it, sorted; hidden files and folders skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(folder).as_posix()
        found += [
            name if rel == "." else f"{rel}/{name}"
            for name in filenames
            if is_image_file(name) and not name.startswith(".")
        ]
    return sorted(found)
