"""One function per task; run.py calls `run_task` with the composed config."""

import json
import logging
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from ..atomic import atomic_write_text
from ..config import apply_overrides, config_from_checkpoint, validate, value
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


def cli_overrides() -> list[str]:
    """The overrides the command line gave (empty outside a Hydra app, e.g. in tests)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def hydra_choice(group: str) -> str:
    """Which option of a config group this run uses ('' outside a Hydra app)."""
    return str(HydraConfig.get().runtime.choices.get(group, "")) if HydraConfig.initialized() else ""


def checkpoint_run_config(state: dict, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The config a checkpoint was trained with, plus what this command line overrides in it
    (e.g. `data.root=...`, `data=folder`, `trainer.device=cpu`); and the keys it overrode."""
    saved = config_from_checkpoint(state["config"])
    return apply_overrides(saved, cfg, cli_overrides(), skip=("task", "ckpt", "inputs", "resume"))


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def run_task(cfg: DictConfig):
    """Run `cfg.task` in Hydra's run directory. A UserError ends a single run with its one-line
    message and exit status 1; in a sweep it fails that job only (Hydra runs the others, then reports)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    task = value(cfg.task)
    try:
        validate(cfg)
        return _tasks()[task](cfg, run_dir)
    except UserError as e:
        log.error(f"error: {e}")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        sys.exit(1)
    except Exception as e:
        log.error(f"task={task} failed in {run_dir}: {e!r}")  # the traceback follows from Hydra
        raise
