"""`fit`: one training run, top to bottom. Set up (the session, the data, what trains), then epochs of training
and validation, each logged and checkpointed, then the best checkpoint on the test split and metrics.json.

A stop signal (SIGINT, SIGTERM) saves where the run stopped, mid-epoch included, and exits with 128 + the
signal; `resume=` then continues exactly there (tasks/train.py decides what a resume may change).
"""

import gc
import logging
import math
import signal
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, NoReturn, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ..config import value
from ..data import DataBundle, build_data, make_loader, set_epoch
from ..data.datasets import FileImages
from ..data.device_decode import DecodingLoader
from ..data.device_loader import DeviceLoader, device_bytes
from ..data.loaders import shut_down_workers
from ..environment import process_age_s
from ..errors import UserError
from ..models import build_model
from ..models.pretrained import load_pretrained
from ..models.profile import count_gmacs, count_params
from ..rundir import FOLDERS, resume_argument
from . import distributed, fast_paths
from . import progressive as progressive_learning
from .checkpoint import (
    DISK_FULL,
    Progress,
    chosen_weights,
    load_checkpoint,
    restore_training_state,
    rng_state,
    training_state,
    unwritable,
    weights_state,
)
from .fast_paths import FastPaths
from .loop import (
    EpochTotals,
    Evaluation,
    Inputs,
    Interrupted,
    Learner,
    Network,
    NonFiniteLoss,
    build_learner,
    evaluate,
    train_epoch,
)
from .report import epoch_line, open_report
from .runtime import pass_on_signal
from .session import Session, close_session, open_session

log = logging.getLogger("rethink")


def fit(
    cfg: DictConfig, run_dir: Path, resumed: Optional[dict] = None, layout: str = "", job: Optional[int] = None
) -> dict:
    """Train `cfg` in `run_dir`, continuing `resumed` (a checkpoint) if given. `layout`: the stage layout's name for
    HPARAMS; `job`: this run's number in a sweep, which picks its GPU when `trainer.device=auto` and there are several."""
    session = open_session(cfg, run_dir, job)
    run = None
    try:
        data = load_data(session, resumed)
        run = prepare(session, data, resumed, layout)
        keep_best_of(session, resumed)
        with open_report(session, run.progress.epoch if resumed else None) as report, session.listening():
            report.started(run, resumed is not None)
            FOLDERS.mark_training_started(run_dir)  # from here on, everything the run writes stays (rundir.py)
            for epoch in range(run.progress.epoch + 1, cfg.trainer.epochs + 1):
                record = train_and_validate(session, run, epoch)
                report.epoch(record, run.progress)
                save_epoch(session, run)
                log.info(epoch_line(record, run.progress, cfg.trainer.epochs))
                if session.stop_requested_anywhere():
                    stop(session, f"after epoch {epoch}")
            distributed.barrier(session.world)  # best.pt is written
            test, best_epoch = test_best(session, run)
            return report.finished(run, test, best_epoch)
    except OSError as e:  # a full disk where the run writes (TensorBoard, metrics): one line, as for a checkpoint
        if e.errno not in DISK_FULL:
            raise
        raise UserError(unwritable(e.filename or f"into {session.run_dir}", e, session.ckpt_dir)) from None
    finally:
        release(session, run)


@dataclass
class TrainingRun:
    """What one run trains with, built once by `prepare`."""

    data: DataBundle
    network: Network
    learner: Learner
    train_loader: Any  # a DataLoader, or with data.on_gpu a DeviceLoader; progressive learning replaces it per stage
    val_loader: Any
    steps: int  # loader batches per epoch
    fast: FastPaths  # as decided
    store_fitted: bool  # with data.on_gpu: whether the images fitted on the device after all
    stages: progressive_learning.ProgressiveLearning
    progress: Progress
    params: int
    gmacs: float
    config: dict  # the run's config as its checkpoints record it
    layout: str  # the stage layout's name, for HPARAMS
    world_size: int  # processes training it (torchrun); a resume must keep their number
    saved_rng: Optional[list] = None  # an epoch cut short by a signal: its processes' random state, used once
    stepped: bool = False  # whether this process has taken a training step yet

    def state(self, rng: Optional[list] = None) -> dict:
        """The checkpoint of the run as it stands."""
        state = training_state(
            self.network.model, self.learner, self.config, self.data.classes, self.steps, self.progress, rng
        )
        return {**state, "layout": self.layout, "world_size": self.world_size}

    def fast_paths_used(self) -> FastPaths:
        captured = not getattr(self.network.trained, "failed", False)
        return fast_paths.as_used(self.fast, store_fitted=self.store_fitted, graphs_captured=captured)

    def take_saved_rng(self) -> Optional[list]:
        saved, self.saved_rng = self.saved_rng, None
        return saved


def load_data(session: Session, resumed: Optional[dict]) -> DataBundle:
    """The data set; a new run records its classes and split in the run folder, a resumed run keeps its own
    split (its splits.csv), even if files were added since. Under torchrun rank 0 downloads first, and the
    processes share the scan (each checks its share of the files, then reads the others' findings)."""
    cfg = session.cfg
    share = distributed.data_share(session.world)
    if resumed is None:
        data = build_data(cfg.data, cfg.model, share=share)
        if session.world.is_main:
            data.write_run_files(session.run_dir)
        return data
    manifest = session.run_dir / "splits.csv"
    data = build_data(cfg.data, cfg.model, manifest=manifest if manifest.is_file() else None, share=share)
    if list(data.classes) != list(resumed["classes"]):
        raise UserError(
            f"resume={session.run_dir}: the data's classes {data.classes} are not the run's {resumed['classes']}"
        )
    return data


def prepare(session: Session, data: DataBundle, resumed: Optional[dict], layout: str) -> TrainingRun:
    """The network, its loaders, the fast paths it takes and its Learner (with a resume's training state).
    `layout`: the stage layout's name (a resume keeps the run's own)."""
    cfg, t, num_classes = session.cfg, session.cfg.trainer, len(data.classes)
    model, normalization = build_network_model(session, num_classes, resumed)
    train_loader, val_loader, steps = make_loaders(session, data, resumed)
    fast = decide_fast_paths(session, data.train, steps, model)
    torch.backends.cudnn.benchmark = fast.cudnn_benchmark.on
    forward, trained = fast_paths.forward_modules(
        model,
        fast.compile.on,
        fast.cuda_graphs.on,
        session.precision.autocast,
        wrap=lambda module: distributed.wrap(module, session.world, session.device),
    )
    network = Network(model, forward, trained, Inputs(session.device, *normalization, t.channels_last))
    store_fitted = True
    if fast.data_on_gpu.on:  # the same batches, made on the device
        train_loader, store_fitted = device_loader(session, data.train, train_loader)
    elif value(cfg.data.decode) == "device":
        train_loader = decoding_loader(session, data.train, train_loader)
    learner = build_learner(cfg, network, session.precision, steps, num_classes)
    if resumed:
        restore_training_state(resumed, learner)
    stages = progressive_learning.ProgressiveLearning(
        cfg, num_classes, pin_memory=session.pin_memory, shard=session.world.shard, compiled=fast.compile.on
    )  # progressive=none: changes nothing
    progress = Progress.of(resumed)
    saved_rng = resumed.get("rng") if resumed and progress.partial else None
    return TrainingRun(
        data=data,
        network=network,
        learner=learner,
        train_loader=train_loader,
        val_loader=val_loader,
        steps=steps,
        fast=fast,
        store_fitted=store_fitted,
        stages=stages,
        progress=progress,
        params=count_params(model),
        gmacs=count_gmacs(model, cfg.model.eval_size),
        config=recorded_config(cfg, normalization),
        layout=resumed.get("layout", layout) if resumed else layout,
        world_size=session.world.world_size,
        saved_rng=saved_rng,
    )


def build_network_model(session: Session, num_classes: int, resumed: Optional[dict]) -> tuple[nn.Module, tuple]:
    """The network on the device, with pretrained weights (a new run) or the run's own (a resume), frozen and
    checkpointed as asked; and the (mean, std) its inputs are normalised with: model.mean/std, or the pretrained
    weights' own."""
    cfg = session.cfg
    model = build_model(cfg.model, num_classes)
    normalization = (tuple(cfg.model.mean), tuple(cfg.model.std))
    if resumed is None and cfg.model.pretrained not in (False, None):
        report, weights_normalization = load_pretrained(model, cfg.model.pretrained, cfg.model.torchvision_weights)
        log.info(f"pretrained weights ({cfg.model.pretrained}): {report}")
        if weights_normalization:
            normalization = tuple(tuple(values) for values in weights_normalization)
    if cfg.model.freeze.value == "backbone":
        model.freeze_backbone()
    model.set_grad_checkpointing(cfg.trainer.grad_checkpointing)
    if resumed:
        model.load_state_dict(resumed["model"])
    model = distributed.sync_batchnorm(model, session.world, cfg.trainer.sync_bn, session.device)
    model.to(session.device)
    if cfg.trainer.channels_last:
        model.to(memory_format=torch.channels_last)
    return model, normalization


def recorded_config(cfg: DictConfig, normalization: tuple) -> dict:
    """The run's config as its checkpoints record it (eval, predict and export read it back): resolved, as plain
    data, with the normalisation its inputs got."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["model"]["mean"], config["model"]["std"] = (list(values) for values in normalization)
    return config


def make_loaders(session: Session, data: DataBundle, resumed: Optional[dict]) -> tuple[Any, Any, int]:
    """The train and val loaders and the batches an epoch trains on (a resume must find the run's own count)."""
    cfg, shard = session.cfg, session.world.shard
    train_loader = make_loader(
        data.train, cfg.data, train=True, seed=cfg.seed, pin_memory=session.pin_memory, shard=shard
    )
    val_loader = make_loader(
        data.val,
        cfg.data,
        train=False,
        seed=cfg.seed,
        pin_memory=session.pin_memory,
        limit_batches=cfg.trainer.limit_val_batches,
        shard=shard,
    )
    steps = batches_per_epoch(train_loader, cfg.trainer)
    world_size, trained_with = (
        session.world.world_size,
        resumed.get("world_size", session.world.world_size) if resumed else None,
    )
    if resumed and trained_with != world_size:
        raise UserError(
            f"resume={session.run_dir}: the run trained in {trained_with} process(es) (a global batch of "
            f"{trained_with * cfg.data.batch_size}); this resume has {world_size}, which would change the global batch and "
            f"the epoch's order; resume it with torchrun --nproc-per-node={trained_with}"
            + (" (or without torchrun)" if trained_with == 1 else "")
        )
    if resumed and resumed.get("steps_per_epoch", steps) != steps:
        raise UserError(
            f"resume={session.run_dir}: an epoch now has {steps} steps, the run had {resumed['steps_per_epoch']}; "
            "the data or data.batch_size changed, and the run cannot go on as it was"
        )
    return train_loader, val_loader, steps


def batches_per_epoch(train_loader, t: DictConfig) -> int:
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


def decide_fast_paths(session: Session, train_set, steps: int, model: nn.Module) -> FastPaths:
    device, cfg, t = session.device, session.cfg, session.cfg.trainer
    free = (
        torch.cuda.mem_get_info(device)[0] // t.jobs_per_gpu if device.type == "cuda" else None
    )  # jobs sharing the GPU share it
    return fast_paths.choose(
        cfg,
        device.type,
        session.world.world_size,
        steps,
        store_bytes=lambda: device_bytes(train_set, session.world.shard),
        free_bytes=free,
        step_bytes=lambda graphs: fast_paths.step_reserve(
            model, cfg.data.batch_size, cfg.model.train_size, t.channels_last, graphs
        ),
    )


def decoding_loader(session: Session, dataset, cpu_loader) -> DecodingLoader:
    """data.decode=device: the train loader whose batches the device decodes (its workers read bytes)."""
    cfg = session.cfg
    if not isinstance(dataset, FileImages):
        raise UserError(f"data.decode=device decodes image files; data={value(cfg.data.name)} is held in memory")
    if value(cfg.data.augment) not in ("flip_crop", "none"):
        raise UserError(f"data.decode=device crops as data.augment=flip_crop or none; not {value(cfg.data.augment)}")
    shut_down_workers(cpu_loader)
    return DecodingLoader(
        dataset, cfg.data, cfg.model.train_size, seed=cfg.seed, device=session.device, shard=session.world.shard
    )


def device_loader(session: Session, dataset, cpu_loader) -> tuple[Any, bool]:
    """The train loader with the images resident on the device, or where they do not fit after all, the CPU's
    (a warning; metrics.json then says data_on_gpu: false); and whether they fitted."""
    cfg = session.cfg
    try:
        return DeviceLoader(
            dataset, cfg.data, cfg.model.train_size, seed=cfg.seed, device=session.device, shard=session.world.shard
        ), True
    except torch.cuda.OutOfMemoryError:
        gc.collect()
        torch.cuda.empty_cache()
        log.warning(
            f"data.on_gpu: the training images do not fit on {session.device}; loading them on the CPU (data.on_gpu=false avoids the attempt)"
        )
        return cpu_loader, False


def train_and_validate(session: Session, run: TrainingRun, epoch: int) -> dict:
    """One epoch: training (a resumed epoch from where it stopped), then validation; returns its record, which
    is added to the run's progress. A stop signal saves the run where it stopped and exits."""
    run.train_loader = run.stages.apply(
        epoch, run.train_loader, run.network.model, run.learner
    )  # a new stage: its size and regularisation
    totals = train_part(session, run, epoch)
    val = val_ema = None
    if not totals.interrupted:
        try:
            val, val_ema = validate(session, run)
        except Interrupted:
            totals.interrupted = True
        else:
            require_finite(session, run, epoch, [("validation", val), ("EMA validation", val_ema)])
    if totals.interrupted:  # saved where it stopped, random state included: the resume finishes the epoch exactly
        run.progress.partial = asdict(totals)
        session.save(run.state(rng=distributed.gather(session.world, rng_state())), "last.pt")
        stop(session, f"in epoch {epoch} after {totals.batches} of {run.steps} batches")
    return run.progress.add_epoch(epoch, totals, val, val_ema, run.stages.record())


def first_batch_announced(batches: Iterator) -> Iterator:
    """`batches`, saying in the log how long after the process started the first of them was ready: the time
    to the first training step, which the data set's size must not govern (README, "Large data sets")."""
    for number, batch in enumerate(batches):
        if number == 0 and (age := process_age_s()) is not None:
            log.info(f"first training step {age:.1f} s after the process started")
        yield batch


def train_part(session: Session, run: TrainingRun, epoch: int) -> EpochTotals:
    """The epoch's training steps (those left of it, after a stop mid-epoch), summed over every process."""
    cfg, world, t = session.cfg, session.world, session.cfg.trainer
    seed_epoch(cfg.seed, epoch, world.rank, run.take_saved_rng())
    partial = run.progress.partial
    totals = distributed.own_share(world, EpochTotals(**partial)) if partial else EpochTotals()
    set_epoch(run.train_loader, epoch, start_batch=totals.batches)  # after an interrupt: where it stopped
    batches = islice(run.train_loader, run.steps - totals.batches)
    if not run.stepped:
        batches, run.stepped = first_batch_announced(batches), True
    try:
        totals = train_epoch(
            run.learner,
            batches,
            run.steps,
            totals,
            log_every=t.log_every_n_steps,
            progress=session.show_progress,
            description=f"epoch {epoch}/{t.epochs}",
            should_stop=session.stop_training,
        )
    except NonFiniteLoss as e:
        raise diverged(session, run, f"{e} in epoch {epoch}") from None
    return distributed.sum_totals(world, totals, session.device)


def require_finite(
    session: Session, run: TrainingRun, epoch: int, scores: list[tuple[str, Optional[Evaluation]]]
) -> None:
    """A val loss that is not finite is divergence too (the logits are, and accuracy would rank garbage)."""
    for name, result in scores:
        if result is not None and not math.isfinite(result.loss):
            raise diverged(session, run, f"the {name} loss became non-finite (nan or inf) in epoch {epoch}")


def diverged(session: Session, run: TrainingRun, what: str) -> UserError:
    last = (
        f"{session.ckpt_dir / 'last.pt'} (epoch {run.progress.epoch})"
        if run.progress.epoch
        else "none (no epoch finished)"
    )
    return UserError(
        f"{what}; training stopped. Last good checkpoint: {last}. Try a lower optimizer.lr, trainer.grad_clip=1.0, or trainer.amp=off"
    )


def validate(session: Session, run: TrainingRun) -> tuple[Evaluation, Optional[Evaluation]]:
    """The val split scored with the trained weights, and with their EMA when the run keeps one: under DDP, with
    rank 0's BatchNorm statistics, those its checkpoint saves."""
    ema = run.learner.ema
    for module in (run.network.model, ema.module if ema is not None else None):
        if module is not None:
            distributed.rank_0_buffers(session.world, module)
    val = score(session, run, run.network.forward, run.val_loader, "val")
    return val, score(session, run, ema.module, run.val_loader, "val ema") if ema is not None else None


def score(session: Session, run: TrainingRun, module: nn.Module, loader, name: str) -> Evaluation:
    """`module` scored on `loader`'s split, over every DDP process."""
    result = evaluate(
        module,
        loader,
        run.network.inputs,
        session.precision,
        len(run.data.classes),
        progress=session.show_progress,
        description=name,
        should_stop=session.stop_evaluating,
    )
    return distributed.sum_evaluation(session.world, result)


def save_epoch(session: Session, run: TrainingRun) -> None:
    """checkpoints/last.pt after every epoch; best.pt, its weights alone (weights_state), when the epoch is the best
    so far: written then, not at the end, so that a run stopped at any point leaves a best.pt that eval, predict
    and export read. A checkpoint the disk refuses ends the run in one line (save_checkpoint)."""
    state = run.state()
    session.save(state, "last.pt")
    if run.progress.best_epoch == run.progress.epoch:
        session.save(weights_state(state), "best.pt")


def keep_best_of(session: Session, resumed: Optional[dict]) -> None:
    """A run killed after writing last.pt at its best epoch, before best.pt, resumes without that epoch's best.pt:
    last.pt holds the epoch's weights then, and best.pt is written from them (otherwise a resume that trains no
    better epoch would have no best checkpoint to score)."""
    if not (resumed and session.world.is_main) or resumed.get("partial") or resumed["best_epoch"] != resumed["epoch"]:
        return  # rank 0 alone writes checkpoints: the others need not read best.pt
    try:
        if load_checkpoint(session.ckpt_dir / "best.pt")["epoch"] == resumed["epoch"]:
            return
    except UserError:  # missing, or cut short
        pass
    session.save(weights_state(resumed), "best.pt")


def test_best(session: Session, run: TrainingRun) -> tuple[Evaluation, int]:
    """The best checkpoint's weights (its EMA weights when the run keeps an EMA) scored on the test split; and
    the epoch it was saved after."""
    best = load_checkpoint(session.ckpt_dir / "best.pt", key="best checkpoint")
    weights, _ = chosen_weights(best, use_ema=run.learner.ema is not None)
    run.network.model.load_state_dict(weights)
    cfg = session.cfg
    loader = make_loader(
        run.data.test, cfg.data, train=False, seed=cfg.seed, pin_memory=session.pin_memory, shard=session.world.shard
    )
    log.info(f"scoring the best checkpoint (epoch {best['epoch']}) on the test split ({len(run.data.test)} images)")
    try:
        return score(session, run, run.network.model, loader, "test"), best["epoch"]
    except Interrupted:
        stop(session, f"while scoring the test split after epoch {run.progress.epoch}")
    finally:
        shut_down_workers(loader)


def stop(session: Session, where: str) -> NoReturn:
    """Exit after a stop signal, with 128 + its number, once every process is there (checkpoints are written);
    `release` then passes the signal on."""
    signum = (
        session.signals.requested if session.signals is not None else 0
    ) or signal.SIGTERM  # under DDP another process may have received it
    if session.world.is_main:  # once, not once per process
        log.warning(
            f"stopped by signal {signum} {where}; saved {session.ckpt_dir / 'last.pt'}; continue with {resume_argument(session.run_dir)}"
        )
    distributed.barrier(session.world)  # no process exits (and so has torchrun end the others) before rank 0 has saved
    session.stopped_by = signum
    raise SystemExit(128 + signum)


def release(session: Session, run: Optional[TrainingRun]) -> None:
    """Let go of the run's big objects now (a failed sweep job's traceback keeps fit's frame alive), then of the
    process group."""
    compiled = run is not None and run.fast.compile.on
    if run is not None:
        for loader in (run.train_loader, run.val_loader):  # or, after an error, exiting would wait for them forever
            shut_down_workers(loader)
        run.network = run.learner = run.train_loader = run.val_loader = run.stages = None
    if compiled:
        torch._dynamo.reset()  # or the next job of a sweep may hit the recompile limit and run uncompiled
    gc.collect()
    if session.device.type == "cuda":
        torch.cuda.empty_cache()
    close_session(session)
    if session.stopped_by:
        pass_on_signal(session.stopped_by)


def seed_epoch(seed: int, epoch: int, rank: int, saved_rng: Optional[list]) -> None:
    """Torch's random state for an epoch (dropout, drop path, mixup): seeded from (seed, epoch, rank),
    or, in an epoch that a signal cut short, the state it had when it stopped."""
    torch.manual_seed(epoch_seed(seed, epoch, rank))
    if saved_rng is not None:
        saved_rng = saved_rng[rank]
        torch.set_rng_state(saved_rng["cpu"])
        if saved_rng.get("cuda") and torch.cuda.is_available() and len(saved_rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(saved_rng["cuda"])


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """Torch's seed for one epoch (dropout, drop path, mixup) of one DDP process: the same whether or
    not the run was resumed."""
    return int(np.random.SeedSequence([seed, epoch] + ([rank] if rank else [])).generate_state(1)[0])
