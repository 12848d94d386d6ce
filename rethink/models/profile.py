"""What a model costs: parameters per stage and multiply-adds, counted on the meta device (no compute)."""

import torch
from torch.utils.flop_counter import FlopCounterMode

from .efficientnet import EfficientNet


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_gmacs(model: EfficientNet, image_size: int) -> float:
    """Multiply-adds (GMACs, half of torch's FLOP count) of one image at `image_size`, in eval mode."""
    with torch.device("meta"):
        shadow = EfficientNet(model.spec, num_classes=model.num_classes).eval()
        image = torch.empty(1, 3, image_size, image_size)
    with FlopCounterMode(display=False) as counter:
        shadow(image)
    return counter.get_total_flops() / 2e9


def stage_table(model: EfficientNet) -> list[dict]:
    """One row per stage (0-based index, the one `model.stages.N.*` overrides address), plus the stem
    and the head (final 1x1 conv and classifier)."""
    spec = model.spec
    rows = [_row("stem", "conv3x3", 1, 3, 2, spec.stem, 1, 0.0, count_params(model.stem))]
    for i, (stage, module) in enumerate(zip(spec.stages, model.stages)):
        rows.append(
            _row(
                i,
                stage.block,
                stage.expand,
                stage.kernel,
                stage.stride,
                stage.out,
                stage.repeats,
                stage.se,
                count_params(module),
            )
        )
    head_params = count_params(model.head) + count_params(model.classifier)
    rows.append(_row("head", "conv1x1+fc", 1, 1, 1, spec.head, 1, 0.0, head_params))
    return rows


def _row(stage, block, expand, kernel, stride, channels, repeats, se, params) -> dict:
    return dict(
        stage=stage,
        block=block,
        expand=expand,
        kernel=kernel,
        stride=stride,
        channels=channels,
        repeats=repeats,
        se=se,
        params=params,
    )
