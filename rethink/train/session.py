"""Where and how one training run computes, set up once: its process's place under torchrun, device, precision,
CPU threads, progress bars, stop signals and folders. Every part of `fit` takes the Session instead of a
list of these."""

import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from omegaconf import DictConfig

from ..rundir import hold_run_lock
from . import distributed
from .checkpoint import save_checkpoint
from .distributed import World
from .runtime import (
    Precision,
    StopSignals,
    reset_memory_stats,
    resolve_device,
    resolve_precision,
    seed_everything,
    set_cpu_threads,
)


def _never() -> bool:
    return False


@dataclass
class Session:
    cfg: DictConfig  # the run's config; read, never written
    run_dir: Path
    world: World
    device: torch.device
    precision: Precision
    cpu_threads: int
    show_progress: bool
    lock: Any = None  # rank 0's lock on the run folder (rundir.hold_run_lock), held until the session closes
    signals: Optional[StopSignals] = None  # while `listening`
    stop_training: Callable[[], bool] = field(default=_never)  # asked between steps; under DDP every process agrees
    stop_evaluating: Callable[[], bool] = field(default=_never)  # asked between evaluation batches
    stopped_by: int = 0  # the signal the run stopped for

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def save(self, state: dict, name: str) -> None:
        """checkpoints/<name>, written by rank 0 alone."""
        if self.world.is_main:
            save_checkpoint(state, self.ckpt_dir / name)

    @contextmanager
    def listening(self) -> Iterator[None]:
        """SIGINT and SIGTERM become a request to stop (runtime.StopSignals). Under DDP the processes agree on
        stopping at each training step; evaluation, whose shards differ in length, is not cut short there: a stop
        then waits for the end of the epoch."""
        with StopSignals() as signals:
            self.signals = signals
            self.stop_training = distributed.agreed(signals, self.world, self.device)
            self.stop_evaluating = signals if not self.world.distributed else _never
            try:
                yield
            finally:
                self.signals, self.stop_training, self.stop_evaluating = None, _never, _never

    def stop_requested_anywhere(self) -> bool:
        requested = self.signals() if self.signals is not None else False
        return distributed.any_process(self.world, requested, self.device)


def open_session(cfg: DictConfig, run_dir: Path, job: Optional[int] = None) -> Session:
    """Threads, seeds, the process group under torchrun, the device (for sweep job `job` with
    `trainer.device=auto`, the GPU it is spread to) and the precision."""
    t = cfg.trainer
    world = distributed.torchrun_world()  # a world of one outside torchrun
    cpu_threads = set_cpu_threads(t.cpu_threads)
    seed_everything(cfg.seed, t.deterministic)
    device = distributed.start(world, t.device, t.dist_timeout_min) or resolve_device(t.device, job, t.jobs_per_gpu)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # CUDA graphs capture on the current device, and a sweep job may run on cuda:1
    precision = resolve_precision(t.amp.value, device)
    reset_memory_stats(device)
    show_progress = t.progress if t.progress is not None else sys.stdout.isatty()
    lock = hold_run_lock(Path(run_dir)) if world.is_main else None
    return Session(cfg, Path(run_dir), world, device, precision, cpu_threads, show_progress, lock)


def close_session(session: Session) -> None:
    distributed.stop(session.world)
    if session.lock is not None:
        session.lock.close()
