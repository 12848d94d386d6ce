"""task=train, the main job: decide whether this is a new run, a resume, or a finished run to leave alone, then
`fit` (rethink/train/fit.py) trains it. `resume=<run dir>` continues a run where its last checkpoint left it;
`resume=auto` continues the run in this run's own folder, if there is one (a requeued or re-run sweep job)."""

import json
import logging
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from ..config import RESUMABLE, config_from_checkpoint, plain, value
from ..environment import torchrun_rank
from ..errors import UserError
from ..hydra_app import command_line_keys, compose_config, hydra_choice, hydra_job
from ..rundir import claimed_by_this_run, refuse_existing_run, resumable_run
from ..train.checkpoint import load_checkpoint
from ..train.fit import fit
from .restore import checkpoint_run_config

log = logging.getLogger("rethink")


def train(cfg: DictConfig, run_dir: Path) -> dict:
    resume = cfg.resume
    if resume == "auto":
        resume = str(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else None
        finished = _finished_metrics(run_dir, cfg.trainer.epochs) if resume else None
        if finished is not None:
            _continued_config(
                cfg, run_dir, load_checkpoint(run_dir / "checkpoints" / "last.pt", key="resume")
            )  # the same run?
            log.info(f"{run_dir} already finished {finished['epochs']} epochs (resume=auto): nothing to do")
            return finished
        if resume is None and claimed_by_this_run(run_dir):
            log.info(
                f"resume=auto: {run_dir} is a new folder, so there is no run to continue: this starts one (a run "
                "without hydra.run.dir gets a new folder each time; to continue a run, pass resume=<its folder>)"
            )
    state = None
    layout = _layout_name(cfg, resumed=resume is not None)
    if resume is not None:
        cfg, run_dir, state = _resume(cfg, resume)
    else:
        refuse_existing_run(run_dir, own_record=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = fit(cfg, run_dir, state, layout=layout, job=hydra_job())
    if not torchrun_rank():
        print(
            f"test acc {metrics['test_acc']:.4f} (best val acc {metrics['best_val_acc']:.4f} at epoch {metrics['best_epoch']})"
        )
        print(f"run directory: {run_dir}")
    return metrics


def _finished_metrics(run_dir: Path, epochs: int) -> Optional[dict]:
    """The metrics of a run in `run_dir` that already trained `epochs` epochs and was scored, or None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("epochs") == epochs else None


def _resume(cfg: DictConfig, resume: str) -> tuple[DictConfig, Path, dict]:
    """The saved run's config, with what the command line may change on a resume taken from it."""
    run_dir = resumable_run(resume)
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt", key="resume")
    merged = _continued_config(cfg, run_dir, state)
    done, epochs = state["epoch"], merged.trainer.epochs
    if epochs < done:
        raise UserError(
            f"resume={run_dir}: the run already trained {done} epochs, more than trainer.epochs={epochs}; raise trainer.epochs to continue it"
        )
    if epochs == done and (run_dir / "metrics.json").is_file():
        raise UserError(
            f"resume={run_dir}: already trained {done} epochs and scored; raise trainer.epochs to continue (e.g. trainer.epochs={done + 10})"
        )
    merged.resume = str(run_dir)
    return merged, run_dir, state


def _continued_config(cfg: DictConfig, run_dir: Path, state: dict) -> DictConfig:
    """The checkpoint's config with what this command line changes in it, which must be only what a resume may
    change (how the run computes, and how long it goes on); anything else is refused, naming each change."""
    merged, taken = checkpoint_run_config(state, cfg)
    saved = config_from_checkpoint(state["config"])
    changed = [k for k in taken if not _may_change(k) and OmegaConf.select(merged, k) != OmegaConf.select(saved, k)]
    if changed:
        diffs = ", ".join(f"{k}: {_short(saved, k)} -> {_short(merged, k)}" for k in changed)
        raise UserError(
            f"resume={run_dir} continues that run as it was configured, but the command line changes {diffs}; "
            f"a resume may change only {', '.join(RESUMABLE)}"
        )
    return merged


def _may_change(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in RESUMABLE)


def _layout_name(cfg: DictConfig, resumed: bool) -> str:
    """The stage layout file, marked `+edits` when the run's stages are not the file's (a stage edit on the command
    line, or an experiment's, that sets a stage to what the file has already is no edit)."""
    layout = hydra_choice("stages")
    if not layout:  # outside a Hydra app: edited when the stages differ from the default config's
        return "custom+edits" if any(k.startswith("model.stages") for k in command_line_keys(cfg)) else "custom"
    experiment = hydra_choice("experiment") not in ("", "None")
    if resumed or not (experiment or any(k.startswith("model.stages") for k in command_line_keys(cfg))):
        return layout  # nothing but the layout file set the stages
    own = compose_config([f"model={hydra_choice('model')}", f"stages={layout}"]).model.stages
    return layout if plain(own) == plain(cfg.model.stages) else f"{layout}+edits"


def _short(cfg: DictConfig, key: str) -> str:
    """A config value for a message: a group by its name (`model: b0 -> v2_s`), long values cut."""
    node = OmegaConf.select(cfg, key)
    if OmegaConf.is_dict(node) and "name" in node:
        return str(value(node.name))
    text = json.dumps(plain(node)) if OmegaConf.is_config(node) else str(value(node))
    return text if len(text) <= 60 else text[:57] + "..."
