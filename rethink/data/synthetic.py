"""data=synthetic: shapes and textures drawn in memory, so that anything can run without a download.

Each class is one pattern (a disc, a square, stripes, a checkerboard, ...) drawn at a random position,
size and small rotation, in a random colour on a contrasting, shaded, noisy background. Deterministic:
class k's images depend only on (data.split_seed, k, data.image_size, data.images_per_class).

Vectorised over a few images at a time (so the work stays in the CPU's caches), in float32. The sensor
noise, per pixel and channel, is uniform with a standard deviation of 0.05 of the full range (+-22 uint8
levels), one random byte each: many times cheaper to draw than normal deviates. The images of earlier
versions (composed in float64, Gaussian noise from numpy's normal draws) had the same shapes, positions,
colours and shading for a seed, and other noise pixels; they took several times as long to draw.
"""

from typing import Callable

import numpy as np
import torch

from ..errors import UserError

# Ordered so that the default four classes mix two textures with two shapes that differ only in outline.
PATTERNS = (
    "circle",
    "stripes",
    "square",
    "checkerboard",
    "triangle",
    "ring",
    "cross",
    "dots",
    "vertical_stripes",
    "diamond",
    "grid",
    "ellipse",
)
TEXTURES = ("stripes", "checkerboard", "dots", "vertical_stripes", "grid")

NOISE_STD = 0.05  # of the full range
_NOISE_SCALE = NOISE_STD * 255 / np.sqrt((256**2 - 1) / 12)  # uint8 levels per step of a uniform random byte
_CHUNK_PIXELS = 1 << 16  # pixels per image plane composed in one pass: the work stays in the CPU's caches


def generate_synthetic(num_classes: int, images_per_class: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """(uint8 images N x 3 x size x size, labels, class names), class by class."""
    if not 2 <= num_classes <= len(PATTERNS):
        raise UserError(f"data.num_classes={num_classes}: data=synthetic has 2 to {len(PATTERNS)} classes ({', '.join(PATTERNS)})")
    if images_per_class < 1:
        raise UserError(f"data.images_per_class={images_per_class}: must be at least 1")
    if image_size < 16:
        raise UserError(f"data.image_size={image_size}: must be at least 16 (pixels)")
    images = np.empty((num_classes * images_per_class, 3, image_size, image_size), np.uint8)
    for k in range(num_classes):
        _draw(k, images[k * images_per_class : (k + 1) * images_per_class], np.random.default_rng([seed, k]))
    labels = [k for k in range(num_classes) for _ in range(images_per_class)]
    return torch.from_numpy(images), labels, list(PATTERNS[:num_classes])


def _draw(pattern: int, out: np.ndarray, rng: np.random.Generator) -> None:
    """Fill `out` (uint8 n x 3 x size x size) with images of one pattern, a chunk of images at a time.
    Every plane below is affine in the pixel coordinates (x, y), so each is one broadcast sum of a row
    and a column: a * x + b * y + c with per-image a, b, c."""
    n, size = out.shape[0], out.shape[-1]
    column = lambda low, high: rng.uniform(low, high, n).astype(np.float32)  # noqa: E731
    centre_x, centre_y = column(0.3, 0.7) * size, column(0.3, 0.7) * size
    radius = column(0.2, 0.35) * size
    angle = np.deg2rad(column(-15, 15))
    period = column(0.12, 0.22) * size
    phase = column(0, 2 * np.pi)
    foreground = rng.uniform(0, 1, (n, 3))
    background = (foreground + rng.uniform(0.35, 0.65, (n, 3))) % 1.0  # every channel contrasts
    foreground, background = (foreground * 255).astype(np.float32), (background * 255).astype(np.float32)  # uint8 levels
    slope_x, slope_y = column(-1, 1), column(-1, 1)

    cos, sin = np.cos(angle), np.sin(angle)
    u = (cos, sin, -(cos * centre_x + sin * centre_y))  # the pattern's rotated frame, centred on it
    v = (-sin, cos, sin * centre_x - cos * centre_y)
    scaled = lambda plane, s, offset=0: (plane[0] * s, plane[1] * s, plane[2] * s + offset)  # noqa: E731
    planes = {
        "u": scaled(u, 1 / radius),  # in units of the radius
        "v": scaled(v, 1 / radius),
        "wave_u": scaled(u, 2 * np.pi / period, phase),  # for textures
        "wave_v": scaled(v, 2 * np.pi / period, phase),
    }
    # The background in uint8 levels: its colour times a lit-from-one-side gradient, per channel; plus
    # the noise's offset (centring it, and the 0.5 that makes the truncating cast to uint8 round).
    offset = 0.5 - 127.5 * _NOISE_SCALE
    shading = (0.25 * slope_x / size, 0.25 * slope_y / size)
    lit = (background * shading[0][:, None], background * shading[1][:, None], background + offset)  # (n, 3) each
    foreground += offset
    coords = np.arange(size, dtype=np.float32)
    step = max(1, _CHUNK_PIXELS // (size * size))
    image = np.empty((min(n, step), 3, size, size), np.float32)  # reused by every chunk: fresh memory for
    work = np.empty_like(image)  # each array would cost more in page faults than the arithmetic
    for start in range(0, n, step):
        i = slice(start, min(n, start + step))
        img, tmp = image[: i.stop - start], work[: i.stop - start]

        def plane(name: str) -> np.ndarray:
            a, b, c = (p[i, None, None] for p in planes[name])
            return (a * coords + c) + b * coords[:, None]

        mask = _mask(PATTERNS[pattern], plane).astype(np.float32)[:, None]
        a, b, c = (p[i, :, None, None] for p in lit)
        np.add(a * coords + c, b * coords[:, None], out=img)
        np.subtract(foreground[i, :, None, None], img, out=tmp)  # the pattern, unshaded
        img += np.multiply(tmp, mask, out=tmp)
        random_bytes = rng.bit_generator.random_raw(-(-img.size // 8)).astype("<u8", copy=False).view(np.uint8)
        img += np.multiply(random_bytes[: img.size].reshape(img.shape), np.float32(_NOISE_SCALE), out=tmp)
        np.clip(img, 0, 255, out=out[i], casting="unsafe")  # truncates to uint8: the offset made it round


def _mask(pattern: str, plane: Callable[[str], np.ndarray]) -> np.ndarray:
    """Where the pattern is (True). `plane(name)` gives what it is drawn from: `u`, `v` (the pattern's
    rotated frame, in units of its radius) for shapes, `wave_u`, `wave_v` (phases) for textures."""
    if pattern in TEXTURES:
        wave_u, wave_v = plane("wave_u"), plane("wave_v")
        return {
            "stripes": lambda: np.sin(wave_v) > 0,
            "checkerboard": lambda: np.sin(wave_u) * np.sin(wave_v) > 0,
            "dots": lambda: np.cos(wave_u) * np.cos(wave_v) > 0.5,
            "vertical_stripes": lambda: np.sin(wave_u) > 0,
            "grid": lambda: (np.cos(wave_u) > 0.8) | (np.cos(wave_v) > 0.8),
        }[pattern]()
    u, v = plane("u"), plane("v")
    r = lambda: np.sqrt(u * u + v * v)  # noqa: E731
    return {
        "circle": lambda: r() < 1,
        "square": lambda: np.maximum(abs(u), abs(v)) < 0.85,
        "triangle": lambda: (v < 0.5) & (np.sqrt(3) * abs(u) - v < 1),
        "ring": lambda: (0.6 < r()) & (r() < 1),
        "cross": lambda: ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1)),
        "diamond": lambda: abs(u) + abs(v) < 1.1,
        "ellipse": lambda: (u / 1.2) ** 2 + (v / 0.5) ** 2 < 1,
    }[pattern]()
