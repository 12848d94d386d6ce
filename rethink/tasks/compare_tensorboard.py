"""What a comparison leaves for TensorBoard, in `groups/` of the folder it writes to (a sweep's, or task=compare's own):

- an hparams config: HPARAMS lists the keys that tell the groups apart (the swept keys first), then the seed,
  params and GMACs where they differ, with test acc and best val acc as its metrics; none of the keys that are
  the same for every run (TensorBoard would otherwise list all of them, alphabetically, and show five);
- one TensorBoard run per group, `groups/<#>_<what the group is>` (# as in comparison.md): per epoch, the mean
  over the group's finished runs of val acc, val loss and train loss, and that mean minus and plus one standard
  deviation;
- a custom-scalars layout whose margin charts draw each group's mean with its band.

A comparison written again into the same folder replaces what the last one wrote there.
"""

from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tensorboard.plugins.hparams import api_pb2
from torch.utils.tensorboard import SummaryWriter

from ..rundir import folder_name
from ..train.tensorboard import hparams_config_summary

# `comparison` below is a tasks/compare.py Comparison, `group` one of its Groups (that module imports this one)

# compare's CURVE_TAGS curves, by their chart titles
CURVES = {"val_acc": "val acc", "val_loss": "val loss", "train_loss": "train loss"}
METRICS = {"test/acc": "test acc", "val/acc_best": "best val acc"}  # scalar tag -> its HPARAMS column
FOLLOWERS = ("seed", "params", "gmacs")  # HPARAMS columns after the keys that tell the groups apart, where they differ
LAYOUT_CATEGORY = "groups: mean ± std over seeds"
GROUPS = "groups"  # where it all goes: TensorBoard's run `groups` holds the hparams config and the layout
COMPARISON_SUFFIX, GROUP_SUFFIX = ".comparison", ".group"  # the ends of the event files written here


def group_curves(group: Any, curve: str) -> list[dict]:
    """The curve `curve` (epoch -> value; a key of compare's CURVE_TAGS) of each finished run of the group that has it."""
    return [run.curves[curve] for run in group.done if run.curves.get(curve)]


def mean_curve(curves: Sequence[dict]) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The epochs of `curves` (epoch -> value, one per run), and at each the runs' mean and standard deviation (0
    where one run has the epoch)."""
    epochs = sorted(set().union(*curves))
    per_epoch = [[c[e] for c in curves if e in c] for e in epochs]
    mean = np.array([np.mean(v) for v in per_epoch])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in per_epoch])
    return epochs, mean, std


def group_tags(curve: str) -> tuple[str, str, str]:
    """A group run's tags for one of CURVES: the mean, the mean minus and the mean plus one standard deviation (the
    band's edges in a section of their own, which TensorBoard's Scalars and Time Series sort after `group`)."""
    return f"group/{curve}", f"std_band/{curve}-std", f"std_band/{curve}+std"


def write_tensorboard(comparison: Any, out_dir: Path, swept: Sequence[str] = ()) -> None:
    """The hparams config, the group runs and the layout in `out_dir`, in place of any an earlier comparison left."""
    _remove_earlier(out_dir)
    writer = SummaryWriter(log_dir=str(out_dir / GROUPS), filename_suffix=COMPARISON_SUFFIX)
    try:
        writer.file_writer.add_summary(hparams_config_summary(hparams_config(comparison, swept)))
        writer.add_custom_scalars(layout())
    finally:
        writer.close()
    width = len(str(len(comparison.groups)))
    for number, group in enumerate(comparison.groups, 1):
        curves = {curve: group_curves(group, curve) for curve in CURVES}
        if not any(curves.values()):
            continue
        group_writer = SummaryWriter(
            log_dir=str(out_dir / GROUPS / group_folder(number, group, width)), filename_suffix=GROUP_SUFFIX
        )
        try:
            for curve, runs in curves.items():
                if runs:
                    _write_band(group_writer, curve, runs)
        finally:
            group_writer.close()


def group_folder(number: int, group: Any, width: int = 1) -> str:
    """`<#>_<key=value>_...`: the group's number (as many digits as the last one's) and its label, `model.` left out
    as in a sweep job's folder (`2_model=b0_stages.3.block=fused`)."""
    parts = [f"{'model' if k == 'model.name' else k.removeprefix('model.')}={_text(v)}" for k, v in group.label.items()]
    return folder_name("_".join([f"{number:0{width}d}", *(parts or ["all_runs"])]))


def layout() -> dict:
    """The custom-scalars layout (torch's form of it): one margin chart per curve, each group run a line in it, its
    band one standard deviation either side."""
    return {LAYOUT_CATEGORY: {title: ["Margin", list(group_tags(curve))] for curve, title in CURVES.items()}}


def hparams_config(comparison: Any, swept: Sequence[str] = ()) -> api_pb2.Experiment:
    """HPARAMS' columns: the keys that tell the groups apart (`swept` keys first, in the sweep's order), then those
    of FOLLOWERS whose values differ between the runs, each where the runs' HPARAMS sessions hold it (runs written
    before their sessions held every key by its config name may not: then the session hparams that differ between
    them). TensorBoard lists hparams marked `differs` first, by name, and shows five: the keys that tell the groups
    apart are marked, so that they come first; the rest follow."""
    runs = [run for group in comparison.groups for run in group.runs]
    values = {}
    for run in runs:
        for name, v in run.hparams.items():
            values.setdefault(name, []).append(v)
    differing = [name for name in values if len(set(map(repr, values[name]))) > 1]
    apart = [key for key in _swept_first(comparison.keys, swept) if key in values]
    if not apart and comparison.keys:
        apart = [name for name in sorted(differing) if name not in FOLLOWERS]
    followers = [name for name in FOLLOWERS if name in differing and name not in apart]
    experiment = api_pb2.Experiment(description=f"rethink: {', '.join(comparison.sources) or 'runs compared'}")
    for name in apart:
        experiment.hparam_infos.append(_hparam_info(name, values[name], differs=True))
    for name in followers:
        experiment.hparam_infos.append(_hparam_info(name, values[name], differs=False))
    for tag, title in METRICS.items():
        experiment.metric_infos.add(name=api_pb2.MetricName(tag=tag), display_name=title)
    return experiment


def _swept_first(keys: Sequence[str], swept: Sequence[str]) -> list[str]:
    """`keys` (config keys) with those the sweep set first, in its order; a swept group (`model`, `optimizer`) is
    its `.name`, a swept key above a leaf covers the leaf."""

    def rank(key: str) -> int:
        for i, name in enumerate(swept):
            if key in (name, f"{name}.name") or key.startswith(f"{name}."):
                return i
        return len(swept)

    return sorted(keys, key=rank)  # stable: the rest keep their order


def _hparam_info(name: str, values: list, differs: bool) -> api_pb2.HParamInfo:
    """A column with the type and domain of the values the runs' sessions hold (strings where they mix types)."""
    info = api_pb2.HParamInfo(name=name, differs=differs)
    kinds = {type(v) for v in values}
    if kinds == {bool}:
        info.type = api_pb2.DATA_TYPE_BOOL
        info.domain_discrete.extend(sorted(set(values)))
    elif kinds <= {int, float}:
        info.type = api_pb2.DATA_TYPE_FLOAT64
        info.domain_interval.min_value, info.domain_interval.max_value = min(values), max(values)
    else:
        info.type = api_pb2.DATA_TYPE_STRING
        info.domain_discrete.extend(sorted({_text(v) for v in values}))
    return info


def _write_band(writer: SummaryWriter, curve: str, runs: list[dict]) -> None:
    epochs, mean, std = mean_curve(runs)
    middle, low, high = group_tags(curve)
    for epoch, m, s in zip(epochs, mean, std):
        writer.add_scalar(middle, m, epoch)
        writer.add_scalar(low, m - s, epoch)
        writer.add_scalar(high, m + s, epoch)


def _remove_earlier(out_dir: Path) -> None:
    """The event files an earlier comparison wrote into `out_dir` (only those: they end in our suffixes), and the
    folders they leave empty."""
    for path in [
        *out_dir.glob(f"{GROUPS}/events.out.tfevents.*{COMPARISON_SUFFIX}"),
        *out_dir.glob(f"{GROUPS}/*/events.out.tfevents.*{GROUP_SUFFIX}"),
    ]:
        path.unlink(missing_ok=True)
    for folder in [*out_dir.glob(f"{GROUPS}/*"), out_dir / GROUPS]:
        try:
            folder.rmdir()
        except OSError:  # not empty (not ours alone), or not there
            pass


def _text(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)
