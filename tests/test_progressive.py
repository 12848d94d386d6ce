"""Progressive learning (progressive=v2): the schedule as a pure function, tiny CPU runs that train and log
each stage's image size and regularisation, resume mid-stage, progressive=none unchanged, loader workers,
torch.compile's recompile limit, the experiment."""

import multiprocessing
import os
import signal

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from rethink.config import validate
from rethink.errors import UserError
from rethink.hydra_app import CONF_DIR, compose_config
from rethink.tasks.train import train
from rethink.train import progressive
from rethink.train.checkpoint import load_checkpoint
from rethink.train.progressive import ProgressiveLearning, stage_of, stage_settings, stage_size

# A small network (b0's layout at width 0.25, one block per stage) at 32-64 px, one CPU thread.
TINY = [
    "data=synthetic",
    "data.images_per_class=24",
    "data.image_size=64",
    "data.num_workers=0",
    "data.batch_size=8",
    "model.width=0.25",
    "model.depth=0.1",
    "model.head=64",
    "model.train_size=64",
    "model.eval_size=32",
    "trainer.device=cpu",
    "trainer.cpu_threads=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.image_grid=false",
    "seed=3",
]
STAGES = [
    "progressive=v2",
    "progressive.stages=4",
    "progressive.min_size=32",
    "trainer.epochs=4",
    "data.augment=randaugment",
    "data.mixup_alpha=0.4",
]


def tiny(*overrides: str):
    cfg = compose_config([*TINY, *overrides])
    validate(cfg)
    return cfg


def recording_steps(monkeypatch, seen: list) -> None:
    """Learner.step records (image side, classifier dropout, mixup alpha or 0, live child processes) per batch."""
    import rethink.train.loop as loop

    real_step = loop.Learner.step

    def step(self, images, labels):
        mixers = getattr(self.mixer, "transforms", [])
        alpha = next((m.alpha for m in mixers if type(m).__name__ == "MixUp"), 0.0)
        seen.append((images.shape[-1], self.model.dropout.p, alpha, len(multiprocessing.active_children())))
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step)


def hparams_of(run_dir) -> dict:
    plugins = PluginAccumulator(str(run_dir))
    plugins.Reload()
    content = plugins.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def comparable(history: list[dict]) -> list[dict]:
    """Epoch records without their timings."""
    return [{k: v for k, v in r.items() if k not in ("epoch_s", "train_img_s")} for r in history]


def weights(run_dir) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the schedule ------------------------------------------------------------------------------------


def test_the_schedule_grows_size_and_regularisation_stage_by_stage():
    cfg = tiny(*STAGES)
    settings = [stage_settings(e, 4, cfg.progressive, cfg.model, cfg.data) for e in (1, 2, 3, 4)]
    assert [s.stage for s in settings] == [0, 1, 2, 3]
    assert [s.image_size for s in settings] == [40, 48, 56, 64]  # 32 + 32 * (k + 1) / 4: never 32 itself
    assert [s.dropout for s in settings] == pytest.approx(
        [0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2]
    )  # 0.1 -> model.dropout
    assert [s.randaug_magnitude for s in settings] == pytest.approx([5, 5 + 5 / 3, 5 + 10 / 3, 10])
    assert [s.mixup_alpha for s in settings] == pytest.approx([0, 0.4 / 3, 0.8 / 3, 0.4])  # 0 -> data.mixup_alpha
    # E epochs in M equal parts: epoch e (1-based) is in stage floor((e - 1) * M / E)
    assert [stage_of(e, 8, 4) for e in range(1, 9)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [stage_of(e, 10, 4) for e in range(1, 11)] == [0, 0, 0, 1, 1, 2, 2, 2, 3, 3]
    # the official V2-S schedule: 128 -> 300 in 4 stages (171, 214, 257, 300 unrounded)
    assert [stage_size(k, 4, 128, 300) for k in range(4)] == [168, 216, 256, 300]
    assert [stage_size(k, 3, 64, 299) for k in range(3)] == [144, 224, 299]  # the last stage is train_size itself
    # one stage: the end values at train_size; without RandAugment no magnitude
    one = tiny(*STAGES, "progressive.stages=1", "data.augment=flip_crop")
    assert stage_settings(3, 4, one.progressive, one.model, one.data) == progressive.StageSettings(
        0, 64, 0.2, None, 0.4
    )


def test_v2_preset_is_the_official_v2_s_schedule():
    cfg = compose_config(["model=v2_s", "progressive=v2", "data.augment=randaugment", "trainer.epochs=32"])
    first, last = (stage_settings(e, 32, cfg.progressive, cfg.model, cfg.data) for e in (1, 32))
    assert (first.image_size, first.dropout, first.randaug_magnitude, first.mixup_alpha) == (168, 0.1, 5, 0)
    assert (last.image_size, last.dropout, last.randaug_magnitude, last.mixup_alpha) == (300, 0.2, 10, 0)
    assert cfg.model.eval_size == 384


@pytest.mark.parametrize(
    "model, preset, ends",
    [
        ("v2_m", "v2_m", (384, 0.3, 15, 0.2)),
        ("v2_l", "v2_l", (384, 0.4, 20, 0.5)),
    ],
)
def test_v2_m_and_v2_l_presets_end_where_the_official_code_does(model, preset, ends):
    cfg = compose_config([f"model={model}", f"progressive={preset}", "data.augment=randaugment", "trainer.epochs=32"])
    validate(cfg)
    first, last = (stage_settings(e, 32, cfg.progressive, cfg.model, cfg.data) for e in (1, 32))
    assert (first.image_size, first.dropout, first.randaug_magnitude, first.mixup_alpha) == (
        192,
        0.1,
        5,
        0,
    )  # 128 + 256/4 = 192
    assert (last.image_size, last.dropout, last.randaug_magnitude, last.mixup_alpha) == pytest.approx(ends)
    assert progressive.enabled(cfg.progressive)


def test_a_null_randaugment_end_is_the_runs_own_magnitude():
    cfg = tiny(*STAGES, "progressive.randaug_magnitude=[null,null]", "data.randaug_magnitude=12")
    assert {stage_settings(e, 4, cfg.progressive, cfg.model, cfg.data).randaug_magnitude for e in (1, 4)} == {12}


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["progressive.min_size=96"], ["progressive.min_size=96", "model.train_size=64"]),
        (["trainer.epochs=3"], ["progressive.stages=4", "trainer.epochs"]),
    ],
)
def test_impossible_schedules_are_refused_with_one_line(overrides, words):
    with pytest.raises(UserError) as refused:
        ProgressiveLearning(tiny(*STAGES, *overrides), 4)
    assert all(w in str(refused.value) for w in words)


@pytest.mark.parametrize(
    "override, key",
    [
        ("progressive.randaug_magnitude=[5,25]", "progressive.randaug_magnitude"),
        ("data.randaug_magnitude=21", "data.randaug_magnitude"),
        ("progressive.dropout=[0.1]", "progressive.dropout"),
        ("progressive.stages=0", "progressive.stages"),
    ],
)
def test_out_of_range_keys_are_refused(override, key):
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        tiny(*STAGES, override)


def test_compile_may_recompile_once_per_stage():
    # set and put back by hand: pytest's monkeypatch, undoing on torch's config module, can leave the
    # limit unreadable to dynamo for the rest of the session
    config = torch._dynamo.config
    saved = config.cache_size_limit
    config.cache_size_limit = 8
    try:
        ProgressiveLearning(
            tiny(*STAGES, "progressive.stages=20", "trainer.epochs=40", "trainer.compile=true"), 4, compiled=True
        )
        assert config.cache_size_limit >= 2 * 20 + 2  # one entry per stage and mode, and some to spare
    finally:
        config.cache_size_limit = saved


# --- training -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    """An uninterrupted 4-epoch run in 4 stages, with what every training step saw."""
    run_dir, seen = tmp_path_factory.mktemp("staged"), []
    with pytest.MonkeyPatch.context() as monkeypatch:
        recording_steps(monkeypatch, seen)
        train(tiny(*STAGES), run_dir)
    return run_dir, seen


def test_each_stage_trains_and_logs_its_size_and_regularisation(staged_run, scalars):
    run_dir, seen = staged_run
    assert [size for size, *_ in seen] == [40, 40, 48, 48, 56, 56, 64, 64]  # two batches per epoch
    assert [p for _, p, *_ in seen[::2]] == pytest.approx([0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2])
    assert [a for _, _, a, _ in seen[::2]] == pytest.approx([0, 0.4 / 3, 0.8 / 3, 0.4])
    logged = scalars(run_dir)
    assert logged["train/image_size"] == [(1, 40), (2, 48), (3, 56), (4, 64)]
    for tag, values in [
        ("train/dropout", [0.1, 0.1 + 0.1 / 3, 0.1 + 0.2 / 3, 0.2]),
        ("train/randaug_magnitude", [5, 5 + 5 / 3, 5 + 10 / 3, 10]),
        ("train/mixup_alpha", [0, 0.4 / 3, 0.8 / 3, 0.4]),
    ]:
        assert [step for step, _ in logged[tag]] == [1, 2, 3, 4], tag
        assert [v for _, v in logged[tag]] == pytest.approx(values, abs=1e-6), tag
    history = load_checkpoint(run_dir / "checkpoints" / "last.pt")["history"]
    assert [(r["stage"], r["image_size"]) for r in history] == [(0, 40), (1, 48), (2, 56), (3, 64)]
    hparams = hparams_of(run_dir)
    assert (hparams["progressive.name"], hparams["progressive.stages"], hparams["progressive.min_size"]) == (
        "v2",
        4,
        32,
    )
    assert hparams["progressive_sizes"] == "40->64" and hparams["progressive_randaug"] == "5->10"


@pytest.mark.slow
def test_resume_in_the_middle_of_a_stage_continues_its_schedule_exactly(
    staged_run, tmp_path, monkeypatch, scalars, stop_exits
):
    uninterrupted, _ = staged_run
    import rethink.train.loop as loop

    real_step, steps = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):
        steps["n"] += 1
        if steps["n"] == 5:  # epoch 3's first batch: saved after it, with epoch 2 the last one finished
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)
    with pytest.raises(SystemExit):
        train(tiny(*STAGES), tmp_path)
    stopped = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 2 and stopped["partial"]["batches"] == 1
    seen = []
    recording_steps(monkeypatch, seen)
    train(tiny(*STAGES, f"resume={tmp_path}"), tmp_path / "ignored")
    assert [size for size, *_ in seen] == [56, 64, 64]  # epoch 3's second batch, then epoch 4
    resumed, whole = (load_checkpoint(d / "checkpoints" / "last.pt")["history"] for d in (tmp_path, uninterrupted))
    assert comparable(resumed) == comparable(whole)  # settings, losses and accuracies, epoch by epoch
    assert same_weights(weights(tmp_path), weights(uninterrupted))
    assert scalars(tmp_path)["train/image_size"] == [(1, 40), (2, 48), (3, 56), (4, 64)]


@pytest.mark.slow
def test_progressive_none_trains_bit_for_bit_as_before(tmp_path, monkeypatch, scalars):
    base = ["trainer.epochs=2", "data.augment=randaugment", "data.mixup_alpha=0.4"]
    train(tiny(*base), tmp_path / "none")  # the default: progressive=none

    class Absent:  # the training loop without progressive learning
        def __init__(self, *args, **kwargs):
            pass

        def apply(self, epoch, loader, model, learner):
            return loader

        def record(self):
            return {}

    with monkeypatch.context() as m:
        m.setattr(progressive, "ProgressiveLearning", Absent)
        train(tiny(*base), tmp_path / "before")
    # one stage whose settings are the run's own: the rebuilt loader, transform and mixer change nothing
    neutral = [
        "progressive=v2",
        "progressive.stages=1",
        "progressive.min_size=64",
        "progressive.dropout=[null,null]",
        "progressive.randaug_magnitude=[null,null]",
        "progressive.mixup_alpha=[null,null]",
    ]
    train(tiny(*base, *neutral), tmp_path / "neutral")
    none, before, same = (
        load_checkpoint(tmp_path / r / "checkpoints" / "last.pt") for r in ("none", "before", "neutral")
    )
    assert comparable(none["history"]) == comparable(before["history"])
    assert same_weights(none["model"], before["model"]) and same_weights(none["model"], same["model"])
    assert [r["train_loss"] for r in same["history"]] == [r["train_loss"] for r in none["history"]]
    assert not any(tag.startswith(("train/image_size", "train/dropout")) for tag in scalars(tmp_path / "none"))


@pytest.mark.slow
def test_loader_workers_see_each_stage_and_old_workers_are_gone(tmp_path, monkeypatch):
    seen, others = [], len(multiprocessing.active_children())
    recording_steps(monkeypatch, seen)
    train(
        tiny(
            "progressive=v2",
            "progressive.stages=2",
            "progressive.min_size=32",
            "model.train_size=48",
            "trainer.epochs=2",
            "data.num_workers=1",
        ),
        tmp_path,
    )
    assert [size for size, *_ in seen] == [40, 40, 48, 48]  # made in a worker process, persistent within a stage
    # epoch 2: the val loader's worker and the new train loader's; the first train loader's worker was shut down
    assert max(children for *_, children in seen) - others <= 2


@pytest.mark.slow
def test_compiled_model_recompiles_per_stage_not_per_batch(tmp_path, monkeypatch):
    """dynamo's eager backend (no C++ compiler needed): what is traced, and how often, is what inductor gets."""
    import functools

    from torch._dynamo.utils import counters

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    train(tiny(*STAGES, "progressive.stages=3", "trainer.epochs=3", "trainer.compile=true"), tmp_path)
    # per stage one graph for training and one for validation (no_grad), whatever the number of batches
    assert 3 <= counters["stats"]["unique_graphs"] <= 2 * 3
    assert counters["frames"]["ok"] == counters["frames"]["total"]  # none fell back to running uncompiled


def test_the_experiment_sweeps_progressive_learning_over_three_seeds():
    experiment = OmegaConf.load(CONF_DIR / "experiment" / "progressive_v2_s.yaml")
    assert dict(experiment.hydra.sweeper.params) == {"progressive": "none,v2", "seed": "0,1,2"}
    for option in ("none", "v2"):
        cfg = compose_config(["experiment=progressive_v2_s", f"progressive={option}"])
        validate(cfg)
        assert (
            cfg.model.name == "v2_s"
            and cfg.progressive.name.value == option
            and cfg.compare.baseline == "progressive=none"
        )
        ProgressiveLearning(cfg, 5)  # its schedule is possible
