"""Sweeps (`python run.py -m ...`, or an experiment that sets `hydra.mode: MULTIRUN`): which jobs a
sweep runs, folders named by what each job sweeps, a listing without running (`--dry-run`), and the
comparison of its runs when it ends."""

import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..config import CONF_DIR, compose_config
from ..rundir import SWEPT_KEYS_ENV, job_dir, torchrun_rank

log = logging.getLogger("rethink")


def sweep_jobs(arguments: Sequence[str], params: dict | None) -> tuple[list[str], list[list[str]]]:
    """The keys a sweep varies and each job's overrides, as Hydra's basic sweeper makes them from the
    config's `hydra.sweeper.params` and the command line (which wins for a key set in both)."""
    lines = [f"{k}={v}" for k, v in (params or {}).items()] + list(arguments)
    overrides = OverridesParser.create().parse_overrides(lines)
    jobs = BasicSweeper.split_arguments(overrides, None)[0]
    swept = [o.get_key_element() for o in overrides if o.is_sweep_override()]
    return list(dict.fromkeys(swept)), jobs


def _sweep_of(config: DictConfig) -> tuple[list[str], list[list[str]]]:
    arguments = OmegaConf.to_container(config.hydra.overrides.task)
    params = OmegaConf.to_container(config.hydra.sweeper.params) if config.hydra.sweeper.get("params") else None
    return sweep_jobs(arguments, params)


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
        swept, jobs = _sweep_of(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        self.jobs_left = len(jobs)
        self.compared = str(getattr(config.task, "value", config.task)) != "train"  # only training runs compare

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
        from .compare import compare_sweep

        try:
            compare_sweep(sweep_dir)
        except Exception as e:  # the runs are what matters: a comparison that fails must not hide them
            log.warning(f"could not compare the runs of {sweep_dir}: {e}; try python run.py task=compare compare.dirs=[{sweep_dir}]")


def list_jobs(arguments: Sequence[str]) -> int:
    """`python run.py -m ... --dry-run`: each job's folder name and overrides, each composed and checked
    (an impossible job is named with its one-line error) without training anything. Returns the exit status."""
    from ..errors import explain

    plain = [a for a in arguments if not _is_sweep(a)]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=plain, return_hydra_config=True)
    params = OmegaConf.to_container(base.hydra.sweeper.params) if base.hydra.sweeper.get("params") else None
    swept, jobs = sweep_jobs(arguments, params)
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


def _is_sweep(argument: str) -> bool:
    return OverridesParser.create().parse_overrides([argument])[0].is_sweep_override()
