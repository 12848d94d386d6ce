"""data.on_gpu: the training images resident on the training device, each batch cropped and flipped there.

`DeviceLoader` stands in for the train DataLoader: it decodes the training split once (in loader workers,
in parallel, through the data set's own `image()`, so the decoded-image cache and its pixels are the same
as the CPU path's), keeps the images in a padded uint8 store on the device (device_augment.py), and yields
(uint8 images [B, 3, size, size], labels) on the device: RandomResizedCrop + horizontal flip
(data.augment=flip_crop) or resize + centre crop (none), batched, with no copy from the host per step.

Order and randomness: the same SeededSampler as make_loader (the same batches of the same images in the same
order per (seed, epoch), shards under DDP, resumable mid-epoch). Each batch's boxes and flips come from a CPU
generator seeded by the sampler's seed for the batch's first sample, so a batch depends on (seed, epoch, its
place in the epoch) alone: reproducible per seed, the same crops on any device, and a resumed epoch continues
exactly. The crops have torchvision's distribution, not its random numbers: this path and the CPU loader's
train on different draws. The boxes are drawn and sorted on the CPU and go over to the GPU (with the labels)
from pinned memory, so making a batch never waits for the GPU.
"""

import logging
from typing import Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..config import value
from .datasets import FileImages, SeededImages, TensorImages
from .device_augment import crop_resize_flip, pad_into_store, random_resized_crop_flip, store_bytes, to_device
from .images import shorter_side_size
from .loaders import SeededSampler, default_num_workers

log = logging.getLogger("rethink")


def stored_shapes(dataset: SeededImages) -> list[tuple[int, int]]:
    """(height, width) of each image as the data set decodes it, from the files' headers (nothing is decoded)."""
    if isinstance(dataset, TensorImages):
        return [tuple(dataset.images.shape[-2:])] * len(dataset)
    if isinstance(dataset, FileImages):
        return [_decoded_shape(dataset.root / path, dataset.stored_side) for path in dataset.paths]
    return [tuple(dataset.image(i).shape[-2:]) for i in range(len(dataset))]


def device_bytes(dataset: SeededImages) -> int:
    """The device memory the data set's images take in a DeviceLoader's store."""
    return store_bytes(stored_shapes(dataset))


def _decoded_shape(path, stored_side: int) -> tuple[int, int]:
    """load_image(path, stored_side)'s (height, width) as the header says (EXIF rotation included; a JPEG
    decoded at a reduced scale may come out a pixel off in its longer side)."""
    with Image.open(path) as image:
        width, height = image.size
        if (image.getexif().get(0x0112) or 1) in (5, 6, 7, 8):  # rotated by 90 degrees
            width, height = height, width
    width, height = shorter_side_size(width, height, stored_side)
    return height, width


class _Decoded(Dataset):
    def __init__(self, dataset: SeededImages):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset.image(index)


def decode_all(dataset: SeededImages, workers: int) -> list[torch.Tensor]:
    """Every image of `dataset` as it decodes it (uint8 3xHxW), in order, decoded by `workers` loader workers."""
    loader = DataLoader(_Decoded(dataset), batch_size=None, num_workers=workers, prefetch_factor=8 if workers else None)
    return [image.clone() for image in loader]  # a copy of its own: a worker's tensor holds a file descriptor


class DeviceLoader:
    """Training batches made on `device` from images resident there; see the module's docstring."""

    def __init__(self, dataset: SeededImages, data_cfg, size: int, *, seed: int, device: torch.device, shard=(0, 1)):
        self.dataset = dataset
        self.batch_size = data_cfg.batch_size
        self.size = size
        self.crop = value(data_cfg.augment) == "flip_crop"  # else data.augment=none: resize + centre crop
        self.device = device
        self.sampler = SeededSampler(range(len(dataset)), seed, shuffle=True, shard=shard)
        workers = default_num_workers() if data_cfg.num_workers is None else data_cfg.num_workers
        self.store, sizes = pad_into_store(decode_all(dataset, workers), device)
        self.sizes = sizes.cpu()  # the crops' bookkeeping stays on the CPU: nothing waits for the GPU
        self.labels = torch.as_tensor(dataset.labels, dtype=torch.long)
        log.info(f"data.on_gpu: {len(dataset)} training images on {device} ({self.store.numel() / 2**30:.2f} GiB)")

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
        if self.crop:  # boxes and flips from a CPU generator: the same crops whatever the device
            return random_resized_crop_flip(self.store, self.sizes, index, self.size, torch.Generator().manual_seed(seed))
        # torchvision's Resize(size) (the longer side int(size * long / short)) then CenterCrop(size), as the
        # square of the shorter side the crop covers in the stored image
        real = self.sizes[index]
        short = real.min(1, keepdim=True).values
        resized = torch.where(real == short, self.size, (self.size * real) // short)
        offset = torch.round(torch.round((resized - self.size) / 2) * short / self.size).long()
        boxes = torch.cat([offset, short, short], 1)
        return crop_resize_flip(self.store, index, self.sizes, boxes, torch.zeros(len(index), dtype=torch.bool), self.size)
