"""task=compare and the study's experiments: statistics, grouping, run states, a real sweep compared
end to end through run.py, verdicts on real runs with a planted difference and with none, and a
one-batch dry run of every experiment."""

import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from scipy import stats as scipy_stats

from rethink import stats
from rethink.config import CompareConfig
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.compare import (
    Run,
    _accuracy_vs_cost,
    _val_curves,
    build_comparison,
    compare,
    find_run_dirs,
    group_runs,
    label_groups,
    markdown,
    pair_groups,
    pick_groups,
    read_runs,
)
from rethink.tasks.train import train

ROOT = Path(__file__).resolve().parent.parent
RUN = [sys.executable, str(ROOT / "run.py")]
TINY = [
    "data=synthetic",
    "data.images_per_class=40",
    "data.image_size=40",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.train_size=32",
    "model.eval_size=32",
    "trainer.device=cpu",
    "trainer.epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.image_grid=false",
]
# a network that learns two synthetic classes to ~95% in 5 epochs, about a CPU second a run: B0 at a quarter
# of its width and depth, every stage Fused-MBConv (plain convolutions, no SE: quick and steady to train)
LEARNS = [
    "data=synthetic",
    "data.num_classes=2",
    "data.images_per_class=100",
    "data.image_size=24",
    "data.augment=none",
    "data.num_workers=0",
    "data.batch_size=16",
    "model.train_size=24",
    "model.eval_size=24",
    "model.width=0.25",
    "model.depth=0.25",
    *(f"model.stages.{i}.block=fused" for i in range(7)),
    "model.dropout=0",
    "model.drop_path_rate=0",
    "optimizer.lr=0.05",
    "trainer.label_smoothing=0",
    "trainer.device=cpu",
    "trainer.image_grid=false",
    "trainer.progress=false",
]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))


def train_run(run_dir: Path, overrides: list[str]) -> None:
    """A training run in-process, with the record Hydra would have written for it."""
    cfg = compose_config(overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    train(cfg, run_dir)


def fake_run(flat: dict, state: str = "done", test_acc: float = 0.5) -> Run:
    metrics = {"test_acc": test_acc, "best_val_acc": test_acc} if state == "done" else {}
    return Run(Path(f"/runs/{len(str(flat))}"), {}, flat, state, metrics, {})


# Statistics ----------------------------------------------------------------------------------------


def test_welch_interval_verdicts_and_power_analysis():
    base, better = [0.900, 0.910, 0.905], [0.950, 0.960, 0.955]
    d = stats.compare_samples(base, better)
    se = math.sqrt(2 * 0.005**2 / 3)
    df = stats.welch_df(0.005**2, 3, 0.005**2, 3)
    assert df == pytest.approx(4.0)
    half = scipy_stats.t.ppf(0.975, df) * se
    assert d.diff == pytest.approx(0.05) and d.ci == pytest.approx((0.05 - half, 0.05 + half))
    assert d.verdict == stats.BETTER
    assert stats.compare_samples(better, base).verdict == stats.WORSE
    assert stats.compare_samples(base, [0.901, 0.911, 0.906]).verdict == stats.WITHIN_NOISE
    assert stats.compare_samples([0.9], better).verdict == stats.CANNOT_JUDGE
    assert stats.compare_samples([], better).diff is None
    # the detectable difference is the one the test finds with 80% power at the 5% level
    assert stats.welch_power(d.detectable, 0.005**2, 3, 0.005**2, 3, 0.05) == pytest.approx(0.8, abs=1e-6)
    # seeds a side for 0.5 points at a 1-point spread: the first n with 80% power (the normal approximation says ~63)
    n = stats.seeds_needed(1e-4, 1e-4, 0.005, 0.05, 0.8)
    power = lambda k: stats.welch_power(0.005, 1e-4, k, 1e-4, k, 0.05)  # noqa: E731
    assert power(n) >= 0.8 > power(n - 1) and 60 <= n <= 70
    assert stats.seeds_needed(1e-2, 1e-2, 0.005, 0.05, 0.8) is None  # more than MOST_SEEDS
    same = stats.compare_samples([0.5, 0.5], [0.7, 0.7])
    assert (
        same.verdict == stats.CANNOT_JUDGE and same.detectable is None
    )  # no spread: nothing to judge or size a test by


# Grouping ------------------------------------------------------------------------------------------


def test_groups_ignore_seed_and_how_a_run_computes_and_are_told_apart_by_what_differs():
    def config(model, block, seed, device="cpu", size=224):
        return {
            "model.name": model,
            "model.train_size": size,
            "model.stages.3.block": block,
            "seed": seed,
            "trainer.device": device,
        }

    runs = [
        fake_run(config("b0", "mbconv", 0)),
        fake_run(config("b0", "mbconv", 1, "cuda")),
        fake_run(config("b0", "fused", 0)),
        fake_run(config("v2_s", "mbconv", 0, size=300), state="failed"),
    ]
    groups = group_runs(runs, ["seed", "trainer.device"])
    assert [len(g.runs) for g in groups] == [2, 1, 1]
    defaults = {
        "b0": {"model.train_size": 224, "model.stages.3.block": "mbconv"},
        "v2_s": {"model.train_size": 300, "model.stages.3.block": "mbconv"},
    }
    keys = label_groups(groups, lambda group, option: defaults[option] if group == "model" else {})
    assert keys == ["model.name", "model.stages.3.block"]  # train_size follows the model: not a difference of its own
    assert groups[2].done == [] and groups[2].name == "model.name=v2_s, model.stages.3.block=mbconv"

    assert pick_groups(groups, "baseline", "model.stages.3.block=fused") == [groups[1]]
    assert pick_groups(groups, "baseline", "model:v2_s") == [
        groups[2]
    ]  # a group's name, key:value as on the command line
    assert pick_groups(groups, "baseline", "model=b0, model.stages.3.block=mbconv") == [groups[0]]
    for text, message in [
        ("nosuch.key=1", "no key nosuch.key; the keys that differ between groups: model.name, model.stages.3.block"),
        (
            "model.stages.3.block=fusd",
            "no group has model.stages.3.block=fusd; its values in the groups: mbconv, fused",
        ),
        ("seed=1", "seed is a key in which runs of one group may differ"),
        ("model", "expected key=value"),
    ]:
        with pytest.raises(UserError, match=message):
            pick_groups(groups, "baseline", text)

    assert pair_groups(groups, None, None) == [(groups[0], groups[1]), (groups[0], groups[2])]
    # a filter that picks several baselines: each candidate meets the one that differs from it least
    assert pair_groups(groups, [groups[0], groups[1]], None) == [(groups[0], groups[2])]
    with pytest.raises(UserError, match="same groups"):
        pair_groups(groups, groups, None)


def test_run_states_come_from_metrics_the_log_and_the_records_task(tmp_path):
    record = OmegaConf.to_yaml(compose_config(TINY), resolve=True)
    logs = {
        "failed": "[10:00:00][INFO] training b0\n[10:00:01][ERROR] error: model.pretrained=/x.pt: no such file\n",
        "stopped": "[10:00:00][INFO] training b0\n[10:00:09][WARNING] stopped by signal 15 in epoch 1 after 3 batches\n",
        "resumed": "[10:00:09][WARNING] stopped by signal 15 in epoch 1\n[10:05:00][INFO] resuming b0 (4,012,672 params)\n",
        "running": "[10:00:00][INFO] training b0\n",
    }
    for name, log in [*logs.items(), ("done", "")]:
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "config.yaml").write_text(record)
        (tmp_path / name / "run.log").write_text(log)
    (tmp_path / "done" / "metrics.json").write_text(json.dumps({"test_acc": 0.5, "seed": 0}))
    (tmp_path / "eval" / ".hydra").mkdir(parents=True)  # another task's record: not a training run
    (tmp_path / "eval" / ".hydra" / "config.yaml").write_text(record.replace("task: train", "task: eval"))

    runs = {run.path.name: run for run in read_runs(find_run_dirs([tmp_path]))}
    assert {name: run.state for name, run in runs.items()} == {
        "done": "done",
        "failed": "failed",
        "stopped": "stopped",
        "resumed": "incomplete",
        "running": "incomplete",
    }
    assert "no such file" in runs["failed"].note
    comparison = build_comparison(list(runs.values()), CompareConfig())
    assert [row["runs"] for row in comparison.rows] == ["1 done, 1 failed, 1 stopped, 2 incomplete"]


# A sweep, end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_sweep_ends_with_its_comparison_and_task_compare_lists_a_failed_job(tmp_path):
    sweep = subprocess.run(
        [*RUN, "-m", "model=b0,v2_s", "seed=0,1", *TINY, "hydra.sweep.dir=sweep"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert "| # | model.name | seeds |" in sweep.stdout and "Verdicts" in sweep.stdout  # the table on screen
    assert re.search(r"^sweep \S*sweep: 4 runs, [\d.]+ [MG]B on disk \(checkpoints [\d.]+ [MG]B\)$", sweep.stdout, re.M)
    rows = list(csv.DictReader((tmp_path / "sweep" / "comparison.csv").open()))
    assert [(r["model.name"], r["seeds"], r["runs"]) for r in rows] == [("b0", "2", "2 done"), ("v2_s", "2", "2 done")]
    assert all(r["test_acc_std"] != "" and r["test_acc_ci_low"] != "" for r in rows)
    for plot in ["accuracy_vs_cost.png", "val_curves.png"]:
        assert (tmp_path / "sweep" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (
            tmp_path / "sweep" / plot
        ).stat().st_size > 10_000

    failed = subprocess.run(
        [*RUN, "-m", "model.pretrained=/nonexistent.pt", *TINY, "hydra.sweep.dir=failed"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode != 0
    assert "No run finished (1 failed)" in (tmp_path / "failed" / "comparison.md").read_text()

    compared = subprocess.run(
        [*RUN, "task=compare", "compare.dirs=[sweep,failed]"], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert compared.returncode == 0, compared.stderr[-3000:]
    [out] = list(tmp_path.glob("outputs/compare/*/*"))
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert [(r["model.name"], r["model.pretrained"], r["runs"]) for r in rows] == [
        ("b0", "false", "2 done"),
        ("v2_s", "false", "2 done"),
        ("b0", "/nonexistent.pt", "1 failed"),
    ]
    report = (out / "comparison.md").read_text()
    assert (
        "#3 (model.pretrained=/nonexistent.pt) vs #1 (model.pretrained=false), 0 vs 2 seeds: **cannot judge**" in report
    )
    assert "- failed: " in report and "no such file" in report
    assert (out / "val_curves.png").stat().st_size > 0 and (out / "accuracy_vs_cost.png").stat().st_size > 0

    mistake = subprocess.run(
        [*RUN, "task=compare", "compare.dirs=[sweep]", "compare.baseline=model:b9"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert mistake.returncode == 1 and "Traceback" not in mistake.stderr
    assert (
        "error: compare.baseline=model:b9: no group has model.name=b9; its values in the groups: b0, v2_s"
        in mistake.stderr
    )


# Verdicts on real runs -----------------------------------------------------------------------------


@pytest.mark.slow
def test_verdicts_better_for_a_planted_difference_and_within_noise_for_a_key_of_no_effect(tmp_path):
    groups = {
        "short": ["trainer.epochs=1", "optimizer.weight_decay=1e-4"],
        "long": ["trainer.epochs=5", "optimizer.weight_decay=1e-4"],
        "long_wd": ["trainer.epochs=5", "optimizer.weight_decay=1.0001e-4"],
    }
    for name, overrides in groups.items():
        for seed in range(3):
            train_run(tmp_path / f"{name}_{seed}", [*LEARNS, *overrides, f"seed={seed}"])

    def judged(baseline: str, candidate: str) -> tuple[dict, dict]:
        """The one verdict, and the table's rows by group number."""
        cfg = compose_config(
            [
                "task=compare",
                f"compare.dirs=[{tmp_path}]",
                f'compare.baseline="{baseline}"',
                f'compare.candidate="{candidate}"',
            ]
        )
        result = compare(cfg, tmp_path / "compare")
        [verdict] = result["verdicts"]
        return verdict, {row["group"]: row for row in result["groups"]}

    planted, rows = judged("trainer.epochs=1", "trainer.epochs=5,optimizer.weight_decay=0.0001")
    assert rows[planted["baseline"]]["trainer.epochs"] == "1" and rows[planted["candidate"]]["trainer.epochs"] == "5"
    assert planted["verdict"] == "better", planted
    assert 0 < planted["ci_low"] < planted["diff"] and 0 < planted["detectable"] < planted["diff"]
    assert planted["seeds_needed"] is None  # 0.5 points at a spread of several points: more than 1000 seeds a side
    assert "0.50 points would need more than 1000 seeds a side" in (tmp_path / "compare" / "comparison.md").read_text()
    # the weight-decay filter picks both 1e-4 groups as baselines: the candidate meets the one that differs only in it
    no_effect, rows = judged("optimizer.weight_decay=1e-4", "optimizer.weight_decay=1.0001e-4")
    assert rows[no_effect["baseline"]]["trainer.epochs"] == "5"
    assert no_effect["baseline_name"] == "optimizer.weight_decay=0.0001"  # a verdict names what differs within its pair
    assert no_effect["verdict"] == "within noise", no_effect
    assert (tmp_path / "compare" / "comparison.md").is_file() and (tmp_path / "compare" / "val_curves.png").is_file()


# The study's experiments ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_says_what_it_asks_composes_every_job_and_trains_one_batch(tmp_path, name):
    text = (ROOT / "experiments" / f"{name}.yaml").read_text()
    assert "Question:" in text and "Rough cost" in text
    experiment = OmegaConf.load(ROOT / "experiments" / f"{name}.yaml")
    params = OmegaConf.select(experiment, "hydra.sweeper.params") or {}
    jobs = [[]]
    if params:
        assert experiment.hydra.mode == "MULTIRUN"  # `python run.py experiment=NAME` sweeps without -m
        parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
        jobs = BasicSweeper.split_arguments(parsed, None)[0]
    configs = [compose_config([f"experiment={name}", *job]) for job in jobs]
    assert len({OmegaConf.to_yaml(c) for c in configs}) == len(jobs)  # every job is a different run

    dry = [
        "data=synthetic",
        "data.images_per_class=6",
        "data.image_size=16",
        "data.num_workers=0",
        "data.batch_size=2",
        "model.train_size=16",
        "model.eval_size=16",
        "model.pretrained=false",
        "trainer.device=cpu",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.image_grid=false",
        "trainer.grad_clip=1.0",
    ]  # one SGD step on 2 images of 16 px, where BatchNorm sees 1x1 maps, can diverge
    metrics = train(compose_config([f"experiment={name}", *jobs[0], *dry]), tmp_path)
    assert metrics["epochs"] == 1


# What the table and plots say of accuracies ---------------------------------------------------------


def test_a_group_at_chance_level_is_named_and_its_interval_stays_within_0_and_100(tmp_path):
    def run(block, seed, acc):
        metrics = {"test_acc": acc, "best_val_acc": acc, "test_images": 12}
        return Run(
            Path(f"/runs/{block}{seed}"),
            {},
            {"model.stages.3.block": block, "seed": seed},
            "done",
            metrics,
            {},
            classes=3,
        )

    learned = [run("mbconv", 0, 0.75), run("mbconv", 1, 1.0), run("mbconv", 2, 0.92)]  # 12 test images, 3 classes
    guessed = [run("fused", 0, 1 / 3), run("fused", 1, 1 / 3), run("fused", 2, 0.5)]
    comparison = build_comparison(learned + guessed, CompareConfig(), option_defaults=lambda group, option: {})
    first, second = comparison.rows
    assert 0 <= first["test_acc_ci_low"] and first["test_acc_ci_high"] == 1.0  # the t interval alone reaches past 100%
    assert (first["runs_at_chance"], second["runs_at_chance"]) == (
        0,
        3,
    )  # 6 of 12 on 3 classes: p = 0.18, no better than a guess
    text = markdown(comparison)
    assert "#2: 3 of 3 finished runs no better than chance** (33.33% on 3 classes" in text and "#1:" not in text
    assert (
        stats.above_chance(9 / 12, 12, 3) and not stats.above_chance(6 / 12, 12, 3) and stats.above_chance(0.5, None, 3)
    )


def test_the_legends_of_many_groups_lie_below_the_plots_and_cover_nothing(tmp_path):
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    runs = [
        Run(
            Path(f"/runs/{g}_{s}"),
            {},
            {"optimizer.lr": 0.001 * (g + 1), "seed": s},
            "done",
            {"test_acc": 0.5 + 0.01 * g + 0.01 * s, "best_val_acc": 0.5, "params": 4_000_000 + g, "gmacs": 0.4},
            {"val_acc": {1: 0.4, 2: 0.5 + 0.01 * s}},
        )
        for g in range(12)
        for s in range(2)
    ]
    comparison = build_comparison(runs, CompareConfig(), option_defaults=lambda group, option: {})
    for plot in (_accuracy_vs_cost, _val_curves):
        figure = plot(comparison)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib's "constrained_layout not applied" among them
            FigureCanvasAgg(figure).draw()
        [legend] = figure.legends
        box = legend.get_window_extent()
        assert (
            len(legend.get_texts()) == 12
            and figure.bbox.x0 <= box.x0
            and box.x1 <= figure.bbox.x1
            and box.y0 >= figure.bbox.y0
        )
        assert all(box.y1 <= axes.get_window_extent().y0 for axes in figure.axes)
