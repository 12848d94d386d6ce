"""Sweeps (`python run.py -m ...`, or an experiment that sets `hydra.mode: MULTIRUN`): which jobs a
sweep runs, folders named by what each job sweeps, a listing without running (`--dry-run`), and the
comparison of its runs when it ends."""

import atexit
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..environment import torchrun_rank
from ..hydra_app import compose_config, explain, planned_sweep, sweep_of
from ..rundir import SWEPT_KEYS_ENV, job_dir

log = logging.getLogger("rethink")


class SweepCallback(Callback):
    """Tells the jobs which keys the sweep varies (for their folder names), and compares the runs
    after the last job, whether or not some failed (Hydra skips `on_multirun_end` after a failure)."""

    def __init__(self):
        self.jobs_left = None
        self.compared = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if torchrun_rank() is not None:  # (Hydra turns a callback's exceptions into warnings: exit here)
            print("error: a sweep (-m, or an experiment that is one) cannot run under torchrun: every process would run "
                  "every job; run each job with torchrun, or the sweep without torchrun (hydra/launcher=joblib or slurm)",
                  file=sys.stderr)
            raise SystemExit(1)
        swept, jobs = sweep_of(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        self.jobs_left = len(jobs)
        self.compared = str(getattr(config.task, "value", config.task)) != "train"  # only training runs compare
        # A launcher that runs jobs in other processes (joblib, submitit) calls on_job_end there, and Hydra skips
        # on_multirun_end after a failed job: this process compares when it exits, if it has not yet.
        atexit.register(self._compare, Path(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.jobs_left is None:  # a single run, or a job in a launcher's worker process
            return
        self.jobs_left -= 1
        if self.jobs_left == 0:
            self._compare(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._compare(Path(config.hydra.sweep.dir))

    def _compare(self, sweep_dir: Path) -> None:
        if self.compared:
            return
        self.compared = True
        if not any(sweep_dir.glob("*/.hydra")):  # no job started (the sweep was refused): nothing to compare, nor a folder to make
            return
        from .compare import compare_sweep

        try:
            compare_sweep(sweep_dir)
        except Exception as e:  # the runs are what matters: a comparison that fails must not hide them
            log.warning(f"could not compare the runs of {sweep_dir}: {e}; try python run.py task=compare compare.dirs=[{sweep_dir}]")


def list_jobs(arguments: Sequence[str]) -> int:
    """`python run.py -m ... --dry-run`: each job's folder name and overrides, each composed and checked
    (an impossible job is named with its one-line error) without training anything. Returns the exit status."""
    swept, jobs = planned_sweep(arguments)
    os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
    failed = 0
    print(f"{len(jobs)} job(s), sweeping {', '.join(swept) or 'nothing'}:")
    for num, overrides in enumerate(jobs):
        try:
            cfg = compose_config(overrides)
            line = f"#{num} {job_dir(num, cfg.model.name, overrides)}: {' '.join(overrides)}"
        except Exception as e:
            failed += 1
            line = f"#{num} error: {explain(e, overrides)}"
        print(line)
    return 1 if failed else 0
