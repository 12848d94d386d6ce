"""Load torchvision's EfficientNet weights into our models.

torchvision names parts by position (`features.4.2.block.1.0.weight`); we name them by role
(`stages.3.2.depthwise.conv.weight`). `torchvision_key` translates one name into the other, reading
each torchvision block's roles off its own keys, so the same code serves a standard layout (every
tensor maps) and a changed one (what still fits loads, the rest stays at its initialisation and is
listed in the report).
"""

import contextlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional
from urllib.error import URLError

import torch
import torchvision
from torch import nn

from ..environment import downloads_allowed
from ..errors import UserError, why_unreadable

log = logging.getLogger("rethink")

_BLOCK_KEY = re.compile(r"features\.(\d+)\.(\d+)\.block\.(\d+)\.(.+)")
_CONV_BN = {"0": "conv", "1": "bn"}
_SE = {"fc1": "reduce", "fc2": "expand"}


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    shape_mismatch: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # key, ours, theirs
    missing: list[str] = field(default_factory=list)  # our tensors the source had nothing for
    unused: list[str] = field(default_factory=list)  # source tensors with no place in our model

    @property
    def kept_initial(self) -> list[str]:
        return [k for k, _, _ in self.shape_mismatch] + self.missing

    @property
    def complete(self) -> bool:
        return not (self.shape_mismatch or self.missing or self.unused)

    def __str__(self) -> str:
        total = len(self.loaded) + len(self.kept_initial)
        text = f"loaded {len(self.loaded)}/{total} tensors"
        if self.complete:
            return text + " (all of them)"
        parts = [text]
        if self.shape_mismatch:
            first = sorted(self.shape_mismatch, key=lambda m: not m[0].startswith("classifier."))  # the usual one first
            shown = ", ".join(f"{k} {_shape(a)} vs {_shape(b)}" for k, a, b in first[:6])
            more = len(self.shape_mismatch) - 6
            parts.append(f"kept initial (shape differs): {shown}" + (f" and {more} more" if more > 0 else ""))
        if self.missing:
            parts.append(f"kept initial (not in source): {_summarise(self.missing)}")
        if self.unused:
            parts.append(f"unused from source: {_summarise(self.unused)}")
        return "; ".join(parts)


def torchvision_block_roles(state_dict: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], dict[str, str]]:
    """For each torchvision block (features index, block index): its `block.K` indices by role.

    torchvision's MBConv is [expand?, depthwise, SE, project] and always has SE; its FusedMBConv is
    [expand, project] or a single [project] conv.
    """
    indices: dict[tuple[int, int], set[str]] = {}
    se_index: dict[tuple[int, int], str] = {}
    for key in state_dict:
        m = _BLOCK_KEY.fullmatch(key)
        if m:
            where = (int(m[1]), int(m[2]))
            indices.setdefault(where, set()).add(m[3])
            if m[4].startswith("fc1."):
                se_index[where] = m[3]
    roles = {}
    for where, ks in indices.items():
        order = sorted(ks, key=int)
        if where in se_index:
            s = order.index(se_index[where])
            named = {"se": order[s], "depthwise": order[s - 1], "project": order[s + 1]}
            if s == 2:
                named["expand"] = order[0]
        elif len(order) == 2:
            named = {"expand": order[0], "project": order[1]}
        else:
            named = {"project": order[0]}
        roles[where] = {k: role for role, k in named.items()}
    return roles


def torchvision_key(key: str, num_stages: int, roles: Mapping[tuple[int, int], Mapping[str, str]]) -> Optional[str]:
    """Our name for a torchvision EfficientNet state_dict key, or None when it has no counterpart."""
    parts = key.split(".")
    if parts[0] == "classifier" and len(parts) == 3 and parts[1] == "1":
        return f"classifier.{parts[2]}"
    if parts[0] != "features" or len(parts) < 4:
        return None
    feature = int(parts[1])
    if feature in (0, num_stages + 1) and parts[2] in _CONV_BN:
        return f"{'stem' if feature == 0 else 'head'}.{_CONV_BN[parts[2]]}.{'.'.join(parts[3:])}"
    m = _BLOCK_KEY.fullmatch(key)
    if not m:
        return None
    stage, block, index, rest = int(m[1]), int(m[2]), m[3], m[4]
    role = roles.get((stage, block), {}).get(index)
    if role is None:
        return None
    sub, _, param = rest.partition(".")
    name = _SE.get(sub) if role == "se" else _CONV_BN.get(sub)
    return None if name is None else f"stages.{stage - 1}.{block}.{role}.{name}.{param}"


def load_torchvision_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Copy a torchvision EfficientNet state_dict into `model` (ours, any layout): every tensor whose
    name and shape fit is loaded; the report lists what was skipped and why."""
    roles = torchvision_block_roles(state_dict)
    num_stages = len(model.stages)
    return _load(model, ((torchvision_key(k, num_stages, roles), k, t) for k, t in state_dict.items()))


def load_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Like load_torchvision_weights, for a state_dict in our own names (another rethink model)."""
    return _load(model, ((k, k, t) for k, t in state_dict.items()))


def _load(model: nn.Module, mapped) -> LoadReport:
    """mapped: (our key or None, source key, tensor) triples."""
    ours = model.state_dict()
    report, update, seen = LoadReport(), {}, set()
    for target, key, tensor in mapped:
        if target is None or target not in ours:
            report.unused.append(key)
            continue
        seen.add(target)
        if ours[target].shape != tensor.shape:
            report.shape_mismatch.append((target, tuple(ours[target].shape), tuple(tensor.shape)))
            continue
        update[target] = tensor
        report.loaded.append(target)
    report.missing = [k for k in ours if k not in seen]
    model.load_state_dict({**ours, **update})
    return report


def fetch_torchvision_weights(name: str) -> tuple[dict, list[float], list[float]]:
    """torchvision's weights `name` (e.g. EfficientNet_B0_Weights.IMAGENET1K_V1) from the torch hub
    cache, downloaded and hash-checked there on first use; with their normalisation mean and std."""
    try:
        weights = torchvision.models.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise UserError(
            f"model.torchvision_weights={name}: not a torchvision weights name (e.g. EfficientNet_B0_Weights.IMAGENET1K_V1)"
        ) from None
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    hint = f"copy {cached.name} into {cached.parent}, or pass model.pretrained=PATH to a state_dict file"
    was_cached = cached.is_file()
    if not was_cached and not downloads_allowed():
        raise UserError(
            f"model.pretrained=true: {name} is not in the torch hub cache and downloads are off (RETHINK_NO_DOWNLOAD=1); {hint}"
        )
    try:
        # torch.hub prints 'Downloading: "<url>"' before it tries, so an offline run would print it
        # above its error; we say what was downloaded once it has been
        with contextlib.redirect_stdout(io.StringIO()):
            state_dict = weights.get_state_dict(progress=True, check_hash=True)
    except (URLError, OSError, RuntimeError) as e:
        reason = str(getattr(e, "reason", e)).splitlines()[0][:120]
        raise UserError(f"model.pretrained=true: could not fetch {name} ({reason}); offline, {hint}") from None
    if not was_cached:
        log.info(f"model.pretrained=true: downloaded {name} to {cached}")
    preset = weights.transforms()
    return state_dict, list(preset.mean), list(preset.std)


def load_pretrained(
    model: nn.Module, pretrained: Any, torchvision_weights: Optional[str]
) -> tuple[LoadReport, Optional[tuple]]:
    """`model.pretrained`: true (torchvision's ImageNet weights for this model) or a path to a state_dict
    file (torchvision's names or ours, or a rethink checkpoint). Returns the load report and, for
    torchvision's weights, their (mean, std)."""
    if pretrained is True or str(pretrained).lower() == "true":
        if not torchvision_weights:
            raise UserError(
                "model.pretrained=true: this model config names no model.torchvision_weights; pass model.pretrained=PATH"
            )
        state_dict, mean, std = fetch_torchvision_weights(torchvision_weights)
        return load_torchvision_weights(model, state_dict), (mean, std)
    path = Path(str(pretrained)).expanduser()
    if not path.is_file():
        raise UserError(
            f"model.pretrained={pretrained}: no such file; use false, true (torchvision's ImageNet weights) or a path to a state_dict"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"model.pretrained={path}: not a readable state_dict ({why_unreadable(path, e)})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a rethink checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"model.pretrained={path}: holds no state_dict (a mapping of names to tensors)")
    if any(k.startswith("features.") for k in state):
        return load_torchvision_weights(model, state), None
    report = load_weights(model, state)
    if not report.loaded:
        raise UserError(f"model.pretrained={path}: none of its {len(state)} tensors fit this model")
    return report, None


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _summarise(keys: list[str], limit: int = 6) -> str:
    """Block-level names (`stages.3.0.se`) rather than every tensor, for a readable line."""
    groups = []
    for key in keys:
        group = ".".join(key.split(".")[:-2]) if key.count(".") >= 2 else key
        if group not in groups:
            groups.append(group)
    shown = ", ".join(groups[:limit])
    return shown + (f" and {len(groups) - limit} more" if len(groups) > limit else "")
