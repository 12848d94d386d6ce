"""task=train, the main job: data and model from the config, then epochs of training and validation,
each logged to TensorBoard and checkpointed; at the end the best checkpoint on the test split and
metrics.json. `resume=<run dir>` continues a run where its last checkpoint left it."""

import gc
import json
import logging
import signal
import sys
from dataclasses import asdict, dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torchvision.utils import make_grid

from ..config import config_from_checkpoint, plain, value
from ..data import build_data, make_loader, set_epoch
from ..data.device_loader import DeviceLoader, device_bytes
from ..data.transforms import batch_mixer
from ..errors import UserError
from ..models import build_model
from ..models.pretrained import load_pretrained
from ..models.profile import count_gmacs, count_params
from ..rundir import torchrun_rank
from ..train import distributed, fast_paths
from ..train import progressive as progressive_learning
from ..train.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint
from ..train.loop import EpochTotals, Inputs, Interrupted, Learner, NonFiniteLoss, evaluate, train_epoch
from ..train.metrics import confusion_figure
from ..train.optim import build_optimizer, build_scheduler
from ..train.runtime import (
    StopSignals, peak_memory_mb, reset_memory_stats, resolve_device, resolve_precision, seed_everything, set_cpu_threads,
)
from ..train.tensorboard import SILENT_WRITER, log_session_end, log_session_start, open_writer
from . import checkpoint_run_config, command_line_keys, hydra_choice, hydra_job, write_json

log = logging.getLogger("rethink")

# What `resume=` may change: how the run computes and how long it goes on, never what it is.
# (Not trainer.limit_val_batches: it changes which images validate; nor data.cache: a run keeps how it was read.)
RESUMABLE = (
    "trainer.epochs", "trainer.device", "trainer.amp", "trainer.compile", "trainer.cuda_graphs", "trainer.progress", "trainer.cpu_threads", "trainer.jobs_per_gpu",
    "trainer.grad_checkpointing",
    "trainer.log_every_n_steps", "trainer.cudnn_benchmark", "trainer.image_grid", "data.num_workers", "data.root",
    "data.cache_dir", "data.on_gpu",
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
    if cfg.resume == "auto":  # continue the run in this folder if there is one (a requeued or re-run sweep job)
        finished = _finished_metrics(run_dir, cfg.trainer.epochs)
        if finished is not None:
            log.info(f"{run_dir} already finished {finished['epochs']} epochs (resume=auto): nothing to do")
            return finished
        cfg.resume = str(run_dir) if (run_dir / "checkpoints" / "last.pt").is_file() else None
    state = None
    if cfg.resume is not None:
        cfg, run_dir, state = _resume(cfg)
    elif (run_dir / "checkpoints" / "last.pt").exists():
        raise UserError(f"{run_dir} already holds a run; continue it with resume={run_dir}, or choose another hydra.run.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = fit(cfg, run_dir, state, layout=_layout_name(cfg), job=hydra_job())
    if not torchrun_rank():
        print(f"test acc {metrics['test_acc']:.4f} (best val acc {metrics['best_val_acc']:.4f} at epoch {metrics['best_epoch']})")
        print(f"run directory: {run_dir}")
    return metrics


def fit(cfg: DictConfig, run_dir: Path, resumed: Optional[dict] = None, layout: str = "", job: Optional[int] = None) -> dict:
    """Train `cfg` in `run_dir` (continuing `resumed`, a checkpoint); `job`: this run's number in a
    sweep, which picks its GPU when `trainer.device=auto` and there are several."""
    t = cfg.trainer
    world = distributed.torchrun_world()  # a world of one outside torchrun
    cpu_threads = set_cpu_threads(t.cpu_threads)
    seed_everything(cfg.seed, t.deterministic)
    device = distributed.start(world, t.device) or resolve_device(t.device, job, t.jobs_per_gpu)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA graphs capture on the current device, and a sweep job may run on cuda:1
    precision = resolve_precision(t.amp.value, device)
    reset_memory_stats(device)

    with distributed.main_first(world):  # rank 0 downloads and scans; the others then find its caches
        data = _data(cfg, run_dir, resumed, write=world.is_main)
    classes = data.classes
    model = distributed.sync_batchnorm(_model(cfg, len(classes), resumed), world, t.sync_bn, device)
    progress = Progress(**{k: resumed[k] for k in asdict(Progress())}) if resumed else Progress()
    model.to(device)
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True) if t.ema else None

    pin = device.type == "cuda"
    train_loader = make_loader(data.train, cfg.data, train=True, seed=cfg.seed, pin_memory=pin, shard=world.shard)
    val_loader = make_loader(data.val, cfg.data, train=False, seed=cfg.seed, pin_memory=pin, limit_batches=t.limit_val_batches, shard=world.shard)
    steps = _batches_per_epoch(train_loader, t)  # whole groups of trainer.grad_accumulation batches
    if resumed and resumed.get("steps_per_epoch", steps) != steps:
        raise UserError(
            f"resume={run_dir}: an epoch now has {steps} steps, the run had {resumed['steps_per_epoch']}; "
            "the data or data.batch_size changed, and the run cannot go on as it was"
        )
    free = torch.cuda.mem_get_info(device)[0] // t.jobs_per_gpu if device.type == "cuda" else None  # jobs sharing the GPU share it
    fast = fast_paths.choose(cfg, device.type, world.world_size, steps, store_bytes=lambda: device_bytes(data.train), free_bytes=free)
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark.on
    forward, trained = fast_paths.forward_modules(model, fast.compile.on, fast.cuda_graphs.on, precision.autocast,
                                                  wrap=lambda module: distributed.wrap(module, world, device))
    if fast.data_on_gpu.on:  # the same batches, made on the device
        train_loader, fast = _device_loader(data.train, cfg, device, world, train_loader, fast)
    optimizer = build_optimizer(model, plain(cfg.optimizer))
    scheduler = build_scheduler(optimizer, steps // t.grad_accumulation, t.epochs, plain(cfg.scheduler))  # per optimizer step
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    if resumed:
        _restore_training_state(resumed, optimizer, scheduler, scaler, ema)
    inputs = Inputs(device, tuple(cfg.model.mean), tuple(cfg.model.std), t.channels_last)
    learner = Learner(trained, optimizer, scheduler, inputs, precision, scaler, ema, batch_mixer(cfg.data, len(classes)), t.label_smoothing, t.grad_clip,
                      grad_accumulation=t.grad_accumulation)
    stages = progressive_learning.ProgressiveLearning(cfg, len(classes), pin_memory=pin, shard=world.shard, compiled=fast.compile.on)  # none: changes nothing

    params, gmacs = count_params(model), count_gmacs(model, cfg.model.eval_size)
    show_progress = t.progress if t.progress is not None else sys.stdout.isatty()
    ckpt_dir = run_dir / "checkpoints"
    if resumed and world.is_main:
        _set_aside_earlier_metrics(run_dir, progress.epoch)
    writer = open_writer(run_dir, resume_step=progress.epoch if resumed else None) if world.is_main else SILENT_WRITER
    save = save_checkpoint if world.is_main else lambda state, path: None
    ok = False
    try:
        if resumed is None:
            log_session_start(writer, _hparams(cfg, layout, model, params, gmacs, world))
            if t.image_grid:
                writer.add_image("train/images", _image_grid(data.train), 0)
        log.info(
            f"{'resuming' if resumed else 'training'} {cfg.model.name} ({params:,} params, {gmacs:.2f} GMACs) on "
            f"{cfg.data.name.value} ({len(data.train)}/{len(data.val)}/{len(data.test)} images, {len(classes)} classes), "
            f"{_device_line(device, precision, cpu_threads)}, epochs {progress.epoch + 1}-{t.epochs}, run dir {run_dir}"
        )
        if device.type == "cuda":
            log.info(f"fast paths: {fast.line()}")

        with StopSignals() as stop:
            # under DDP the processes agree on stopping at each step; evaluation, whose shards differ in
            # length, is not cut short there: a stop then waits for the end of the epoch
            stop_training = distributed.agreed(stop, world, device)
            stop_evaluating = stop if not world.distributed else (lambda: False)
            saved_rng = resumed.get("rng") if resumed and progress.partial else None
            for epoch in range(progress.epoch + 1, t.epochs + 1):
                train_loader = stages.apply(epoch, train_loader, model, learner)  # a new stage: its image size and regularisation
                _seed_epoch(cfg.seed, epoch, world.rank, saved_rng)
                saved_rng = None
                totals = distributed.own_share(world, EpochTotals(**progress.partial)) if progress.partial else EpochTotals()
                set_epoch(train_loader, epoch, start_batch=totals.batches)  # after an interrupt: where it stopped
                totals = _train_epoch(learner, islice(train_loader, steps - totals.batches), steps, totals, epoch, t, show_progress, stop_training, progress, ckpt_dir)
                totals = distributed.sum_totals(world, totals, device)
                val = val_ema = None
                if not totals.interrupted:
                    try:
                        val = _validate(forward, val_loader, inputs, precision, len(classes), show_progress, "val", stop_evaluating, world)
                        val_ema = _validate(ema.module if ema else None, val_loader, inputs, precision, len(classes), show_progress, "val ema", stop_evaluating, world)
                    except Interrupted:
                        totals.interrupted = True
                if totals.interrupted:  # saved where it stopped, random state included: the resume finishes the epoch exactly
                    progress.partial = asdict(totals)
                    save(_checkpoint(model, learner, cfg, classes, steps, progress, rng=distributed.gather(world, _rng_state())), ckpt_dir / "last.pt")
                    _stop(stop, f"in epoch {epoch} after {totals.batches} of {steps} batches", ckpt_dir, run_dir, world)
                record = _end_epoch(epoch, totals, val, val_ema, progress, stages.record())
                _log_epoch(writer, record, progress.best_val_acc)
                writer.flush()  # before the checkpoint: a kill between the two re-runs this epoch, logged once
                save(_checkpoint(model, learner, cfg, classes, steps, progress), ckpt_dir / "last.pt")
                if progress.best_epoch == epoch and world.is_main:
                    copy_checkpoint(ckpt_dir / "last.pt", ckpt_dir / "best.pt")
                log.info(_epoch_line(record, progress, t.epochs))
                if distributed.any_process(world, stop(), device):
                    _stop(stop, f"after epoch {epoch}", ckpt_dir, run_dir, world)

            distributed.barrier(world)  # best.pt is written
            try:
                test, best_epoch = _test_best(model, ckpt_dir, ema is not None, data.test, cfg, inputs, precision, len(classes), pin, show_progress, stop_evaluating, world)
            except Interrupted:
                _stop(stop, f"while scoring the test split after epoch {progress.epoch}", ckpt_dir, run_dir, world)
        writer.add_scalar("test/acc", test.acc, progress.epoch)
        writer.add_scalar("test/loss", test.loss, progress.epoch)
        writer.add_figure("test/confusion_matrix", confusion_figure(test.confusion, classes, f"test, epoch {best_epoch}"), progress.epoch)
        if getattr(trained, "failed", False):  # CUDA graphs could not be captured: the run trained without them
            fast = replace(fast, cuda_graphs=fast_paths.Choice(False, "capture failed"))
        metrics = _metrics(cfg, progress, test, ema is not None, params, gmacs, device, precision, cpu_threads, world, fast)
        if world.is_main:
            write_json(run_dir / "metrics.json", metrics)
        log.info(f"test acc {test.acc:.4f} (best checkpoint, epoch {progress.best_epoch}); wrote {run_dir / 'metrics.json'}")
        ok = True
        return metrics
    finally:
        log_session_end(writer, ok)
        writer.close()
        # a failed job's traceback keeps this frame alive in a sweep: let go of the big objects now
        del train_loader, val_loader, learner, forward, ema, optimizer, model
        if fast.compile.on:
            torch._dynamo.reset()  # or the next job of a sweep may hit the recompile limit and run uncompiled
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        distributed.stop(world)


def _device_loader(dataset, cfg: DictConfig, device, world, cpu_loader, fast):
    """The train loader with the images resident on `device`, or where they do not fit after all, the CPU's
    (a warning; metrics.json then says data_on_gpu: false)."""
    try:
        return DeviceLoader(dataset, cfg.data, cfg.model.train_size, seed=cfg.seed, device=device, shard=world.shard), fast
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        log.warning(f"data.on_gpu: the training images do not fit on {device}; loading them on the CPU (data.on_gpu=false avoids the attempt)")
        return cpu_loader, replace(fast, data_on_gpu=fast_paths.Choice(False, "did not fit"))


def _finished_metrics(run_dir: Path, epochs: int) -> Optional[dict]:
    """The metrics of a run in `run_dir` that already trained `epochs` epochs and was scored, or None."""
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    return metrics if metrics.get("epochs") == epochs else None


def _data(cfg: DictConfig, run_dir: Path, resumed: Optional[dict], write: bool = True):
    """The data set; a resumed run keeps its own split (its splits.csv), even if files were added since.
    `write`: record the classes and the split in the run folder (a new run)."""
    if resumed is None:
        data = build_data(cfg.data, cfg.model)
        if write:
            data.write_run_files(run_dir)
        return data
    manifest = run_dir / "splits.csv"
    data = build_data(cfg.data, cfg.model, manifest=manifest if manifest.is_file() else None)
    if list(data.classes) != list(resumed["classes"]):
        raise UserError(f"resume={run_dir}: the data's classes {data.classes} are not the run's {resumed['classes']}")
    return data


def _model(cfg: DictConfig, num_classes: int, resumed: Optional[dict]):
    """The network, with pretrained weights (a new run) or the run's own (a resume), frozen and
    checkpointed as asked."""
    model = build_model(cfg.model, num_classes)
    if resumed is None and cfg.model.pretrained not in (False, None):
        report, norm = load_pretrained(model, cfg.model.pretrained, cfg.model.torchvision_weights)
        log.info(f"pretrained weights ({cfg.model.pretrained}): {report}")
        if norm:
            cfg.model.mean, cfg.model.std = norm
    if cfg.model.freeze.value == "backbone":
        model.freeze_backbone()
    model.set_grad_checkpointing(cfg.trainer.grad_checkpointing)
    if resumed:
        model.load_state_dict(resumed["model"])
    return model


def _restore_training_state(resumed: dict, optimizer, scheduler, scaler, ema) -> None:
    optimizer.load_state_dict(resumed["optimizer"])
    scheduler.load_state_dict(resumed["scheduler"])
    if scaler is not None and resumed.get("scaler"):
        scaler.load_state_dict(resumed["scaler"])
    if ema is not None and resumed.get("ema"):
        ema.module.load_state_dict(resumed["ema"])
        ema.n_averaged.fill_(resumed["ema_updates"])


def _batches_per_epoch(train_loader, t: DictConfig) -> int:
    """The loader batches an epoch trains on: all of them (or trainer.limit_train_batches), rounded down to
    whole optimizer steps of trainer.grad_accumulation batches; the few left over wait for the next
    epoch's shuffle, as drop_last does with images."""
    batches = len(train_loader) if t.limit_train_batches is None else min(len(train_loader), t.limit_train_batches)
    if batches < t.grad_accumulation:
        raise UserError(
            f"trainer.grad_accumulation={t.grad_accumulation}: an epoch has only {batches} batches of data.batch_size="
            f"{train_loader.batch_size}; accumulate fewer batches, or use smaller ones"
        )
    return batches - batches % t.grad_accumulation


def _train_epoch(learner, batches, steps, totals, epoch, t, show_progress, stop, progress, ckpt_dir) -> EpochTotals:
    try:
        return train_epoch(
            learner, batches, steps, totals, log_every=t.log_every_n_steps, progress=show_progress,
            description=f"epoch {epoch}/{t.epochs}", should_stop=stop,
        )
    except NonFiniteLoss as e:
        last = f"{ckpt_dir / 'last.pt'} (epoch {progress.epoch})" if progress.epoch else "none (no epoch finished)"
        raise UserError(
            f"{e} in epoch {epoch}; training stopped. Last good checkpoint: {last}. "
            "Try a lower optimizer.lr, trainer.grad_clip=1.0, or trainer.amp=off"
        ) from None


def _end_epoch(epoch: int, totals: EpochTotals, val, val_ema, progress: Progress, stage: dict) -> dict:
    """Add a finished epoch to `progress`; returns its record (what the log and TensorBoard show).
    `stage`: progressive learning's settings for the epoch (none without it)."""
    score = (val_ema or val).acc
    if score > progress.best_val_acc:
        progress.best_val_acc, progress.best_epoch = score, epoch
    progress.epoch = epoch
    progress.train_time_s += totals.seconds
    progress.train_images += totals.images
    progress.partial = None
    record = dict(epoch=epoch, train_loss=totals.loss, train_acc=totals.acc, val_loss=val.loss, val_acc=val.acc, val_images=val.images,
                  lr=totals.lr, epoch_s=totals.seconds, train_img_s=totals.images_per_s)
    if val_ema:
        record.update(val_ema_loss=val_ema.loss, val_ema_acc=val_ema.acc)
    record.update(stage)
    progress.history.append(record)
    return record


def _epoch_line(record: dict, progress: Progress, epochs: int) -> str:
    ema = f" (ema {record['val_ema_acc']:.4f})" if "val_ema_acc" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}  train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}  "
        f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}{ema}  best {progress.best_val_acc:.4f} @{progress.best_epoch}  "
        f"lr {record['lr']:.3g}  {record['train_img_s']:.0f} img/s  {record['epoch_s']:.1f}s"
    )


def _validate(module, loader, inputs, precision, num_classes, show_progress, name, stop, world):
    """`module` scored on the val split (over every DDP process), or None where there is no module."""
    if module is None:
        return None
    return distributed.sum_evaluation(world, evaluate(module, loader, inputs, precision, num_classes, progress=show_progress, description=name, should_stop=stop))


def _metrics(cfg, progress: Progress, test, ema: bool, params: int, gmacs: float, device, precision, cpu_threads: int, world, fast) -> dict:
    """metrics.json: what the run reached, what it cost, and where it ran."""
    peak_mb, peak_kind = peak_memory_mb(device)
    last = progress.history[-1]
    return dict(
        best_val_acc=progress.best_val_acc,
        best_epoch=progress.best_epoch,
        final_val_acc=last.get("val_ema_acc", last["val_acc"]),
        final_train_loss=last["train_loss"],
        test_acc=test.acc,
        test_loss=test.loss,
        test_images=test.images,
        val_images=last.get("val_images"),
        weights="ema" if ema else "model",
        epochs=progress.epoch,
        params=params,
        gmacs=round(gmacs, 4),
        train_time_s=round(progress.train_time_s, 2),
        train_img_s=round(progress.train_images / progress.train_time_s, 1) if progress.train_time_s else 0.0,
        peak_memory_mb=round(peak_mb, 1),
        peak_memory=peak_kind,
        device=str(device),
        precision=precision.name,
        cpu_threads=cpu_threads,
        **fast.record(),
        world_size=world.world_size,
        global_batch=cfg.data.batch_size * world.world_size,
        model=cfg.model.name,
        seed=cfg.seed,
    )


def _test_best(model, ckpt_dir: Path, use_ema: bool, test_set, cfg, inputs, precision, num_classes, pin, show_progress, stop, world):
    """The best checkpoint's weights (its EMA weights when the run keeps an EMA) scored on the test split."""
    best = load_checkpoint(ckpt_dir / "best.pt", key="best checkpoint")
    model.load_state_dict(best["ema"] if use_ema and best.get("ema") else best["model"])
    test_loader = make_loader(test_set, cfg.data, train=False, seed=cfg.seed, pin_memory=pin, shard=world.shard)
    log.info(f"scoring the best checkpoint (epoch {best['epoch']}) on the test split ({len(test_set)} images)")
    test = evaluate(model, test_loader, inputs, precision, num_classes, progress=show_progress, description="test", should_stop=stop)
    return distributed.sum_evaluation(world, test), best["epoch"]


def _stop(stop: StopSignals, where: str, ckpt_dir: Path, run_dir: Path, world) -> None:
    signum = stop.requested or signal.SIGTERM  # under DDP another process may have received it
    log.warning(f"stopped by signal {signum} {where}; saved {ckpt_dir / 'last.pt'}; continue with resume={run_dir}")
    distributed.barrier(world)  # no process exits (and so has torchrun end the others) before rank 0 has saved
    raise SystemExit(128 + signum)


def _seed_epoch(seed: int, epoch: int, rank: int, saved_rng: Optional[list]) -> None:
    """Torch's random state for an epoch (dropout, drop path, mixup): seeded from (seed, epoch, rank),
    or, in an epoch that a signal cut short, the state it had when it stopped."""
    torch.manual_seed(_epoch_seed(seed, epoch, rank))
    if saved_rng is not None:
        saved_rng = saved_rng[rank]
        torch.set_rng_state(saved_rng["cpu"])
        if saved_rng.get("cuda") and torch.cuda.is_available() and len(saved_rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved_rng["cuda"])


def _rng_state() -> dict:
    return dict(cpu=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [])


def _set_aside_earlier_metrics(run_dir: Path, epochs: int) -> None:
    """A run continued past the epochs it was scored at: its old metrics.json (kept as
    metrics.epoch<N>.json) no longer describes the run, which gets a new one when it finishes."""
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        metrics.replace(run_dir / f"metrics.epoch{epochs}.json")


def _device_line(device: torch.device, precision, cpu_threads: int) -> str:
    if device.type == "cpu":
        return f"cpu ({cpu_threads} threads), {precision.name}"
    return f"{device}, {precision.name}"


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
        diffs = ", ".join(f"{k}: {_short(saved, k)} -> {_short(merged, k)}" for k in changed)
        raise UserError(
            f"resume={run_dir} continues that run as it was configured, but the command line changes {diffs}; "
            f"a resume may change only {', '.join(RESUMABLE)}"
        )
    done, epochs = state["epoch"], merged.trainer.epochs
    if epochs < done:
        raise UserError(f"resume={run_dir}: the run already trained {done} epochs, more than trainer.epochs={epochs}; raise trainer.epochs to continue it")
    if epochs == done and (run_dir / "metrics.json").is_file():
        raise UserError(f"resume={run_dir}: already trained {done} epochs and scored; raise trainer.epochs to continue (e.g. trainer.epochs={done + 10})")
    merged.resume = str(run_dir)
    return merged, run_dir, state


def _checkpoint(model, learner: Learner, cfg: DictConfig, classes: list, steps: int, progress: Progress, rng: Optional[dict] = None) -> dict:
    """Everything a resume needs (`model` is the module itself, not its torch.compile wrapper); `rng`:
    torch's random state of each process, by rank, where a signal cut an epoch short."""
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
        rng=rng,
        **asdict(progress),
    )


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Torch's seed for one epoch (dropout, drop path, mixup) of one DDP process: the same whether or
    not the run was resumed."""
    return int(np.random.SeedSequence([seed, epoch] + ([rank] if rank else [])).generate_state(1)[0])


def _hparams(cfg: DictConfig, layout: str, model, params: int, gmacs: float, world) -> dict:
    """What the run is, for TensorBoard's HPARAMS table: the recipe, and the network as built: one
    column per stage (`mbconv e6 k3 s2 c24 x2 se0.25`: block, expansion, kernel, stride, output
    channels, repeats, squeeze-excite ratio, after width and depth scaling)."""
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.trainer
    stages = {
        f"stage_{i}": f"{s.block} e{s.expand:g} k{s.kernel} s{s.stride} c{s.out} x{s.repeats} se{s.se:g}"
        for i, s in enumerate(model.spec.stages)
    }
    return {
        "model": m.name, "stages": layout, **stages,
        "width": m.width, "depth": m.depth, "stem": model.spec.stem, "head": model.spec.head,
        "train_size": m.train_size, "eval_size": m.eval_size, "dropout": m.dropout,
        "drop_path_rate": m.drop_path_rate, "drop_path_schedule": m.drop_path_schedule.value,
        "pretrained": str(m.pretrained), "freeze": m.freeze.value,
        "data": d.name.value, "split_seed": d.split_seed, "batch_size": d.batch_size, "augment": d.augment.value,
        "randaug_magnitude": d.randaug_magnitude if d.augment.value == "randaugment" else 0.0,
        "world_size": world.world_size, "global_batch": d.batch_size * world.world_size,
        "mixup_alpha": d.mixup_alpha, "cutmix_alpha": d.cutmix_alpha, "crop_pct": d.crop_pct,
        "optimizer": o.name.value, "lr": o.lr, "momentum": o.momentum, "weight_decay": o.weight_decay,
        "scheduler": cfg.scheduler.name.value, "warmup_epochs": cfg.scheduler.warmup_epochs,
        "epochs": t.epochs, "label_smoothing": t.label_smoothing, "grad_clip": t.grad_clip or 0.0,
        "grad_accumulation": t.grad_accumulation,
        "ema": t.ema, "ema_decay": t.ema_decay if t.ema else 0.0,
        "limit_train_batches": t.limit_train_batches or 0, "limit_val_batches": t.limit_val_batches or 0,
        "seed": cfg.seed, "params": params, "gmacs": round(gmacs, 4), **progressive_learning.hparams(cfg),
    }


def _layout_name(cfg: DictConfig) -> str:
    """The stage layout file, marked `+edits` when the command line changed its stages."""
    layout = hydra_choice("stages") or "custom"
    edited = any(k.startswith("model.stages") for k in command_line_keys(cfg)) if cfg.resume is None else False
    return f"{layout}+edits" if edited else layout


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
    for key in progressive_learning.SCALARS:  # with progressive learning: the epoch's image size and regularisation
        if key in record:
            writer.add_scalar(f"train/{key}", record[key], step)


def _image_grid(dataset, count: int = 16) -> torch.Tensor:
    """The first augmented training images, as the model sees them before normalisation."""
    images = [dataset[i][0] for i in range(min(count, len(dataset)))]
    return make_grid(torch.stack(images), nrow=8)


def _short(cfg: DictConfig, key: str) -> str:
    """A config value for a message: a group by its name (`model: b0 -> v2_s`), long values cut."""
    node = OmegaConf.select(cfg, key)
    if OmegaConf.is_dict(node) and "name" in node:
        return str(value(node.name))
    text = json.dumps(plain(node)) if OmegaConf.is_config(node) else str(value(node))
    return text if len(text) <= 60 else text[:57] + "..."
