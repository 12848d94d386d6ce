"""Verdicts you could publish: on run folders built as a training run leaves them (its Hydra record, metrics.json,
provenance.json and test_predictions.csv, with known accuracies), noise is not read as a result however many groups
there are, no verdict comes from one test image, how a run computes does not split a group while the data set
does, and every verdict shows what it rests on. Also: the power of the Welch test against a simulation, and what a
real run records."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from scipy import optimize
from scipy import stats as scipy_stats

from rethink import stats
from rethink.config import CompareConfig, DataConfig
from rethink.data import build_data
from rethink.environment import code_version
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.compare import build_comparison, compare, find_run_dirs, read_runs
from rethink.tasks.train import train
from rethink.train import provenance
from rethink.train.distributed import interleaved

BASE = ["data=synthetic", "data.num_workers=0", "trainer.device=cpu"]
IMAGES = 551  # tf_flowers' test split


@pytest.fixture(scope="module")
def record() -> dict:
    """The resolved config of a run, as its .hydra/config.yaml holds it (composed once)."""
    return OmegaConf.to_container(compose_config(BASE), resolve=True)


def write_run(
    folder: Path,
    record: dict,
    seed: int,
    correct: int,
    settings: dict = (),
    images: int = IMAGES,
    reshuffle: float = 0.05,
    **recorded,
) -> None:
    """A finished run's folder as fit leaves it: `correct` of `images` test images right (the easiest ones, the
    order of difficulty reshuffled from seed to seed by `reshuffle` of the images), `settings` (dotted key -> value)
    in its record, `recorded` in its provenance."""
    config = OmegaConf.create(record)
    for key, value in {"seed": seed, **dict(settings)}.items():
        OmegaConf.update(config, key, value, merge=False)
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(config))
    names = [f"synthetic/{i:06d}" for i in range(images)]
    difficulty = np.arange(images) + np.random.default_rng([seed, correct]).normal(0, images * reshuffle, images)
    right = np.zeros(images, dtype=bool)
    right[np.argsort(difficulty)[:correct]] = True
    with open(folder / "test_predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label", "predicted"])
        writer.writerows((name, 0, 0 if ok else 1) for name, ok in zip(names, right))
    kept = {
        "code_version": "1a2b3c4d5e6f",
        "device_name": "NVIDIA H100",
        "precision": "bf16",
        "torch_version": "2.7.0",
        "data_fingerprint": "0f0f0f0f0f0f0f0f",
        **recorded,
    }
    (folder / "provenance.json").write_text(json.dumps(kept))
    metrics = {
        "test_acc": correct / images,
        "best_val_acc": correct / images,
        "test_images": images,
        "seed": seed,
        **kept,
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))


def comparison_of(root: Path, runs=None, **settings):
    """The comparison of the runs under `root` (read there unless given)."""
    runs = read_runs(find_run_dirs([root])) if runs is None else runs
    return build_comparison(runs, CompareConfig(**settings), [str(root)])


def correct_counts(rng: np.random.Generator, mean: float, spread: float, seeds: int, images: int = IMAGES) -> list[int]:
    return [int(round(images * rng.normal(mean, spread))) for _ in range(seeds)]


# Noise is not a result ------------------------------------------------------------------------------------------


@pytest.mark.slow  # 60 run folders read (about 10 s)
def test_twenty_groups_from_one_distribution_give_no_better_or_worse(tmp_path, record):
    rng = np.random.default_rng(7)  # a draw in which 2 of the 19 uncorrected verdicts are false (better or worse)
    for group in range(20):
        for seed, correct in enumerate(correct_counts(rng, 0.80, 0.01, 3)):
            write_run(tmp_path / f"{group}_{seed}", record, seed, correct, {"optimizer.lr": 0.01 + group / 1000})
    runs = read_runs(find_run_dirs([tmp_path]))
    uncorrected = comparison_of(tmp_path, runs, correction="none", bootstrap=0)
    false_results = [v for v in uncorrected.verdicts if v["verdict"] in ("better", "worse")]
    assert len(uncorrected.verdicts) == 19 and len(false_results) >= 1  # what Welch's t alone says of noise

    comparison = comparison_of(tmp_path, runs)
    assert [v["verdict"] for v in comparison.verdicts if v["verdict"] in ("better", "worse")] == []
    for v in comparison.verdicts:
        assert v["comparisons"] == 19 and v["p_adjusted"] >= v["p_value"] and v["level"] == pytest.approx(0.05 / 19)
    smallest = min(comparison.verdicts, key=lambda v: v["p_value"])
    assert smallest["p_adjusted"] == pytest.approx(min(1.0, 19 * smallest["p_value"]))  # Holm's first step
    report = tmp_path / "out" / "comparison.md"
    from rethink.tasks.compare import write_comparison

    write_comparison(comparison, report.parent)
    text = report.read_text()
    assert (
        "adjusted together by Holm's step-down method (compare.correction=holm)" in text
        and "of the 19 verdicts" in text
    )
    assert "Holm-adjusted p" in text
    rows = list(csv.DictReader((report.parent / "verdicts.csv").open()))
    assert len(rows) == 19 and {
        "p_value",
        "p_adjusted",
        "df",
        "effect_size",
        "ci_low",
        "bootstrap_low",
        "seeds_needed_high",
    } <= set(rows[0])


def test_holm_and_bonferroni_adjust_as_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # 4 x 0.005, 3 x 0.01, then max(2 x 0.03, 0.04) and 0.06 again (kept increasing)
    assert stats.adjust(p, "holm") == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.adjust(p, "bonferroni") == pytest.approx([0.04, 0.16, 0.12, 0.02])
    assert stats.adjust(p, "none") == pytest.approx(p)


def test_identical_seeds_a_quarter_point_or_one_test_image_apart_give_no_better(tmp_path, record):
    # 320/400 and 321/400: 80.00% and 80.25%, one test image apart, every seed the same (k/N three times has a
    # round-off variance of ~1e-32, not 0); and 446/551 against 447/551
    for name, images, counts in (("quarter", 400, (320, 321)), ("image", 551, (446, 447))):
        for side, correct in zip(("a", "b"), counts):
            for seed in range(3):
                write_run(
                    tmp_path / name / f"{side}{seed}",
                    record,
                    seed,
                    correct,
                    {"trainer.epochs": 30 if side == "a" else 40},
                    images,
                )
        [verdict] = comparison_of(tmp_path / name).verdicts
        assert verdict["verdict"] == "cannot judge", verdict
        assert "no spread the test set can resolve" in verdict["reason"]
    # without the runs' test images known, round-off alone is no spread either
    assert stats.compare_samples([0.80] * 3, [0.8025] * 3).verdict == stats.CANNOT_JUDGE
    # one side's spread is enough
    assert stats.compare_samples([443 / 551] * 3, [0.85, 0.86, 0.87]).verdict == stats.BETTER
    # a spread (one seed of ten scored one image more), and a difference of less than one test image: never a verdict
    one_image = stats.compare_samples([0.8] * 9 + [0.8025], [0.8025] * 10, resolution=1 / 400)
    assert one_image.p_adjusted < 0.05 and one_image.verdict == stats.WITHIN_NOISE
    assert "one test image" in one_image.reason


@pytest.mark.slow
def test_a_clear_six_point_difference_over_five_seeds_is_better_at_every_level(tmp_path, record):
    rng = np.random.default_rng(1)
    for name, mean, epochs in (("base", 0.80, 30), ("long", 0.86, 40)):
        for seed, correct in enumerate(correct_counts(rng, mean, 0.01, 5)):
            write_run(tmp_path / f"{name}{seed}", record, seed, correct, {"trainer.epochs": epochs})
    [v] = comparison_of(tmp_path).verdicts
    assert v["verdict"] == "better" and v["levels_agree"] is True and v["comparisons"] == 1
    assert 0.05 < v["diff"] < 0.07 and 0 < v["bootstrap_low"] < v["diff"] < v["bootstrap_high"] and v["p_beat"] > 0.99
    # the test images add their own uncertainty
    assert v["ci_high"] - v["ci_low"] < v["bootstrap_high"] - v["bootstrap_low"]
    assert v["seeds_needed_low"] <= v["seeds_needed"] <= v["seeds_needed_high"]
    again = comparison_of(tmp_path).verdicts[0]
    # seeded: the same folders give the same numbers
    assert (again["bootstrap_low"], again["p_beat_low"]) == (v["bootstrap_low"], v["p_beat_low"])


def test_the_test_images_can_disagree_with_the_seeds_and_the_verdict_says_so(tmp_path, record):
    # seeds that hardly vary in how many of 60 test images they get right, but much in which: a 3-image gain is
    # significant over seeds, not over test images
    for name, counts, epochs in (("base", (40, 40, 41, 41), 30), ("long", (43, 43, 44, 44), 40)):
        for seed, correct in enumerate(counts):
            write_run(
                tmp_path / f"{name}{seed}", record, seed, correct, {"trainer.epochs": epochs}, images=60, reshuffle=0.5
            )
    comparison = comparison_of(tmp_path)
    [v] = comparison.verdicts
    assert v["verdict"] == "better" and v["levels_agree"] is False and v["bootstrap_low"] < 0
    from rethink.tasks.compare import markdown

    assert "but over seeds and test images the interval holds 0" in markdown(comparison)


def test_equivalence_within_the_margin_is_shown_where_the_seeds_show_it(tmp_path, record):
    same = stats.compare_samples([0.800, 0.801, 0.802, 0.801, 0.800], [0.801, 0.800, 0.802, 0.801, 0.802], margin=0.005)
    assert same.verdict == stats.EQUIVALENT and same.p_equivalence < 0.05
    # TOST is two one-sided Welch tests: the 90% interval lies within the margin
    low, high = scipy_stats.ttest_ind(
        [0.801, 0.800, 0.802, 0.801, 0.802], [0.800, 0.801, 0.802, 0.801, 0.800], equal_var=False
    ).confidence_interval(0.90)
    assert -0.005 < low < high < 0.005
    unsure = stats.compare_samples([0.78, 0.80, 0.82], [0.79, 0.81, 0.80])
    assert unsure.verdict == stats.WITHIN_NOISE and unsure.p_equivalence > 0.05


# Power that is true for the test that decides ---------------------------------------------------------------------


def simulated_welch_difference(n: int, power: float = 0.8, alpha: float = 0.05, draws: int = 40_000) -> float:
    """The difference (in units of the seeds' standard deviation) that Welch's test, as scipy runs it on samples of
    n a side, detects `power` of the time: bisection on a fixed set of standard normal draws."""
    rng = np.random.default_rng(12345)
    a, b = rng.standard_normal((draws, n)), rng.standard_normal((draws, n))

    def rejected(delta: float) -> float:
        return float((scipy_stats.ttest_ind(b + delta, a, axis=1, equal_var=False).pvalue < alpha).mean())

    low, high = 0.0, 20.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (low, middle) if rejected(middle) >= power else (middle, high)
    return high


def noncentral_t_difference(n: int) -> float:
    """The 80%-power difference of a t test with fixed degrees of freedom (the Welch-Satterthwaite ones of equal
    spreads, 2n - 2): what the power analysis said before it integrated over the sample variances."""
    df, se = 2 * n - 2, math.sqrt(2 / n)
    critical = scipy_stats.t.ppf(0.975, df)

    def power(delta: float) -> float:
        nc = delta / se
        return scipy_stats.nct.sf(critical, df, nc) + np.nan_to_num(scipy_stats.nct.cdf(-critical, df, nc))

    return optimize.brentq(lambda delta: power(delta) - 0.8, 0, 30)


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_the_detectable_difference_is_the_simulated_welch_tests(n):
    printed = stats.detectable_difference(1.0, n, 1.0, n, 0.05, 0.8)
    simulated = simulated_welch_difference(n)
    assert printed == pytest.approx(simulated, rel=0.05)
    if n <= 3:  # at few seeds a fixed-degrees-of-freedom t test overstates the power: its difference is too small
        assert noncentral_t_difference(n) < 0.95 * simulated


def test_seeds_needed_has_a_range_from_the_spreads_uncertainty():
    low, high = stats.spread_factors(4, 0.95)  # 3 seeds a side
    assert low == pytest.approx(4 / scipy_stats.chi2.ppf(0.975, 4)) and high == pytest.approx(
        4 / scipy_stats.chi2.ppf(0.025, 4)
    )
    d = stats.compare_samples([0.80, 0.81, 0.82], [0.81, 0.82, 0.83])
    needed_low, needed_high = d.seeds_needed_range
    assert needed_low < d.seeds_needed < needed_high


# Groups: how a run computes is pooled, what the data is is not -----------------------------------------------------


@pytest.mark.slow
def test_runs_that_differ_only_in_how_they_compute_form_one_group_and_pooled_provenance_is_warned(tmp_path, record):
    how = [
        {"trainer.cuda_graphs": True, "data.on_gpu": True, "trainer.amp": "bf16", "data.root": "/data/a"},
        {
            "trainer.cuda_graphs": False,
            "data.on_gpu": False,
            "data.cache": False,
            "trainer.device": "cuda:1",
            "data.root": "/b",
        },
        {"trainer.compile": True, "data.num_workers": 4, "trainer.channels_last": False},
    ]
    for seed, settings in enumerate(how):
        write_run(
            tmp_path / f"run{seed}",
            record,
            seed,
            440 + seed,
            settings,
            precision="fp32" if seed else "bf16",
            code_version="1a2b3c4d5e6f+edited" if seed == 2 else "1a2b3c4d5e6f",
        )
    comparison = comparison_of(tmp_path)
    assert len(comparison.groups) == 1 and comparison.rows[0]["seeds"] == 3
    assert any("pools runs of different precisions (bf16, fp32)" in w for w in comparison.warnings)
    assert any("different code versions (1a2b3c4d5e6f, 1a2b3c4d5e6f+edited)" in w for w in comparison.warnings)
    # a run that failed before it recorded its data set counts in its config's group; an older finished run that
    # recorded none is pooled too, with a warning
    failed = tmp_path / "failed"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "config.yaml").write_text((tmp_path / "run0" / ".hydra" / "config.yaml").read_text())
    (failed / "run.log").write_text("[10:00:00][ERROR] error: model.pretrained=/x.pt: no such file\n")
    write_run(tmp_path / "older", record, 3, 441)
    (tmp_path / "older" / "provenance.json").unlink()
    (tmp_path / "older" / "metrics.json").write_text(
        json.dumps({"test_acc": 441 / IMAGES, "test_images": IMAGES, "seed": 3})
    )
    comparison = comparison_of(tmp_path)
    assert len(comparison.groups) == 1 and comparison.rows[0]["runs"] == "4 done, 1 failed"
    assert any("pools runs of different data sets (unknown, 0f0f0f0f0f0f0f0f)" in w for w in comparison.warnings)
    for folder in (failed, tmp_path / "older"):
        for path in sorted(folder.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        folder.rmdir()
    # the same settings on another data set (another split fingerprint) are another group, whatever data.root says
    write_run(tmp_path / "other_data", record, 0, 300, {"data.root": "/data/a"}, data_fingerprint="123456789abcdef0")
    comparison = comparison_of(tmp_path)
    assert comparison.keys == ["data.fingerprint"]
    assert sorted((row["data.fingerprint"], row["seeds"]) for row in comparison.rows) == [
        ("0f0f0f0f0f0f0f0f", 3),
        ("123456789abcdef0", 1),
    ]


def test_the_split_fingerprint_is_what_the_data_is_not_where_it_lies(tmp_path):
    def image(path: Path, value: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), value, dtype=np.uint8)).save(path)

    for i in range(6):
        for k, name in enumerate(("cat", "dog")):
            image(tmp_path / "a" / name / f"{i}.png", 40 * i + k)
            image(tmp_path / "b" / name / f"{i}.png", 40 * i + k)
    model = OmegaConf.create({"train_size": 16, "eval_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3})

    def fingerprint(root: Path, **values) -> str:
        return build_data(
            OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "folder", "root": str(root), **values}), model
        ).fingerprint

    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b")  # the same images elsewhere
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "a", split_seed=1)  # another split
    image(tmp_path / "b" / "dog" / "0.png", 255)
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")  # one image's content changed
    synthetic = OmegaConf.merge(
        OmegaConf.structured(DataConfig), {"name": "synthetic", "images_per_class": 6, "image_size": 16}
    )
    assert build_data(synthetic, model).fingerprint == build_data(synthetic, model).fingerprint


# Pairs that answer the sweep's question ---------------------------------------------------------------------------


@pytest.mark.slow
def test_a_factorial_sweep_sets_each_group_against_the_one_that_differs_in_one_key(tmp_path, record):
    rng = np.random.default_rng(3)
    cells = [("mbconv", 0.1), ("fused", 0.1), ("mbconv", 0.0), ("fused", 0.0)]  # the order a sweep's jobs come in
    for number, (block, smoothing) in enumerate(cells):
        for seed, correct in enumerate(correct_counts(rng, 0.80, 0.01, 3)):
            write_run(
                tmp_path / f"{number * 3 + seed}_job",
                record,
                seed,
                correct,
                {"model.stages.3.block": block, "trainer.label_smoothing": smoothing},
            )
    comparison = comparison_of(tmp_path)
    assert comparison.keys == ["model.stages.3.block", "trainer.label_smoothing"]
    assert [(v["candidate"], v["baseline"]) for v in comparison.verdicts] == [(2, 1), (3, 1), (4, 3), (4, 2)]
    assert all(v["changes"] == 1 for v in comparison.verdicts)
    asked = comparison_of(
        tmp_path,
        baseline="model.stages.3.block=mbconv,trainer.label_smoothing=0.1",
        candidate="model.stages.3.block=fused,trainer.label_smoothing=0.0",
    )
    assert [(v["candidate"], v["baseline"], v["changes"]) for v in asked.verdicts] == [(4, 1, 2)]  # shown when asked

    out = tmp_path / "out"
    from rethink.tasks.compare import write_comparison

    write_comparison(comparison, out)
    text = (out / "comparison.md").read_text()
    line = next(chunk for chunk in text.split("\n- ") if chunk.startswith("#4 (model.stages.3.block=fused) vs #3"))
    for part in (
        "seeds: **",
        "over seeds: ",
        "95% CI [",
        "Welch t = ",
        "df, p ",
        "Holm-adjusted p",
        "effect size d = ",
        "equivalence within ±0.50 points",
        "over seeds and test images (551 images, bootstrap of 10000 draws): 95% interval [",
        "P(#4 beats #3 on a new seed) = ",
        "power: these seeds detect",
        "seeds a side (",
    ):
        assert part in line, part
    assert "| code version | device | precision |" in text and text.count("| 1a2b3c4d5e6f | NVIDIA H100 | bf16 |") == 12


# Settings ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_every_compare_setting_is_checked_with_one_line_and_levels_keep_their_digits(tmp_path, record):
    for seed, correct in enumerate((440, 445, 450)):
        write_run(tmp_path / f"a{seed}", record, seed, correct)
        write_run(tmp_path / f"b{seed}", record, seed, correct + 5, {"trainer.epochs": 40})
    for settings, message in [
        ({"power": 0.01}, "compare.power=0.01: must be above the level of the test, 1 - compare.confidence = 5%"),
        ({"also_ignore": ["trainer.nosuch"]}, "compare.also_ignore: trainer.nosuch is no key of the config"),
    ]:
        with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
            comparison_of(tmp_path, **settings)
    from rethink.tasks.compare import markdown

    text = markdown(comparison_of(tmp_path, confidence=0.999, power=0.8))
    assert "99.9% CI" in text and "level 0.1%" in text and "100% CI" not in text and "0% level" not in text
    cfg = compose_config(
        ["task=compare", f"compare.dirs=[{tmp_path}]", "compare.correction=bonferroni", "compare.margin=0.01"]
    )
    result = compare(cfg, tmp_path / "compared")
    assert result["verdicts"][0]["correction"] == "bonferroni" and result["verdicts"][0]["margin"] == 0.01


# What a training run records ----------------------------------------------------------------------------------------


@pytest.mark.slow  # a training run (a few seconds)
def test_a_run_records_its_provenance_and_per_image_test_results(tmp_path, tiny, scalars):
    metrics = train(tiny("trainer.epochs=1"), tmp_path)
    commit, dirty = code_version()
    for key in (
        "code_version",
        "torch_version",
        "cuda_version",
        "cudnn_version",
        "device_name",
        "data_fingerprint",
        "precision",
    ):
        assert metrics[key] and json.loads((tmp_path / "provenance.json").read_text())[key] == metrics[key], key
    assert (
        metrics["code_version"] == provenance.describe_code(commit, dirty)
        and metrics["torch_version"] == torch.__version__
    )
    rows = list(csv.DictReader((tmp_path / "test_predictions.csv").open()))
    assert len(rows) == metrics["test_images"] and sum(r["label"] == r["predicted"] for r in rows) / len(
        rows
    ) == pytest.approx(metrics["test_acc"])
    split = {r["path"]: r for r in csv.DictReader((tmp_path / "splits.csv").open()) if r["split"] == "test"}
    assert {r["image"] for r in rows} == set(split) and all(split[r["image"]]["label"] == r["label"] for r in rows)
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    start = metadata.parse_session_start_info_plugin_data(
        events.PluginTagToContent("hparams")[metadata.SESSION_START_INFO_TAG]
    )
    assert start.hparams["code_version"].string_value == metrics["code_version"]
    assert start.hparams["data_fingerprint"].string_value == metrics["data_fingerprint"]


def test_the_code_version_is_unknown_outside_a_checkout_and_a_resume_by_other_code_records_both(tmp_path):
    assert code_version(tmp_path) == ("unknown", None) and provenance.describe_code("unknown", None) == "unknown"
    assert provenance.describe_code("a" * 40, True) == "aaaaaaaaaaaa+edited"
    first = provenance.record(tmp_path, {"code_version": "aaaaaaaaaaaa"})
    assert (
        first["code_version"] == "aaaaaaaaaaaa" and provenance.record(tmp_path, first)["code_version"] == "aaaaaaaaaaaa"
    )
    assert (
        provenance.record(tmp_path, {"code_version": "bbbbbbbbbbbb"})["code_version"]
        == "aaaaaaaaaaaa then bbbbbbbbbbbb"
    )


def test_the_shards_of_a_distributed_evaluation_come_back_in_the_splits_order():
    parts = [torch.tensor([0, 3, 6]), torch.tensor([1, 4]), torch.tensor([2, 5])]
    assert interleaved(parts).tolist() == list(range(7))
