"""Sweeps (`python run.py -m ...`, or an experiment that sets `hydra.mode: MULTIRUN`): which jobs a
sweep runs, folders named by what each job sweeps, a listing without running (`--dry-run`), and the
comparison of its runs when it ends."""

import atexit
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..data.cache import size_text
from ..environment import torchrun_rank
from ..hydra_app import compose_config, explain, is_sweep_argument, planned_sweep, sweep_of
from ..rundir import SWEEP_JOBS_ENV, SWEPT_KEYS_ENV, discard_refused_sweep, job_dir

log = logging.getLogger("rethink")


class SweepCallback(Callback):
    """Tells the jobs which keys the sweep varies (for their folder names), and compares the runs
    after the last job, whether or not some failed (Hydra skips `on_multirun_end` after a failure)."""

    def __init__(self):
        self.jobs_left = None
        self.compared = False
        self.swept: list[str] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if torchrun_rank() is not None:  # (Hydra turns a callback's exceptions into warnings: exit here)
            print(
                "error: a sweep (-m, or an experiment that is one) cannot run under torchrun: every process would run "
                "every job; run each job with torchrun, or the sweep without torchrun (hydra/launcher=joblib or slurm)",
                file=sys.stderr,
            )
            raise SystemExit(1)
        swept, jobs = sweep_of(config)
        os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
        os.environ[SWEEP_JOBS_ENV] = str(len(jobs))
        self.swept, self.jobs_left = swept, len(jobs)
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
        if not any(sweep_dir.glob("*/.hydra")):  # no job started (the sweep was refused): it leaves nothing
            discard_refused_sweep(sweep_dir)
            return
        from .compare import compare_sweep

        try:
            compare_sweep(sweep_dir, self.swept)
        except Exception as e:  # the runs are what matters: a comparison that fails must not hide them
            log.warning(
                f"could not compare the runs of {sweep_dir}: {e}; try python run.py task=compare compare.dirs=[{sweep_dir}]"
            )
        try:
            print(footprint_line(sweep_dir))
        except OSError as e:  # a folder that vanished while it was measured
            log.warning(f"could not measure the disk {sweep_dir} takes: {e}")


def disk_footprint(folder: Path) -> tuple[int, int, int]:
    """(runs, bytes on disk, of which checkpoints) of a sweep's folder: every file once (a hard link is not a
    second copy), as the file system allocates it. The image cache under data.cache_dir is not counted: it is
    shared with other sweeps, and measuring it means visiting each of its entries."""
    seen: set[tuple[int, int]] = set()
    total = checkpoints = 0
    for directory, _, files in os.walk(folder):
        in_checkpoints = Path(directory).name == "checkpoints"
        for name in files:
            stat = os.lstat(os.path.join(directory, name))
            if (stat.st_dev, stat.st_ino) in seen:
                continue
            seen.add((stat.st_dev, stat.st_ino))
            size = getattr(stat, "st_blocks", 0) * 512 or stat.st_size
            total += size
            checkpoints += size if in_checkpoints else 0
    runs = sum(1 for _ in Path(folder).glob("*/.hydra"))
    return runs, total, checkpoints


def footprint_line(folder: Path) -> str:
    runs, total, checkpoints = disk_footprint(folder)
    return (
        f"sweep {folder}: {runs} run{'s' if runs != 1 else ''}, {size_text(total)} on disk "
        f"(checkpoints {size_text(checkpoints)})"
    )


def list_jobs(arguments: Sequence[str]) -> int:
    """`python run.py -m ... --dry-run`: each job's folder name and overrides, each composed and checked
    (an impossible job is named with its one-line error) without training anything. Returns the exit status."""
    swept, jobs = planned_sweep(arguments)
    os.environ[SWEPT_KEYS_ENV] = ",".join(swept)
    os.environ[SWEEP_JOBS_ENV] = str(len(jobs))
    failed = 0
    print(f"{len(jobs)} job(s), sweeping {', '.join(swept) or 'nothing'}, into {planned_folder(arguments)}:")
    for num, overrides in enumerate(jobs):
        try:
            cfg = compose_config(overrides)
            line = f"#{num} {job_dir(num, cfg.model.name, overrides)}: {' '.join(overrides)}"
        except Exception as e:
            failed += 1
            line = f"#{num} error: {explain(e, overrides)}"
        print(line)
    return 1 if failed else 0


def planned_folder(arguments: Sequence[str]) -> str:
    """Where `python run.py -m ARGUMENTS` would put its jobs: hydra.sweep.dir as it reads now, not claimed (the sweep
    claims it when it starts: `<time>-1`, `-2`, ... where another run took that name first), with that said."""
    base = compose_config([a for a in arguments if not is_sweep_argument(a)], with_hydra=True)
    folder = OmegaConf.to_container(base.hydra.sweep, resolve=False)["dir"]
    claimed = re.fullmatch(r"\$\{rethink\.claim:(.*)\}", folder)
    OmegaConf.update(base, "hydra.sweep.dir", claimed[1] if claimed else folder)
    try:
        folder = str(base.hydra.sweep.dir)
    except Exception:  # an interpolation that reads only inside a running app: as written
        pass
    return (
        f"{folder}/ (or {Path(folder).name}-1, -2, ... if another run takes that name first)"
        if claimed
        else f"{folder}/"
    )
