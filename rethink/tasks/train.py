"""task=train, the main job: data and model from the config, then epochs of training and validation,
each logged to TensorBoard and checkpointed; at the end the best checkpoint on the test split and
metrics.json. `resume=<run dir>` continues a run where its last checkpoint left it."""

import gc
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

from ..config import config_from_checkpoint, plain
from ..data import build_data, make_loader, set_epoch
from ..data.transforms import batch_mixer
from ..errors import UserError
from ..models import build_model
from ..models.pretrained import load_pretrained
from ..models.profile import count_gmacs, count_params
from ..train.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from ..train.loop import EpochTotals, Inputs, Learner, NonFiniteLoss, evaluate, train_epoch
from ..train.metrics import confusion_figure
from ..train.optim import build_optimizer, build_scheduler
from ..train.runtime import StopSignals, peak_memory_mb, reset_memory_stats, resolve_device, resolve_precision, seed_everything
from ..train.tensorboard import log_session_end, log_session_start, open_writer
from . import checkpoint_run_config, hydra_choice, write_json

log = logging.getLogger("rethink")

# What `resume=` may change: how the run computes and how long it goes on, never what it is.
RESUMABLE = (
    "trainer.epochs", "trainer.device", "trainer.amp", "trainer.compile", "trainer.progress",
    "trainer.log_every_n_steps", "trainer.limit_val_batches", "trainer.cudnn_benchmark",
    "trainer.image_grid", "data.num_workers", "data.root", "data.cache", "data.cache_dir",
)


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


def train(cfg: DictConfig, run_dir: Path) -> dict:
    state = None
    if cfg.resume is not None:
        cfg, run_dir, state = _resume(cfg)
    elif (run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with resume={run_dir}, or choose another hydra.run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = fit(cfg, run_dir, state, layout=hydra_choice("stages"))
    print(f"test acc {metrics['test_acc']:.4f} (best val acc {metrics['best_val_acc']:.4f} at epoch {metrics['best_epoch']})")
    print(f"run directory: {run_dir}")
    return metrics


def fit(cfg: DictConfig, run_dir: Path, resumed: Optional[dict] = None, layout: str = "") -> dict:
    t = cfg.trainer
    seed_everything(cfg.seed, t.deterministic)
    device = resolve_device(t.device)
    precision = resolve_precision(t.amp.value, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = t.cudnn_benchmark and not t.deterministic
    reset_memory_stats(device)

    if resumed is None:
        data = build_data(cfg.data, cfg.model)
        data.write_run_files(run_dir)
    else:  # the run's own split, even if files were added to the data set since
        manifest = run_dir / "splits.csv"
        data = build_data(cfg.data, cfg.model, manifest=manifest if manifest.is_file() else None)
        if list(data.classes) != list(resumed["classes"]):
            raise UserError(f"resume={run_dir}: the data's classes {data.classes} are not the run's {resumed['classes']}")
    classes = data.classes
    model = build_model(cfg.model, len(classes))
    if resumed is None and cfg.model.pretrained not in (False, None):
        report, norm = load_pretrained(model, cfg.model.pretrained, cfg.model.torchvision_weights)
        log.info(f"pretrained weights ({cfg.model.pretrained}): {report}")
        if norm:
            cfg.model.mean, cfg.model.std = norm
    if cfg.model.freeze.value == "backbone":
        model.freeze_backbone()
    progress = Progress()
    if resumed:
        model.load_state_dict(resumed["model"])
        progress = Progress(**{k: resumed[k] for k in asdict(progress)})
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True) if t.ema else None
    forward = torch.compile(model) if t.compile else model

    pin = device.type == "cuda"
    train_loader = make_loader(data.train, cfg.data, train=True, seed=cfg.seed, pin_memory=pin)
    val_loader = make_loader(data.val, cfg.data, train=False, seed=cfg.seed, pin_memory=pin)
    steps = len(train_loader) if t.limit_train_batches is None else min(len(train_loader), t.limit_train_batches)
    if resumed and resumed.get("steps_per_epoch", steps) != steps:
        raise UserError(
            f"resume={run_dir}: an epoch now has {steps} steps, the run had {resumed['steps_per_epoch']}; "
            "the data or data.batch_size changed, and the run cannot go on as it was"
        )
    optimizer = build_optimizer(model, plain(cfg.optimizer))
    scheduler = build_scheduler(optimizer, steps, t.epochs, plain(cfg.scheduler))
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    if resumed:
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        if scaler is not None and resumed.get("scaler"):
            scaler.load_state_dict(resumed["scaler"])
        if ema is not None and resumed.get("ema"):
            ema.module.load_state_dict(resumed["ema"])
            ema.n_averaged.fill_(resumed["ema_updates"])
    inputs = Inputs(device, tuple(cfg.model.mean), tuple(cfg.model.std), t.channels_last)
    learner = Learner(forward, optimizer, scheduler, inputs, precision, scaler, ema, batch_mixer(cfg.data, len(classes)), t.label_smoothing, t.grad_clip)

    params, gmacs = count_params(model), count_gmacs(model, cfg.model.eval_size)
    show_progress = t.progress if t.progress is not None else sys.stdout.isatty()
    ckpt_dir = run_dir / "checkpoints"
    writer = open_writer(run_dir, resume_step=progress.epoch if resumed else None)
    ok = False
    try:
        if resumed is None:
            log_session_start(writer, _hparams(cfg, layout, model, params, gmacs))
            if t.image_grid:
                writer.add_image("train/images", _image_grid(data.train), 0)
        log.info(
            f"{'resuming' if resumed else 'training'} {cfg.model.name} ({params:,} params, {gmacs:.2f} GMACs) on "
            f"{cfg.data.name.value} ({len(data.train)}/{len(data.val)}/{len(data.test)} images, {len(classes)} classes), "
            f"{device} {precision.name}, epochs {progress.epoch + 1}-{t.epochs}, run dir {run_dir}"
        )

        with StopSignals() as stop:
            for epoch in range(progress.epoch + 1, t.epochs + 1):
                torch.manual_seed(_epoch_seed(cfg.seed, epoch))
                totals = EpochTotals(**progress.partial) if progress.partial else EpochTotals()
                set_epoch(train_loader, epoch, start_batch=totals.batches)  # after an interrupt: where it stopped
                batches = islice(train_loader, steps - totals.batches)
                try:
                    totals = train_epoch(
                        learner, batches, steps, totals,
                        log_every=t.log_every_n_steps, progress=show_progress,
                        description=f"epoch {epoch}/{t.epochs}", should_stop=lambda: bool(stop.requested),
                    )
                except NonFiniteLoss as e:
                    last = f"{ckpt_dir / 'last.pt'} (epoch {progress.epoch})" if progress.epoch else "none (no epoch finished)"
                    raise UserError(
                        f"{e} in epoch {epoch}; training stopped. Last good checkpoint: {last}. "
                        "Try a lower optimizer.lr, trainer.grad_clip=1.0, or trainer.amp=off"
                    ) from None
                if totals.interrupted:
                    progress.partial = asdict(totals)
                    save_checkpoint(_checkpoint(model, learner, cfg, classes, steps, progress), ckpt_dir / "last.pt")
                    log.warning(f"stopped by signal {stop.requested} in epoch {epoch} after {totals.batches} batches; "
                                f"saved {ckpt_dir / 'last.pt'}; continue with resume={run_dir}")
                    raise SystemExit(128 + stop.requested)
                val = evaluate(forward, val_loader, inputs, precision, len(classes), t.limit_val_batches)
                val_ema = evaluate(ema.module, val_loader, inputs, precision, len(classes), t.limit_val_batches) if ema else None
                score = (val_ema or val).acc
                improved = score > progress.best_val_acc
                if improved:
                    progress.best_val_acc, progress.best_epoch = score, epoch
                progress.epoch = epoch
                progress.train_time_s += totals.seconds
                progress.train_images += totals.images
                lr = optimizer.param_groups[0]["lr"]
                record = dict(epoch=epoch, train_loss=totals.loss, train_acc=totals.acc, val_loss=val.loss, val_acc=val.acc,
                              lr=lr, epoch_s=totals.seconds, train_img_s=totals.images_per_s)
                if val_ema:
                    record.update(val_ema_loss=val_ema.loss, val_ema_acc=val_ema.acc)
                progress.history.append(record)
                _log_epoch(writer, record, progress.best_val_acc)
                writer.flush()  # before the checkpoint: a kill between the two re-runs this epoch, logged once
                progress.partial = None
                save_checkpoint(_checkpoint(model, learner, cfg, classes, steps, progress), ckpt_dir / "last.pt")
                if improved:
                    copy_checkpoint(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
                log.info(
                    f"epoch {epoch}/{t.epochs}  train loss {totals.loss:.4f} acc {totals.acc:.4f}  "
                    f"val loss {val.loss:.4f} acc {val.acc:.4f}"
                    + (f" (ema {val_ema.acc:.4f})" if val_ema else "")
                    + f"  best {progress.best_val_acc:.4f} @{progress.best_epoch}  lr {lr:.3g}  "
                    f"{totals.images_per_s:.0f} img/s  {totals.seconds:.1f}s"
                )

        best = load_checkpoint(ckpt_dir / "best.pt", key="best checkpoint")
        weights = best["ema"] if ema is not None and best.get("ema") else best["model"]
        model.load_state_dict(weights)
        test_loader = make_loader(data.test, cfg.data, train=False, seed=cfg.seed, pin_memory=pin)
        test = evaluate(model, test_loader, inputs, precision, len(classes))
        writer.add_scalar("test/acc", test.acc, progress.epoch)
        writer.add_scalar("test/loss", test.loss, progress.epoch)
        writer.add_figure("test/confusion_matrix", confusion_figure(test.confusion, classes, f"test, epoch {best['epoch']}"), progress.epoch)
        last = progress.history[-1]
        metrics = dict(
            best_val_acc=progress.best_val_acc,
            best_epoch=progress.best_epoch,
            final_val_acc=last.get("val_ema_acc", last["val_acc"]),
            final_train_loss=last["train_loss"],
            test_acc=test.acc,
            test_loss=test.loss,
            test_images=test.images,
            epochs=progress.epoch,
            params=params,
            gmacs=round(gmacs, 4),
            train_time_s=round(progress.train_time_s, 2),
            train_img_s=round(progress.train_images / progress.train_time_s, 1) if progress.train_time_s else 0.0,
            peak_memory_mb=round(peak_memory_mb(device), 1),
            device=str(device),
            precision=precision.name,
            model=cfg.model.name,
            seed=cfg.seed,
        )
        write_json(run_dir / "metrics.json", metrics)
        log.info(f"test acc {test.acc:.4f} (best checkpoint, epoch {progress.best_epoch}); wrote {run_dir / 'metrics.json'}")
        ok = True
        return metrics
    finally:
        log_session_end(writer, ok)
        writer.close()
        # a failed job's traceback keeps this frame alive in a sweep: let go of the big objects now
        del train_loader, val_loader, learner, forward, ema, optimizer, model
        if t.compile:
            torch._dynamo.reset()  # or the next job of a sweep may hit the recompile limit and run uncompiled
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _resume(cfg: DictConfig) -> tuple[DictConfig, Path, dict]:
    """The saved run's config, with what the command line may change on a resume taken from it."""
    run_dir = Path(cfg.resume).expanduser()
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        raise UserError(f"resume={cfg.resume}: no checkpoints/last.pt there; pass the directory of a run that saved a checkpoint")
    state = load_checkpoint(last, key="resume")
    merged, taken = checkpoint_run_config(state, cfg)
    saved = config_from_checkpoint(state["config"])
    changed = [k for k in taken if not k.startswith(RESUMABLE) and OmegaConf.select(merged, k) != OmegaConf.select(saved, k)]
    if changed:
        diffs = ", ".join(f"{k} (was {_short(OmegaConf.select(saved, k))})" for k in changed)
        raise UserError(
            f"resume={run_dir} continues that run as it was configured, but the command line changes {diffs}; "
            f"a resume may change only {', '.join(RESUMABLE)}"
        )
    merged.resume = str(run_dir)
    return merged, run_dir, state


def _checkpoint(model, learner: Learner, cfg: DictConfig, classes: list, steps: int, progress: Progress) -> dict:
    """Everything a resume needs (`model` is the module itself, not its torch.compile wrapper)."""
    ema = learner.ema
    return dict(
        model=model.state_dict(),
        ema=ema.module.state_dict() if ema is not None else None,
        ema_updates=int(ema.n_averaged) if ema is not None else 0,
        optimizer=learner.optimizer.state_dict(),
        scheduler=learner.scheduler.state_dict(),
        scaler=learner.scaler.state_dict() if learner.scaler is not None else None,
        steps_per_epoch=steps,
        config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
        classes=list(classes),
        **asdict(progress),
    )


def _epoch_seed(seed: int, epoch: int) -> int:
    """Torch's seed for one epoch (dropout, drop path, mixup): the same whether or not the run was resumed."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _hparams(cfg: DictConfig, layout: str, model, params: int, gmacs: float) -> dict:
    return {
        "model": cfg.model.name,
        "stages": layout or "custom",
        "blocks": ",".join(s.block for s in model.spec.stages),
        "data": cfg.data.name.value,
        "optimizer": cfg.optimizer.name.value,
        "lr": cfg.optimizer.lr,
        "scheduler": cfg.scheduler.name.value,
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.trainer.epochs,
        "train_size": cfg.model.train_size,
        "eval_size": cfg.model.eval_size,
        "drop_path_rate": cfg.model.drop_path_rate,
        "drop_path_schedule": cfg.model.drop_path_schedule.value,
        "augment": cfg.data.augment.value,
        "pretrained": str(cfg.model.pretrained),
        "freeze": cfg.model.freeze.value,
        "ema": cfg.trainer.ema,
        "seed": cfg.seed,
        "params": params,
        "gmacs": round(gmacs, 4),
    }


def _log_epoch(writer, record: dict, best_val_acc: float) -> None:
    step = record["epoch"]
    writer.add_scalar("train/loss", record["train_loss"], step)
    writer.add_scalar("train/acc", record["train_acc"], step)
    writer.add_scalar("val/loss", record["val_loss"], step)
    writer.add_scalar("val/acc", record["val_acc"], step)
    writer.add_scalar("val/acc_best", best_val_acc, step)
    if "val_ema_acc" in record:
        writer.add_scalar("val_ema/loss", record["val_ema_loss"], step)
        writer.add_scalar("val_ema/acc", record["val_ema_acc"], step)
    writer.add_scalar("lr", record["lr"], step)
    writer.add_scalar("time/epoch_s", record["epoch_s"], step)
    writer.add_scalar("throughput/train_img_s", record["train_img_s"], step)


def _image_grid(dataset, count: int = 16) -> torch.Tensor:
    """The first augmented training images, as the model sees them before normalisation."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    return make_grid(torch.stack(images), nrow=8)


def _short(value) -> str:
    text = json.dumps(plain(value)) if OmegaConf.is_config(value) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
