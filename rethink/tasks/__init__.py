"""The tasks, one function each (`task(cfg, run_dir) -> result`); run.py calls `run_task` with the composed config."""

import logging
import sys

from omegaconf import DictConfig

from ..config import validate, value
from ..environment import torchrun_rank
from ..errors import UserError
from ..hydra_app import app_is_sweep, app_output_dir
from ..rundir import FOLDERS

log = logging.getLogger("rethink")
run_log = logging.getLogger("rethink.run_log")  # the run's run.log only (conf/hydra/job_logging/rethink.yaml)


def _tasks():
    from . import benchmark, compare, evaluate, export, pack, predict, summary, train

    return {
        "train": train.train,
        "eval": evaluate.evaluate,
        "predict": predict.predict,
        "export": export.export,
        "summary": summary.summary,
        "benchmark": benchmark.benchmark,
        "compare": compare.compare,
        "pack": pack.pack,
    }


def _console_only(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    logging.getLogger("rethink").setLevel(level)


def run_task(cfg: DictConfig):
    """Run `cfg.task` in Hydra's run directory. A UserError ends a single run with its one-line message on stderr
    and exit status 1; in a sweep it fails that job only (Hydra runs the others, then reports). What a run that
    ended before its first training step added to the disk is taken back (rundir.FOLDERS.discard_refused_start:
    its new folder, or its record and log lines in another run's folder; a sweep job's new folder keeps its
    run.log, so the comparison lists the job as failed); a run that reached its first training step keeps all
    it wrote, and its run.log says how it ended."""
    run_dir = app_output_dir()
    task = value(cfg.task)
    if torchrun_rank():  # under torchrun rank 0 alone writes run.log and says how it goes
        _console_only(logging.WARNING)
    try:
        FOLDERS.raise_refusal(run_dir)
        validate(cfg)
        return _tasks()[task](cfg, run_dir)
    except UserError as e:
        run_log.error(f"error: {e}")  # first: on a full disk, logging's own report of a failed write goes to stderr
        print(f"error: {e}", file=sys.stderr)
        FOLDERS.discard_refused_start(run_dir, keep_new_folder=app_is_sweep())  # nothing, once the run trained
        if app_is_sweep():
            raise
        sys.exit(1)
    except Exception as e:
        log.error(f"task={task} failed in {run_dir}: {e!r}")  # the traceback follows from Hydra
        raise
