"""EfficientNet assembled from a decoded NetworkSpec: stem, stages of blocks, head, classifier."""

import math
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .blocks import BLOCKS, ConvBNAct
from .spec import NetworkSpec


class EfficientNet(nn.Module):
    def __init__(self, spec: NetworkSpec, num_classes: int = 1000):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.spec = spec
        bn = dict(bn_eps=spec.bn_eps, bn_momentum=spec.bn_momentum)
        self.stem = ConvBNAct(3, spec.stem, 3, stride=2, **bn)
        stages, in_channels = [], spec.stem
        for stage, rates in zip(spec.stages, spec.drop_path):
            blocks = []
            for i, rate in enumerate(rates):
                blocks.append(
                    BLOCKS[stage.block](
                        in_channels,
                        stage.out,
                        expand_ratio=stage.expand,
                        kernel_size=stage.kernel,
                        stride=stage.stride if i == 0 else 1,
                        se_ratio=stage.se,
                        drop_path=rate,
                        **bn,
                    )
                )
                in_channels = stage.out
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = ConvBNAct(in_channels, spec.head, 1, **bn)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(spec.head, num_classes)
        self.backbone_frozen = False
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self):
        # torchvision's initialisation, except the classifier's range: 1/sqrt(in_features) rather
        # than 1/sqrt(num_classes). Both are ~0.03 at ImageNet's 1000 classes, but torchvision's
        # gives +-0.45 with 5 classes, logits of +-10 and a first loss near 10 when training from scratch.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                bound = 1.0 / math.sqrt(m.in_features)
                nn.init.uniform_(m.weight, -bound, bound)
                nn.init.zeros_(m.bias)

    @property
    def num_classes(self) -> int:
        return self.classifier.out_features

    def set_dropout(self, p: float) -> None:
        """The classifier's dropout probability (model.dropout at construction; progressive learning
        changes it between epochs). Not part of the state_dict."""
        if not 0 <= p < 1:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.dropout.p = p

    def backbone(self) -> list[nn.Module]:
        return [self.stem, self.stages, self.head]

    def freeze_backbone(self) -> None:
        """Train the classifier only: backbone parameters stop learning and its BatchNorm layers keep
        their running statistics (they stay in eval mode even under model.train())."""
        for part in self.backbone():
            part.requires_grad_(False)
        self.backbone_frozen = True
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.backbone_frozen:
            for part in self.backbone():
                part.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Keep only each stage's input for the backward pass and recompute the stage's activations
        there (torch.utils.checkpoint, per stage, in training only): much less activation memory for
        about one more forward pass of the stages. Same gradients: drop path draws the same masks in
        the recomputation (the random state is restored), and BatchNorm normalises with the same batch
        statistics without updating its running statistics a second time."""
        self.grad_checkpointing = enable

    def forward_features(self, x):
        x = self.stem(x)
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for stage in self.stages:
                x = _checkpointed(stage, x)
        else:
            x = self.stages(x)
        return self.head(x)

    def forward_head(self, features):
        return self.classifier(self.dropout(self.pool(features).flatten(1)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _checkpointed(stage: nn.Module, x):
    """`stage(x)`, keeping only `x` for the backward pass, which recomputes the stage (torch.utils.checkpoint;
    the random state is restored for it, so drop path draws the same masks). In the recomputation the
    stage's BatchNorm layers run at momentum 0 and their batch counters are put back: the forward already
    updated their running statistics with the same batch, and torch would update them a second time.
    Under torch.compile, whose compiled backward recomputes without repeating that update, plain checkpoint."""
    if torch.compiler.is_compiling():
        return checkpoint(stage, x, use_reentrant=False)
    return checkpoint(stage, x, use_reentrant=False, context_fn=lambda: (nullcontext(), _statistics_kept(stage)))


@contextmanager
def _statistics_kept(stage: nn.Module):
    norms = [
        m
        for m in stage.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, batches) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(batches)
