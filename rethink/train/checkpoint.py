"""Checkpoints: written atomically, read with weights_only=True, checked before use.

A checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), so `torch.load(weights_only=True)`
reads it and a file from an untrusted source cannot run code:
    format, version, model, ema (or None), ema_updates, optimizer, scheduler, scaler (or None),
    epoch (completed epochs), partial (the running totals of an epoch cut short by a signal, or None),
    steps_per_epoch, best_val_acc, best_epoch, train_time_s, train_images, history,
    config (the resolved run config), classes.
"""

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write
from ..errors import UserError, why_unreadable

FORMAT = "rethink-checkpoint"
VERSION = 1


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically, and flushed to the disk: a crash leaves the previous checkpoint intact."""
    atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f), durable=True)


def copy_checkpoint(src: Path, dst: Path) -> None:
    """dst becomes the same file as src (a hard link where the file system allows, else a copy),
    atomically."""
    tmp = dst.with_name(f".{dst.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: Any, key: str = "ckpt") -> dict:
    """A checkpoint written by save_checkpoint; anything else (missing, truncated, foreign) is a
    UserError naming `key` and the file."""
    path = Path(str(path)).expanduser()
    if path.is_dir():
        candidate = path / "checkpoints" / "best.pt"
        if not candidate.is_file():
            raise UserError(f"{key}={path}: a directory without checkpoints/best.pt; pass a .pt file")
        path = candidate
    if not path.is_file():
        raise UserError(f"{key}={path}: no such file; pass a checkpoint such as <run dir>/checkpoints/best.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # whatever a truncated or foreign file makes the unpickler raise
        raise UserError(f"{key}={path}: not a readable checkpoint ({why_unreadable(path, e)}); task=train writes them as <run dir>/checkpoints/best.pt") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}={path}: not a rethink checkpoint (no '{FORMAT}' marker); task=eval/predict/export need a checkpoint written by task=train")
    if state.get("version", 0) > VERSION:
        raise UserError(f"{key}={path}: checkpoint version {state['version']} is newer than this rethink ({VERSION}); upgrade rethink")
    return state


def model_from_checkpoint(state: dict, use_ema: bool = True):
    """The checkpoint's model, built from its own config, in eval mode on the CPU; its EMA weights
    when it has them and `use_ema`."""
    from ..models import build_model

    model = build_model(state["config"]["model"], len(state["classes"]))
    weights = state["ema"] if use_ema and state.get("ema") else state["model"]
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(f"checkpoint: its weights do not fit the model its config describes ({str(e).splitlines()[0][:120]})") from None
    return model.eval()
