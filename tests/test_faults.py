"""Faults at unlucky moments, injected at tiny sizes: a run ends by itself, keeps what it wrote once it trained,
says how it ended, and a rerun with resume=auto finishes or refuses in one line. Rule (rundir.py): a folder is
removed only when its run never reached its first training step."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from rethink import rundir
from rethink.atomic import atomic_write_json
from rethink.config import DataConfig
from rethink.data import build_data
from rethink.errors import UserError
from rethink.hydra_app import compose_config
from rethink.tasks.compare import read_run
from rethink.tasks.evaluate import evaluate
from rethink.tasks.train import train
from rethink.train.checkpoint import load_checkpoint, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["trainer.progress=false", "trainer.cpu_threads=1", "trainer.image_grid=false"]

# run.py with a fault injected: the training loss reads nan from step NAN_AFTER_STEPS + 1 of this process on
POISONED_RUN = f"""
import os, runpy, sys
import rethink.train.loop as loop
after, calls, real = int(os.environ["NAN_AFTER_STEPS"]), [0], loop.Learner.forward_backward
def poisoned(self, images, labels):
    loss, correct = real(self, images, labels)
    calls[0] += 1
    return (loss * float("nan") if calls[0] > after else loss), correct
loop.Learner.forward_backward = poisoned
sys.argv[0] = {str(ROOT / "run.py")!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def poisoned_run_py(nan_after: int, *args, cwd=ROOT):
    return subprocess.run(
        [sys.executable, "-c", POISONED_RUN, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NAN_AFTER_STEPS": str(nan_after)},
    )


def png_folder(root: Path, classes: int = 2, per_class: int = 16) -> Path:
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(
                0, 256, (40, 48, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(c * 100 + i)
            )
            Image.fromarray(pixels.numpy()).save(root / f"class_{c}" / f"{i:03d}.png")
    return root


# 1. a loader worker's error ------------------------------------------------------------------------------


@pytest.mark.slow
def test_images_that_vanish_mid_run_with_loader_workers_end_the_run_in_one_line_keeping_its_folder(
    tmp_path, tiny_overrides
):
    data = png_folder(tmp_path / "photos", per_class=24)
    run = tmp_path / "run"
    args = [
        "data=folder",
        f"data.root={data}",
        "data.cache=false",
        "data.num_workers=1",
        "data.batch_size=4",
        "model.train_size=32",
        "model.eval_size=32",
        "trainer.device=cpu",
        "trainer.epochs=3",
        *QUICK,
        f"hydra.run.dir={run}",
    ]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 300
        while (
            "epoch 1/3" not in ((run / "run.log").read_text() if (run / "run.log").exists() else "")
            and time.time() < deadline
        ):
            assert process.poll() is None, process.communicate()[1][-2000:]
            time.sleep(0.1)
        for image in (data / "class_0").iterdir():  # a stale NFS mount, a deleted folder
            image.unlink()
        _, err = process.communicate(timeout=60)  # ends by itself, well within a minute
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 1
    last = err.strip().splitlines()[-1]
    assert (
        last.startswith("error: ")
        and "not a readable image" in last
        and "DataLoader worker" in last
        and "Traceback" not in err
    )
    assert (
        (run / "run.log").is_file()
        and (run / "checkpoints" / "last.pt").is_file()
        and "not a readable image" in (run / "run.log").read_text()
    )


def test_a_workers_user_error_is_its_own_line():
    report = (
        "Caught UserError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File ...\n"
        "rethink.errors.UserError: /data/x.png: not a readable image (no such file)\n"
    )
    assert str(UserError(report)) == "/data/x.png: not a readable image (no such file) (in DataLoader worker process 0)"


# 2, 3. divergence before the first checkpoint, and during a resume ---------------------------------------------


@pytest.mark.slow
def test_a_run_that_diverges_before_its_first_checkpoint_keeps_its_folder_and_says_why(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    result = poisoned_run_py(1, *tiny_overrides, *QUICK, f"hydra.run.dir={run}")
    assert result.returncode == 1 and "non-finite" in result.stderr.splitlines()[-1]
    assert "non-finite" in (run / "run.log").read_text()  # the reason, kept
    assert (
        list(run.glob("events.out.tfevents.*"))
        and (run / "splits.csv").is_file()
        and not (run / "checkpoints").exists()
    )
    assert read_run(run).state == "failed" and "non-finite" in read_run(run).note


def test_a_resume_that_diverges_keeps_the_runs_history_and_its_resume_record(tmp_path, tiny_overrides, run_py):
    run = tmp_path / "run"
    first = run_py(*tiny_overrides, *QUICK, "trainer.epochs=1", "trainer.limit_train_batches=2", f"hydra.run.dir={run}")
    assert first.returncode == 0, first.stderr[-2000:]
    log_before = (run / "run.log").read_text()
    resumed = poisoned_run_py(
        2, *tiny_overrides, *QUICK, "trainer.epochs=3", "trainer.limit_train_batches=2", f"resume={run}"
    )
    assert resumed.returncode == 1 and "non-finite" in resumed.stderr.splitlines()[-1]
    log = (run / "run.log").read_text()
    assert log.startswith(log_before) and "epoch 2/3" in log and "non-finite" in log  # nothing cut back
    assert list((run / ".hydra").glob("resumed-*/config.yaml"))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["epoch"] == 2 and (run / "metrics.epoch1.json").is_file()
    assert read_run(run).state == "failed" and "non-finite" in read_run(run).note


@pytest.mark.slow
def test_a_non_finite_validation_loss_is_divergence(tmp_path, tiny, monkeypatch):
    import rethink.train.fit as fit

    real = fit.evaluate

    def nan_loss(*args, **kwargs):
        result = real(*args, **kwargs)
        result.loss = float("nan")
        return result

    monkeypatch.setattr(fit, "evaluate", nan_loss)
    with pytest.raises(UserError, match="the validation loss became non-finite .* in epoch 1"):
        train(tiny(), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_json_files_hold_no_bare_nan(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"loss": float("nan"), "curve": [1.0, float("inf")]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "loss": None,
        "curve": [1.0, None],
    }


# 4, 5. resume=auto after a kill before the first checkpoint, and with a changed recipe ---------------------------


def killed_before_its_first_checkpoint(folder: Path, overrides: list[str]) -> None:
    """What a run killed with kill -9 while it set up (or in its first epoch) leaves: Hydra's record, a run.log."""
    cfg = compose_config(overrides)
    (folder / ".hydra").mkdir(parents=True)
    from omegaconf import OmegaConf

    (folder / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (folder / "run.log").write_text("[12:00:00][INFO] data: 4 classes, ...\n")


def test_resume_auto_starts_again_a_run_killed_before_its_first_checkpoint(tmp_path, tiny_overrides, run_py):
    run = tmp_path / "run"
    killed_before_its_first_checkpoint(run, tiny_overrides)
    result = run_py(*tiny_overrides, *QUICK, "trainer.epochs=1", "resume=auto", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["epochs"] == 1
    aside = run / "earlier-attempt-1"
    assert (aside / "hydra" / "config.yaml").is_file() and (aside / "run.log").read_text().startswith("[12:00:00]")


@pytest.mark.slow
def test_a_sweep_whose_first_job_was_killed_before_its_checkpoint_finishes_every_job_with_resume_auto(
    tmp_path, unseeded, run_py
):
    sweep = tmp_path / "sweep"
    job_args = [*unseeded, *QUICK, "trainer.epochs=1", "trainer.limit_train_batches=2", "resume=auto"]
    killed_before_its_first_checkpoint(sweep / "0_b0_seed=0", [*job_args, "seed=0"])
    result = run_py("-m", *job_args, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2


def test_resume_auto_refuses_to_pass_a_finished_run_off_as_a_changed_recipe(tmp_path, tiny_overrides, run_py):
    run = tmp_path / "run"
    args = [*tiny_overrides, *QUICK, "trainer.epochs=1", "resume=auto", f"hydra.run.dir={run}"]
    assert run_py(*args).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    changed = run_py(*args, "optimizer=adamw", "optimizer.lr=0.05")
    assert changed.returncode == 1
    last = changed.stderr.strip().splitlines()[-1]
    assert "optimizer" in last and "optimizer.lr: 0.01 -> 0.05" in last and "a resume may change only" in last
    assert {
        p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"
    } == before  # untouched, no record
    again = run_py(*args)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr


# 6. a continued run is filed under its new length ------------------------------------------------------------


@pytest.mark.slow
def test_a_continued_run_is_compared_and_shown_under_its_new_length(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    train(tiny("trainer.epochs=2", f"resume={tmp_path}"), tmp_path / "ignored")
    assert read_run(tmp_path).config["trainer"]["epochs"] == 2
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    events = EventAccumulator(str(tmp_path))
    events.Reload()
    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert start.session_start_info.hparams["trainer.epochs"].number_value == 2


# 8. commands that can be pasted --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "folder", ["outputs/multirun/2026-12-02/10-00-00/1_b0_seed=1", "outputs/train/2026-12-02/10-00-00"]
)
def test_the_printed_resume_argument_works_when_pasted_into_a_shell(folder):
    printed = rundir.resume_argument(folder)
    (as_the_shell_passes_it,) = shlex.split(printed)
    assert compose_config([as_the_shell_passes_it]).resume == folder


# 11. torchrun's ranks find rank 0's folder whatever their clocks said -----------------------------------------


def test_every_rank_finds_the_folder_rank_0_claimed_in_another_second(tmp_path, monkeypatch):
    claimed = tmp_path / "outputs" / "train" / "2026-12-02" / "23-59-59"
    claimed.mkdir(parents=True)
    (claimed / ".torchrun-job7").touch()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job7")
    for mine in ("2026-12-02/23-59-58", "2026-12-03/00-00-00"):  # a second before, and the next day
        assert rundir.RunFolders().claim(str(tmp_path / "outputs" / "train" / mine)) == str(claimed)
    assert not (tmp_path / "outputs" / "train" / "2026-12-03").exists()  # rank 1 made nothing


# 12, 13. tasks that must refuse ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eval_refuses_a_model_that_contradicts_the_checkpoint(tmp_path, tiny, tiny_overrides):
    train(tiny("trainer.epochs=1"), tmp_path / "run")
    eval_args = [*tiny_overrides, "task=eval", f"ckpt={tmp_path / 'run'}"]
    with pytest.raises(UserError, match=r"checkpoint is a b0 .* changes model"):
        evaluate(compose_config([*eval_args, "model=v2_s"]), tmp_path / "eval")
    with pytest.raises(UserError, match=r"changes model.stages"):
        evaluate(compose_config([*eval_args, "model.stages.3.block=fused"]), tmp_path / "eval")
    assert evaluate(compose_config([*eval_args, "model.eval_size=40"]), tmp_path / "eval")["images"] > 0


def test_a_folder_with_one_class_is_refused(tmp_path):
    cfg = DataConfig(name="folder", root=str(png_folder(tmp_path / "photos", classes=1)), num_workers=0)
    with pytest.raises(UserError, match=r"holds one class folder \(class_0/\); a classifier needs at least 2"):
        build_data(compose_config(["data=folder", f"data.root={cfg.root}"]).data, compose_config([]).model)


# 14. signals ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_run_leaves_the_signal_handlers_as_it_found_them(tmp_path, tiny, monkeypatch):
    import rethink.train.fit as fit

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(tiny("trainer.epochs=1"), tmp_path / "a")
    assert {s: signal.getsignal(s) for s in before} == before
    monkeypatch.setattr(fit, "train_epoch", lambda *a, **k: (_ for _ in ()).throw(UserError("failed mid-run")))
    with pytest.raises(UserError, match="failed mid-run"):
        train(tiny("trainer.epochs=1"), tmp_path / "b")
    assert {s: signal.getsignal(s) for s in before} == before


STOPPED_IN_PROCESS = """
import os, sys
import rethink.train.loop as loop
from rethink.hydra_app import compose_config
from rethink.tasks.train import train
real, calls = loop.Learner.step, [0]
def step(self, images, labels):
    calls[0] += 1
    if calls[0] == 2:
        os.kill(os.getpid(), 15)
    return real(self, images, labels)
loop.Learner.step = step
train(compose_config(sys.argv[2:]), __import__("pathlib").Path(sys.argv[1]))
print("went on after the run")
"""


@pytest.mark.slow
def test_a_stop_by_sigterm_in_a_program_that_did_not_handle_it_ends_that_program_after_saving(tmp_path, tiny_overrides):
    """As with pytest under `timeout`: the run saves, then the signal does what it did before the run."""
    result = subprocess.run(
        [sys.executable, "-c", STOPPED_IN_PROCESS, str(tmp_path), *tiny_overrides, *QUICK],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGTERM, result.stderr[-2000:]
    assert (
        "went on" not in result.stdout and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["partial"] is not None
    )


# suspicions --------------------------------------------------------------------------------------------


def test_a_second_process_cannot_train_in_a_folder_a_run_holds(tmp_path, tiny):
    tmp_path.mkdir(exist_ok=True)
    held = rundir.hold_run_lock(tmp_path)  # another process's run, as the file system sees it
    try:
        with pytest.raises(UserError, match="another process is training in this folder"):
            train(tiny("trainer.epochs=1"), tmp_path)
        assert rundir.run_is_locked(tmp_path)
    finally:
        held.close()
    assert not rundir.run_is_locked(tmp_path)


def test_a_refused_eval_into_a_run_folder_leaves_its_log_as_it_was(tmp_path, tiny_overrides, run_py):
    run = tmp_path / "run"
    assert run_py(*tiny_overrides, *QUICK, "trainer.epochs=1", f"hydra.run.dir={run}").returncode == 0
    log = (run / "run.log").read_text()
    refused = run_py("task=eval", f"ckpt={run}", "model=v2_s", "trainer.device=cpu", f"hydra.run.dir={run}")
    assert refused.returncode == 1 and "the checkpoint is a b0" in refused.stderr.splitlines()[-1]
    assert (run / "run.log").read_text() == log and not list((run / ".hydra").glob("eval-*"))


@pytest.mark.slow
def test_a_resume_with_another_number_of_processes_is_refused(tmp_path, tiny):
    train(tiny("trainer.epochs=1"), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    save_checkpoint({**state, "world_size": 2}, tmp_path / "checkpoints" / "last.pt")  # as a torchrun of 2 leaves it
    with pytest.raises(
        UserError, match=r"trained in 2 process\(es\) .* global batch of 16.*torchrun --nproc-per-node=2"
    ):
        train(tiny("trainer.epochs=2", f"resume={tmp_path}"), tmp_path / "x")


def test_the_image_cache_keeps_each_decoders_entries_apart(tmp_path, monkeypatch):
    from rethink.data import cache, images

    ours = cache.ImageCache(tmp_path).entry("ab" * 16, 64)
    monkeypatch.setattr(cache, "DECODER", "decode2-pillow99")
    assert cache.ImageCache(tmp_path).entry("ab" * 16, 64) != ours and images.DECODER in str(ours)


HOLD_AND_FORK = """
import os, sys, time
from rethink import rundir
lock = rundir.hold_run_lock(sys.argv[1])
if os.fork() == 0:  # a loader worker: outlives a killed parent for a few seconds
    time.sleep(30)
    os._exit(0)
print("held", flush=True)
time.sleep(60)
"""


def test_a_run_killed_hard_frees_its_folder_at_once_though_its_loader_workers_live_on(tmp_path):
    """A worker forked from the run shares its open files: the folder's lock must not outlive the run in it, or
    `resume=` right after a kill -9 is refused as "another process is training"."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert process.stdout.readline().strip() == "held"
        assert rundir.run_is_locked(tmp_path)
        process.kill()  # the run, not its worker
        process.wait(timeout=10)
        assert not rundir.run_is_locked(tmp_path)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
