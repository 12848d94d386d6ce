"""Batched RandomResizedCrop + horizontal flip on tensors that stay on one device (CPU or GPU).

The same augmentation as `train_transform` with data.augment=flip_crop (torchvision's
RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), antialias=True) followed by
RandomHorizontalFlip(0.5)), but for a whole batch at once on decoded images resident on the device,
instead of per image in CPU loader workers. Pure functions: no module state, no global RNG.

Store format: an `ImageStore`, the images packed one after another in one flat uint8 tensor on the device,
each in HWC order (no padding: a photo set of both orientations, or a few panoramas, costs what its pixels
do), with each image's (height, width) and start offset kept on the CPU. `store_bytes(shapes)` says what a
store for images of (about) these shapes takes; `fill_store(images, shapes, device)` copies images into one
as they arrive, so a caller that decodes them one by one holds only those in flight on the host.

Boxes are int64 [B, 4] = (top, left, height, width) in image pixels, always inside the real size.

    boxes = sample_crop_boxes(store.sizes[index], generator)       # torchvision's make_params, vectorised
    flips = torch.rand(B, generator=generator) < 0.5
    out   = crop_resize_flip(store, index, boxes, flips, size)     # uint8 [B, 3, size, size]
or both at once: `random_resized_crop_flip(store, index, size, generator)`. With `resize_to` and `crop_at`,
`crop_resize_flip` resizes each box to resize_to (height, width) and keeps the size x size window at crop_at
of that: torchvision's Resize then CenterCrop (data.augment=none), filter taps across the window's borders
and sub-pixel offsets included.

Resize method: exactly the filter of torch's antialiased bilinear interpolation, which is what
torchvision.transforms.v2.functional.resized_crop(..., antialias=True) runs (a triangle filter
stretched by the downscale factor, PIL-style; plain bilinear when upscaling), applied separably:
each image's box is gathered as rows (one index_select of windows of the flat store: row indices are
clamped inside the box, and the columns a window holds past the box's width are never read by the
filter, so no pixel outside a box is used), then resized vertically and horizontally, each pass one
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
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

DEFAULT_SCALE = (0.08, 1.0)
DEFAULT_RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10  # torchvision's RandomResizedCrop tries this many random boxes before its centre-crop fallback


# ----------------------------------------------------------------------------------------------- store


@dataclass
class ImageStore:
    """Images packed in one flat uint8 tensor: image k is pixels[offsets[k] : offsets[k] + 3 h w] in HWC order,
    (h, w) = sizes[k]. `pixels` is on the device; `sizes` and `offsets` (int64) stay on the CPU, where the crops'
    bookkeeping happens."""

    pixels: torch.Tensor
    sizes: torch.Tensor
    offsets: torch.Tensor

    def __len__(self) -> int:
        return len(self.sizes)

    def image(self, k: int) -> torch.Tensor:
        """Image k, uint8 3xHxW (a view of the store)."""
        h, w = self.sizes[k].tolist()
        start = int(self.offsets[k])
        return self.pixels[start : start + 3 * h * w].view(h, w, 3).permute(2, 0, 1)


def store_bytes(shapes: Sequence[Sequence[int]]) -> int:
    """Bytes of the store `fill_store` makes for images of these shapes ((H, W) or (C, H, W) each, stored with 3
    channels): their pixels with a pixel of slack in each side (a JPEG's header can tell its decoded size a pixel
    off), a tail as long as the widest row (each crop reads whole windows of the widest box's width), and the
    bookkeeping."""
    shapes = [tuple(s)[-2:] for s in shapes]
    if not shapes:
        return 0
    return _capacity(shapes) + len(shapes) * 3 * 8


def _capacity(shapes: Sequence[tuple[int, int]]) -> int:
    return sum(3 * (h + 1) * (w + 1) for h, w in shapes) + 3 * (max(w for _, w in shapes) + 1)


def fill_store(
    images: Iterable[torch.Tensor], shapes: Sequence[Sequence[int]], device: torch.device | str
) -> ImageStore:
    """The store of `images` (uint8 3xHxW, about `shapes` in size, as many), each copied to `device` as it
    arrives: a lazy iterable of decoded images is never held on the host all at once."""
    shapes = [tuple(int(v) for v in tuple(s)[-2:]) for s in shapes]
    if not shapes:
        raise ValueError("fill_store: no images")
    pixels = torch.empty(_capacity(shapes), dtype=torch.uint8, device=device)
    room = pixels.numel() - 3 * (max(w for _, w in shapes) + 1)  # the tail stays free for the windows
    sizes, offsets, used = [], [], 0
    for k, image in enumerate(images):
        if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"fill_store: image {k} is {image.dtype} {tuple(image.shape)}; expected uint8 3xHxW")
        h, w = int(image.shape[1]), int(image.shape[2])
        if k >= len(shapes) or used + 3 * h * w > room:
            raise ValueError(f"fill_store: image {k} ({h}x{w}) is past the {len(shapes)} images of the sizes given")
        pixels[used : used + 3 * h * w].view(h, w, 3).copy_(image.permute(1, 2, 0))
        sizes.append((h, w))
        offsets.append(used)
        used += 3 * h * w
    if len(sizes) != len(shapes):
        raise ValueError(f"fill_store: {len(sizes)} images for the {len(shapes)} sizes given")
    return ImageStore(pixels, torch.tensor(sizes, dtype=torch.long), torch.tensor(offsets, dtype=torch.long))


def pack_into_store(images: Sequence[torch.Tensor], device: torch.device | str | None = None) -> ImageStore:
    """The store of these uint8 3xHxW images (any sizes), on `device` (default: the first image's)."""
    if not images:
        raise ValueError("pack_into_store: no images")
    return fill_store(images, [image.shape for image in images], device if device is not None else images[0].device)


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


def _aa_taps(length: torch.Tensor, out_size: int, taps: int, flip: torch.Tensor | None = None, full=None, start=None):
    """Torch's antialiased-bilinear filter (aten's _compute_indices_min_size_weights_aa, triangle
    filter, align_corners=False) for resizing lines of `length` pixels (per image) to `out_size`:
    (first int64 [b, out_size], weights float32 [b, out_size, taps]): output o is
    sum_k weights[o, k] * line[first[o] + k]; taps past the filter's window weigh 0. With `full` and
    `start` (per image), the lines are resized to `full` pixels and outputs start..start + out_size - 1
    of that are kept (a resize, then a crop). With `flip`, the outputs of those images come in reverse
    order (a horizontal flip for free)."""
    device = length.device
    n = length.to(torch.float64)[:, None]  # [b, 1]
    full = n.new_full(n.shape, out_size) if full is None else full.to(torch.float64)[:, None]
    start = torch.zeros_like(n) if start is None else start.to(torch.float64)[:, None]
    scale = n / full
    upscale = scale < 1
    support = torch.where(upscale, torch.ones_like(scale), scale)  # bilinear: half-width 1, stretched when shrinking
    invscale = torch.where(upscale, torch.ones_like(scale), 1.0 / scale)
    center = scale * (start + torch.arange(out_size, device=device, dtype=torch.float64)[None] + 0.5)
    first = torch.clamp(torch.trunc(center - support + 0.5), min=0)
    end = torch.minimum(torch.trunc(center + support + 0.5), n)
    j = first[:, :, None] + torch.arange(taps, device=device, dtype=torch.float64)
    weights = torch.clamp(1 - ((j - center[:, :, None] + 0.5) * invscale[:, :, None]).abs(), min=0) * (
        j < end[:, :, None]
    )
    weights = weights / weights.sum(-1, keepdim=True)
    first = first.to(torch.long)
    if flip is not None:
        first = torch.where(flip[:, None], first.flip(1), first)
        weights = torch.where(flip[:, None, None], weights.flip(1), weights)
    return first, weights.to(torch.float32)


def _max_taps(downscale: float) -> int:
    """An upper bound of the filter's window (input pixels per output) at this largest downscale factor."""
    return math.ceil(2 * max(downscale, 1.0)) + 2


def _filter_rows(
    lines: torch.Tensor,
    count: torch.Tensor,
    lines_per_image: int,
    out_size: int,
    taps: int,
    flip=None,
    full=None,
    start=None,
) -> torch.Tensor:
    """lines [b * lines_per_image, L] (image i's line r at row i * lines_per_image + r, only its first
    count[i] real) -> float32 [b * out_size, L], each image's lines resized to out_size (or to full[i],
    keeping outputs from start[i]: see _aa_taps): one row-gather and multiply-add per filter tap; no line
    at or past count[i] is read."""
    b = count.shape[0]
    first, weights = _aa_taps(count, out_size, taps, flip, full, start)
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


def _box_rows(store: ImageStore, index: torch.Tensor, boxes: torch.Tensor, rows_max: int) -> torch.Tensor:
    """Where each of a chunk's box rows starts in the flat store (int64 [b * rows_max], on the CPU): row r of
    box i is the box's row min(r, height - 1), from its left edge."""
    top, left, h, _ = boxes.unbind(1)
    rows = top[:, None] + torch.minimum(torch.arange(rows_max)[None], h[:, None] - 1)  # [b, rows_max]
    width = store.sizes[index, 1][:, None]
    return (store.offsets[index][:, None] + (rows * width + left[:, None]) * 3).reshape(-1)


def _resize_chunk(
    store: ImageStore, starts, boxes, flips, size, rows_max, cols_max, taps, resize_to, crop_at
) -> torch.Tensor:
    """float32 [b, 3, size, size] for one chunk (its box rows start at `starts`); uses only pixels inside each box."""
    b = boxes.shape[0]
    _, _, h, w = boxes.unbind(1)
    window = cols_max * 3  # a row of the chunk's widest box: past a narrower box's width it holds pixels never read
    pixels = store.pixels
    windows = pixels.as_strided((pixels.numel() - window + 1, window), (1, 1))  # one from every byte on (a view)
    crop = windows.index_select(0, starts)  # [b * rows_max, window]
    resize_h, resize_w = resize_to.unbind(1)
    crop_y, crop_x = crop_at.unbind(1)
    # vertical pass: lines = rows of the crop, each cols_max * 3 long
    tall = _filter_rows(crop, h, rows_max, size, taps[0], full=resize_h, start=crop_y)
    # horizontal pass: lines = columns of that, each size * 3 long; the flip reverses the output columns
    columns = tall.view(b, size, cols_max, 3).transpose(1, 2).reshape(b * cols_max, size * 3)
    wide = _filter_rows(columns, w, cols_max, size, taps[1], flips, full=resize_w, start=crop_x)  # [b * x, y * 3]
    return wide.view(b, size, size, 3).permute(0, 3, 2, 1)  # [b, 3, y, x]


def crop_resize_flip(
    store: ImageStore,
    index: torch.Tensor,
    boxes: torch.Tensor,
    flips: torch.Tensor,
    size: int,
    chunk: int | None = None,
    resize_to: torch.Tensor | None = None,
    crop_at: torch.Tensor | None = None,
) -> torch.Tensor:
    """uint8 [B, 3, size, size]: image index[i] of `store` cropped to boxes[i] (top, left, height,
    width), resized to size x size (antialiased bilinear, as torchvision's resized_crop), flipped
    left-right where flips[i]. With `resize_to` and `crop_at` ([B, 2] each, (y, x)), the box is resized to
    resize_to[i] (height, width) instead and the size x size window at crop_at[i] of that is kept (Resize,
    then CenterCrop). Boxes are clamped inside the images' real sizes, so no other pixel is read even for a
    bad box. At most `chunk` images are converted to float at a time (each as its box, padded to the
    chunk's largest box); default 8 on CPU (cache sized), 32 elsewhere (fewer kernel launches). `index` may
    repeat and be in any order.

    The bookkeeping (clamping, the chunks' largest boxes, where their rows start) happens on the CPU, like
    the store's sizes: give `index`, `boxes` and `flips` there and the GPU is never waited for (what it
    needs goes over from pinned memory)."""
    device = store.pixels.device
    index, boxes, flips = index.cpu().long(), boxes.cpu().long(), flips.cpu().bool()
    batch = index.shape[0]
    out = torch.empty(batch, 3, size, size, dtype=torch.uint8, device=device)
    if batch == 0:
        return out
    real = store.sizes[index]
    top = torch.minimum(boxes[:, 0].clamp(min=0), real[:, 0] - 1)
    left = torch.minimum(boxes[:, 1].clamp(min=0), real[:, 1] - 1)
    h = torch.minimum(boxes[:, 2].clamp(min=1), real[:, 0] - top)
    w = torch.minimum(boxes[:, 3].clamp(min=1), real[:, 1] - left)
    boxes = torch.stack([top, left, h, w], 1)
    resize_to = torch.full((batch, 2), size, dtype=torch.long) if resize_to is None else resize_to.cpu().long()
    crop_at = torch.zeros(batch, 2, dtype=torch.long) if crop_at is None else crop_at.cpu().long()

    order = torch.argsort(h * w)  # similar-sized boxes share a chunk
    chunk = max(1, int(chunk if chunk is not None else (8 if device.type == "cpu" else 32)))
    for c in range(-(-batch // chunk)):
        part = order[c * chunk : (c + 1) * chunk]
        rows_max, cols_max = boxes[part, 2:].amax(0).tolist()
        downscale = (boxes[part, 2:] / resize_to[part]).amax(0).tolist()  # (vertical, horizontal)
        facts = to_device(
            torch.cat([boxes[part], resize_to[part], crop_at[part], flips[part, None], part[:, None]], 1), device
        )
        starts = to_device(_box_rows(store, index[part], boxes[part], rows_max), device)
        taps = (_max_taps(downscale[0]), _max_taps(downscale[1]))
        resized = _resize_chunk(
            store,
            starts,
            facts[:, :4],
            facts[:, 8].bool(),
            size,
            rows_max,
            cols_max,
            taps,
            facts[:, 4:6],
            facts[:, 6:8],
        )
        out.index_copy_(0, facts[:, 9], resized.round_().clamp_(0, 255).to(torch.uint8))
    return out


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; from the CPU to a GPU through pinned memory, without waiting for the GPU."""
    if tensor.device == device:
        return tensor
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def resize_centre_crop(store: ImageStore, index: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's Resize(size) (the shorter side to size, the longer to int(size * long / short)) of images
    index[i] of the store, then CenterCrop(size) of that (its offset round((resized - size) / 2)): uint8
    [B, 3, size, size] (data.augment=none)."""
    index = index.cpu().long()
    real = store.sizes[index]
    short = real.min(1, keepdim=True).values
    resized = torch.where(real == short, size, (size * real) // short)
    offset = torch.round((resized - size) / 2).long()
    whole = torch.cat([torch.zeros_like(real), real], 1)
    no_flip = torch.zeros(len(index), dtype=torch.bool)
    return crop_resize_flip(store, index, whole, no_flip, size, resize_to=resized, crop_at=offset)


def random_resized_crop_flip(
    store: ImageStore,
    index: torch.Tensor,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = DEFAULT_SCALE,
    ratio: tuple[float, float] = DEFAULT_RATIO,
    chunk: int | None = None,
) -> torch.Tensor:
    """RandomResizedCrop(size, scale, ratio, antialias=True) + RandomHorizontalFlip(0.5) of images
    index[i] of the store: uint8 [B, 3, size, size]. Boxes first, then flips, all from `generator`, a CPU
    generator (same seed, same batch): the same boxes for a store on any device, drawn without waiting for
    a GPU."""
    index = index.cpu().long()
    boxes = sample_crop_boxes(store.sizes[index], generator, scale, ratio)
    flips = torch.rand(index.shape[0], generator=generator) < 0.5
    return crop_resize_flip(store, index, boxes, flips, size, chunk=chunk)
