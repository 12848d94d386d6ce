"""Datasets of uint8 images: files or a pack's shards (decoded once into the image cache), and tensors held in memory.

An item can be asked for by index, or by (index, sample_seed) as `SeededSampler` yields them: then
the random transform runs with torch's CPU generator seeded by sample_seed, so a sample's
augmentation depends on the sampler's (seed, epoch) alone, not on which worker made it or how many
workers there are, and a run resumed at epoch k sees what an uninterrupted run saw.
"""

from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import UserError
from .cache import ImageCache
from .images import load_image
from .packed import ShardLocations

Transform = Callable[[torch.Tensor], torch.Tensor]


class SeededImages(Dataset):
    def __init__(self, labels: Sequence[int], transform: Transform):
        self.labels = [int(label) for label in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        image = self.image(index)
        if sample_seed is None:
            return self.transform(image), self.labels[index]
        return with_seed(self.transform, image, sample_seed), self.labels[index]


def with_seed(transform: Transform, image: torch.Tensor, seed: int) -> torch.Tensor:
    """transform(image) with the CPU generator seeded by `seed`; the generator's state is put back
    after, so a loader without workers leaves the training loop's random stream alone. (Only the CPU
    generator: torch.manual_seed would reseed CUDA's too.)"""
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)


class Strings(Sequence[str]):
    """A list of strings kept as one numpy array of utf-8 bytes. A loader worker forked from the main process
    shares its pages: reading a Python list's items there writes their reference counts and so copies the pages
    (a million paths and hashes: hundreds of MB per worker)."""

    def __init__(self, items: Sequence[str]):
        self.items = np.array([item.encode() for item in items], dtype=bytes)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> str:
        return self.items[index].decode()

    def __eq__(self, other) -> bool:
        return isinstance(other, Sequence) and list(self) == list(other)

    def __add__(self, other: Sequence[str]) -> list[str]:
        return list(self) + list(other)


class FileImages(SeededImages):
    """Image files under `root`, each decoded with its shorter side at most `stored_side`. With a cache
    (which needs each file's content hash, `digests`) a file is decoded once and then read back as
    raw uint8: the same pixels, faster. `sizes`: each file's upright (width, height) at full size, as the scan
    recorded it (one small array, not an object per file)."""

    def __init__(
        self,
        root: Path,
        paths: Sequence[str],
        labels: Sequence[int],
        transform: Transform,
        stored_side: int,
        cache: ImageCache | None = None,
        digests: Sequence[str] | None = None,
        sizes: Sequence[tuple[int, int]] | None = None,
    ):
        super().__init__(labels, transform)
        self.root = Path(root)
        self.paths = Strings(paths)
        self.stored_side = stored_side
        self.cache = cache
        self.digests = Strings(digests) if digests is not None else None
        self.sizes = np.asarray(sizes, dtype=np.int64).reshape(-1, 2) if sizes is not None else None

    def image(self, index: int) -> torch.Tensor:
        def decode() -> torch.Tensor:
            return self.decode(index)

        return self.cache.get(self.digests[index], self.stored_side, decode) if self.cache else decode()

    def decode(self, index: int) -> torch.Tensor:
        return load_image(self.root / self.paths[index], self.stored_side)

    def read_bytes(self, index: int) -> bytes:
        """The file's bytes as they are (data.decode=device decodes them)."""
        path = self.root / self.paths[index]
        try:
            return path.read_bytes()
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e.strerror or e})") from None


class PackedImages(FileImages):
    """The same images as FileImages, their bytes read from a pack's shards (data/packed.py) instead of files:
    the same pixels. `paths` are the files' names in the pack."""

    def __init__(self, locations: ShardLocations, paths: Sequence[str], *args, **kwargs):
        super().__init__(locations.folder, paths, *args, **kwargs)
        self.locations = locations

    def decode(self, index: int) -> torch.Tensor:
        return load_image(self.paths[index], self.stored_side, data=self.locations.read(index))

    def read_bytes(self, index: int) -> bytes:
        return self.locations.read(index)


class TensorImages(SeededImages):
    """Images already in memory as one uint8 N x 3 x H x W tensor (synthetic, CIFAR)."""

    def __init__(self, images: torch.Tensor, labels: Sequence[int], transform: Transform):
        super().__init__(labels, transform)
        self.images = images

    def image(self, index: int) -> torch.Tensor:
        return self.images[index]
