"""Where and how a run computes: device, mixed precision, seeding, determinism, memory."""

import multiprocessing
import os
import random
import resource
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..environment import available_cpus
from ..errors import UserError


def resolve_device(name: str, job: int | None = None, jobs_per_gpu: int = 1) -> torch.device:
    """`auto` is a CUDA device when there is one, else the CPU: device 0, or for job `job` of a sweep
    device (job // jobs_per_gpu) modulo the number of devices, so parallel jobs spread over the GPUs
    with `jobs_per_gpu` jobs sharing each."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", 0 if job is None else (job // jobs_per_gpu) % torch.cuda.device_count())
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"trainer.device={name}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"trainer.device={name}: no CUDA device is available here; use trainer.device=auto or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"trainer.device={name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"trainer.device={name}: unsupported device type; use auto, cpu, cuda or cuda:N")
    return device


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype | None  # None: full fp32
    device_type: str

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, cache_enabled: bool = True):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype, cache_enabled=cache_enabled)


def resolve_precision(amp: str, device: torch.device) -> Precision:
    """`auto`: bf16 on a GPU that supports it, fp16 (with a gradient scaler) on one that doesn't,
    full precision on the CPU."""
    if amp == "off":
        return Precision(None, device.type)
    if device.type != "cuda":
        if amp == "auto":
            return Precision(None, device.type)
        if amp == "fp16":
            raise UserError("trainer.amp=fp16 needs a CUDA device; on the CPU use trainer.amp=bf16 or off")
        return Precision(torch.bfloat16, device.type)
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError("trainer.amp=bf16: this GPU does not support bfloat16; use trainer.amp=fp16 or auto")
    return Precision(torch.bfloat16 if amp == "bf16" else torch.float16, device.type)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); with `deterministic`, also ask torch and cuDNN for
    deterministic algorithms (slower; ops without one warn)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)  # set either way: a sweep's next job
    torch.backends.cudnn.deterministic = deterministic  # must not inherit it


def set_cpu_threads(threads: int | None) -> int:
    """Torch's intra-op threads: `threads`, or (null) $OMP_NUM_THREADS where it is set (a parallel
    launcher such as joblib sets it to share the cores among its jobs), else one per CPU this process
    may use. Returns the number in use. The count changes the order of floating-point sums, so runs
    that must match bit for bit need the same count."""
    torch.set_num_threads(threads or _env_threads() or available_cpus())
    return torch.get_num_threads()


def _env_threads() -> int | None:
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return None


_PEAK_RSS_RESETTABLE = os.path.exists("/proc/self/clear_refs")


def reset_memory_stats(device: torch.device) -> None:
    """Start measuring the peak from now: CUDA's allocator statistics, or on the CPU (Linux) the
    process's peak resident set, so that a sweep's job does not report the peak of the jobs before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _PEAK_RSS_RESETTABLE:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (Linux 4.0+)
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """The peak since reset_memory_stats and what it measures: `cuda_allocated` (memory held by
    tensors on the GPU), `process_rss` (the process's peak resident memory on the CPU, Linux), or
    `process_rss_lifetime` where the peak cannot be reset (the process's whole life)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_allocated"
    try:
        with open("/proc/self/status") as f:
            peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        return peak_kb / 1024, "process_rss"
    except (OSError, StopIteration, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process_rss_lifetime"


class StopSignals:
    """While active, SIGINT and SIGTERM only set `requested` (to the signal number), so the loop can
    save a checkpoint between steps and exit. Signals within REPEAT_S of the first are the same request
    (`timeout` and some schedulers signal the process and then its group); a signal after that
    interrupts at once. Call the object to ask whether a stop was requested."""

    REPEAT_S = 5.0

    def __init__(self):
        self.requested = 0
        self._first_at = 0.0
        self._previous = {}

    def __call__(self) -> bool:
        return bool(self.requested)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if not self.requested:
            self.requested, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at > self.REPEAT_S:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False


def exit_on_signal(signum, frame) -> None:
    """run.py's handler of SIGINT and SIGTERM outside a run: exit with 128 + the signal, as a shell reports it."""
    raise SystemExit(128 + signum)


def pass_on_signal(signum: int) -> None:
    """After a run stopped for `signum` (and saved): the signal does what it did before the run, so that whatever
    started the run in this process (run.py, a notebook, pytest) stops as it would have without it. A Python
    handler is called; the default action ends the process, except in a child process (a parallel launcher's
    worker), where the run's SystemExit ends the job instead; an ignored signal stays ignored."""
    handler = signal.getsignal(signum)
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL and multiprocessing.parent_process() is None:
        signal.raise_signal(signum)
