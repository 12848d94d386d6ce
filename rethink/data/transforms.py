"""Transforms from the model's image sizes (torchvision.transforms.v2 on uint8 CHW tensors).

Loader workers only crop, resize and flip uint8 images; converting to float and normalising happens
batch-wise on the device (`normalize`), and so does mixup/cutmix (`batch_mixer`).

    train (data.augment): flip_crop      RandomResizedCrop(train_size) + horizontal flip (the default)
                          none           resize the shorter side to train_size + centre crop
                          randaugment    flip_crop + RandAugment
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
        raise UserError(f"data.crop_pct={crop_pct}: must be in (0, 1], the fraction of the resized image the centre crop keeps")
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
    """uint8 3xHxW -> uint8 3 x size x size. `size` (default model.train_size) and `randaug_magnitude` (the
    papers' 0-10 scale; default torchvision's magnitude 9 of 0-30, i.e. 3) are a progressive-learning stage's."""
    size = size or model_cfg.train_size
    augment = value(data_cfg.augment)
    if augment == "none":
        return v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    if augment == "randaugment":
        steps.append(v2.RandAugment() if randaug_magnitude is None else v2.RandAugment(magnitude=randaug_bin(randaug_magnitude)))
    elif augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif augment != "flip_crop":
        raise UserError(f"data.augment={augment}: allowed: none, flip_crop, randaugment, trivialaugment")
    return v2.Compose(steps)


RANDAUG_BINS_PER_LEVEL = 3  # torchvision's RandAugment: magnitude bins 0-30; the papers' (TF, timm) levels: 0-10


def randaug_bin(level: float) -> int:
    """torchvision's RandAugment magnitude (bin 0-30) for a level on the papers' 0-10 scale: at 10 both give
    each op its full range (rotate 30 degrees, shear 0.3, colour factors 0.1-1.9, posterize to 4 bits), as
    the official EfficientNet(V2) code (autoaugment.py, _MAX_LEVEL = 10) does. Steps of 1/3 level."""
    if not 0 <= level <= 10:
        raise UserError(f"RandAugment magnitude {level}: must be in [0, 10] (the papers' scale; 10 is torchvision's strongest)")
    return round(level * RANDAUG_BINS_PER_LEVEL)


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
