"""Batched RandomResizedCrop + flip on a device-resident uint8 store (rethink/data/device_augment.py),
checked on CPU tensors against torchvision's per-image transform."""

import math
import weakref

import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from rethink.data.device_augment import (
    crop_resize_flip,
    fill_store,
    pack_into_store,
    random_resized_crop_flip,
    sample_crop_boxes,
    store_bytes,
)


def smooth_image(h, w, phase=0.0):
    y, x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    planes = [127 + 120 * torch.sin(x / (17 + 5 * c) + phase + c) * torch.cos(y / (23 + 3 * c)) for c in range(3)]
    return torch.stack(planes).round().clamp(0, 255).to(torch.uint8)


def noisy_image(h, w, seed=0):
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def torchvision_boxes(height, width, n):
    rrc = v2.RandomResizedCrop(224, antialias=True)
    image = torch.empty(3, height, width, dtype=torch.uint8)
    rows = []
    for _ in range(n):
        p = rrc.make_params([image])
        rows.append((p["top"], p["left"], p["height"], p["width"]))
    return torch.tensor(rows, dtype=torch.long)


def fallback_box(height, width, ratio=(3 / 4, 4 / 3)):
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return ((height - h) // 2, (width - w) // 2, h, w)


def is_fallback(boxes, height, width):
    return (boxes == torch.tensor(fallback_box(height, width))).all(1)


@pytest.mark.parametrize("height,width", [(256, 256), (375, 500), (1000, 90)])
def test_box_distribution_matches_torchvision(height, width):
    n = 3000
    torch.manual_seed(0)
    theirs = torchvision_boxes(height, width, n)
    ours = sample_crop_boxes(torch.tensor([[height, width]] * n), torch.Generator().manual_seed(1))
    assert ours.dtype == torch.long and ours.shape == (n, 4)

    def stats(boxes):
        top, left, h, w = boxes.double().unbind(1)
        # area fraction, log aspect ratio, and where the box sits within its free range
        return {
            "area": (h * w / (height * width)).numpy(),
            "log_ratio": torch.log(w / h).numpy(),
            "top": ((top + 0.5) / (height - h + 1)).numpy(),
            "left": ((left + 0.5) / (width - w + 1)).numpy(),
        }

    s_ours, s_theirs = stats(ours), stats(theirs)
    for key in s_ours:
        p = ks_2samp(s_ours[key], s_theirs[key]).pvalue
        assert p > 1e-3, (height, width, key, p)

    rate_ours = is_fallback(ours, height, width).double().mean().item()
    rate_theirs = is_fallback(theirs, height, width).double().mean().item()
    sigma = math.sqrt(max(rate_theirs * (1 - rate_theirs), 1e-4) * 2 / n)
    assert abs(rate_ours - rate_theirs) < 5 * sigma, (rate_ours, rate_theirs)
    if width / height < 0.2:  # the thin image: most draws do not fit, so the fallback is frequent
        assert 0.3 < rate_ours < 0.95, rate_ours


def test_boxes_inside_real_size_and_flips_half():
    gen = torch.Generator().manual_seed(3)
    sizes = torch.cat(
        [torch.randint(1, 400, (3000, 2), generator=gen), torch.tensor([[1, 1], [1, 300], [300, 1], [2, 2]])]
    )
    boxes = sample_crop_boxes(sizes, torch.Generator().manual_seed(4))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= sizes[:, 0]).all() and (left + w <= sizes[:, 1]).all()

    # flips, seen in the pixels: a left-to-right ramp comes out reversed about half the time
    ramp = torch.arange(64, dtype=torch.uint8).mul(4).expand(3, 48, 64).contiguous()
    store = pack_into_store([ramp], "cpu")
    out = random_resized_crop_flip(store, torch.zeros(2000, dtype=torch.long), 8, torch.Generator().manual_seed(5))
    flipped = (out[:, 0, :, 0].float().mean(1) > out[:, 0, :, -1].float().mean(1)).double().mean().item()
    assert abs(flipped - 0.5) < 0.05, flipped


CASES = [  # (top, left, height, width), output size: downscale factors 1 to ~4.5, and upscales
    ((10, 20, 224, 224), 224),
    ((5, 7, 336, 300), 224),
    ((0, 0, 448, 400), 224),
    ((31, 2, 419, 498), 160),
    ((3, 1, 447, 499), 100),
    ((50, 60, 100, 120), 160),
    ((17, 33, 60, 45), 224),
]


@pytest.mark.parametrize("kind", ["smooth", "noisy"])
def test_pixels_match_torchvision_resized_crop(kind):
    images = (
        [smooth_image(450, 500), smooth_image(470, 520, 1.0)]
        if kind == "smooth"
        else [noisy_image(450, 500), noisy_image(470, 520, 1)]
    )
    store = pack_into_store(images, "cpu")
    index, boxes, flips, refs_u8, refs_float = [], [], [], {}, {}
    for n, (box, size) in enumerate(CASES):
        for flip in (False, True):
            k = (n + flip) % 2
            index.append(k)
            boxes.append(box)
            flips.append(flip)
            ref = F.resized_crop(images[k], *box, [size, size], antialias=True)  # torchvision's uint8 CPU kernel
            ref_f = (
                F.resized_crop(images[k].float(), *box, [size, size], antialias=True)
                .round()
                .clamp(0, 255)
                .to(torch.uint8)
            )
            refs_u8[len(index) - 1] = F.horizontal_flip(ref) if flip else ref
            refs_float[len(index) - 1] = F.horizontal_flip(ref_f) if flip else ref_f
    by_size = {}
    for i, (_, size) in enumerate(c for c in CASES for _ in (0, 1)):
        by_size.setdefault(size, []).append(i)
    for size, rows in by_size.items():
        out = crop_resize_flip(
            store,
            torch.tensor([index[i] for i in rows]),
            torch.tensor([boxes[i] for i in rows]),
            torch.tensor([flips[i] for i in rows]),
            size,
            chunk=3,
        )
        assert out.dtype == torch.uint8 and out.shape == (len(rows), 3, size, size)
        for j, i in enumerate(rows):
            diff = (out[j].int() - refs_u8[i].int()).abs()
            assert diff.float().mean() < 0.5 and diff.max() <= 2, (
                boxes[i],
                size,
                diff.float().mean().item(),
                diff.max().item(),
            )
            diff_f = (out[j].int() - refs_float[i].int()).abs()  # torchvision's float path, what it runs on CUDA
            assert diff_f.float().mean() < 0.01 and diff_f.max() <= 1, (boxes[i], size, diff_f.float().mean().item())


def test_no_pixel_outside_an_image_is_read():
    images = [smooth_image(300, 200), noisy_image(120, 410, 2), smooth_image(64, 64, 2.0), noisy_image(500, 90, 3)]
    store = pack_into_store(images, "cpu")
    white = pack_into_store(images, "cpu")  # the same images, every other byte of the store white
    used = torch.zeros(white.pixels.numel(), dtype=torch.bool)
    for k, image in enumerate(images):
        used[int(white.offsets[k]) : int(white.offsets[k]) + image.numel()] = True
    white.pixels[~used] = 255
    index = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(0))
    a = random_resized_crop_flip(store, index, 48, torch.Generator().manual_seed(7))
    assert torch.equal(a, random_resized_crop_flip(white, index, 48, torch.Generator().manual_seed(7)))
    # whole images (boxes on the real edges) read nothing of their neighbours, and a box reaching past an image
    # is clamped to its real size
    full = torch.cat([torch.zeros(4, 2, dtype=torch.long), store.sizes], 1)
    no_flip = torch.zeros(4, dtype=torch.bool)
    a = crop_resize_flip(store, torch.arange(4), full, no_flip, 40)
    for k, image in enumerate(images):
        own = pack_into_store([image])
        assert torch.equal(a[k], crop_resize_flip(own, torch.tensor([0]), full[k : k + 1], no_flip[:1], 40)[0])
    assert torch.equal(a, crop_resize_flip(white, torch.arange(4), full + torch.tensor([0, 0, 50, 50]), no_flip, 40))


def test_reproducible_per_seed():
    store = pack_into_store([smooth_image(200, 260), noisy_image(180, 150)], "cpu")
    index = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1])
    a = random_resized_crop_flip(store, index, 32, torch.Generator().manual_seed(11))
    b = random_resized_crop_flip(store, index, 32, torch.Generator().manual_seed(11))
    c = random_resized_crop_flip(store, index, 32, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the one-call form is boxes, then flips, from the same generator
    gen = torch.Generator().manual_seed(11)
    boxes = sample_crop_boxes(store.sizes[index], gen)
    flips = torch.rand(len(index), generator=gen) < 0.5
    assert torch.equal(a, crop_resize_flip(store, index, boxes, flips, 32))


def test_index_repeats_any_order_and_chunking():
    images = [smooth_image(120 + 20 * k, 200 - 15 * k, float(k)) for k in range(5)]
    store = pack_into_store(images, "cpu")
    index = torch.tensor([3, 0, 3, 4, 1, 1, 0, 2, 3])
    boxes = sample_crop_boxes(store.sizes[index], torch.Generator().manual_seed(2))
    flips = torch.tensor([True, False, False, True, True, False, True, False, True])
    batch = crop_resize_flip(store, index, boxes, flips, 40, chunk=4)
    for chunk in (1, 9):
        assert torch.equal(batch, crop_resize_flip(store, index, boxes, flips, 40, chunk=chunk))
    for i in range(len(index)):
        ref = F.resized_crop(images[index[i]], *boxes[i].tolist(), [40, 40], antialias=True)
        ref = F.horizontal_flip(ref) if flips[i] else ref
        assert (batch[i].int() - ref.int()).abs().max() <= 1
    assert crop_resize_flip(store, index[:0], boxes[:0], flips[:0], 40).shape == (0, 3, 40, 40)


def test_the_store_packs_images_without_padding_and_its_size_is_known_beforehand():
    images = [noisy_image(30, 50, 1), noisy_image(45, 20, 2), noisy_image(20, 400, 3)]  # a panorama among them
    store = pack_into_store(images, "cpu")
    assert store.pixels.dtype == torch.uint8 and store.sizes.tolist() == [[30, 50], [45, 20], [20, 400]]
    assert all(torch.equal(store.image(k), image) for k, image in enumerate(images))
    assert store_bytes([im.shape for im in images]) == store.pixels.numel() + len(images) * 3 * 8
    pixels = sum(im.numel() for im in images)
    assert store.pixels.numel() < 1.1 * pixels  # padded to the largest height and width it would take 6x
    assert store_bytes([(30, 50), (45, 20), (20, 400)]) == store_bytes([im.shape for im in images])
    assert store_bytes([]) == 0
    with pytest.raises(ValueError):
        pack_into_store([torch.zeros(1, 4, 4, dtype=torch.uint8)], "cpu")


def test_the_store_takes_each_image_as_it_arrives_and_a_pixel_more_than_the_header_said():
    said = [(30, 50), (44, 20), (20, 40), (33, 33)]  # a JPEG header may tell its decoded size a pixel short
    decoded = [(30, 50), (45, 21), (20, 40), (33, 33)]
    alive = []

    def arriving():  # decoded one by one, as a loader yields them
        for k, (h, w) in enumerate(decoded):
            assert not any(ref() is not None for ref in alive[: max(0, k - 1)])  # only the last one may still be held
            image = noisy_image(h, w, k)
            alive.append(weakref.ref(image))
            yield image

    store = fill_store(arriving(), said, "cpu")
    assert store.sizes.tolist() == [list(s) for s in decoded]
    assert all(torch.equal(store.image(k), noisy_image(h, w, k)) for k, (h, w) in enumerate(decoded))
    with pytest.raises(ValueError, match="past the 2 images"):
        fill_store(iter([noisy_image(h, w) for h, w in decoded]), said[:2], "cpu")
