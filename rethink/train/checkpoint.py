"""Checkpoints: written atomically, read with weights_only=True, checked before use.

What a checkpoint holds is written here too (`training_state`, `restore_training_state`, `chosen_weights`):
a checkpoint is a plain dict (tensors, numbers, strings, lists, dicts), so `torch.load(weights_only=True)`
reads it and a file from an untrusted source cannot run code:
    format, version, model, ema (or None), ema_updates, optimizer, scheduler, scaler (or None),
    epoch (completed epochs), partial (the running totals of an epoch cut short by a signal, or None),
    steps_per_epoch, best_val_acc, best_epoch, train_time_s, train_images, history,
    config (the resolved run config), classes, rng (torch's random state by rank, after a signal, or None).
That is last.pt, which a resume continues. best.pt, which eval, predict, export and the test split read, is the
same without what only a resume needs (`weights_state`: no optimizer, scheduler, scaler or random state).

A checkpoint that cannot be written (a full disk, a quota) is one UserError line; the file it would have replaced
stays as it was, and no part of the new one is left behind.
"""

import errno
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from ..atomic import atomic_write
from ..data.cache import size_text
from ..environment import free_space
from ..errors import UserError, why_unreadable
from ..models import build_model
from ..rundir import resume_argument

FORMAT = "rethink-checkpoint"
VERSION = 1


@dataclass
class Progress:
    """Where a run stands; saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    best_val_acc: float = -1.0
    best_epoch: int = 0
    train_time_s: float = 0.0
    train_images: int = 0
    history: list = field(default_factory=list)
    partial: Optional[dict] = None  # EpochTotals of an epoch cut short by a signal

    @classmethod
    def of(cls, state: Optional[dict]) -> "Progress":
        """A checkpoint's progress; a new run's when there is no checkpoint."""
        return cls(**{k: state[k] for k in asdict(cls())}) if state else cls()

    def add_epoch(self, epoch: int, totals, val, val_ema, stage: dict) -> dict:
        """Add a finished epoch (its training totals, its val scores, with the EMA weights' when there are some);
        returns its record (what the log and TensorBoard show). `stage`: progressive learning's settings for the
        epoch ({} without it). The best epoch is the one whose validated weights (the EMA's, if kept) scored best."""
        score = (val_ema or val).acc
        if score > self.best_val_acc:
            self.best_val_acc, self.best_epoch = score, epoch
        self.epoch = epoch
        self.train_time_s += totals.seconds
        self.train_images += totals.images
        self.partial = None
        record = dict(
            epoch=epoch,
            train_loss=totals.loss,
            train_acc=totals.acc,
            val_loss=val.loss,
            val_acc=val.acc,
            val_images=val.images,
            lr=totals.lr,
            epoch_s=totals.seconds,
            train_img_s=totals.images_per_s,
        )
        if val_ema:
            record.update(val_ema_loss=val_ema.loss, val_ema_acc=val_ema.acc)
        record.update(stage)
        self.history.append(record)
        return record


def training_state(
    model, learner, config: dict, classes: list, steps: int, progress: Progress, rng: Optional[list] = None
) -> dict:
    """Everything a resume needs (`model` is the module itself, not its torch.compile wrapper); `config` the run's
    resolved config as plain data; `rng`: torch's random state of each process, by rank, where a signal cut an
    epoch short."""
    ema = learner.ema
    return dict(
        model=model.state_dict(),
        ema=ema.module.state_dict() if ema is not None else None,
        ema_updates=int(ema.n_averaged) if ema is not None else 0,
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        scaler=learner.scaler.state_dict() if learner.scaler is not None else None,
        steps_per_epoch=steps,
        config=config,
        classes=list(classes),
        rng=rng,
        **asdict(progress),
    )


def restore_training_state(state: dict, learner) -> None:
    """The optimizer, schedule, gradient scaler and EMA of `learner` as the checkpoint left them."""
    learner.optimizer.load_state_dict(state["optimizer"])
    learner.scheduler.load_state_dict(state["scheduler"])
    if learner.scaler is not None and state.get("scaler"):
        learner.scaler.load_state_dict(state["scaler"])
    if learner.ema is not None and state.get("ema"):
        learner.ema.module.load_state_dict(state["ema"])
        learner.ema.n_averaged.fill_(state["ema_updates"])


def chosen_weights(state: dict, use_ema: bool) -> tuple[dict, str]:
    """The weights a checkpoint is scored with: its EMA weights when asked and it has them, else the model's;
    and which of the two (`ema` or `model`)."""
    if use_ema and state.get("ema"):
        return state["ema"], "ema"
    return state["model"], "model"


def rng_state() -> dict:
    """Torch's random state in this process (CPU, and every CUDA device in use)."""
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


TRAINING_ONLY = ("optimizer", "scheduler", "scaler", "rng")  # what only a resume needs


def weights_state(state: dict) -> dict:
    """`state` as best.pt holds it: the weights (and EMA), config, classes and progress, without what only a
    resume needs; readable by everything that reads a checkpoint except a resume."""
    return {k: v for k, v in state.items() if k not in TRAINING_ONLY}


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)  # a full file system, a quota: what freeing space or moving the run fixes


def save_checkpoint(state: dict, path: Path) -> None:
    """Atomically, and flushed to the disk: a crash leaves the previous checkpoint intact. An OSError (a full
    disk, a quota, a read-only folder) is a UserError saying what to do."""
    path = Path(path)
    try:
        atomic_write(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **state}, f), durable=True)
    except OSError as e:
        raise UserError(unwritable(f"checkpoint {path}", e, path.parent)) from None


def unwritable(what: str, error: OSError, checkpoints: Path) -> str:
    """The one line for a run whose file (`what`) the file system refused: which, why, the free space there (where
    the error names the file, else in `checkpoints`), and what to do, with the run's last.pt in `checkpoints`
    (which stays as it was)."""
    try:
        folder = Path(error.filename).parent if isinstance(error.filename, str) else checkpoints
        free = f"{size_text(free_space(folder)[0])} free there"
    except OSError:
        free = "free space unknown"
    last = checkpoints / "last.pt"
    kept = (
        f"the run stops; its last.pt (epoch {_epoch_of(last)}) is intact: free space, then continue with "
        f"{resume_argument(checkpoints.parent)}"
        if last.is_file()
        else "the run stops before any checkpoint was saved: free space and start it again"
    )
    return f"cannot write {what} ({error.strerror or error}; {free}); {kept}"


def _epoch_of(path: Path) -> str:
    try:
        return str(torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("epoch", "?"))
    except Exception:  # the line must be written whatever the file holds
        return "?"


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
        raise UserError(
            f"{key}={path}: not a readable checkpoint ({why_unreadable(path, e)}); task=train writes them as <run dir>/checkpoints/best.pt"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(
            f"{key}={path}: not a rethink checkpoint (no '{FORMAT}' marker); task=eval/predict/export need a checkpoint written by task=train"
        )
    if state.get("version", 0) > VERSION:
        raise UserError(
            f"{key}={path}: checkpoint version {state['version']} is newer than this rethink ({VERSION}); upgrade rethink"
        )
    return state


def model_from_checkpoint(state: dict, use_ema: bool = True):
    """The checkpoint's model, built from its own config, in eval mode on the CPU; its EMA weights
    when it has them and `use_ema`."""
    model = build_model(state["config"]["model"], len(state["classes"]))
    weights, _ = chosen_weights(state, use_ema)
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"checkpoint: its weights do not fit the model its config describes ({str(e).splitlines()[0][:120]})"
        ) from None
    return model.eval()
