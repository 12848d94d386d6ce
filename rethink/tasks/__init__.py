"""One function per task; run.py calls `run_task` with the composed config."""

import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..errors import UserError

log = logging.getLogger("rethink")


def _tasks():
    from . import benchmark, evaluate, export, predict, summary, train

    return {
        "train": train.train,
        "eval": evaluate.evaluate,
        "predict": predict.predict,
        "export": export.export,
        "summary": summary.summary,
        "benchmark": benchmark.benchmark,
    }


def run_task(cfg: DictConfig):
    """Run `cfg.task` in Hydra's run directory. A UserError ends a single run with its one-line
    message and exit status 1; in a sweep it fails that job only (Hydra runs the others, then reports)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    task = cfg.task.value if hasattr(cfg.task, "value") else str(cfg.task)
    try:
        return _tasks()[task](cfg, run_dir)
    except UserError as e:
        log.error(f"error: {e}")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    except Exception:
        log.exception(f"task={task} failed in {run_dir}")
        raise
