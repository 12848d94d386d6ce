"""data=synthetic: shapes and textures drawn in memory, so that anything can run without a download.

Each class is one pattern (a disc, a square, stripes, a checkerboard, ...) drawn at a random position,
size and small rotation, in a random colour on a contrasting, shaded, noisy background. Deterministic:
class k's images depend only on (data.split_seed, k, data.image_size, data.images_per_class).
"""

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


def generate_synthetic(num_classes: int, images_per_class: int, image_size: int, seed: int) -> tuple[torch.Tensor, list[int], list[str]]:
    """(uint8 images N x 3 x size x size, labels, class names), class by class."""
    if not 2 <= num_classes <= len(PATTERNS):
        raise UserError(f"data.num_classes={num_classes}: data=synthetic has 2 to {len(PATTERNS)} classes ({', '.join(PATTERNS)})")
    if images_per_class < 1:
        raise UserError(f"data.images_per_class={images_per_class}: must be at least 1")
    if image_size < 16:
        raise UserError(f"data.image_size={image_size}: must be at least 16 (pixels)")
    images = [_draw(k, images_per_class, image_size, np.random.default_rng([seed, k])) for k in range(num_classes)]
    labels = [k for k in range(num_classes) for _ in range(images_per_class)]
    return torch.from_numpy(np.concatenate(images)), labels, list(PATTERNS[:num_classes])


def _draw(pattern: int, n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """n images of one pattern, uint8 n x 3 x size x size."""
    column = lambda low, high: rng.uniform(low, high, (n, 1, 1)).astype(np.float32)  # noqa: E731
    centre_x, centre_y = column(0.3, 0.7) * size, column(0.3, 0.7) * size
    radius = column(0.2, 0.35) * size
    angle = np.deg2rad(column(-15, 15))
    period = column(0.12, 0.22) * size
    phase = column(0, 2 * np.pi)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    dx, dy = x - centre_x, y - centre_y
    u = dx * np.cos(angle) + dy * np.sin(angle)  # coordinates in the pattern's rotated frame
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    mask = _mask(PATTERNS[pattern], u / radius, v / radius, 2 * np.pi * u / period + phase, 2 * np.pi * v / period + phase)

    foreground = rng.uniform(0, 1, (n, 3, 1, 1)).astype(np.float32)
    background = (foreground + rng.uniform(0.35, 0.65, (n, 3, 1, 1))) % 1.0  # every channel contrasts
    shading = 1 + 0.25 * (column(-1, 1) * x + column(-1, 1) * y) / size  # a lit-from-one-side gradient
    image = background * shading[:, None] * (1 - mask[:, None]) + foreground * mask[:, None]
    image += 0.05 * rng.standard_normal(image.shape, dtype=np.float32)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _mask(pattern: str, u: np.ndarray, v: np.ndarray, wave_u: np.ndarray, wave_v: np.ndarray) -> np.ndarray:
    """Where the pattern is (1.0) in the rotated frame: u, v in units of the radius; waves for textures."""
    r = np.sqrt(u * u + v * v)
    masks = {
        "circle": lambda: r < 1,
        "square": lambda: np.maximum(abs(u), abs(v)) < 0.85,
        "triangle": lambda: (v < 0.5) & (np.sqrt(3) * abs(u) - v < 1),
        "stripes": lambda: np.sin(wave_v) > 0,
        "checkerboard": lambda: np.sin(wave_u) * np.sin(wave_v) > 0,
        "ring": lambda: (r < 1) & (r > 0.6),
        "cross": lambda: ((abs(u) < 0.3) & (abs(v) < 1)) | ((abs(v) < 0.3) & (abs(u) < 1)),
        "dots": lambda: np.cos(wave_u) * np.cos(wave_v) > 0.5,
        "diamond": lambda: abs(u) + abs(v) < 1.1,
        "vertical_stripes": lambda: np.sin(wave_u) > 0,
        "grid": lambda: (np.cos(wave_u) > 0.8) | (np.cos(wave_v) > 0.8),
        "ellipse": lambda: (u / 1.2) ** 2 + (v / 0.5) ** 2 < 1,
    }
    return masks[pattern]().astype(np.float32)
