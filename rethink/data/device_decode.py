"""data.decode=device: training batches decoded on the training device, for data sets too large to keep there.

Loader workers only read each file's bytes (from its file or a pack's shard); the device decodes the batch's
JPEGs in one call (torchvision.io.decode_jpeg: nvJPEG on a GPU, libjpeg-turbo on the CPU), at full size with
the EXIF orientation applied, and crops and flips them there with data.on_gpu's batched crops
(device_augment.py). A file that is not a JPEG (PNG, WebP, CMYK JPEGs where the device cannot) is decoded in
the worker by the CPU path's own decoder (images.load_image), at full size, and joins the batch decoded.

Order and randomness are data.on_gpu's: the same SeededSampler as make_loader (the same images in each batch,
for any number of workers and processes, resumable mid-epoch) and each batch's boxes and flips drawn from a CPU
generator seeded by its first sample's seed. The crops have torchvision's distribution but are not the CPU
loader's draws, and they are cut from the image decoded at full size rather than at the DCT reduction the CPU
path decodes at: a different pipeline (validation and test keep the CPU path's preprocessing).
"""

import logging
import warnings
from typing import Iterator

import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from ..config import value
from .datasets import FileImages
from .device_augment import pack_into_store, random_resized_crop_flip, resize_centre_crop, to_device
from .images import load_image
from .loaders import make_loader

log = logging.getLogger("rethink")

JPEG_MAGIC = b"\xff\xd8\xff"


class EncodedImages(Dataset):
    """The items of `files` as (the file's bytes as a uint8 1-D tensor, or for a file that is not a JPEG its image
    decoded at full size, uint8 3xHxW; label; the sample's seed)."""

    def __init__(self, files: FileImages):
        self.files = files
        self.labels = files.labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        data = self.files.read_bytes(index)
        if data.startswith(JPEG_MAGIC):
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), self.files.labels[index], sample_seed
        return load_image(self.files.paths[index], data=data), self.files.labels[index], sample_seed


def collate_encoded(items: list) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """A batch as (its images, encoded or decoded, as a list; the labels; the seed of its first sample)."""
    return [item[0] for item in items], torch.tensor([item[1] for item in items]), items[0][2]


def decode_on(device: torch.device, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each of `images` decoded on `device` (uint8 3xHxW): the encoded JPEGs in one batched call, the rest moved."""
    encoded = [k for k, image in enumerate(images) if image.dim() == 1]
    decoded = [to_device(image, device) if image.dim() == 3 else None for image in images]
    if encoded:
        try:
            batch = _decode_jpegs([images[k] for k in encoded], device)
        except RuntimeError:  # a JPEG this device's decoder refuses (CMYK on some): the batch's JPEGs one by one
            batch = [_decode_one(images[k], device) for k in encoded]
        for k, image in zip(encoded, batch):
            decoded[k] = image
    return decoded


def _decode_jpegs(encoded, device: torch.device):
    # torchvision 0.29 deprecates its decoders for TorchCodec's (torchcodec>=0.16, which needs torch>=2.11); this
    # project admits torch>=2.3, so it keeps torchvision's while they are there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


def _decode_one(encoded: torch.Tensor, device: torch.device) -> torch.Tensor:
    try:
        return _decode_jpegs(encoded, device)
    except RuntimeError:
        return to_device(load_image("", data=encoded.numpy().tobytes()), device)


class DecodingLoader:
    """Training batches (uint8 [B, 3, size, size] and labels, on `device`) decoded and cropped on the device; see
    the module's docstring. Stands in for the train DataLoader as data.on_gpu's DeviceLoader does."""

    def __init__(self, dataset: FileImages, data_cfg, size: int, *, seed: int, device: torch.device, shard=(0, 1)):
        self.loader = make_loader(
            EncodedImages(dataset), data_cfg, train=True, seed=seed, shard=shard, collate_fn=collate_encoded
        )
        self.sampler, self.batch_size = self.loader.sampler, self.loader.batch_size
        self.size = size
        self.crop = value(data_cfg.augment) == "flip_crop"  # else data.augment=none: resize + centre crop
        self.device = device
        log.info(f"data.decode=device: training batches decoded and cropped on {device}; loader workers read bytes")

    def __len__(self) -> int:
        return len(self.loader)

    def resized(self, size: int) -> "DecodingLoader":
        """This loader making crops of `size` (a progressive-learning stage)."""
        self.size = size
        return self

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, seed in self.loader:
            store = pack_into_store(decode_on(self.device, images), self.device)
            index = torch.arange(len(images))
            yield self._images(store, index, seed), to_device(labels, self.device)

    def _images(self, store, index: torch.Tensor, seed: int) -> torch.Tensor:
        if self.crop:
            return random_resized_crop_flip(store, index, self.size, torch.Generator().manual_seed(seed))
        return resize_centre_crop(store, index, self.size)
