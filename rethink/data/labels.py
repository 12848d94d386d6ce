"""Labels of a flat split folder: ImageNet's val/ as it comes, 50,000 JPEGs in one folder, labelled by a file.

    meta.bin                                   torchvision's: torch.save((wnid_to_classes, val_wnids)), the wnids
                                               in the order of the sorted file names
    LOC_val_solution.csv                       Kaggle's: ImageId,PredictionString (its first word the wnid)
    ILSVRC2012_validation_ground_truth.txt     the devkit's: a 1-based ILSVRC2012_ID per line, in the order of the
      + meta.mat                               sorted file names; meta.mat's synsets map each ID to its wnid

Each is looked for in data.root and the three folders above it (Kaggle's csv lies above ILSVRC/Data/CLS-LOC),
and in their ILSVRC2012_devkit_t12/data/.
"""

import csv
from pathlib import Path
from typing import Callable

from ..errors import UserError

TORCHVISION, KAGGLE, DEVKIT, DEVKIT_META = (
    "meta.bin",
    "LOC_val_solution.csv",
    "ILSVRC2012_validation_ground_truth.txt",
    "meta.mat",
)
DEVKIT_FOLDER = "ILSVRC2012_devkit_t12/data"


def flat_folder_labels(root: Path, folder: str, files: list[str]) -> dict[str, str]:
    """The class (wnid) of each of `files` (sorted names in root/folder), from the first label file found."""
    places = [root, *list(root.resolve().parents)[:3]]
    places += [place / DEVKIT_FOLDER for place in places]
    readers: dict[str, Callable[[Path, list[str]], list[str]]] = {
        TORCHVISION: _torchvision_labels,
        KAGGLE: _kaggle_labels,
        DEVKIT: _devkit_labels,
    }
    for name, read in readers.items():
        for place in places:
            if (place / name).is_file():
                wnids = read(place / name, files)
                if len(wnids) != len(files):
                    raise UserError(
                        f"{place / name}: labels {len(wnids)} images, {root / folder} holds {len(files)}; is it this folder's label file?"
                    )
                return dict(zip(files, wnids))
    raise UserError(
        f"data.root={root}: {folder}/ holds images but no class folders; label them with {TORCHVISION}, {KAGGLE} or "
        f"{DEVKIT} (+ {DEVKIT_META}), looked for in {', '.join(str(p) for p in places)}; or sort them into class folders"
    )


def _torchvision_labels(path: Path, files: list[str]) -> list[str]:
    import torch

    try:
        _, wnids = torch.load(path, weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not torchvision's ImageNet meta.bin ({e})") from None
    return [str(w) for w in wnids]


def _kaggle_labels(path: Path, files: list[str]) -> list[str]:
    with open(path, newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is None or "ImageId" not in rows.fieldnames or "PredictionString" not in rows.fieldnames:
            raise UserError(f"{path}: want the columns ImageId,PredictionString (Kaggle's LOC_val_solution.csv)")
        wnid_of = {row["ImageId"]: row["PredictionString"].split()[0] for row in rows if row["PredictionString"]}
    missing = next((f for f in files if Path(f).stem not in wnid_of), None)
    if missing is not None:
        raise UserError(f"{path}: has no label for {missing}; is it this folder's label file?")
    return [wnid_of[Path(f).stem] for f in files]


def _devkit_labels(path: Path, files: list[str]) -> list[str]:
    meta = path.parent / DEVKIT_META
    if not meta.is_file():
        raise UserError(f"{path}: numbers the classes by the devkit's {DEVKIT_META}; put it beside it ({meta})")
    from scipy.io import loadmat

    synsets = loadmat(meta, squeeze_me=True)["synsets"]
    wnid_of = {int(k): str(w) for k, w in zip(synsets["ILSVRC2012_ID"], synsets["WNID"])}
    try:
        return [wnid_of[int(line)] for line in path.read_text().split()]
    except (KeyError, ValueError) as e:
        raise UserError(f"{path}: {e} is not an ILSVRC2012_ID of {meta}") from None
