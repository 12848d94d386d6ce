"""The building blocks: one small module per block type.

Attribute names say what each part is (`expand`, `depthwise`, `se`, `project`); the order in which
they are created keeps the state_dict in torchvision's order, so its weights map over one to one
(see pretrained.py).
"""

import torch
from torch import nn

from .spec import expanded_channels, squeeze_channels


class ConvBNAct(nn.Sequential):
    """Conv (no bias, 'same' padding) -> BatchNorm -> SiLU (or nothing when act=False)."""

    def __init__(
        self, in_channels, out_channels, kernel_size=1, stride=1, groups=1, act=True, bn_eps=1e-5, bn_momentum=0.1
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding=(kernel_size - 1) // 2, groups=groups, bias=False
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=bn_eps, momentum=bn_momentum)
        self.act = nn.SiLU(inplace=True) if act else nn.Identity()


class SqueezeExcite(nn.Module):
    """Channel attention: global average -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        scale = self.expand(self.act(self.reduce(scale)))
        return x * scale.sigmoid()


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p and scale
    the survivors by 1 / (1 - p); identity in eval."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def add_to(self, shortcut, x):
        """`shortcut + self(x)`, a block's residual sum, without the extra pass over memory that the two
        steps take: one fused multiply-add in training, an in-place add into `x` (the branch's output,
        which nothing else reads) otherwise. The same random draws as `forward`."""
        if not self.training or self.p == 0.0:
            return x.add_(shortcut)
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return torch.addcmul(shortcut, x, mask.div_(keep))

    def extra_repr(self) -> str:
        return f"p={self.p:.4f}"


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> SE -> 1x1 project (+ residual)."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, se_ratio, drop_path, **bn):
        super().__init__()
        mid = expanded_channels(in_channels, expand_ratio)
        self.expand = ConvBNAct(in_channels, mid, 1, **bn) if mid != in_channels else nn.Identity()
        self.depthwise = ConvBNAct(mid, mid, kernel_size, stride, groups=mid, **bn)
        self.se = SqueezeExcite(mid, squeeze_channels(in_channels, se_ratio)) if se_ratio > 0 else nn.Identity()
        self.project = ConvBNAct(mid, out_channels, 1, act=False, **bn)
        self.drop_path = DropPath(drop_path)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return self.drop_path.add_to(x, out) if self.has_residual else out


class FusedMBConv(nn.Module):
    """Fused inverted residual: kxk expand -> (optional SE) -> 1x1 project (+ residual). With expand
    ratio 1 there is a single kxk conv with activation, as in EfficientNetV2's first stage."""

    def __init__(self, in_channels, out_channels, expand_ratio, kernel_size, stride, se_ratio, drop_path, **bn):
        super().__init__()
        mid = expanded_channels(in_channels, expand_ratio)
        squeeze = squeeze_channels(in_channels, se_ratio)
        if mid != in_channels:
            self.expand = ConvBNAct(in_channels, mid, kernel_size, stride, **bn)
            self.se = SqueezeExcite(mid, squeeze) if se_ratio > 0 else nn.Identity()
            self.project = ConvBNAct(mid, out_channels, 1, act=False, **bn)
        else:
            self.expand = nn.Identity()
            self.se = nn.Identity()
            self.project = ConvBNAct(in_channels, out_channels, kernel_size, stride, **bn)
            if se_ratio > 0:  # gate the single conv's output
                self.project.add_module("se", SqueezeExcite(out_channels, squeeze))
        self.drop_path = DropPath(drop_path)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.project(self.se(self.expand(x)))
        return self.drop_path.add_to(x, out) if self.has_residual else out


BLOCKS = {"mbconv": MBConv, "fused": FusedMBConv}
