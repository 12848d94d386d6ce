"""data.on_gpu: the training images resident on the training device, each batch cropped and flipped there.

`DeviceLoader` stands in for the train DataLoader: it decodes the training split once (in loader workers,
in parallel, through the data set's own `image()`, so the decoded-image cache and its pixels are the same
as the CPU path's), copying each image into a packed uint8 store on the device as it arrives (the host holds
only the images in flight), and yields (uint8 images [B, 3, size, size], labels) on the device:
RandomResizedCrop + horizontal flip (data.augment=flip_crop) or torchvision's Resize + CenterCrop (none),
batched, with no copy from the host per step.

Order and randomness: the same SeededSampler as make_loader (the same batches of the same images in the same
order per (seed, epoch), resumable mid-epoch). Each batch's boxes and flips come from a CPU generator seeded
by the sampler's seed for the batch's first sample, so a batch depends on (seed, epoch, its place in the
epoch) alone: reproducible per seed, the same crops on any device, and a resumed epoch continues exactly. The
crops have torchvision's distribution, not its random numbers: this path and the CPU loader's train on
different draws. The boxes are drawn and sorted on the CPU and go over to the GPU (with the labels) from
pinned memory, so making a batch never waits for the GPU.

Under DDP each process stores only its own share of the training images, every world_size-th image from its
rank on (a fixed share: the split is sorted by class, so each share holds every class), and shuffles that
share each epoch, len(split) // world_size images an epoch as the CPU loader's shards have: every process
steps equally often, and an epoch still trains on each image once, but the global batch draws from the
processes' shares instead of one shuffle of the whole split.
"""

import logging
import time
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..config import value
from .datasets import FileImages, SeededImages, TensorImages
from .device_augment import fill_store, random_resized_crop_flip, resize_centre_crop, store_bytes, to_device
from .images import header_size, shorter_side_size
from .loaders import SeededSampler, default_num_workers

log = logging.getLogger("rethink")


def share(size: int, shard: tuple[int, int] = (0, 1)) -> list[int]:
    """The images a process of a DDP run stores: every world_size-th from its rank on."""
    rank, world_size = shard
    return list(range(rank, size, world_size))


def stored_shapes(dataset: SeededImages, indices: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """(height, width) of each image (of `indices`, default all) as the data set decodes it: from the sizes
    the scan recorded, else from the files' headers (nothing is decoded)."""
    indices = range(len(dataset)) if indices is None else indices
    if isinstance(dataset, TensorImages):
        return [tuple(dataset.images.shape[-2:])] * len(indices)
    if isinstance(dataset, FileImages) and dataset.sizes is not None:
        sizes = dataset.sizes[np.asarray(indices, dtype=np.int64)].tolist()
        return [tuple(reversed(shorter_side_size(w, h, dataset.stored_side))) for w, h in sizes]
    if isinstance(dataset, FileImages):
        return [_decoded_shape(dataset.root / dataset.paths[i], dataset.stored_side) for i in indices]
    return [tuple(dataset.image(i).shape[-2:]) for i in indices]


def device_bytes(dataset: SeededImages, shard: tuple[int, int] = (0, 1)) -> int:
    """The device memory the data set's images take in a DeviceLoader's store (a DDP process's: its share)."""
    return store_bytes(stored_shapes(dataset, share(len(dataset), shard)))


def _decoded_shape(path, stored_side: int) -> tuple[int, int]:
    """load_image(path, stored_side)'s (height, width) as the header says (EXIF rotation included; a JPEG
    decoded at a reduced scale may come out a pixel off in its longer side)."""
    width, height = shorter_side_size(*header_size(path), stored_side)
    return height, width


class _Decoded(Dataset):
    def __init__(self, dataset: SeededImages, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> torch.Tensor:
        return self.dataset.image(self.indices[k])


def decoded(dataset: SeededImages, workers: int, indices: Sequence[int] | None = None) -> Iterator[torch.Tensor]:
    """The images of `dataset` (of `indices`, default all) as it decodes them (uint8 3xHxW), in order, one at a
    time, decoded by `workers` loader workers in parallel."""
    indices = range(len(dataset)) if indices is None else indices
    yield from DataLoader(
        _Decoded(dataset, indices), batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None
    )


class DeviceLoader:
    """Training batches made on `device` from images resident there; see the module's docstring."""

    def __init__(self, dataset: SeededImages, data_cfg, size: int, *, seed: int, device: torch.device, shard=(0, 1)):
        self.dataset = dataset
        self.batch_size = data_cfg.batch_size
        self.size = size
        self.crop = value(data_cfg.augment) == "flip_crop"  # else data.augment=none: resize + centre crop
        self.device = device
        owned = share(len(dataset), shard)[: len(dataset) // shard[1]]  # as many for every process
        # the store's k-th image is the data set's owned[k]; each process shuffles its own share with its own seed
        rank_seed = seed if shard[1] == 1 else int(np.random.SeedSequence([seed, shard[0]]).generate_state(1)[0])
        self.sampler = SeededSampler(range(len(owned)), rank_seed, shuffle=True)
        workers = default_num_workers() if data_cfg.num_workers is None else data_cfg.num_workers
        started = time.perf_counter()
        self.store = fill_store(decoded(dataset, workers, owned), stored_shapes(dataset, owned), device)
        self.decode_s = time.perf_counter() - started
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long)[owned]
        log.info(
            f"data.on_gpu: {len(owned)} training images on {device} ({self.store.pixels.numel() / 2**30:.2f} GiB), "
            f"decoded and stored in {self.decode_s:.1f} s"
        )

    def __len__(self) -> int:
        """Whole batches (the last incomplete one dropped, as the train DataLoader does)."""
        return len(self.sampler) // self.batch_size if len(self.sampler) >= self.batch_size else 1

    def resized(self, size: int) -> "DeviceLoader":
        """This loader making crops of `size` (a progressive-learning stage); the store stays."""
        self.size = size
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pairs = list(self.sampler)
        order = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self._images(index, pairs[start][1]), to_device(self.labels[index], self.device)

    def _images(self, index: torch.Tensor, seed: int) -> torch.Tensor:
        """The batch of the store's images `index`."""
        if self.crop:  # boxes and flips from a CPU generator: the same crops whatever the device
            return random_resized_crop_flip(self.store, index, self.size, torch.Generator().manual_seed(seed))
        return resize_centre_crop(self.store, index, self.size)
