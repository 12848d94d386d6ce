"""Sweeps beyond one process: joblib's parallel jobs, submitit's local executor (SLURM's stand-in),
and re-run or requeued jobs that continue from their own checkpoints (`resume=auto`)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rethink.train.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="needs the launchers extra (pip install -e '.[dev]')")
pytest.importorskip(
    "hydra_plugins.hydra_submitit_launcher", reason="needs the launchers extra (pip install -e '.[dev]')"
)


@pytest.fixture
def short(unseeded):
    return [
        *unseeded,
        "trainer.epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.image_grid=false",
    ]


def run_times(run_log: str) -> tuple[str, str]:
    stamps = re.findall(r"^\[(\d\d:\d\d:\d\d)\]", run_log, flags=re.M)
    return stamps[0], stamps[-1]


@pytest.mark.slow
def test_a_joblib_sweep_runs_its_jobs_in_parallel_processes_with_loader_workers(tmp_path, run_py, short):
    result = run_py(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        *short,
        "data.num_workers=1",
        "trainer.limit_train_batches=6",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("*_b0_seed=*"))
    assert [j.name for j in jobs] == ["0_b0_seed=0", "1_b0_seed=1"]
    pids = {next(j.glob("events.out.tfevents.*")).name.split(".")[-2] for j in jobs}
    assert len(pids) == 2 and str(os.getpid()) not in pids  # two worker processes, not this one
    (start_a, end_a), (start_b, end_b) = (run_times((j / "run.log").read_text()) for j in jobs)
    assert start_a <= end_b and start_b <= end_a  # at the same time
    assert (tmp_path / "comparison.md").is_file()


@pytest.mark.slow
def test_a_joblib_sweep_with_a_failed_job_still_writes_its_comparison_listing_the_failure(tmp_path, run_py, short):
    """Hydra skips on_multirun_end after a failed job, and joblib counts finished jobs in its workers: the sweep's
    own process compares when it exits."""
    result = run_py(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "optimizer.lr=0.01,1e6",
        "scheduler=constant",
        "seed=0",
        *short,
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode != 0  # one job diverged
    comparison = (tmp_path / "comparison.md").read_text()
    assert "failed" in comparison and "non-finite" in comparison


@pytest.mark.slow
def test_a_submitit_local_sweep_of_two_jobs_finishes(tmp_path, run_py, short):
    result = run_py(
        "-m", "hydra/launcher=submitit_local", "resume=auto", "seed=0,1", *short, f"hydra.sweep.dir={tmp_path}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0_b0_seed=0", "1_b0_seed=1"):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["epochs"] == 1
    assert (tmp_path / "comparison.md").is_file()


@pytest.mark.slow
def test_a_killed_sweep_rerun_with_resume_auto_continues_each_job_from_its_checkpoint(
    tmp_path, run_command, run_py, scalars, unseeded, wait_for_checkpoint_writes
):
    args = [
        "-m",
        "resume=auto",
        "seed=0,1",
        *unseeded,
        "trainer.epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.image_grid=false",
        f"hydra.sweep.dir={tmp_path}",
    ]
    sweep = subprocess.Popen(
        [*run_command, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    wait_for_checkpoint_writes(tmp_path / "0_b0_seed=0" / "checkpoints" / "last.pt", sweep, writes=1)
    os.killpg(sweep.pid, signal.SIGKILL)  # a node lost: nothing gets to save
    sweep.communicate()
    time.sleep(0.5)
    again = run_py(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    first = tmp_path / "0_b0_seed=0"
    assert "resuming b0" in (first / "run.log").read_text()
    assert [step for step, _ in scalars(first)["val/acc"]] == [1, 2, 3]
    for job in ("0_b0_seed=0", "1_b0_seed=1"):
        assert json.loads((tmp_path / job / "metrics.json").read_text())["epochs"] == 3
    finished = run_py(*args)  # a third time: every job is finished, nothing is trained again
    assert finished.returncode == 0 and "already finished 3 epochs" in finished.stderr, finished.stderr[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(ROOT / "run.py")]


@pytest.fixture
def ddp(unseeded):
    return [
        *unseeded,
        "seed=3",
        "data.batch_size=4",
        "trainer.limit_train_batches=null",
        "trainer.limit_val_batches=null",
        "trainer.image_grid=false",
        "trainer.cpu_threads=1",
    ]


def torchrun(*args, **kwargs):
    return subprocess.run([*TORCHRUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=900, **kwargs)


def train_images(run_dir) -> int:
    return sum(1 for line in (run_dir / "splits.csv").read_text().splitlines()[1:] if line.startswith("train,"))


@pytest.mark.slow
def test_ddp_under_torchrun_trains_one_run_as_one_process_with_the_global_batch_would(tmp_path, ddp, run_py, scalars):
    result = torchrun(*ddp, "trainer.epochs=2", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        len(list(tmp_path.glob("events.out.tfevents.*"))) == 1 and len(list(tmp_path.glob("*.json"))) == 3
    )  # metrics, classes, provenance
    assert (tmp_path / "run.log").read_text().count("epoch 2/2") == 1  # rank 0 alone logs
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["global_batch"] == 8
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["steps_per_epoch"] == train_images(tmp_path) // 8  # as one process with batch 8
    assert ckpt["scheduler"]["last_epoch"] == 2 * ckpt["steps_per_epoch"]
    assert metrics["test_images"] == sum(
        1 for line in (tmp_path / "splits.csv").read_text().splitlines() if line.startswith("test,")
    )
    # the per-image test results of both processes' shards, each image with its own label
    labels = {
        line.split(",")[3]: line.split(",")[1]
        for line in (tmp_path / "splits.csv").read_text().splitlines()
        if line.startswith("test,")
    }
    scored = [line.split(",") for line in (tmp_path / "test_predictions.csv").read_text().splitlines()[1:]]
    assert sorted(image for image, _, _ in scored) == sorted(labels) and all(
        labels[image] == label for image, label, _ in scored
    )
    assert sum(label == predicted for _, label, predicted in scored) / len(scored) == pytest.approx(metrics["test_acc"])
    evaluated = run_py("task=eval", f"ckpt={tmp_path}", "trainer.device=cpu", f"hydra.run.dir={tmp_path / 'eval'}")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["test_acc"] == metrics["test_acc"]
    # the last epoch's logged val scores are those of the model last.pt saved (rank 0's BatchNorm statistics)
    last = run_py(
        "task=eval",
        f"ckpt={tmp_path / 'checkpoints' / 'last.pt'}",
        "eval.split=val",
        "trainer.device=cpu",
        f"hydra.run.dir={tmp_path / 'eval_last'}",
    )
    assert last.returncode == 0, last.stderr[-3000:]
    scored, logged = json.loads((tmp_path / "eval_last" / "eval.json").read_text()), scalars(tmp_path)
    # (the loss only to 2e-3: a tiny b0's logits reach the hundreds, and two processes' batches of 4 round otherwise
    # than one process's batches; each process's own BatchNorm statistics made it 7% apart)
    assert logged["val/acc"][-1][1] == pytest.approx(scored["val_acc"]) and logged["val/loss"][-1][1] == pytest.approx(
        scored["val_loss"], rel=2e-3
    )


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_process_at_one_step_and_the_resume_completes(
    tmp_path, ddp, scalars, wait_for_checkpoint_writes
):
    """With progressive learning too: every rank rebuilds its loader (workers) at the stage change, and the
    resume, wherever the signal fell, trains each epoch at its stage's size."""
    progressive = ["progressive=v2", "progressive.stages=2", "progressive.min_size=16"]  # 24 px, then 32
    args = [*ddp, *progressive, "trainer.epochs=4", "data.num_workers=1", f"hydra.run.dir={tmp_path}"]
    process = subprocess.Popen(
        [*TORCHRUN, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    wait_for_checkpoint_writes(tmp_path / "checkpoints" / "last.pt", process, writes=1)
    os.killpg(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0 and output.count("stopped by signal") == 1, output[-3000:]  # rank 0 alone says it
    resumed = torchrun(*args, f"resume={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ckpt["scheduler"]["last_epoch"] == 4 * ckpt["steps_per_epoch"]
    logged = scalars(tmp_path)
    assert [step for step, _ in logged["val/acc"]] == [1, 2, 3, 4]
    assert logged["train/image_size"] == [(1, 24), (2, 24), (3, 32), (4, 32)]
    assert "progressive learning: stage 2/2 (epochs 3-4): 32 px" in (tmp_path / "run.log").read_text()


@pytest.mark.slow
def test_a_sweep_under_torchrun_is_refused_with_one_line(tmp_path, short):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "seed=0,1", *short],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"},
    )
    assert result.returncode == 1 and "cannot run under torchrun" in result.stderr.splitlines()[-1], result.stderr[
        -2000:
    ]
    assert not (tmp_path / "outputs").exists()
