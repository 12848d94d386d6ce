"""Transforms from the model's image sizes (torchvision.transforms.v2 on uint8 CHW tensors).

Loader workers only crop, resize and flip uint8 images; converting to float and normalising happens
batch-wise on the device (`normalize`), and so does mixup/cutmix (`batch_mixer`).

    train (data.augment): flip_crop      RandomResizedCrop(train_size) + horizontal flip (the default)
                          none           resize the shorter side to train_size + centre crop
                          randaugment    flip_crop + RandAugment (data.randaug_magnitude, the papers' 0-20 scale)
                          trivialaugment flip_crop + TrivialAugmentWide
    eval:                 resize the shorter side to round(eval_size / data.crop_pct) + centre crop eval_size

Both work on images decoded at `stored_size` (cached or not): as small as they can be without either
transform having to enlarge what it crops.
"""

import math
from typing import Callable, Sequence

import torch
from torchvision.transforms import v2

from ..config import value
from ..errors import UserError


def eval_resize(model_cfg, data_cfg) -> int:
    crop_pct = float(data_cfg.crop_pct)
    if not 0 < crop_pct <= 1:
        raise UserError(
            f"data.crop_pct={crop_pct}: must be in (0, 1], the fraction of the resized image the centre crop keeps"
        )
    return round(model_cfg.eval_size / crop_pct)


def stored_size(model_cfg, data_cfg) -> int:
    """The shorter side images are decoded to for both transforms, whether the cache is on or not
    (never above the original's). RandomResizedCrop may keep as little as `scale[0]` of the area
    (0.08 by default), whose side is sqrt(scale[0]) of the image's: for that crop still to hold
    train_size pixels the shorter side needs train_size / sqrt(scale[0]) (792 px for 224). The eval
    resize, or resize + centre crop (data.augment=none), need their own size only."""
    steps = getattr(train_transform(model_cfg, data_cfg), "transforms", [])
    smallest = min((step.scale[0] for step in steps if isinstance(step, v2.RandomResizedCrop)), default=1.0)
    return max(math.ceil(model_cfg.train_size / math.sqrt(smallest)), eval_resize(model_cfg, data_cfg))


def train_transform(
    model_cfg, data_cfg, *, size: int | None = None, randaug_magnitude: float | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 3xHxW -> uint8 3 x size x size. `size` (default model.train_size) and `randaug_magnitude` (default
    data.randaug_magnitude) are a progressive-learning stage's."""
    size = size or model_cfg.train_size
    augment = value(data_cfg.augment)
    if augment == "none":
        return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if augment == "randaugment":
        steps.append(RandAugment(data_cfg.randaug_magnitude if randaug_magnitude is None else randaug_magnitude))
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif augment != "flip_crop":
        raise UserError(f"data.augment={augment}: allowed: none, flip_crop, randaugment, trivialaugment")
    return v2.Compose(steps)


RANDAUG_BINS_PER_LEVEL = 3  # torchvision's RandAugment: magnitude bins 0-30 for the papers' (TF, timm) levels 0-10
MAX_RANDAUG_LEVEL = 20  # the strongest the official recipes use: EfficientNetV2-L's last stage
_ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")


def _beyond_level_10(name: str, magnitudes_fn):
    """An op's magnitudes per bin: torchvision's 31 bins (levels 0-10) as they are, then more bins that carry
    its range on linearly (level 20: twice the range at 10), clamped where the op runs out of range."""

    def magnitudes(num_bins: int, height: int, width: int):
        base = magnitudes_fn(RANDAUG_BINS_PER_LEVEL * 10 + 1, height, width)
        if base is None or num_bins <= len(base):
            return base
        beyond = torch.arange(len(base), num_bins) / (len(base) - 1)  # level / 10
        if name == "Posterize":  # bits kept: 8 - 4 * level / 10, at least one
            extra = (8 - 4 * beyond).round().clamp(min=1)
        elif name == "Solarize":  # the threshold (a fraction of 255) reached 0 at level 10
            extra = torch.zeros(len(beyond))
        else:
            extra = base[-1] * beyond
        return torch.cat([base, extra.to(base.dtype)])

    return magnitudes


class RandAugment(v2.RandAugment):
    """torchvision's RandAugment with its magnitude as a level on the papers' scale (TF's and timm's 0-10;
    the official EfficientNet(V2) autoaugment.py, _MAX_LEVEL = 10), continued linearly beyond 10 up to
    MAX_RANDAUG_LEVEL, as the official EfficientNetV2 code does for V2-M (15) and V2-L (20).

    Up to 10 it is torchvision's transform, bit for bit: level L is magnitude bin 3L of 0-30 (steps of 1/3), and
    at 10 every op has its full range (rotate 30 degrees, shear 0.3, translate 0.45 of the side, colour factors
    0.1-1.9, posterize to 4 bits, solarize everything). Beyond 10 each range grows in proportion to the level
    (at 20: rotate 60 degrees, shear 0.6, translate 0.9 of the side, colour factors up to 2.8, posterize to 1
    bit), clamped where an op runs out: colour factors stay at 0.1 or more (timm's clamp), posterize keeps at
    least one bit, solarize has no threshold below 0."""

    _AUGMENTATION_SPACE = {
        name: (_beyond_level_10(name, fn), signed) for name, (fn, signed) in v2.RandAugment._AUGMENTATION_SPACE.items()
    }

    def __init__(self, level: float = 3.0):
        if not 0 <= level <= MAX_RANDAUG_LEVEL:
            raise UserError(
                f"RandAugment magnitude {level:g}: must be in [0, {MAX_RANDAUG_LEVEL}] (the papers' scale, where 10 is torchvision's strongest)"
            )
        magnitude_bin = round(level * RANDAUG_BINS_PER_LEVEL)
        super().__init__(
            magnitude=magnitude_bin, num_magnitude_bins=max(RANDAUG_BINS_PER_LEVEL * 10, magnitude_bin) + 1
        )
        self.level = magnitude_bin / RANDAUG_BINS_PER_LEVEL

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, interpolation, fill):
        if transform_id in _ENHANCE_OPS:
            magnitude = max(magnitude, -0.9)  # factor 1 + magnitude >= 0.1; only reached beyond level 10
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation, fill)


def eval_transform(model_cfg, data_cfg) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 3xHxW -> uint8 3 x eval_size x eval_size."""
    return v2.Compose([v2.Resize(eval_resize(model_cfg, data_cfg), antialias=True), v2.CenterCrop(model_cfg.eval_size)])


def normalize(images_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (NCHW or CHW, any device and memory format) -> float32 (x / 255 - mean) / std."""
    mean = torch.as_tensor(mean, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1) * 255
    std = torch.as_tensor(std, dtype=torch.float32, device=images_uint8.device).view(-1, 1, 1) * 255
    return images_uint8.float().sub_(mean).div_(std)


def batch_mixer(data_cfg, num_classes: int, *, mixup_alpha: float | None = None) -> Callable | None:
    """MixUp and/or CutMix (one of them, picked at random per batch) for (float images, int labels)
    batches; labels come back as mixed one-hot rows. None when data.mixup_alpha and data.cutmix_alpha are 0.
    `mixup_alpha` replaces data.mixup_alpha (a progressive-learning stage's)."""
    mixers = []
    for key, mixer in (("mixup_alpha", v2.MixUp), ("cutmix_alpha", v2.CutMix)):
        alpha = float(mixup_alpha if key == "mixup_alpha" and mixup_alpha is not None else data_cfg[key])
        if alpha < 0:
            raise UserError(f"data.{key}={alpha}: must be 0 (off) or positive")
        if alpha > 0:
            mixers.append(mixer(alpha=alpha, num_classes=num_classes))
    return v2.RandomChoice(mixers) if mixers else None
