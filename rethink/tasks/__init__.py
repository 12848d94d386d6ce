"""One function per task; run.py calls `run_task` with the composed config."""

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from ..atomic import atomic_write_text
from ..config import apply_overrides, changed_keys, compose_config, config_from_checkpoint, override_keys, validate, value
from ..errors import UserError
from ..rundir import discard_refused_start, torchrun_rank
from ..train.checkpoint import model_from_checkpoint
from ..train.loop import Inputs
from ..train.runtime import Precision, resolve_device, resolve_precision

log = logging.getLogger("rethink")
run_log = logging.getLogger("rethink.run_log")  # the run's run.log only (conf/hydra/job_logging/rethink.yaml)


def _tasks():
    from . import benchmark, compare, evaluate, export, predict, summary, train

    return {
        "train": train.train,
        "eval": evaluate.evaluate,
        "predict": predict.predict,
        "export": export.export,
        "summary": summary.summary,
        "benchmark": benchmark.benchmark,
        "compare": compare.compare,
    }


def command_line_keys(cfg: DictConfig) -> list[str]:
    """The keys the command line set; called from Python (no Hydra app), the keys in which `cfg`
    differs from the default config."""
    if HydraConfig.initialized():
        return override_keys(HydraConfig.get().overrides.task)
    return changed_keys(cfg, compose_config([]))


def hydra_choice(group: str) -> str:
    """Which option of a config group this run uses ('' outside a Hydra app)."""
    return str(HydraConfig.get().runtime.choices.get(group, "")) if HydraConfig.initialized() else ""


def hydra_job() -> int | None:
    """This run's job number in a sweep (None for a single run or outside a Hydra app)."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


def checkpoint_run_config(state: dict, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The config a checkpoint was trained with, plus what this command line overrides in it
    (e.g. `data.root=...`, `data=folder`, `trainer.device=cpu`); and the keys it overrode."""
    saved = config_from_checkpoint(state["config"])
    return apply_overrides(saved, cfg, command_line_keys(cfg), skip=("task", "ckpt", "inputs", "resume"))


@dataclass
class Restored:
    """A checkpoint made ready for inference (task=eval, task=predict)."""

    config: DictConfig  # the checkpoint's config, with this command line's overrides
    overridden: list[str]
    model: torch.nn.Module  # on its device, in eval mode
    inputs: Inputs
    precision: Precision


def restore(state: dict, cfg: DictConfig, use_ema: bool) -> Restored:
    """Device and precision are this machine's (`trainer.device`/`trainer.amp` of this command line,
    `auto` by default), not those of the machine that trained."""
    run_cfg, overridden = checkpoint_run_config(state, cfg)
    for key in ("trainer.device", "trainer.amp"):
        if key not in overridden:
            OmegaConf.update(run_cfg, key, OmegaConf.select(cfg, key))
    device = resolve_device(run_cfg.trainer.device)
    precision = resolve_precision(value(run_cfg.trainer.amp), device)
    model = model_from_checkpoint(state, use_ema=use_ema).to(device)
    if run_cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    inputs = Inputs(device, tuple(run_cfg.model.mean), tuple(run_cfg.model.std), run_cfg.trainer.channels_last)
    return Restored(run_cfg, overridden, model, inputs, precision)


def write_json(path: Path, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _console_only(level: int) -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(handler)
        handler.close()
    logging.getLogger("rethink").setLevel(level)


def run_task(cfg: DictConfig):
    """Run `cfg.task` in Hydra's run directory. A UserError ends a single run with its one-line
    message on stderr and exit status 1, and what the refused run added to the disk is taken back
    (rundir.discard_refused_start); in a sweep it fails that job only (Hydra runs the others, then
    reports), and the job's folder keeps its run.log, so the comparison lists the job as failed."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    task = value(cfg.task)
    if torchrun_rank():  # under torchrun rank 0 alone writes run.log and says how it goes
        _console_only(logging.WARNING)
    try:
        validate(cfg)
        return _tasks()[task](cfg, run_dir)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        run_log.error(f"error: {e}")
        if hydra_cfg.mode == RunMode.MULTIRUN:
            raise
        discard_refused_start(run_dir)
        sys.exit(1)
    except Exception as e:
        log.error(f"task={task} failed in {run_dir}: {e!r}")  # the traceback follows from Hydra
        raise
