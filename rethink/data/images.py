"""Decode any image file into RGB uint8, whatever its mode: CMYK, greyscale, palette, alpha, 16-bit.

Transparent pixels are composited onto white; 16-bit samples are scaled to 8 bits (65535 -> 255), not
clipped; the EXIF orientation is applied, so a photo stands the way its camera showed it.
"""

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import PIL
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import UserError

# What decodes a file, as the image cache's entries record it (data/cache.py): this module's decode (raise
# DECODE_VERSION when it changes what load_image returns) and Pillow (its libjpeg may round differently).
DECODE_VERSION = 1
DECODER = f"decode{DECODE_VERSION}-pillow{PIL.__version__}"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def is_image_file(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def open_rgb(source: str | Path | BinaryIO, shorter_side: int | None = None) -> Image.Image:
    """Fully decode `source` into an RGB PIL image. With `shorter_side`, a JPEG is decoded at the
    strongest DCT reduction (1/2, 1/4, 1/8) that keeps its shorter side at least that long: much
    faster; the scan (`shorter_side=1`) and the image cache use it. Raises whatever PIL raises."""
    return _decode(Image.open(source), shorter_side)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened, not yet decoded image as it stands once decoded: its header's size,
    swapped when its EXIF orientation turns it by 90 degrees (nothing is decoded)."""
    width, height = image.size
    if (image.getexif().get(0x0112) or 1) in (5, 6, 7, 8):
        return height, width
    return width, height


def _decode(image: Image.Image, shorter_side: int | None) -> Image.Image:
    if shorter_side is not None and image.format == "JPEG":
        image.draft("RGB", (shorter_side, shorter_side))
    image.load()
    image = ImageOps.exif_transpose(image)
    return to_rgb(image)


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        values = np.asarray(image).astype(np.int64)
        if mode != "I" or values.max(initial=0) > 255:  # mode I holds 16-bit data, unless it all fits in 8 bits
            values = (values * 255 + 32767) // 65535
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8)).convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float32)
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0  # float images are 0..1 or 0..255
        return Image.fromarray(np.clip(values * scale + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, P without transparency


def shorter_side_size(width: int, height: int, shorter_side: int) -> tuple[int, int]:
    """(width, height) downscaled so the shorter side is `shorter_side`; never upscaled."""
    if min(width, height) <= shorter_side:
        return width, height
    scale = shorter_side / min(width, height)
    return max(shorter_side, round(width * scale)), max(shorter_side, round(height * scale))


def header_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the image file as load_image shows it (EXIF rotation included), from its header:
    nothing is decoded."""
    with Image.open(path) as image:
        return upright_size(image)


def resize_shorter_side(image: Image.Image, shorter_side: int) -> Image.Image:
    """Downscale so the shorter side is `shorter_side`; never upscale."""
    size = shorter_side_size(*image.size, shorter_side)
    return image if size == image.size else image.resize(size, Image.BILINEAR, reducing_gap=None)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor 3xHxW (a channels-last view: torchvision's uint8 resize is fastest on it)."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def load_image(path: str | Path, shorter_side: int | None = None, data: bytes | None = None) -> torch.Tensor:
    """Any image file -> uint8 RGB tensor 3xHxW (downscaled to `shorter_side` when given); `data`: the file's
    bytes when they were read already (from a pack): the same pixels. An unreadable file is a UserError that
    names it."""
    try:
        image = open_rgb(path if data is None else io.BytesIO(data), shorter_side)
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
        raise UserError(f"{path}: not a readable image ({describe_error(e)})") from None
    if shorter_side is not None:
        image = resize_shorter_side(image, shorter_side)
    return to_tensor(image)


def decode_error(data: bytes) -> str | None:
    """None when `data` decodes fully into an RGB image, else why not (one short phrase)."""
    return inspect_image(data)[1]


def inspect_image(data: bytes) -> tuple[tuple[int, int] | None, str | None]:
    """(the image's upright (width, height) at full size, why it does not decode fully into an RGB image): one
    of them None. JPEGs are decoded at 1/8 scale, which still reads every byte of the file."""
    if not data:
        return None, "empty file"
    try:
        with Image.open(io.BytesIO(data)) as image:
            size = upright_size(image)
            _decode(image, shorter_side=1)
    except Exception as e:
        return None, describe_error(e)
    return size, None


def describe_error(error: BaseException) -> str:
    if isinstance(error, UnidentifiedImageError):
        return "not an image format Pillow can read"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:120]
