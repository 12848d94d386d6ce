"""A saved run made ready for another task: its config with this command line's overrides, and (for eval and
predict) its model on this machine's device."""

from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from ..config import apply_overrides, config_from_checkpoint, value
from ..errors import UserError
from ..hydra_app import command_line_keys
from ..train.checkpoint import model_from_checkpoint
from ..train.loop import Inputs
from ..train.runtime import Precision, resolve_device, resolve_precision


def checkpoint_run_config(state: dict, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """The config a checkpoint was trained with, plus what this command line overrides in it
    (e.g. `data.root=...`, `data=folder`, `trainer.device=cpu`); and the keys it overrode."""
    saved = config_from_checkpoint(state["config"])
    return apply_overrides(saved, cfg, command_line_keys(cfg), skip=("task", "ckpt", "inputs", "resume"))


# What another task may change in a checkpoint's model: where it scores it, never which network it is
MODEL_KEYS_INFERENCE_MAY_CHANGE = ("model.eval_size",)


def inference_config(state: dict, cfg: DictConfig) -> tuple[DictConfig, list[str]]:
    """checkpoint_run_config for eval, predict and export: the checkpoint's weights decide the network, so a
    command line that changes its model (`model=v2_s`, `model.stages.3.block=fused`, ...) is refused in one line;
    the data, the device and `model.eval_size` may change."""
    run_cfg, overridden = checkpoint_run_config(state, cfg)
    saved = config_from_checkpoint(state["config"])
    contradicting = [
        k
        for k in overridden
        if (k == "model" or k.startswith("model."))
        and k not in MODEL_KEYS_INFERENCE_MAY_CHANGE
        and OmegaConf.select(run_cfg, k) != OmegaConf.select(saved, k)
    ]
    if contradicting:
        raise UserError(
            f"task={value(cfg.task)}: the checkpoint is a {saved.model.name} and its weights decide the network, but the command "
            f"line changes {', '.join(contradicting)}; leave the model's keys out (only {', '.join(MODEL_KEYS_INFERENCE_MAY_CHANGE)} may change)"
        )
    return run_cfg, overridden


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
    run_cfg, overridden = inference_config(state, cfg)
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
