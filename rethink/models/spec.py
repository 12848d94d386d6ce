"""Decode and scale a model config into a network spec. Pure functions, no torch.

A model config (conf/model/*.yaml plus its stage layout from conf/stages/) says what the network is in
the papers' terms: stage rows (block, expand, kernel, stride, out, repeats, se) before scaling, a width
and a depth multiplier, stem and head widths. `network_spec` turns it into the concrete network: every
channel count rounded the way torchvision and timm round it, every repeat count scaled up with `ceil`,
and one drop-path probability per block.
"""

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

BLOCK_TYPES = ("mbconv", "fused")
DEFAULT_SE = {"mbconv": 0.25, "fused": 0.0}
DROP_PATH_SCHEDULES = ("linear", "uniform")


class SpecError(ValueError):
    """A model config that names an impossible network; the message names the key."""


@dataclass(frozen=True)
class StageSpec:
    block: str  # "mbconv" | "fused"
    expand: float
    kernel: int
    stride: int
    out: int
    repeats: int
    se: float  # squeeze width as a fraction of the block's input channels; 0 means no SE


@dataclass(frozen=True)
class NetworkSpec:
    stem: int
    stages: tuple[StageSpec, ...]  # scaled
    head: int
    dropout: float
    bn_eps: float
    bn_momentum: float
    drop_path: tuple[tuple[float, ...], ...]  # per stage, per block


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round to the nearest multiple of `divisor`, never going more than 10% below `value`."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def scale_channels(channels: int, width: float) -> int:
    return make_divisible(channels * width)


def scale_repeats(repeats: int, depth: float) -> int:
    return int(math.ceil(repeats * depth))


def expanded_channels(in_channels: int, expand: float) -> int:
    return make_divisible(in_channels * expand)


def squeeze_channels(in_channels: int, se: float) -> int:
    return max(1, int(in_channels * se))


def drop_path_rates(num_blocks: int, rate: float, schedule: str) -> list[float]:
    """`linear`: rate * i / N over the global 0-based block index i (the shallowest block never drops);
    `uniform`: the same rate everywhere."""
    if schedule == "linear":
        return [rate * i / num_blocks for i in range(num_blocks)]
    if schedule == "uniform":
        return [rate] * num_blocks
    raise SpecError(f"model.drop_path_schedule: '{schedule}' is not one of {', '.join(DROP_PATH_SCHEDULES)}")


def decode_stage(index: int, row: Mapping[str, Any]) -> StageSpec:
    """One stage row of the config, checked; `se: null` takes the block type's default."""
    key = f"model.stages.{index}"
    block = row.get("block", "mbconv")
    if block not in BLOCK_TYPES:
        raise SpecError(f"{key}.block: '{block}' is not a block type; use one of {', '.join(BLOCK_TYPES)}")
    se = row.get("se")
    stage = StageSpec(
        block=block,
        expand=float(row.get("expand", 1)),
        kernel=int(row.get("kernel", 3)),
        stride=int(row.get("stride", 1)),
        out=int(row["out"]),
        repeats=int(row.get("repeats", 1)),
        se=DEFAULT_SE[block] if se is None else float(se),
    )
    if stage.expand <= 0:
        raise SpecError(f"{key}.expand: {stage.expand:g} must be positive")
    if stage.kernel < 1 or stage.kernel % 2 == 0:
        raise SpecError(f"{key}.kernel: {stage.kernel} must be an odd positive number")
    if stage.stride not in (1, 2):
        raise SpecError(f"{key}.stride: {stage.stride} is not allowed; use 1 or 2")
    if stage.out < 1:
        raise SpecError(f"{key}.out: {stage.out} must be at least 1")
    if stage.repeats < 1:
        raise SpecError(f"{key}.repeats: {stage.repeats} must be at least 1")
    if not 0 <= stage.se < 1:
        raise SpecError(f"{key}.se: {stage.se:g} must be in [0, 1) (0 means no squeeze-excite)")
    return stage


def decode_stages(rows: Iterable[Mapping[str, Any]]) -> list[StageSpec]:
    stages = [decode_stage(i, row) for i, row in enumerate(rows)]
    if not stages:
        raise SpecError("model.stages: the layout has no stages")
    return stages


def scale_stage(stage: StageSpec, width: float, depth: float) -> StageSpec:
    return StageSpec(
        block=stage.block,
        expand=stage.expand,
        kernel=stage.kernel,
        stride=stage.stride,
        out=scale_channels(stage.out, width),
        repeats=scale_repeats(stage.repeats, depth),
        se=stage.se,
    )


def network_spec(model: Mapping[str, Any]) -> NetworkSpec:
    """The concrete network a model config describes (stages scaled, drop-path rates assigned)."""
    width, depth = float(model.get("width", 1.0)), float(model.get("depth", 1.0))
    if width <= 0 or depth <= 0:
        raise SpecError(f"model.width and model.depth must be positive (got {width:g}, {depth:g})")
    rate = float(model.get("drop_path_rate", 0.0))
    if not 0 <= rate < 1:
        raise SpecError(f"model.drop_path_rate: {rate:g} must be in [0, 1)")
    stages = tuple(scale_stage(s, width, depth) for s in decode_stages(model["stages"]))
    rates = drop_path_rates(sum(s.repeats for s in stages), rate, model.get("drop_path_schedule", "linear"))
    per_stage, start = [], 0
    for stage in stages:
        per_stage.append(tuple(rates[start : start + stage.repeats]))
        start += stage.repeats
    return NetworkSpec(
        stem=scale_channels(int(model.get("stem", 32)), width),
        stages=stages,
        head=scale_channels(int(model.get("head", 1280)), width),
        dropout=float(model.get("dropout", 0.2)),
        bn_eps=float(model.get("bn_eps", 1e-5)),
        bn_momentum=float(model.get("bn_momentum", 0.1)),
        drop_path=tuple(per_stage),
    )
