"""Build EfficientNet-B0..B7, EfficientNetV2-S/M/L and any variant of their stage layout."""

from typing import Any, Mapping, Sequence

from ..config import plain
from ..errors import UserError
from .efficientnet import EfficientNet
from .pretrained import LoadReport, load_torchvision_weights
from .spec import NetworkSpec, SpecError, network_spec

__all__ = [
    "EfficientNet",
    "LoadReport",
    "NetworkSpec",
    "build_model",
    "create_model",
    "load_torchvision_weights",
    "network_spec",
]


def build_model(model_cfg: Mapping[str, Any], num_classes: int) -> EfficientNet:
    """The network a `model` config node describes (weights initialised, not pretrained)."""
    try:
        spec = network_spec(plain(model_cfg))
    except SpecError as e:
        raise UserError(str(e)) from None
    return EfficientNet(spec, num_classes=num_classes)


def create_model(name: str, num_classes: int = 1000, overrides: Sequence[str] = ()) -> EfficientNet:
    """`create_model("v2_l", 5, ["model.stages.3.block=fused"])`: compose conf/ exactly as
    `python run.py model=v2_l model.stages.3.block=fused` would, and build that model."""
    from ..hydra_app import compose_config  # here, not above: building a model from a spec needs no Hydra

    cfg = compose_config([f"model={name}", *overrides])
    return build_model(cfg.model, num_classes)
