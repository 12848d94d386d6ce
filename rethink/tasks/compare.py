"""task=compare: training runs grouped across seeds, set against each other, with a verdict.

It reads only what training runs leave (`.hydra/config.yaml`, `metrics.json`, `provenance.json`,
`test_predictions.csv`, `run.log`, TensorBoard events), so old runs compare too. Top to bottom:
1. reading: find the run folders under the given folders, and read each run's config, state
   (done, failed, stopped, incomplete), metrics, provenance, per-image test results, curves (val acc, val loss,
   train loss) and HPARAMS session;
2. grouping: runs whose configs differ only in ignored keys (seed, device, workers, ...) and that ran on the
   same data set (its split's fingerprint) form a group, labelled by the keys that tell the groups apart;
   groups are paired (baseline, candidate) so that each pair differs in one key, unless the user picks pairs;
3. judging: the pairs are judged as one family by rethink/stats.py;
4. writing: comparison.md, comparison.csv, verdicts.csv, accuracy_vs_cost.png and val_curves.png, what
   TensorBoard shows of it (groups/: tasks/compare_tensorboard.py), and the table and verdicts on stdout.
`compare` (task=compare) and `compare_sweep` (the end of every sweep) share `build_comparison` and
`write_comparison`. Accuracies are fractions in the CSVs and percentages (2 decimals) everywhere else.
"""

import csv
import functools
import io
import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from .. import stats
from ..atomic import atomic_write, atomic_write_text
from ..config import KEYS, CompareConfig, config_from_checkpoint, flatten, plain, value
from ..errors import UserError
from ..hydra_app import compose_config
from ..train.provenance import FILE as PROVENANCE_FILE
from ..train.report import TEST_RESULTS
from .compare_tensorboard import group_curves, mean_curve, write_tensorboard

log = logging.getLogger("rethink")

DONE, FAILED, STOPPED, INCOMPLETE = "done", "failed", "stopped", "incomplete"
# run.log lines that say where a run without metrics.json stands; the last one found wins
LOG_MARKERS = (
    (re.compile(r"\[ERROR\]\s*(.*)"), FAILED),
    (re.compile(r"\[WARNING\]\s*(stopped by signal.*)"), STOPPED),
    (re.compile(r"\[INFO\]\s*(resuming .*)"), INCOMPLETE),
)
ABSENT = "-"  # a key that one group's config does not have
FINGERPRINT = "data.fingerprint"  # the data set's identity (its split's fingerprint), grouped by as a key of the config
PROVENANCE = ("code_version", "device_name", "precision", "torch_version", "data_fingerprint")
# what a group's runs should share, and a warning says when they do not ("unknown": a run that did not record it)
PROVENANCE_POOLED = (
    ("code_version", "code versions"),
    ("device_name", "devices"),
    ("precision", "precisions"),
    ("data_fingerprint", "data sets"),
)


# 1. Reading runs -----------------------------------------------------------------------------------


@dataclass
class Run:
    path: Path
    config: dict  # the run's resolved config, typed by the schema, as plain Python
    flat: dict  # the same, as dotted key -> leaf value (`model.stages.3.block` -> "fused")
    state: str
    metrics: dict  # metrics.json ({} until the run finished)
    curves: dict  # from TensorBoard: "val_acc", "val_loss", "train_loss" -> epoch -> value
    note: str = ""  # why it failed or stopped, from run.log
    provenance: dict = field(default_factory=dict)  # provenance.json (code version, device, ...; {} for older runs)
    test_results: Optional["TestResults"] = None  # test_predictions.csv of a finished run (None for older runs)
    hparams: dict = field(default_factory=dict)  # its HPARAMS session's start: name -> value
    classes: Optional[int] = None  # how many classes it tells apart (classes.json)

    @property
    def val_curve(self) -> dict:
        return self.curves.get("val_acc", {})


@dataclass(frozen=True)
class TestResults:
    """A run's per-image test results, sorted by image name."""

    images: tuple[str, ...]
    correct: np.ndarray  # bool, one per image


def find_run_dirs(roots: Sequence[Path]) -> list[Path]:
    """Every folder under `roots` (or a root itself) that holds a Hydra record, once each: root by
    root, each in natural order (job 2 before job 10), so the first group is the first job's."""
    found = {}
    for root in roots:
        for folder in sorted((record.parent.parent for record in root.rglob(".hydra/config.yaml")), key=_natural_key):
            found.setdefault(folder.resolve(), folder)
    return list(found.values())


def read_runs(folders: Sequence[Path]) -> list[Run]:
    runs = (read_run(folder) for folder in folders)
    return [run for run in runs if run is not None]


def read_run(folder: Path) -> Optional[Run]:
    """The training run in `folder`; None when the folder holds another task's record. Its config is the one it
    last ran with (run_config.yaml: a resume that raised trainer.epochs files it under its new length), else
    Hydra's record of how it started."""
    config = _load_config(folder / "run_config.yaml") or _load_config(folder / ".hydra" / "config.yaml")
    if config is None or value(config.get("task", "train")) != "train":
        return None
    metrics = _load_json(folder / "metrics.json")
    curves, hparams, session_failed = _read_events(folder)
    if metrics is not None:
        state, note = DONE, ""
    else:
        state, note = _state_from_log(folder / "run.log")
        if state is None:
            state = FAILED if session_failed else INCOMPLETE
    recorded = {
        **{k: metrics[k] for k in PROVENANCE if k in (metrics or {})},
        **(_load_json(folder / PROVENANCE_FILE) or {}),
    }
    flat = flatten(config)
    if recorded.get("data_fingerprint"):  # what the data set is, wherever it lay (data.root is a how-key)
        flat[FINGERPRINT] = recorded["data_fingerprint"]
    results = read_test_results(folder / TEST_RESULTS) if state == DONE else None
    classes = _load_json(folder / "classes.json")
    return Run(
        folder,
        config,
        flat,
        state,
        metrics or {},
        curves,
        note,
        provenance=recorded,
        test_results=results,
        hparams=hparams,
        classes=len(classes) if isinstance(classes, list) else None,
    )


def read_test_results(path: Path) -> Optional[TestResults]:
    """test_predictions.csv (image, label, predicted), sorted by image; None when absent or unreadable."""
    try:
        with open(path, newline="") as f:
            rows = sorted((r["image"], r["label"] == r["predicted"]) for r in csv.DictReader(f))
    except (OSError, KeyError, csv.Error):
        return None
    if not rows:
        return None
    images, correct = zip(*rows)
    return TestResults(tuple(images), np.array(correct, dtype=bool))


def _load_config(path: Path) -> Optional[dict]:
    """The record as the schema types it today (keys added since the run get their defaults); as it
    is written when the schema no longer fits it."""
    try:
        record = OmegaConf.load(path)
    except Exception:
        return None
    try:
        return plain(config_from_checkpoint(OmegaConf.to_container(record, resolve=True)))
    except Exception:
        return OmegaConf.to_container(record, resolve=False, enum_to_str=True)


def _load_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _state_from_log(path: Path) -> tuple[Optional[str], str]:
    """(state, the line that says so) from the last marker line in run.log; (None, "") without one."""
    state, note = None, ""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return state, note
    for line in lines:
        for pattern, meaning in LOG_MARKERS:
            match = pattern.search(line)
            if match:
                state, note = meaning, match[1].strip()
                break
    return state, note[:200]


# The curves a run's TensorBoard events give, by the tags that hold them: the EMA weights' where the run kept
# them (they picked its best checkpoint)
CURVE_TAGS = {
    "val_acc": ("val_ema/acc", "val/acc"),
    "val_loss": ("val_ema/loss", "val/loss"),
    "train_loss": ("train/loss",),
}


def _read_events(folder: Path) -> tuple[dict, dict, bool]:
    """The run's curves (CURVE_TAGS), its HPARAMS session's hparams, and whether that session ended in failure."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator
    from tensorboard.plugins.hparams import api_pb2, metadata

    if not any(folder.glob("events.out.tfevents.*")):
        return {}, {}, False
    events = EventAccumulator(str(folder), size_guidance={SCALARS: 0})
    try:
        events.Reload()
    except Exception:  # a file cut short by a hard kill: what was read is kept
        pass
    tags = events.Tags().get("scalars", [])
    curves = {}
    for name, candidates in CURVE_TAGS.items():
        tag = next((t for t in candidates if t in tags), None)
        if tag is not None:
            curves[name] = {e.step: e.value for e in events.Scalars(tag)}
    try:
        session = events.PluginTagToContent(metadata.PLUGIN_NAME)
    except KeyError:  # no HPARAMS data in the events
        session = {}
    start, end = session.get(metadata.SESSION_START_INFO_TAG), session.get(metadata.SESSION_END_INFO_TAG)
    hparams = {}
    if start is not None:
        hparams = {
            k: getattr(v, v.WhichOneof("kind"))
            for k, v in metadata.parse_session_start_info_plugin_data(start).hparams.items()
            if v.WhichOneof("kind") in ("number_value", "string_value", "bool_value")
        }
    failed = end is not None and metadata.parse_session_end_info_plugin_data(end).status == api_pb2.STATUS_FAILURE
    return curves, hparams, failed


def _natural_key(path: Path) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


# 2. Grouping (pure) --------------------------------------------------------------------------------


@dataclass(eq=False)
class Group:
    runs: list[Run]
    config: dict  # the flat config its runs share (ignored keys left out)
    label: dict = field(default_factory=dict)  # the keys that tell the groups apart -> this group's values

    @property
    def done(self) -> list[Run]:
        return [run for run in self.runs if run.state == DONE]

    @property
    def name(self) -> str:
        return self.name_against(self)

    def name_against(self, other: "Group") -> str:
        """The label's keys in which this group differs from `other` (all of them against itself)."""
        keys = [k for k, v in self.label.items() if other is self or other.label.get(k) != v]
        return ", ".join(f"{k}={_show(self.label[k])}" for k in keys) or "all runs"


def is_ignored(key: str, ignored: Sequence[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in ignored)


def group_runs(runs: Sequence[Run], ignored: Sequence[str]) -> list[Group]:
    """Runs with equal configs once the `ignored` keys (and everything under them) are left out, and on the same
    data set (FINGERPRINT), in the order of their first run. A run that recorded no data set (one that failed before
    it started training, or an older run) joins the first group of its config that did; where no group of any config
    recorded one but one data set runs through all the groups, that is taken for the groups that did not record it."""
    use_fingerprint = not is_ignored(FINGERPRINT, ignored)
    keys, fingerprints = [], []
    seen: dict[tuple, list[str]] = {}  # config -> the data sets its runs recorded, in order
    for run in runs:
        config = {k: v for k, v in run.flat.items() if not is_ignored(k, ignored) and k != FINGERPRINT}
        key = tuple(sorted(config.items(), key=lambda item: item[0]))
        fingerprint = run.flat.get(FINGERPRINT) if use_fingerprint else None
        keys.append(key)
        fingerprints.append(fingerprint)
        if fingerprint is not None and fingerprint not in seen.setdefault(key, []):
            seen[key].append(fingerprint)
    groups: dict[tuple, Group] = {}
    for run, key, fingerprint in zip(runs, keys, fingerprints):
        fingerprint = fingerprint or next(iter(seen.get(key, [])), None)
        config = dict(key) | ({FINGERPRINT: fingerprint} if fingerprint else {})
        groups.setdefault((key, fingerprint), Group([], config)).runs.append(run)
    every = {group.config[FINGERPRINT] for group in groups.values() if FINGERPRINT in group.config}
    if len(every) == 1:
        for group in groups.values():
            group.config.setdefault(FINGERPRINT, next(iter(every)))
    return list(groups.values())


def label_groups(groups: Sequence[Group], option_defaults: Callable[[str, str], dict]) -> list[str]:
    """Set each group's label to the keys whose values differ between the groups, and return those keys.
    A key of a config group with a name (`model.*`, `optimizer.*`, ...) is left out where every group
    has the value its option sets (`option_defaults("model", "v2_s")`), so `model=b0,v2_s` is told
    apart by `model.name` alone, not by every size and stage, and `optimizer=sgd,adamw` by `optimizer.name`."""
    keys = list(dict.fromkeys(k for group in groups for k in group.config))
    differing = [k for k in keys if len({repr(g.config.get(k, ABSENT)) for g in groups}) > 1]

    def implied(key: str) -> bool:
        option = key.split(".")[0]
        return key != f"{option}.name" and all(
            f"{option}.name" in g.config
            and g.config.get(key, ABSENT) == option_defaults(option, str(g.config[f"{option}.name"])).get(key, ABSENT)
            for g in groups
        )

    shown = [k for k in differing if not implied(k)]
    for group in groups:
        group.label = {k: group.config.get(k, ABSENT) for k in shown}
    return shown


def pick_groups(groups: Sequence[Group], option: str, text: str) -> list[Group]:
    """The groups that `compare.<option>=<text>` selects: `key=value` conditions joined by commas
    (`key:value` too, for the command line, where Hydra keeps `=` for itself)."""
    keys = list(dict.fromkeys(k for group in groups for k in group.config))
    picked = list(groups)
    for condition in text.split(","):
        match = re.fullmatch(r"\s*([^=:\s]+)\s*[=:]\s*(.*?)\s*", condition)
        if not match:
            raise UserError(
                f"compare.{option}={text}: expected key=value (key:value on the command line), e.g. model.stages.3.block=mbconv"
            )
        key, wanted = match[1], match[2]
        if key not in keys and f"{key}.name" in keys:  # a group's name: model=v2_s means model.name=v2_s
            key = f"{key}.name"
        if key not in keys:
            differing = ", ".join(k for k in groups[0].label) or "none, there is one group"
            ignored = any(key in run.flat for group in groups for run in group.runs)
            why = (
                f"{key} is a key in which runs of one group may differ (compare.ignore)"
                if ignored
                else f"the runs have no key {key}"
            )
            raise UserError(f"compare.{option}={text}: {why}; the keys that differ between groups: {differing}")
        picked = [g for g in picked if _matches(g.config.get(key, ABSENT), wanted)]
        if not picked:
            values = ", ".join(dict.fromkeys(_show(g.config.get(key, ABSENT)) for g in groups))
            raise UserError(f"compare.{option}={text}: no group has {key}={wanted}; its values in the groups: {values}")
    return picked


def pair_groups(
    groups: Sequence[Group], baseline: Optional[list[Group]], candidate: Optional[list[Group]]
) -> list[tuple[Group, Group]]:
    """(baseline, candidate) pairs. Without filters, the pairs that differ in one key (`one_change_pairs`). When a
    filter picks several groups (one per model, say), each candidate is set against the baseline group that differs
    from it in the fewest keys (those pairs may differ in several: the user asked for them)."""
    if baseline is None and candidate is None:
        return one_change_pairs(groups)
    if baseline is None:
        baseline = [g for g in groups if g not in candidate]
    if candidate is None:
        candidate = [g for g in groups if g not in baseline]
    candidate = [g for g in candidate if g not in baseline]
    if not baseline or not candidate:
        raise UserError(
            "compare.baseline and compare.candidate pick the same groups; they must leave at least one group on each side"
        )
    return [(min(baseline, key=lambda b: changes(b, c)), c) for c in candidate]


def one_change_pairs(groups: Sequence[Group]) -> list[tuple[Group, Group]]:
    """Each group set against every group that differs from it in exactly one of the keys that tell groups apart,
    that key having its first value there (the first group's: in a sweep, the first value swept). Every verdict then
    reads as the effect of one change: in `model=b0,v2_s model.stages.3.block=mbconv,fused`, (v2_s, fused) meets
    (v2_s, mbconv) and (b0, fused), never (b0, mbconv). Ordered by candidate, then by key."""
    if not groups:
        return []
    first = groups[0].label
    pairs = []
    for candidate in groups:
        for key in candidate.label:
            if candidate.label[key] == first[key]:
                continue
            wanted = {**candidate.label, key: first[key]}
            pairs += [(g, candidate) for g in groups if g.label == wanted]
    return pairs


def changes(a: Group, b: Group) -> int:
    """The keys that tell groups apart in which `a` and `b` differ."""
    return sum(a.label.get(k) != b.label.get(k) for k in a.label)


def _matches(actual: Any, wanted: str) -> bool:
    if actual is None or isinstance(actual, bool):
        return _show(actual) == wanted.lower() or (actual is None and wanted.lower() == "none")
    if isinstance(actual, (int, float)):
        try:
            return float(wanted) == float(actual)
        except ValueError:
            return False
    return str(actual) == wanted


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return str(v)


# 3. Judging (pure) ---------------------------------------------------------------------------------


@dataclass
class Comparison:
    groups: list[Group]
    keys: list[str]  # the keys that tell the groups apart
    rows: list[dict]  # one per group, accuracies as fractions
    verdicts: list[dict]  # one per pair
    settings: CompareConfig
    sources: list[str]
    # groups that pool runs of different code versions, devices or precisions
    warnings: list[str] = field(default_factory=list)
    unpaired: list[int] = field(default_factory=list)  # the numbers of groups in no pair


def build_comparison(
    runs: Sequence[Run],
    settings: CompareConfig,
    sources: Sequence[str] = (),
    option_defaults: Optional[Callable[[str, str], dict]] = None,
) -> Comparison:
    check_settings(settings)
    groups = group_runs(runs, ["seed", *settings.ignore, *settings.also_ignore])
    keys = label_groups(groups, option_defaults or config_group_defaults)
    pairs = []
    if groups:
        baseline = pick_groups(groups, "baseline", settings.baseline) if settings.baseline else None
        candidate = pick_groups(groups, "candidate", settings.candidate) if settings.candidate else None
        pairs = pair_groups(groups, baseline, candidate)
    rows = [summarise(number, group, settings.confidence) for number, group in enumerate(groups, 1)]
    verdicts = judge(groups, pairs, settings)
    in_pairs = {group for pair in pairs for group in pair}
    unpaired = [number for number, group in enumerate(groups, 1) if group not in in_pairs] if len(groups) > 1 else []
    return Comparison(groups, keys, rows, verdicts, settings, list(sources), pooled_warnings(groups), unpaired)


def check_settings(s: CompareConfig) -> None:
    """What the ranges of the compare.* keys cannot say alone, as a one-line UserError."""
    alpha = 1 - s.confidence
    if s.power <= alpha:
        raise UserError(
            f"compare.power={s.power}: must be above the level of the test, 1 - compare.confidence = {percent(alpha)} "
            "(a test has that power for no difference at all); 0.8 is usual"
        )
    for option in ("ignore", "also_ignore"):
        unknown = [name for name in getattr(s, option) if name != FINGERPRINT and not KEYS.under(name)]
        if unknown:
            raise UserError(
                f"compare.{option}: {unknown[0]} is no key of the config; name keys or groups as the config does "
                "(trainer.device, data.on_gpu, eval)"
            )


def rules_of(settings: CompareConfig) -> stats.Rules:
    return stats.Rules(
        settings.confidence,
        settings.power,
        settings.detect,
        settings.margin,
        value(settings.correction),
        settings.bootstrap,
    )


def summarise(number: int, group: Group, confidence: float) -> dict:
    """One row of the table: the group's label, its seeds, and its runs' numbers (mean over seeds)."""
    done = group.done
    test = stats.describe(per_seed(done, "test_acc"), confidence)
    best_val = stats.describe(per_seed(done, "best_val_acc"), confidence)
    epochs = [
        r.metrics["train_time_s"] / r.metrics["epochs"]
        for r in done
        if r.metrics.get("epochs") and "train_time_s" in r.metrics
    ]
    params = _mean(_values(done, "params"))
    return {
        "group": number,
        **{k: _show(v) for k, v in group.label.items()},
        "seeds": test.n,
        "runs": _states(group.runs),
        "test_acc_mean": test.mean,
        "test_acc_std": test.std,
        "test_acc_ci_low": max(0.0, test.ci[0])
        if test.ci
        else None,  # an accuracy lies in 0-1: the interval is cut there
        "test_acc_ci_high": min(1.0, test.ci[1]) if test.ci else None,
        "runs_at_chance": sum(at_chance(run, confidence) for run in done),
        "best_val_acc_mean": best_val.mean,
        "best_val_acc_std": best_val.std,
        "final_train_loss": _mean(_values(done, "final_train_loss")),
        "params": round(params) if params is not None else None,
        "gmacs": _mean(_values(done, "gmacs"), 4),
        "s_per_epoch": _mean(epochs, 3),
        "train_img_s": _mean(_values(done, "train_img_s"), 1),
        "peak_memory_mb": _mean(_values(done, "peak_memory_mb"), 1),
    }


def judge(groups: Sequence[Group], pairs: Sequence[tuple[Group, Group]], settings: CompareConfig) -> list[dict]:
    """Every pair's verdict, the pairs judged as one family (rethink/stats.py), one dict each (verdicts.csv's rows)."""
    rules = rules_of(settings)
    inputs = [pair_input(a, b) for a, b in pairs]
    judged = stats.judge_pairs(inputs, rules)
    return [
        verdict_record(groups.index(a) + 1, a, groups.index(b) + 1, b, d, rules, pair)
        for (a, b), d, pair in zip(pairs, judged, inputs)
    ]


def pair_input(baseline: Group, candidate: Group) -> stats.Pair:
    """A pair's numbers: test accuracy per seed, one test image as a fraction of accuracy (from the runs' test
    images; None when a run did not record them) and the seeds' per-image results where every run saved them."""
    counts = [run.metrics.get("test_images") for run in baseline.done + candidate.done]
    known = counts and all(isinstance(n, int) and n > 0 for n in counts)
    a, b = seed_results(baseline.done), seed_results(candidate.done)
    return stats.Pair(
        per_seed(baseline.done, "test_acc"),
        per_seed(candidate.done, "test_acc"),
        1 / max(counts) if known else None,
        a[1] if a else None,
        b[1] if b else None,
        paired=bool(a and b and a[0] == b[0]),
    )


def seed_results(runs: Sequence[Run]) -> Optional[tuple[tuple[str, ...], np.ndarray]]:
    """(the test images, seeds x images: 1 where the seed's run got the image right; runs that repeat a seed are
    averaged, as in per_seed), or None when a run lacks its per-image results or the runs scored different images."""
    by_seed: dict[Any, list[np.ndarray]] = {}
    images = None
    for run in runs:
        if not isinstance(run.metrics.get("test_acc"), (int, float)):
            continue
        if run.test_results is None or images not in (None, run.test_results.images):
            return None
        images = run.test_results.images
        by_seed.setdefault(run.flat.get("seed", run.path), []).append(run.test_results.correct)
    if not by_seed:
        return None
    return images, np.array([np.mean(rows, axis=0) for rows in by_seed.values()])


def verdict_record(
    number_a: int,
    baseline: Group,
    number_b: int,
    candidate: Group,
    d: stats.Difference,
    rules: stats.Rules,
    pair: stats.Pair,
) -> dict:
    """Every number of one verdict (accuracies and differences as fractions)."""
    boot = d.bootstrap
    needed_low, needed_high = d.seeds_needed_range or (None, None)
    return {
        "baseline": number_a,
        "candidate": number_b,
        "baseline_name": baseline.name_against(candidate),
        "candidate_name": candidate.name_against(baseline),
        "changes": changes(baseline, candidate),
        "baseline_seeds": d.baseline.n,
        "candidate_seeds": d.candidate.n,
        "verdict": d.verdict,
        "reason": "; ".join([d.reason, *d.notes] if d.reason else d.notes),
        "diff": d.diff,
        "ci_low": d.ci[0] if d.ci else None,
        "ci_high": d.ci[1] if d.ci else None,
        "confidence": rules.confidence,
        "se": d.se,
        "df": d.df,
        "t": d.t,
        "p_value": d.p_value,
        "correction": rules.correction,
        "comparisons": d.comparisons,
        "p_adjusted": d.p_adjusted,
        "effect_size": d.effect_size,
        "margin": rules.margin,
        "p_equivalence": d.p_equivalence,
        "p_equivalence_adjusted": d.p_equivalence_adjusted,
        "test_images": round(1 / pair.resolution) if pair.resolution else None,
        "bootstrap_draws": boot.draws if boot else None,
        "bootstrap_low": boot.ci[0] if boot else None,
        "bootstrap_high": boot.ci[1] if boot else None,
        "p_beat": d.p_beat,
        "p_beat_low": boot.p_beat_ci[0] if boot else None,
        "p_beat_high": boot.p_beat_ci[1] if boot else None,
        "levels_agree": d.levels_agree,
        "power": rules.power,
        "level": d.level,
        "detectable": d.detectable,
        "detect": rules.detect,
        "seeds_needed": d.seeds_needed,
        "seeds_needed_low": needed_low,
        "seeds_needed_high": needed_high,
    }


def pooled_warnings(groups: Sequence[Group]) -> list[str]:
    """A line for each group whose finished runs differ in code version, device, precision or data set."""
    found = []
    for number, group in enumerate(groups, 1):
        for key, what in PROVENANCE_POOLED:
            seen = list(dict.fromkeys(str(run.provenance.get(key, "unknown")) for run in group.done))
            if len(seen) > 1:
                found.append(
                    f"group #{number} pools runs of different {what} ({', '.join(seen)}): its spread over seeds "
                    "includes whatever they change"
                )
    return found


def at_chance(run: Run, confidence: float) -> bool:
    """Whether a finished run's test accuracy is no better than guessing among its classes (1/classes): a one-sided
    binomial test on its test images at level 1 - confidence (without their count: not above 1/classes)."""
    acc, images = run.metrics.get("test_acc"), run.metrics.get("test_images")
    if not isinstance(acc, (int, float)) or not run.classes:
        return False
    return not stats.above_chance(acc, images, run.classes, confidence)


def per_seed(runs: Sequence[Run], key: str) -> list[float]:
    """One value per seed: the seed is the unit of repetition, so runs that repeat a seed (the same
    configuration in two sweeps) are averaged first rather than counted as independent samples."""
    by_seed: dict[Any, list[float]] = {}
    for run in runs:
        if isinstance(run.metrics.get(key), (int, float)):
            by_seed.setdefault(run.flat.get("seed", run.path), []).append(float(run.metrics[key]))
    return [float(np.mean(values)) for values in by_seed.values()]


def _values(runs: Sequence[Run], key: str) -> list[float]:
    return [float(r.metrics[key]) for r in runs if isinstance(r.metrics.get(key), (int, float))]


def _mean(values: Sequence[float], digits: Optional[int] = None) -> Optional[float]:
    if not len(values):
        return None
    mean = float(np.mean(values))
    return round(mean, digits) if digits is not None else mean


def _states(runs: Sequence[Run]) -> str:
    counts = {state: sum(r.state == state for r in runs) for state in (DONE, FAILED, STOPPED, INCOMPLETE)}
    return ", ".join(f"{n} {state}" for state, n in counts.items() if n)


# 4. Writing ----------------------------------------------------------------------------------------


def write_comparison(comparison: Comparison, out_dir: Path, swept: Sequence[str] = ()) -> str:
    """comparison.md, comparison.csv, (when some run finished) the two plots, and what TensorBoard shows of the
    comparison (tasks/compare_tensorboard.py; `swept`: the keys a sweep set, its first HPARAMS columns) in
    `out_dir`; prints the table and the verdicts. Returns the Markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    finished = any(group.done for group in comparison.groups)
    if finished:
        _save(_accuracy_vs_cost(comparison), out_dir / "accuracy_vs_cost.png")
        _save(_val_curves(comparison), out_dir / "val_curves.png")
    table = markdown(comparison)
    atomic_write_text(out_dir / "comparison.md", table + _runs_section(comparison))
    atomic_write_text(out_dir / "comparison.csv", _csv(comparison.rows))
    atomic_write_text(out_dir / "verdicts.csv", _csv(comparison.verdicts))
    try:
        write_tensorboard(comparison, out_dir, swept)
        board = (
            f"; TensorBoard: tensorboard --logdir {out_dir} (HPARAMS, and the groups' mean curves under Custom Scalars)"
        )
    except Exception as e:  # the files above are the comparison; TensorBoard's view of it must not take them down
        log.warning(f"could not write TensorBoard's view of the comparison into {out_dir / 'groups'}: {e!r}")
        board = ""
    print(table, end="")
    print(
        f"wrote {out_dir / 'comparison.md'}, comparison.csv, verdicts.csv"
        + (", accuracy_vs_cost.png, val_curves.png" if finished else "")
        + board
    )
    return table


def markdown(comparison: Comparison) -> str:
    """The table, the verdicts and the runs that did not finish, as Markdown."""
    s = comparison.settings
    level = percent(s.confidence)
    lines = ["# Comparison", ""]
    if comparison.sources:
        lines += [f"Runs under: {', '.join(comparison.sources)}", ""]
    runs = [run for group in comparison.groups for run in group.runs]
    if not runs:
        return "\n".join(lines + ["No training runs found.", ""])
    if not any(group.done for group in comparison.groups):
        lines += [f"No run finished ({_states(runs)}): nothing to compare.", ""]
    lines += [
        f"Runs: {len(runs)}; groups: {len(comparison.groups)} (runs whose configs differ only in seed and in the keys of "
        f"compare.ignore, listed at the end of comparison.md). Accuracies in percent: mean ± standard deviation over "
        f"seeds, and the {level} confidence interval of the mean (cut at 0 and 100)."
        + (" Runs that repeat a seed in one group are averaged first." if _repeats_a_seed(comparison.groups) else ""),
        "",
    ]
    header = [
        "#",
        *comparison.keys,
        "seeds",
        "runs",
        "test acc %",
        f"{level} CI",
        "best val acc %",
        "final train loss",
        "params",
        "GMACs",
        "s/epoch",
        "img/s",
        "peak MB",
    ]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comparison.rows:
        cells = [
            str(row["group"]),
            *(row[k] for k in comparison.keys),
            str(row["seeds"]),
            row["runs"],
            _pm(row["test_acc_mean"], row["test_acc_std"]),
            _interval(row["test_acc_ci_low"], row["test_acc_ci_high"]),
            _pm(row["best_val_acc_mean"], row["best_val_acc_std"]),
            _number(row["final_train_loss"], ".4f"),
            _number(row["params"], ",.0f"),
            _number(row["gmacs"], ".3f"),
            _number(row["s_per_epoch"], ".1f"),
            _number(row["train_img_s"], ".0f"),
            _number(row["peak_memory_mb"], ".0f"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if comparison.warnings:
        lines += ["Warnings:", "", *(f"- {warning}" for warning in comparison.warnings), ""]
    chance = [(row, group) for row, group in zip(comparison.rows, comparison.groups) if row["runs_at_chance"]]
    for row, group in chance:
        classes = {run.classes for run in group.done if run.classes}
        level = ", ".join(f"{100 / k:.2f}% on {k} classes" for k in sorted(classes))
        lines.append(
            f"- **#{row['group']}: {row['runs_at_chance']} of {len(group.done)} finished runs no better than chance** "
            f"({level}; a one-sided binomial test on their test images): such runs did not learn, and a verdict on "
            "them says nothing about their networks; train longer, or check the data and the learning rate."
        )
    if chance:
        lines.append("")
    if comparison.verdicts:
        lines += [
            "## Verdicts (candidate - baseline, test accuracy in points)",
            "",
            _family_sentence(comparison.verdicts, s),
            "",
        ]
        lines += [_verdict_lines(v, s) for v in comparison.verdicts]
        lines.append("")
    if comparison.unpaired:
        numbers = ", ".join(f"#{n}" for n in comparison.unpaired)
        lines += [
            f"Not set against any group: {numbers} (no group differs from {'it' if len(comparison.unpaired) == 1 else 'them'} "
            "in one key alone, at that key's first value); compare.baseline and compare.candidate pick pairs by hand.",
            "",
        ]
    unfinished = [run for run in runs if run.state != DONE]
    if unfinished:
        lines += ["## Runs that did not finish", ""]
        lines += [f"- {run.state}: {run.path}" + (f" ({run.note})" if run.note else "") for run in unfinished]
        lines.append("")
    return "\n".join(lines)


def _repeats_a_seed(groups: Sequence[Group]) -> bool:
    return any(len({run.flat.get("seed") for run in g.done}) < len(g.done) for g in groups)


def _family_sentence(verdicts: Sequence[dict], s: CompareConfig) -> str:
    """What the verdicts rest on: the seeds, the correction for their number, the test split."""
    m = max((v["comparisons"] for v in verdicts if v["p_value"] is not None), default=0)
    alpha, correction = 1 - s.confidence, value(s.correction)
    if m <= 1:
        family = "One verdict with a test: nothing to correct for."
    elif correction == "none":
        family = (
            f"The {m} verdicts are not corrected for their number (compare.correction=none): the chance of at least one "
            f"false **better** or **worse** among them is up to {percent(1 - (1 - alpha) ** m)}."
        )
    else:
        method = "Holm's step-down method" if correction == "holm" else "Bonferroni's method"
        family = (
            f"The p-values of the {m} verdicts are adjusted together by {method} (compare.correction={correction}): "
            f"the chance of any false **better** or **worse** among them is at most {percent(alpha)}."
        )
    return (
        f"Each verdict rests on the test accuracy of each seed (Welch's t at level {percent(alpha)}). {family} "
        "The test images are one fixed draw (data.split_seed): the interval over seeds and test images adds their "
        "sampling; nothing here covers other data sets, training lengths or code versions (those of the runs are "
        "listed at the end of comparison.md)."
    )


def _verdict_lines(v: dict, s: CompareConfig) -> str:
    """One verdict: the headline, then one line per level of evidence."""
    pair = f"#{v['candidate']} ({v['candidate_name']}) vs #{v['baseline']} ({v['baseline_name']})"
    head = f"- {pair}, {v['candidate_seeds']} vs {v['baseline_seeds']} seeds: **{_verdict_words(v)}**"
    if v["changes"] > 1:
        head += f" (the pair differs in {v['changes']} keys: a verdict on all the changes together)"
    if v["p_value"] is None:
        points = f"{_points(v['diff'])} points; " if v["diff"] is not None else ""
        return f"{head} ({points}{v['reason']})"
    if v["reason"]:
        head += f" ({v['reason']})"
    if v["levels_agree"] is False:
        head += (
            "; but over seeds and test images the interval holds 0: the test images cannot confirm it "
            "(a larger test split, or the gain shown on another data set, would)"
        )
    adjusted = (
        f", {value(s.correction).capitalize()}-adjusted p {_p(v['p_adjusted'])} (of {v['comparisons']})"
        if value(s.correction) != "none" and v["comparisons"] > 1
        else ""
    )
    effect = f"; effect size d = {v['effect_size']:.2f}" if v["effect_size"] is not None else ""
    margin = f"±{100 * v['margin']:.2f} points"
    equivalence = "shown" if v["p_equivalence_adjusted"] < 1 - s.confidence else "not shown"
    lines = [
        head,
        f"  - over seeds: {_points(v['diff'])} points, {percent(s.confidence)} CI [{_points(v['ci_low'])}, {_points(v['ci_high'])}] "
        f"(not adjusted); Welch t = {v['t']:.2f} with {v['df']:.1f} df, p {_p(v['p_value'])}{adjusted}{effect}",
        f"  - equivalence within {margin}: {equivalence} (two one-sided tests, p {_p(v['p_equivalence'])}"
        + (f", adjusted {_p(v['p_equivalence_adjusted'])})" if adjusted else ")"),
    ]
    p_beat = f"P(#{v['candidate']} beats #{v['baseline']} on a new seed) = {v['p_beat']:.2f}"
    if v["bootstrap_draws"]:
        lines.append(
            f"  - over seeds and test images ({v['test_images']} images, bootstrap of {v['bootstrap_draws']} draws): "
            f"{percent(s.confidence)} interval [{_points(v['bootstrap_low'])}, {_points(v['bootstrap_high'])}] points; "
            f"{p_beat}, interval [{v['p_beat_low']:.2f}, {v['p_beat_high']:.2f}]"
        )
    else:
        lines.append(
            f"  - over seeds and test images: not available (a run saved no per-image test results); {p_beat} (over the seeds' pairs)"
        )
    needed = f"{v['seeds_needed']}" if v["seeds_needed"] is not None else f"more than {stats.MOST_SEEDS}"
    low, high = (
        str(n) if n is not None else f"more than {stats.MOST_SEEDS}"
        for n in (v["seeds_needed_low"], v["seeds_needed_high"])
    )
    lines.append(
        f"  - power: these seeds detect {100 * v['detectable']:.2f} points ({percent(s.power)} power at level "
        f"{percent(v['level'])}); {100 * s.detect:.2f} points would need {needed} seeds a side ({low} to {high} over the "
        f"spread's {percent(s.confidence)} interval)"
    )
    return "\n".join(lines)


def _verdict_words(v: dict) -> str:
    if v["verdict"] == stats.EQUIVALENT:
        return f"equivalent within ±{100 * v['margin']:.2f} points"
    return v["verdict"]


def _p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"= {p:.3f}"


def percent(fraction: float) -> str:
    """A fraction as a percentage with the decimals it needs (95%, 99.9%, 0.1%), never rounded to 100% or 0%."""
    for decimals in range(4):
        text = f"{100 * fraction:.{decimals}f}"
        if abs(float(text) - 100 * fraction) < 1e-9 * max(1.0, 100 * fraction):
            return f"{text}%"
    return f"{100 * fraction:.3g}%"


def _runs_section(comparison: Comparison) -> str:
    """Every run, and the keys left out of the grouping (comparison.md only, not the screen)."""
    if not comparison.groups:
        return ""
    lines = [
        "## Runs",
        "",
        "| group | seed | state | test acc % | code version | device | precision | folder |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for number, group in enumerate(comparison.groups, 1):
        for run in group.runs:
            test = run.metrics.get("test_acc")
            recorded = [run.provenance.get(key, "unknown") for key in ("code_version", "device_name", "precision")]
            lines.append(
                f"| {number} | {run.flat.get('seed', ABSENT)} | {run.state} | {_number(test and 100 * test, '.2f')} | "
                + " | ".join(map(str, recorded))
                + f" | {run.path} |"
            )
    ignored = ", ".join(dict.fromkeys(["seed", *comparison.settings.ignore, *comparison.settings.also_ignore]))
    lines += ["", f"Keys in which runs of one group may differ (compare.ignore, compare.also_ignore): {ignored}."]
    return "\n" + "\n".join(lines) + "\n"


def _csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _pm(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return ABSENT
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _interval(low: Optional[float], high: Optional[float]) -> str:
    return f"[{100 * low:.2f}, {100 * high:.2f}]" if low is not None else ABSENT


def _points(fraction: float) -> str:
    return f"{100 * fraction:+.2f}"


def _number(x: Optional[float], spec: str) -> str:
    return ABSENT if x is None else format(x, spec)


def _figure(width: float, height: float, columns: int = 1, legend_entries: int = 0):
    """A figure of `columns` plots side by side, taller by the rows of a legend of `legend_entries` below them."""
    from matplotlib.figure import Figure  # Agg through savefig: no display, no pyplot state

    rows = -(-legend_entries // LEGEND_COLUMNS)
    figure = Figure(figsize=(width, height + 0.2 * rows), layout="constrained")
    return figure, figure.subplots(1, columns, squeeze=False)[0]


LEGEND_COLUMNS = 2


def _legend_below(figure, axes) -> None:
    """The legend of `axes` under the plots, where it covers nothing however many groups there are."""
    handles, labels = axes.get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(LEGEND_COLUMNS, len(handles)), fontsize=7)


def _save(figure, path: Path) -> None:
    atomic_write(path, lambda f: figure.savefig(f, format="png", dpi=120))


def _accuracy_vs_cost(comparison: Comparison):
    """Test accuracy against GMACs and against parameters, one point per group (the EfficientNet
    paper's first figure); error bars are the standard deviation over seeds."""
    figure, (by_gmacs, by_params) = _figure(12, 5, columns=2, legend_entries=len(comparison.groups))
    for number, (group, row) in enumerate(zip(comparison.groups, comparison.rows), 1):
        if row["test_acc_mean"] is None:
            continue
        y, spread = 100 * row["test_acc_mean"], 100 * (row["test_acc_std"] or 0)
        for axes, x in ((by_gmacs, row["gmacs"]), (by_params, row["params"] and row["params"] / 1e6)):
            if x is None:
                continue
            axes.errorbar([x], [y], yerr=[spread], fmt="o", capsize=4, label=f"#{number} {group.name}")
            axes.annotate(f"#{number}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    by_gmacs.set_xlabel("GMACs per image (eval size)")
    by_params.set_xlabel("parameters (millions)")
    for axes in (by_gmacs, by_params):
        axes.set_ylabel("test accuracy % (mean ± std over seeds)")
        axes.grid(alpha=0.3)
    _legend_below(figure, by_params)
    figure.suptitle("Test accuracy against cost")
    return figure


def _val_curves(comparison: Comparison):
    """Mean val accuracy per epoch per group, with a band of ± one standard deviation across seeds."""
    figure, (axes,) = _figure(8, 5, legend_entries=len(comparison.groups))
    for number, group in enumerate(comparison.groups, 1):
        curves = group_curves(group, "val_acc")
        if not curves:
            continue
        epochs, mean, std = mean_curve(curves)
        mean, std = 100 * mean, 100 * std
        (line,) = axes.plot(
            epochs, mean, marker="o", markersize=3, label=f"#{number} {group.name} ({len(curves)} seeds)"
        )
        axes.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.set_xlabel("epoch")
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.set_ylabel("val accuracy % (mean ± std over seeds)")
    axes.grid(alpha=0.3)
    _legend_below(figure, axes)
    figure.suptitle("Validation accuracy per epoch")
    return figure


# Entry points ----------------------------------------------------------------------------------------


@functools.cache
def config_group_defaults(group: str, option: str) -> dict:
    """The flat `<group>.*` keys that `<group>=<option>` sets as conf/ defines it today (`model=v2_s`:
    its sizes and its stage layout); {} when there is no such option (any more)."""
    try:
        config = flatten(plain(compose_config([f"{group}={option}"])))
    except Exception:
        return {}
    return {k: v for k, v in config.items() if k.startswith(f"{group}.")}


def compare(cfg: DictConfig, run_dir: Path) -> dict:
    """task=compare: the runs under `compare.dirs` (relative to the directory run.py was started from)."""
    settings: CompareConfig = OmegaConf.to_object(cfg.compare)
    check_settings(settings)
    if not settings.dirs:
        raise UserError("compare.dirs=[]: name at least one folder: a sweep, a run, or outputs")
    roots = [Path(d).expanduser() for d in settings.dirs]
    for root, given in zip(roots, settings.dirs):
        if not root.is_dir():
            raise UserError(f"compare.dirs: {given} is not a folder (relative paths start from {Path.cwd()})")
    runs = read_runs(find_run_dirs(roots))
    if not runs:
        raise UserError(
            f"compare.dirs=[{','.join(settings.dirs)}]: no training runs there (folders holding .hydra/config.yaml with task=train)"
        )
    comparison = build_comparison(runs, settings, settings.dirs)
    write_comparison(comparison, run_dir)
    return {"groups": comparison.rows, "verdicts": comparison.verdicts}


def compare_sweep(sweep_dir: Path, swept: Sequence[str] = ()) -> None:
    """The end of a sweep: its comparison in its folder, and the table on stdout. Never raises: a
    sweep whose jobs all failed gets a comparison that says so. Its settings are the compare.* keys
    the jobs ran with (an experiment may set compare.baseline); a filter that fits no group falls
    back to setting every group against the first. `swept`: the keys the sweep set."""
    sweep_dir = Path(sweep_dir)
    try:
        runs = read_runs(find_run_dirs([sweep_dir]))
        settings = _settings_of(runs)
        try:
            comparison = build_comparison(runs, settings, [str(sweep_dir)])
        except UserError as e:
            print(f"compare: {e}; pairing the groups that differ in one key instead")
            comparison = build_comparison(runs, replace(settings, baseline=None, candidate=None), [str(sweep_dir)])
        write_comparison(comparison, sweep_dir, swept)
    except Exception as e:  # a comparison must never take the sweep's runs down with it
        message = f"could not compare the runs of {sweep_dir}: {e!r}; try python run.py task=compare compare.dirs=[{sweep_dir}]"
        log.warning(message)
        try:
            atomic_write_text(sweep_dir / "comparison.md", f"# Comparison\n\n{message}\n")
        except OSError:
            pass


def _settings_of(runs: Sequence[Run]) -> CompareConfig:
    try:
        return OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(CompareConfig), runs[0].config.get("compare", {}))
        )
    except Exception:
        return CompareConfig()
