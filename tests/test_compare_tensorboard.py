"""What TensorBoard shows of a comparison, read back through TensorBoard's own backend (the data its HPARAMS and
Custom Scalars pages draw): the hparams config, the groups' mean curves with their bands, the layout; then a real
sweep end to end, with its job folders, its HPARAMS sessions and a quiet log."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment

from rethink.config import CompareConfig
from rethink.rundir import SWEEP_JOBS_ENV, SWEPT_KEYS_ENV, job_dir
from rethink.tasks.compare import Run, build_comparison, find_run_dirs, read_runs
from rethink.tasks.compare_tensorboard import LAYOUT_CATEGORY, group_tags, hparams_config, write_tensorboard

ROOT = Path(__file__).resolve().parent.parent
SWEPT = ["model", "model.stages.3.block", "seed"]
SHOWN = 5  # TensorBoard's HPARAMS page ticks the first five hparams it gets (those marked `differs` first)


def tensorboard_backend(logdir: Path) -> base_plugin.TBContext:
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    provider = data_provider.MultiplexerDataProvider(multiplexer, str(logdir))
    return base_plugin.TBContext(
        logdir=str(logdir), data_provider=provider, multiplexer=multiplexer, plugin_name_to_instance={}
    )


def hparams_page(backend: base_plugin.TBContext) -> api_pb2.Experiment:
    """The experiment TensorBoard's HPARAMS page receives (GetExperiment, as the page asks for it)."""
    request = api_pb2.GetExperimentRequest(hparams_limit=1000)
    return get_experiment.Handler(context.RequestContext(), backend_context.Context(backend), "", request).run()


def custom_scalars_layout(backend: base_plugin.TBContext) -> dict:
    return json.loads(CustomScalarsPlugin(backend).layout_impl(context.RequestContext(), ""))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def ticked(experiment: api_pb2.Experiment) -> list[str]:
    """The hparams the page shows without a click: a stable sort by `differs`, then the first five."""
    infos = sorted(experiment.hparam_infos, key=lambda info: not info.differs)
    return [info.name for info in infos[:SHOWN]]


def study_runs() -> list[Run]:
    """2 models x 2 stage-3 blocks x 3 seeds, finished, each with the curves and HPARAMS session a run leaves."""
    runs = []
    for model, params in (("b0", 4_000_000), ("v2_s", 20_000_000)):
        for block in ("mbconv", "fused"):
            for seed in range(3):
                flat = {"model.name": model, "model.stages.3.block": block, "seed": seed, "optimizer.lr": 0.01}
                lift = 0.1 * seed + (0.05 if block == "fused" else 0)
                curves = {
                    "val_acc": {1: 0.3 + lift, 2: 0.5 + lift, 3: 0.6 + lift},
                    "val_loss": {1: 2.0 - lift, 2: 1.5 - lift, 3: 1.2 - lift},
                    "train_loss": {1: 1.6, 2: 1.3, 3: 1.0},
                }
                hparams = {
                    **flat,
                    "stages": model,
                    "params": params + (1000 if block == "fused" else 0),
                    "gmacs": 0.4,
                    "global_batch": 16,
                }
                metrics = {"test_acc": 0.6 + lift, "best_val_acc": 0.6 + lift, "test_images": 550}
                runs.append(
                    Run(
                        Path(f"/runs/{model}_{block}_{seed}"),
                        {},
                        flat,
                        "done",
                        metrics,
                        curves,
                        "",
                        hparams=hparams,
                        classes=5,
                    )
                )
    return runs


def test_hparams_config_lists_what_tells_the_groups_apart_then_seed_and_cost_and_no_constant(tmp_path):
    comparison = build_comparison(
        study_runs(), CompareConfig(), [str(tmp_path)], option_defaults=lambda group, option: {}
    )
    write_tensorboard(comparison, tmp_path, SWEPT)
    experiment = hparams_page(tensorboard_backend(tmp_path))
    assert [(info.name, info.differs) for info in experiment.hparam_infos] == [
        ("model.name", True),
        ("model.stages.3.block", True),
        ("params", False),
        ("seed", False),
    ]  # gmacs is the same everywhere
    assert ticked(experiment) == ["model.name", "model.stages.3.block", "params", "seed"]
    assert [(m.name.tag, m.display_name) for m in experiment.metric_infos] == [
        ("test/acc", "test acc"),
        ("val/acc_best", "best val acc"),
    ]
    block = experiment.hparam_infos[1]
    assert block.type == api_pb2.DATA_TYPE_STRING and [v.string_value for v in block.domain_discrete.values] == [
        "fused",
        "mbconv",
    ]
    seed = experiment.hparam_infos[3]
    assert seed.type == api_pb2.DATA_TYPE_FLOAT64 and (
        seed.domain_interval.min_value,
        seed.domain_interval.max_value,
    ) == (0, 2)

    # the swept keys come first, in the sweep's order, however the config orders them
    assert [info.name for info in hparams_config(comparison, ["model.stages.3.block", "model"]).hparam_infos][:2] == [
        "model.stages.3.block",
        "model.name",
    ]


def test_each_group_is_a_run_with_its_mean_curves_and_band_and_the_layout_draws_them(tmp_path):
    comparison = build_comparison(
        study_runs(), CompareConfig(), [str(tmp_path)], option_defaults=lambda group, option: {}
    )
    write_tensorboard(comparison, tmp_path, SWEPT)
    write_tensorboard(comparison, tmp_path, SWEPT)  # a comparison written again replaces the last one
    groups = sorted(p.name for p in (tmp_path / "groups").iterdir() if p.is_dir())
    assert groups == [
        "1_model=b0_stages.3.block=mbconv",
        "2_model=b0_stages.3.block=fused",
        "3_model=v2_s_stages.3.block=mbconv",
        "4_model=v2_s_stages.3.block=fused",
    ]
    assert len(list(tmp_path.glob("groups/events.out.tfevents.*"))) == 1 and not list(
        tmp_path.glob("events.out.tfevents.*")
    )
    fused = scalars(tmp_path / "groups" / groups[1])
    seeds = np.array([[0.3, 0.5, 0.6]]) + np.array([[0.05], [0.15], [0.25]])  # the three seeds' val acc, epochs 1-3
    mean, std = seeds.mean(axis=0), seeds.std(axis=0, ddof=1)
    middle, low, high = group_tags("val_acc")
    assert [step for step, _ in fused[middle]] == [1, 2, 3]
    assert [v for _, v in fused[middle]] == pytest.approx(mean, abs=1e-6)
    assert [v for _, v in fused[low]] == pytest.approx(mean - std, abs=1e-6)
    assert [v for _, v in fused[high]] == pytest.approx(mean + std, abs=1e-6)
    assert {tag for tag in fused} == {
        tag for curve in ("val_acc", "val_loss", "train_loss") for tag in group_tags(curve)
    }
    assert [v for _, v in fused["std_band/train_loss-std"]] == pytest.approx(
        [1.6, 1.3, 1.0], abs=1e-6
    )  # no spread: no band

    layout = custom_scalars_layout(tensorboard_backend(tmp_path))
    [category] = layout["category"]
    assert category["title"] == LAYOUT_CATEGORY
    assert [(chart["title"], chart["margin"]["series"]) for chart in category["chart"]] == [
        (title, [dict(zip(("value", "lower", "upper"), group_tags(curve)))])
        for curve, title in (("val_acc", "val acc"), ("val_loss", "val loss"), ("train_loss", "train loss"))
    ]


def test_sweep_job_numbers_have_the_width_of_the_last_so_that_they_sort(monkeypatch):
    monkeypatch.setenv(SWEPT_KEYS_ENV, "model,seed")
    monkeypatch.setenv(SWEEP_JOBS_ENV, "12")
    names = [job_dir(num, "b0", [f"seed={num}"]) for num in range(12)]
    assert names[3] == "03_b0_seed=3" and names == sorted(names)
    monkeypatch.setenv(SWEEP_JOBS_ENV, "10")
    assert job_dir(9, "b0", ["seed=9"]) == "9_b0_seed=9"


TINY = [
    "data=synthetic",
    "data.num_classes=2",
    "data.images_per_class=16",
    "data.image_size=24",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.train_size=16",
    "model.eval_size=16",
    "model.width=0.25",
    "model.depth=0.25",
    "trainer.device=cpu",
    "trainer.epochs=2",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "trainer.image_grid=false",
    "trainer.progress=false",
]


@pytest.mark.slow
def test_a_sweep_leaves_tensorboard_its_swept_keys_test_acc_and_the_groups_mean_curves(tmp_path):
    sweep = subprocess.run(
        [
            sys.executable,
            str(ROOT / "run.py"),
            "-m",
            "model=b0,v2_s",
            "model.stages.3.block=mbconv,fused",
            "seed=0,1",
            *TINY,
            "hydra.sweep.dir=sweep",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert (
        "Directory watcher" not in sweep.stderr and "No path found" not in sweep.stderr
    )  # TensorBoard's reader kept quiet
    folder = tmp_path / "sweep"
    assert "Directory watcher" not in (folder / "7_v2_s_stages.3.block=fused_seed=1" / "run.log").read_text()
    backend = tensorboard_backend(folder)
    experiment = hparams_page(backend)
    assert ticked(experiment) == ["model.name", "model.stages.3.block", "gmacs", "params", "seed"]
    assert [m.name.tag for m in experiment.metric_infos] == ["test/acc", "val/acc_best"]

    runs = {run.path.name: run for run in read_runs(find_run_dirs([folder]))}
    assert runs["0_b0_stages.3.block=mbconv_seed=0"].hparams["stages"] == "b0"  # set to the layout's own block: no edit
    assert runs["1_b0_stages.3.block=mbconv_seed=1"].hparams["model.stages.3.block"] == "mbconv"
    assert runs["2_b0_stages.3.block=fused_seed=0"].hparams["stages"] == "b0+edits"
    assert sorted(p.name for p in (folder / "groups").iterdir() if p.is_dir()) == [
        "1_model=b0_stages.3.block=mbconv",
        "2_model=b0_stages.3.block=fused",
        "3_model=v2_s_stages.3.block=mbconv",
        "4_model=v2_s_stages.3.block=fused",
    ]
    band = scalars(folder / "groups" / "4_model=v2_s_stages.3.block=fused")
    seeds = [runs[f"{job}_v2_s_stages.3.block=fused_seed={seed}"].curves["val_loss"] for job, seed in ((6, 0), (7, 1))]
    assert [v for _, v in band["group/val_loss"]] == pytest.approx(
        [np.mean([c[e] for c in seeds]) for e in (1, 2)], abs=1e-6
    )
    assert custom_scalars_layout(backend)["category"][0]["title"] == LAYOUT_CATEGORY
