"""Batched RandomResizedCrop + horizontal flip on tensors that stay on one device (CPU or GPU).

The same augmentation as `train_transform` with data.augment=flip_crop (torchvision's
RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), antialias=True) followed by
RandomHorizontalFlip(0.5)), but for a whole batch at once on decoded images resident on the device,
instead of per image in CPU loader workers. Pure functions: no module state, no global RNG.

Store format
    store  uint8 [N, 3, H_max, W_max]: image k in store[k, :, :h_k, :w_k], padded at the bottom and
           right (the padding's value does not matter: it is never read);
    sizes  int64 [N, 2]: each image's real (height, width) = (h_k, w_k).
    `pad_into_store` builds both from a list of uint8 3xHxW tensors, and `store_bytes` says how much
    memory that takes (to decide whether a data set fits on the GPU).

Boxes are int64 [B, 4] = (top, left, height, width) in image pixels, always inside the real size.

    boxes = sample_crop_boxes(sizes[index], generator)          # torchvision's make_params, vectorised
    flips = torch.rand(B, generator=generator, device=...) < 0.5
    out   = crop_resize_flip(store, index, sizes, boxes, flips, size)  # uint8 [B, 3, size, size]
or both at once: `random_resized_crop_flip(store, sizes, index, size, generator)`.

Resize method: exactly the filter of torch's antialiased bilinear interpolation, which is what
torchvision.transforms.v2.functional.resized_crop(..., antialias=True) runs (a triangle filter
stretched by the downscale factor, PIL-style; plain bilinear when upscaling), applied separably:
each image's box is gathered (uint8, row/column indices clamped inside the box, so no pixel outside a
box, hence no padding, is ever read), then resized vertically and horizontally, each pass one
row-gather (index_select) and one float32 multiply-add per filter tap (about 2 x downscale + 2 taps),
batched over the images of a chunk. The flip reverses the horizontal pass's outputs (free). Images go
in chunks of `chunk` (sorted by box area, so a chunk's boxes, padded to its largest, are alike), which
bounds the float working set to about 3 x chunk x size x W_box x 3 float32 values. Rounded like
torchvision's float path (round half to even, clamp to 0..255): the same as torchvision on CUDA up
to float32 summation order (a rare 1-level difference), and within 1 level (about 0.1-0.2 on
average) of its uint8 CPU kernel, which uses fixed-point weights and rounds between the passes.
No matmul, so TF32 settings do not matter.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10  # torchvision's RandomResizedCrop tries this many random boxes before its centre-crop fallback


# ----------------------------------------------------------------------------------------------- store


def store_bytes(shapes: Sequence[Sequence[int]]) -> int:
    """Bytes of the (store, sizes) pair `pad_into_store` makes for images of these shapes ((H, W) or
    (C, H, W) each; stored with 3 channels, padded to the largest height and width)."""
    shapes = [tuple(s)[-2:] for s in shapes]
    if not shapes:
        return 0
    h_max = max(h for h, _ in shapes)
    w_max = max(w for _, w in shapes)
    return len(shapes) * (3 * h_max * w_max + 2 * 8)


def pad_into_store(images: Sequence[torch.Tensor], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 3xHxW images (any sizes) -> (store uint8 [N, 3, H_max, W_max] zero-padded at the
    bottom/right, sizes int64 [N, 2] of (height, width)), both on `device`."""
    if not images:
        raise ValueError("pad_into_store: no images")
    for k, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"pad_into_store: image {k} is {image.dtype} {tuple(image.shape)}; expected uint8 3xHxW")
    device = torch.device(device) if device is not None else images[0].device
    sizes = torch.tensor([[int(im.shape[1]), int(im.shape[2])] for im in images], dtype=torch.long)
    h_max, w_max = (int(v) for v in sizes.max(0).values)
    store = torch.zeros(len(images), 3, h_max, w_max, dtype=torch.uint8, device=device)
    for k, image in enumerate(images):
        store[k, :, : image.shape[1], : image.shape[2]].copy_(image, non_blocking=True)
    return store, sizes.to(device)


# ----------------------------------------------------------------------------------------------- boxes


def sample_crop_boxes(
    sizes: torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
) -> torch.Tensor:
    """int64 [B, 4] boxes (top, left, height, width), one per row of `sizes` ([B, 2] real (height,
    width)), drawn like torchvision.transforms.v2.RandomResizedCrop.make_params: up to 10 tries of
    (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)), sides rounded, the first try that
    fits the image kept at a uniform position; if none fits, the centre crop of the whole image
    clamped to the ratio range. All tries are drawn at once (4 x 10 + 2 numbers per image, all from
    `generator`), so the result depends only on the generator's state and `sizes`."""
    device = sizes.device
    batch = sizes.shape[0]
    draw_device = generator.device

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=draw_device, dtype=torch.float64).to(device)

    height = sizes[:, 0].to(torch.float64)
    width = sizes[:, 1].to(torch.float64)
    area = height * width

    fraction = scale[0] + (scale[1] - scale[0]) * rand(batch, TRIES)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(batch, TRIES))
    target = area[:, None] * fraction
    w = torch.round(torch.sqrt(target * aspect))  # round half to even, like Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (0 where none does)
    found = fits.any(1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    position = rand(batch, 2)
    top = torch.minimum(torch.floor(position[:, 0] * (height - h + 1)), height - h)
    left = torch.minimum(torch.floor(position[:, 1] * (width - w + 1)), width - w)

    # torchvision's fallback: the whole image, clamped to the ratio range, centred
    in_ratio = width / height
    r_min, r_max = min(ratio), max(ratio)
    too_tall = in_ratio < r_min
    too_wide = in_ratio > r_max
    fb_w = torch.where(too_wide, torch.round(height * r_max), width)
    fb_h = torch.where(too_tall, torch.round(width / r_min), height)
    fb_top = torch.div(height - fb_h, 2, rounding_mode="floor")
    fb_left = torch.div(width - fb_w, 2, rounding_mode="floor")

    boxes = torch.stack(
        [
            torch.where(found, top, fb_top),
            torch.where(found, left, fb_left),
            torch.where(found, h, fb_h),
            torch.where(found, w, fb_w),
        ],
        dim=1,
    )
    return boxes.to(torch.long)


# ---------------------------------------------------------------------------------------------- resize


def _aa_taps(length: torch.Tensor, out_size: int, taps: int, flip: torch.Tensor | None = None):
    """Torch's antialiased-bilinear filter (aten's _compute_indices_min_size_weights_aa, triangle
    filter, align_corners=False) for resizing lines of `length` pixels (per image) to `out_size`:
    (first int64 [b, out_size], weights float32 [b, out_size, taps]): output o is
    sum_k weights[o, k] * line[first[o] + k]; taps past the filter's window weigh 0. With `flip`, the
    outputs of those images come in reverse order (a horizontal flip for free)."""
    device = length.device
    n = length.to(torch.float64)[:, None]  # [b, 1]
    scale = n / out_size
    upscale = scale < 1
    support = torch.where(upscale, torch.ones_like(scale), scale)  # bilinear: half-width 1, stretched when shrinking
    invscale = torch.where(upscale, torch.ones_like(scale), 1.0 / scale)
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float64)[None] + 0.5)
    first = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    end = torch.minimum(torch.trunc(center + support + 0.5), n)
    j = first[:, :, None] + torch.arange(taps, device=device, dtype=torch.float64)
    weights = torch.clamp(1 - ((j - center[:, :, None] + 0.5) * invscale[:, :, None]).abs(), min=0) * (j < end[:, :, None])
    weights = weights / weights.sum(-1, keepdim=True)
    first = first.to(torch.long)
    if flip is not None:
        first = torch.where(flip[:, None], first.flip(1), first)
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return first, weights.to(torch.float32)


def _max_taps(longest: int, out_size: int) -> int:
    """An upper bound of the filter's window (input pixels per output) for lines up to `longest`."""
    return math.ceil(2 * max(longest / out_size, 1.0)) + 2


def _filter_rows(lines: torch.Tensor, count: torch.Tensor, lines_per_image: int, out_size: int, taps: int, flip=None) -> torch.Tensor:
    """lines [b * lines_per_image, L] (image i's line r at row i * lines_per_image + r, only its first
    count[i] real) -> float32 [b * out_size, L], each image's lines resized to out_size: one
    row-gather and multiply-add per filter tap; no line at or past count[i] is read."""
    b = count.shape[0]
    first, weights = _aa_taps(count, out_size, taps, flip)
    base = (torch.arange(b, device=lines.device) * lines_per_image)[:, None]
    last = count[:, None] - 1
    shape = (b * out_size, lines.shape[1])
    out = torch.zeros(shape, dtype=torch.float32, device=lines.device)
    gathered = torch.empty(shape, dtype=lines.dtype, device=lines.device)  # reused: no allocation per tap
    for k in range(taps):
        rows = (torch.minimum(first + k, last) + base).reshape(-1)
        torch.index_select(lines, 0, rows, out=gathered)
        out.addcmul_(gathered, weights[:, :, k].reshape(-1, 1))  # uint8 lines promote to float32 here
    return out


def _resize_chunk(store, index, boxes, flips, size, rows_max, cols_max) -> torch.Tensor:
    """float32 [b, 3, size, size] for one chunk; reads only pixels inside each box."""
    device = store.device
    b = index.shape[0]
    top, left, h, w = boxes.unbind(1)
    rows = top[:, None] + torch.minimum(torch.arange(rows_max, device=device)[None], h[:, None] - 1)  # [b, rows_max]
    cols = left[:, None] + torch.minimum(torch.arange(cols_max, device=device)[None], w[:, None] - 1)
    crop = store[index[:, None, None], :, rows[:, :, None], cols[:, None, :]]  # uint8 [b, rows_max, cols_max, 3]
    # vertical pass: lines = rows of the crop, each cols_max * 3 long
    tall = _filter_rows(crop.reshape(b * rows_max, cols_max * 3), h, rows_max, size, _max_taps(rows_max, size))
    # horizontal pass: lines = columns of that, each size * 3 long; the flip reverses the output columns
    columns = tall.view(b, size, cols_max, 3).transpose(1, 2).reshape(b * cols_max, size * 3)
    wide = _filter_rows(columns, w, cols_max, size, _max_taps(cols_max, size), flips)  # [b * size(x), size(y) * 3]
    return wide.view(b, size, size, 3).permute(0, 3, 2, 1)  # [b, 3, y, x]


def crop_resize_flip(
    store: torch.Tensor,
    index: torch.Tensor,
    sizes: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    chunk: int | None = None,
) -> torch.Tensor:
    """uint8 [B, 3, size, size]: image index[i] of `store` cropped to boxes[i] (top, left, height,
    width), resized to size x size (antialiased bilinear, as torchvision's resized_crop), flipped
    left-right where flips[i]. `sizes` is the store's [N, 2] real sizes: boxes are clamped inside
    them, so padding is never read even for a bad box. At most `chunk` images are converted to
    float at a time (each as its box, padded to the chunk's largest box); default 8 on CPU (cache
    sized), 32 elsewhere (fewer kernel launches). `index` may repeat and be in any order.

    The bookkeeping (clamping, the chunks' largest boxes) happens where `boxes` are: give `index`,
    `sizes`, `boxes` and `flips` on the CPU and the store on the GPU, and the GPU is never waited for
    (they go over from pinned memory); with everything on the GPU, reading the chunks' sides is one
    device-to-host sync."""
    device, host = store.device, boxes.device
    index = index.to(device=host, dtype=torch.long)
    batch = index.shape[0]
    out = torch.empty(batch, 3, size, size, dtype=torch.uint8, device=device)
    if batch == 0:
        return out
    real = sizes.to(host)[index]
    boxes = boxes.to(torch.long)
    top = torch.minimum(boxes[:, 0].clamp(min=0), real[:, 0] - 1)
    left = torch.minimum(boxes[:, 1].clamp(min=0), real[:, 1] - 1)
    h = torch.minimum(boxes[:, 2].clamp(min=1), real[:, 0] - top)
    w = torch.minimum(boxes[:, 3].clamp(min=1), real[:, 1] - left)
    boxes = torch.stack([top, left, h, w], 1)
    flips = flips.to(device=host, dtype=torch.bool)

    order = torch.argsort(h * w)  # similar-sized boxes share a chunk
    chunk = max(1, int(chunk if chunk is not None else (8 if device.type == "cpu" else 32)))
    n_chunks = -(-batch // chunk)
    pad = n_chunks * chunk - batch
    hs = torch.nn.functional.pad(h[order], (0, pad)).view(n_chunks, chunk).amax(1)
    ws = torch.nn.functional.pad(w[order], (0, pad)).view(n_chunks, chunk).amax(1)
    maxima = torch.stack([hs, ws], 1).tolist()  # no sync where `host` is the CPU
    index, boxes, flips, order = (to_device(t, device) for t in (index, boxes, flips, order))
    for c, (rows_max, cols_max) in enumerate(maxima):
        part = order[c * chunk : (c + 1) * chunk]
        resized = _resize_chunk(store, index[part], boxes[part], flips[part], size, int(rows_max), int(cols_max))
        out.index_copy_(0, part, resized.round_().clamp_(0, 255).to(torch.uint8))
    return out


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the CPU to a GPU through pinned memory, without waiting for the GPU."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def random_resized_crop_flip(
    store: torch.Tensor,
    sizes: torch.Tensor,
    index: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    chunk: int | None = None,
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias=True) + RandomHorizontalFlip(0.5) of images
    index[i] of the store: uint8 [B, 3, size, size]. Boxes first, then flips, all from `generator`
    (same seed, same batch), drawn where the generator is: a CPU generator (with `sizes` and `index` on
    the CPU) gives the same boxes for a store on any device, and never waits for a GPU."""
    host = generator.device
    index = index.to(device=host, dtype=torch.long)
    sizes = sizes.to(host)
    boxes = sample_crop_boxes(sizes[index], generator, scale, ratio)
    flips = torch.rand(index.shape[0], generator=generator, device=host) < 0.5
    return crop_resize_flip(store, index, sizes, boxes, flips, size, chunk=chunk)
