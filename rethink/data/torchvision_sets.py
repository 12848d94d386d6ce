"""data=flowers102, cifar10, cifar100 through torchvision.datasets (downloaded into data.root on first
use, unless RETHINK_NO_DOWNLOAD=1). Flowers102 keeps its own train/val/test; CIFAR's val is carved
from its train set (stratified, data.split_seed, fraction data.split[1])."""

from pathlib import Path

import torch
from torchvision import datasets

from ..environment import downloads_allowed
from ..errors import UserError
from .folder import Listing

FOLDERS = {"flowers102": "flowers-102", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}


def flowers102_listing(root: Path) -> Listing:
    """Flowers102's files with its labels and splits, for the file pipeline (scan, cache, manifest)."""
    try:
        import scipy.io  # noqa: F401  (torchvision reads the label files with it)
    except ImportError:
        raise UserError("data=flowers102 needs scipy to read its label files: pip install scipy") from None
    paths, labels, splits = [], [], []
    base = root / FOLDERS["flowers102"]
    for split in ("train", "val", "test"):
        # loader=str: items come back as (path, label) without decoding anything
        dataset = _open("flowers102", datasets.Flowers102, root, split=split, loader=str)
        for path, label in dataset:
            paths.append(Path(path).relative_to(base).as_posix())
            labels.append(int(label))
            splits.append(split)
    return Listing(base, list(datasets.Flowers102.classes), paths, labels, splits)


def cifar_tensors(name: str, root: Path) -> tuple[list[str], dict[str, tuple[torch.Tensor, list[int]]]]:
    """CIFAR's class names, and its train and test sets as (uint8 N x 3 x 32 x 32, labels)."""
    parts = {}
    for split in ("train", "test"):
        dataset = _open(name, CIFAR[name], root, train=split == "train")
        images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        parts[split] = (images, [int(t) for t in dataset.targets])
    return list(dataset.classes), parts


def _open(name: str, dataset_class, root: Path, **kwargs):
    where = f"set data.root to the folder that holds {FOLDERS[name]}/ (torchvision's layout)"
    allowed = downloads_allowed()
    try:
        return dataset_class(str(root), download=allowed, **kwargs)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        why = "downloads are off: RETHINK_NO_DOWNLOAD=1" if not allowed else f"torchvision: {str(e).splitlines()[0]}"
        raise UserError(f"data={name}: not found in {root} ({why}); {where}") from None
    except OSError as e:  # includes urllib's URLError
        raise UserError(
            f"data={name}: cannot download it into {root} ({getattr(e, 'reason', None) or e}); {where}"
        ) from None
