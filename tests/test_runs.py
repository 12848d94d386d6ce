"""What a run reports and where it lands: exact resumes, honest scalars and HPARAMS, run folders that
never collide, refused runs that leave nothing, finished runs that are not trained twice."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def hparams_of(run_dir: Path) -> dict:
    plugins = PluginAccumulator(str(run_dir))
    plugins.Reload()
    content = plugins.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    info = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def session_ends(run_dir: Path) -> int:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    return sum(
        1
        for path in run_dir.glob("events.out.tfevents.*")
        for event in EventFileLoader(str(path)).Load()
        for value in event.summary.value
        if value.tag == "_hparams_/session_end_info"
    )


def signal_at_step(monkeypatch, step: int) -> None:
    """SIGTERM to this process just before training step `step` (1-based, counted over the run)."""
    import rethink.train.loop as loop

    real_step, steps = loop.Learner.step, {"n": 0}

    def step_then_signal(self, images, labels):
        steps["n"] += 1
        if steps["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, images, labels)

    monkeypatch.setattr(loop.Learner, "step", step_then_signal)


# --- numbers you can trust (issue 14) ---


@pytest.mark.slow
def test_a_resume_after_a_signal_mid_epoch_trains_exactly_what_an_uninterrupted_run_does(
    tmp_path, monkeypatch, tiny, stop_exits
):
    # dropout and drop path are on (B0's defaults): the resumed batches must draw what they would have drawn
    settings = ("trainer.epochs=2", "trainer.limit_train_batches=5")
    whole = train(tiny(*settings), tmp_path / "whole")
    signal_at_step(monkeypatch, 8)  # the third batch of epoch 2
    with pytest.raises(SystemExit) as stopped:
        train(tiny(*settings), tmp_path / "cut")
    assert stopped.value.code == 128 + signal.SIGTERM
    monkeypatch.undo()
    resumed = train(tiny(*settings, f"resume={tmp_path / 'cut'}"), tmp_path / "ignored")
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed["test_acc"] == whole["test_acc"]


@pytest.mark.slow
def test_the_logged_lr_is_the_one_each_epoch_trained_with(tmp_path, scalars, tiny):
    train(
        tiny("trainer.epochs=3", "scheduler=study_cosine", "scheduler.warmup_epochs=0", "optimizer.lr=0.01"), tmp_path
    )
    expected = [
        0.01,
        0.01 * (0.99 * 0.75 + 0.01),
        0.01 * (0.99 * 0.25 + 0.01),
    ]  # (1 + cos(pi e / 3)) / 2 = 1, 0.75, 0.25
    history = load_checkpoint(tmp_path / "checkpoints" / "last.pt")["history"]
    assert [r["lr"] for r in history] == pytest.approx(expected)
    assert [v for _, v in scalars(tmp_path)["lr"]] == pytest.approx(expected)


@pytest.mark.slow
def test_hparams_tell_apart_runs_that_change_a_stage(tmp_path, tiny):
    train(tiny("trainer.epochs=1", "trainer.limit_train_batches=1"), tmp_path / "plain")
    train(
        tiny("trainer.epochs=1", "trainer.limit_train_batches=1", "model.stages.1.kernel=5", "model.stages.1.expand=4"),
        tmp_path / "edited",
    )
    plain, edited = hparams_of(tmp_path / "plain"), hparams_of(tmp_path / "edited")
    assert plain["stage_1"] == "mbconv e6 k3 s2 c24 x2 se0.25"
    assert edited["stage_1"] == "mbconv e4 k5 s2 c24 x2 se0.25"
    assert {k for k in plain if plain[k] != edited.get(k)} == {
        "stages",
        "stage_1",
        "params",
        "gmacs",
        "model.stages.1.kernel",
        "model.stages.1.expand",
    }  # the keys by their names
    assert edited["stages"].endswith("+edits") and (
        edited["model.stages.1.kernel"],
        plain["model.name"],
        plain["seed"],
    ) == (5, "b0", 3)
    assert (
        plain["trainer.grad_clip"] == "null" and "trainer.device" not in plain
    )  # None as null; how-keys are no part of it


PEAK_AFTER_RESET = """
import torch
from rethink.train.runtime import peak_memory_mb, reset_memory_stats
cpu = torch.device("cpu")
big = torch.ones(400 * 2**20 // 4)  # 400 MB
big.add_(1)
del big
before, kind = peak_memory_mb(cpu)
reset_memory_stats(cpu)
after, _ = peak_memory_mb(cpu)
print(kind, before, after)
"""


@pytest.mark.slow
def test_peak_memory_on_the_cpu_is_this_runs_not_the_processes():
    """In a process of its own: the peak of a process that earlier tests made large would hide the 400 MB."""
    out = subprocess.run(
        [sys.executable, "-c", PEAK_AFTER_RESET], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    kind, before, after = out.stdout.split()
    if kind == "process_rss_lifetime":
        pytest.skip("this system cannot reset a process's peak memory (no /proc/self/clear_refs)")
    assert float(after) < float(before) - 300


def test_a_step_the_gradient_scaler_skips_moves_neither_the_schedule_nor_the_ema():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from rethink.train.loop import Inputs, Learner
    from rethink.train.runtime import Precision

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9), use_buffers=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    overflow = {"on": True}  # the first step's gradients overflow, as fp16 gradients do: the scaler skips it
    model[1].weight.register_hook(lambda grad: grad * float("inf") if overflow["on"] else grad)
    learner = Learner(
        model,
        optimizer,
        scheduler,
        Inputs(torch.device("cpu"), (0.5,) * 3, (0.5,) * 3, False),
        Precision(None, "cpu"),
        scaler,
        ema,
    )
    weights = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.randint(0, 255, (4, 3, 4, 4), dtype=torch.uint8), torch.tensor([0, 1, 0, 1])
    learner.step(images, labels)
    assert scaler.get_scale() < 2.0**16  # it was skipped
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    assert scheduler.last_epoch == 0 and int(ema.n_averaged) == 0
    overflow["on"] = False
    learner.step(images, labels)
    assert scheduler.last_epoch == 1 and int(ema.n_averaged) == 1


@pytest.mark.slow
def test_a_signal_during_the_last_validation_stops_the_run_and_the_resume_completes_it(
    tmp_path, monkeypatch, scalars, tiny, stop_exits
):
    import rethink.train.fit as train_task

    real, calls = train_task.evaluate, {"n": 0}

    def evaluate_then_signal(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 2's validation, the last
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_task, "evaluate", evaluate_then_signal)
    with pytest.raises(SystemExit) as stopped:
        train(tiny(), tmp_path)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    train(tiny(f"resume={tmp_path}"), tmp_path / "ignored")
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2
    assert [step for step, _ in scalars(tmp_path)["val/acc"]] == [1, 2]
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["scheduler"]["last_epoch"] == 8  # 2 epochs x 4 steps


@pytest.mark.slow
def test_a_signal_during_the_test_pass_stops_the_run_and_the_resume_only_scores_it(
    tmp_path, monkeypatch, scalars, tiny, stop_exits
):
    import rethink.train.fit as train_task

    real, calls = train_task.evaluate, {"n": 0}

    def evaluate_then_signal(*args, **kwargs):
        calls["n"] += 1
        if kwargs.get("description") == "test":
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_task, "evaluate", evaluate_then_signal)
    with pytest.raises(SystemExit):
        train(tiny(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()
    monkeypatch.undo()
    train(tiny(f"resume={tmp_path}"), tmp_path / "ignored")
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2
    assert [step for step, _ in scalars(tmp_path)["test/acc"]] == [2]


# --- run folders (issue 15) ---


def test_runs_started_together_each_get_their_own_folder(tmp_path, run_command, unseeded):
    args = [
        *unseeded,
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.image_grid=false",
    ]
    runs = [
        subprocess.Popen(
            [*run_command, *args, f"seed={s}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for s in range(3)
    ]
    outputs = [p.communicate(timeout=600) for p in runs]
    assert [p.returncode for p in runs] == [0, 0, 0], [err[-1500:] for _, err in outputs]
    folders = sorted(p.parent for p in tmp_path.glob("outputs/train/*/*/metrics.json"))
    assert len(folders) == 3
    for folder in folders:
        seed = json.loads((folder / "metrics.json").read_text())["seed"]
        assert f"seed={seed}" in (folder / ".hydra" / "overrides.yaml").read_text()
        assert len(list(folder.glob("events.out.tfevents.*"))) == 1
        assert (folder / "run.log").read_text().count("test acc") == 1
    printed = [re.findall(r"^run directory: (.+)$", out, flags=re.M) for out, _ in outputs]
    assert [len(lines) for lines in printed] == [1, 1, 1]  # each run says where it landed, once
    assert sorted(Path(lines[0]).resolve() for lines in printed) == [f.resolve() for f in folders]


def test_a_folder_name_is_claimed_atomically_across_processes(tmp_path):
    claim = "import sys; from rethink.rundir import FOLDERS; print(FOLDERS.claim(sys.argv[1]))"
    target = str(tmp_path / "outputs" / "train" / "day" / "12-00-00")
    runs = [
        subprocess.Popen([sys.executable, "-c", claim, target], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    claimed = [p.communicate(timeout=120)[0].strip() for p in runs]
    assert sorted(claimed) == [target, f"{target}-1", f"{target}-2", f"{target}-3"]


@pytest.mark.slow
def test_a_finished_run_is_not_trained_again_but_can_be_continued(tmp_path, scalars, tiny, tiny_overrides):
    train(tiny("trainer.epochs=1"), tmp_path)
    without_epochs = [a for a in tiny_overrides if not a.startswith("trainer.epochs")]  # the run's own trainer.epochs
    for command_line in ([*tiny_overrides, "trainer.epochs=1"], without_epochs):
        with pytest.raises(UserError, match="already trained 1 epochs.*raise trainer.epochs"):
            train(compose_config([*command_line, f"resume={tmp_path}"]), tmp_path / "x")
    train(tiny("trainer.epochs=2", f"resume={tmp_path}"), tmp_path / "x")
    with pytest.raises(UserError, match="already trained 2 epochs, more than trainer.epochs=1"):
        train(tiny("trainer.epochs=1", f"resume={tmp_path}"), tmp_path / "x")
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["test/acc"]] == [2]
    assert [step for step, _ in logged["val/acc"]] == [1, 2]
    assert session_ends(tmp_path) == 1
    assert json.loads((tmp_path / "metrics.json").read_text())["epochs"] == 2
    assert json.loads((tmp_path / "metrics.epoch1.json").read_text())["epochs"] == 1


def test_eval_into_a_training_run_folder_keeps_the_training_record(tmp_path, run_py, tiny_overrides):
    base = [*tiny_overrides, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"]
    assert run_py(*base).returncode == 0
    record = {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir() if p.is_file()}
    evaluated = run_py("task=eval", f"ckpt={tmp_path}", f"hydra.run.dir={tmp_path}", "trainer.device=cpu")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in (tmp_path / ".hydra").iterdir() if p.is_file()} == record
    assert list((tmp_path / ".hydra").glob("eval-*/config.yaml"))


@pytest.mark.parametrize(
    "mistake",
    [
        ["trainer.epochs=-1"],
        ["trainer.device=cuda:7"],
        ["task=eval"],
        ["model.pretrained=/nonexistent.pt"],
    ],
)
def test_a_refused_run_leaves_no_folder(tmp_path, mistake, run_py, tiny_overrides):
    result = run_py(*tiny_overrides, *mistake, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr.splitlines()[-1].startswith("error: "), result.stderr[-2000:]
    assert "[ERROR]" not in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/*/*/*")), list(tmp_path.glob("outputs/**"))


def test_a_refused_resume_leaves_the_run_untouched(tmp_path, run_py, tiny_overrides):
    base = [*tiny_overrides, "trainer.epochs=1", f"hydra.run.dir={tmp_path}"]
    assert run_py(*base).returncode == 0
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    log = (tmp_path / "run.log").read_text()
    for refused in (["optimizer.lr=0.5"], ["trainer.epochs=1"], ["model=v2_s"]):
        result = run_py(*base, *refused, f"resume={tmp_path}")
        assert result.returncode == 1, result.stderr[-2000:]
        assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
        assert (tmp_path / "run.log").read_text() == log
    assert "model: b0 -> v2_s" in result.stderr and len(result.stderr) < 800


def test_a_sweep_lists_its_jobs_without_running_them_and_names_them_by_what_it_sweeps(tmp_path, run_py):
    listed = run_py("-m", "model=b0,v2_s", "model.stages.3.block=mbconv,fused", "seed=0", "--dry-run", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "#3 3_v2_s_stages.3.block=fused: model=v2_s model.stages.3.block=fused seed=0" in listed.stdout
    assert re.search(
        r"^4 job\(s\), sweeping model, model.stages.3.block, into outputs/multirun/\d{4}-\d\d-\d\d/\d\d-\d\d-\d\d/ "
        r"\(or \d\d-\d\d-\d\d-1, -2, \.\.\. if another run takes that name first\):$",
        listed.stdout,
        re.M,
    ), listed.stdout
    assert not (tmp_path / "outputs").exists()
    named = run_py("-m", "seed=0,1", "hydra.sweep.dir=studies/a", "--dry-run", cwd=tmp_path)
    assert "2 job(s), sweeping seed, into studies/a/:" in named.stdout
    refused = run_py("-m", "model=b0,b9", cwd=tmp_path)  # a job that does not compose refuses the whole sweep
    assert refused.returncode == 1 and "model=b9: no such option" in refused.stderr
    assert not list(tmp_path.rglob("multirun.yaml")) and not list(tmp_path.glob("outputs/multirun/*"))
    experiment = run_py("experiment=shallow_fusion", "--dry-run", cwd=tmp_path)
    assert experiment.returncode == 0 and "10 job(s)" in experiment.stdout, experiment.stdout + experiment.stderr


def test_a_sweep_experiment_without_m_runs_as_a_sweep(tmp_path, run_py, unseeded):
    result = run_py(
        "experiment=shallow_fusion",
        *unseeded,
        "model.stages.3.block=fused",
        "seed=0",
        "trainer.epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "outputs" / "train").exists()
    jobs = list(tmp_path.glob("outputs/multirun/*/*/0_v2_s*/metrics.json"))
    assert len(jobs) == 1


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_loader_workers_saves_and_the_resume_completes(
    tmp_path, run_command, run_py, scalars, tiny_overrides, wait_for_checkpoint_writes
):
    args = [
        *tiny_overrides,
        "data.num_workers=2",
        "trainer.epochs=4",
        "trainer.limit_train_batches=null",
        f"hydra.run.dir={tmp_path}",
    ]
    process = subprocess.Popen(
        [*run_command, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_checkpoint_writes(tmp_path / "checkpoints" / "last.pt", process, writes=1)
    for _ in range(2):  # as `timeout` does: the process, then its whole group (the loader workers too)
        os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    assert "stopped by signal 15" in output and "Traceback" not in output, output[-3000:]
    resumed = run_py(*args, f"resume={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["scheduler"]["last_epoch"] == 4 * ckpt["steps_per_epoch"]  # no step repeated or lost
    assert [step for step, _ in scalars(tmp_path)["val/acc"]] == [1, 2, 3, 4]


def test_resume_auto_in_a_new_folder_says_it_starts_a_run(tmp_path, run_py, tiny_overrides):
    result = run_py(*tiny_overrides, "trainer.epochs=1", "trainer.limit_train_batches=1", "resume=auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (
        "resume=auto: " in result.stderr
        and "is a new folder, so there is no run to continue: this starts one" in result.stderr
    )


def test_counts_agree_with_their_nouns():
    from rethink.train.report import counted

    assert (
        counted(1, "thread"),
        counted(2, "thread"),
        counted(1, "class", "classes"),
        counted(4, "class", "classes"),
    ) == ("1 thread", "2 threads", "1 class", "4 classes")


def test_a_val_loss_far_above_the_train_loss_is_explained_in_its_epoch_line():
    from rethink.train.checkpoint import Progress
    from rethink.train.report import epoch_line

    record = {
        "epoch": 1,
        "train_loss": 0.8349,
        "train_acc": 0.5,
        "val_loss": 1847.2,
        "val_acc": 0.5,
        "lr": 1e-4,
        "train_img_s": 17.0,
        "epoch_s": 1.9,
    }
    progress = Progress()
    line = epoch_line(record, progress, 3)
    assert (
        line.startswith("epoch 1/3  train loss 0.8349")
        and "val loss >> train loss: validation uses BatchNorm's running statistics" in line
    )
    assert "BatchNorm" not in epoch_line({**record, "val_loss": 0.91}, progress, 3)
