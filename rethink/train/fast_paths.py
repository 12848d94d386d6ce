"""Which GPU fast paths a run takes. Each is a key set to auto | true | false; `auto` decides from the run:

    trainer.compile          torch.compile. auto: on for CUDA runs that train on at least COMPILE_PAYS_AFTER_IMAGES
                             images (epochs x images per epoch), where the faster steps repay the compile time.
    trainer.cuda_graphs      the training forward and backward replayed as CUDA graphs (train/cuda_graphs.py).
                             auto: on for CUDA runs whose per-process batch is at most GRAPHS_BATCH_MAX (where a
                             GPU mostly waits for kernel launches), in one process, without gradient accumulation
                             or checkpointing and without torch.compile (true with compile: compile's own
                             CUDA graphs, mode="reduce-overhead").
    trainer.cudnn_benchmark  cuDNN's search for the fastest convolution algorithms, per input shape. auto: on
                             for CUDA runs of at least CUDNN_PAYS_AFTER_STEPS training steps (its search took
                             17.7 s for B0 on an H200, issue 12; it can only repay that over many steps); never
                             with trainer.deterministic.
    data.on_gpu              the decoded training images resident on the GPU, cropped and flipped there in
                             batches (data/device_augment.py). auto: on for CUDA runs with data.augment=flip_crop
                             or none whose images (a DDP process's share of them) take at most
                             ON_GPU_MEMORY_SHARE of the GPU's free memory, and leave room for the training
                             step (`step_reserve`: its activations, twice with CUDA graphs, and the gradients
                             and optimizer state).

Compiled code is kept between runs: `share_compiled_code` turns on inductor's FX-graph cache and AOT autograd's
cache in one folder per user ($TORCHINDUCTOR_CACHE_DIR, else ~/.cache/rethink/inductor), so the jobs of a sweep
(and later runs) that compile the same network at the same shapes load it instead of compiling it again.

`choose(...)` gives every decision with its reason (one log line, and metrics.json); the rules are pure
functions of plain values so that the CPU tests cover every branch. `forward_modules(...)` builds from the
decisions the modules a run evaluates and trains with (fit and the benchmark both use it).
"""

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import value
from ..environment import user_cache_home
from ..errors import UserError
from .cuda_graphs import GraphedForward

COMPILE_PAYS_AFTER_IMAGES = (
    2_000_000  # B0 224 px batch 256 on an H200 (issue 11): 63 s to compile, 5,118 -> 6,928 img/s
)
GRAPHS_BATCH_MAX = 64  # B0 on an H200 (issue 12): 570 img/s at batch 16, 5,118 at 256: small batches wait on launches
CUDNN_PAYS_AFTER_STEPS = 10_000  # 17.7 s of search, repaid at ~2 ms per step (10% of a launch-bound 20 ms step)
ON_GPU_MEMORY_SHARE = 0.5  # of the free GPU memory; the rest is the training step's
SWITCH = (True, False, "auto")


@dataclass(frozen=True)
class Choice:
    on: bool
    why: str


@dataclass(frozen=True)
class FastPaths:
    compile: Choice
    cuda_graphs: Choice
    cudnn_benchmark: Choice
    data_on_gpu: Choice

    def line(self) -> str:
        names = ("compile", "CUDA graphs", "cuDNN benchmark", "data on the GPU")
        return "; ".join(f"{name} {'on' if c.on else 'off'} ({c.why})" for name, c in zip(names, self.choices()))

    def choices(self) -> tuple[Choice, ...]:
        return self.compile, self.cuda_graphs, self.cudnn_benchmark, self.data_on_gpu

    def record(self) -> dict:
        keys = ("compile", "cuda_graphs", "cudnn_benchmark", "data_on_gpu")
        return {key: choice.on for key, choice in zip(keys, self.choices())}


def as_used(decided: FastPaths, store_fitted: bool = True, graphs_captured: bool = True) -> FastPaths:
    """What a run took of what was decided (its record in metrics.json): images that did not fit on the GPU
    after all, or CUDA graphs that could not be captured, ran the plain path."""
    used = decided
    if decided.data_on_gpu.on and not store_fitted:
        used = replace(used, data_on_gpu=Choice(False, "did not fit"))
    if decided.cuda_graphs.on and not graphs_captured:
        used = replace(used, cuda_graphs=Choice(False, "capture failed"))
    return used


def choose(
    cfg,
    device_type: str,
    world_size: int,
    steps_per_epoch: int,
    store_bytes: Callable[[], int],
    free_bytes: Optional[int] = None,
    step_bytes: Callable[[bool], int] = lambda graphs: 0,
) -> FastPaths:
    """The run's decisions. `store_bytes()`: what its training images would take on the GPU, `step_bytes(graphs)`:
    what its training step will take there (with CUDA graphs or not), both asked only where they decide;
    `free_bytes`: the GPU's free memory."""
    t = cfg.trainer
    batch = cfg.data.batch_size
    steps = t.epochs * steps_per_epoch
    compiled = compile_choice(t.compile, device_type, steps * batch * world_size)
    graphs = cuda_graphs_choice(
        t.cuda_graphs, device_type, batch, world_size, t.grad_accumulation, bool(t.grad_checkpointing), compiled.on
    )
    benchmark = cudnn_benchmark_choice(t.cudnn_benchmark, device_type, bool(t.deterministic), steps)
    on_gpu = data_on_gpu_choice(
        cfg.data.on_gpu, device_type, value(cfg.data.augment), store_bytes, free_bytes, lambda: step_bytes(graphs.on)
    )
    return FastPaths(compiled, graphs, benchmark, on_gpu)


def compile_choice(setting: Any, device_type: str, planned_images: int) -> Choice:
    if setting != "auto":
        return Choice(bool(setting), f"trainer.compile={str(setting).lower()}")
    if device_type != "cuda":
        return Choice(False, "auto: not on a GPU")
    if planned_images < COMPILE_PAYS_AFTER_IMAGES:
        return Choice(
            False,
            f"auto: {planned_images:,} training images, fewer than the {COMPILE_PAYS_AFTER_IMAGES:,} that repay compiling",
        )
    return Choice(True, f"auto: {planned_images:,} training images repay compiling")


def cuda_graphs_choice(
    setting: Any,
    device_type: str,
    batch: int,
    world_size: int,
    grad_accumulation: int,
    grad_checkpointing: bool,
    compiled: bool,
) -> Choice:
    conflicts = [
        why
        for why, present in (
            ("a CUDA device", device_type != "cuda"),
            ("one process (not DDP)", world_size > 1),
            ("trainer.grad_accumulation=1", grad_accumulation > 1),
            ("trainer.grad_checkpointing=false", grad_checkpointing),
        )
        if present
    ]
    if setting is True:
        if conflicts:
            raise UserError(
                f"trainer.cuda_graphs=true needs {' and '.join(conflicts)}; use trainer.cuda_graphs=auto or false"
            )
        return Choice(
            True, "trainer.cuda_graphs=true" + (", as torch.compile's mode=reduce-overhead" if compiled else "")
        )
    if setting is False:
        return Choice(False, "trainer.cuda_graphs=false")
    if conflicts:
        return Choice(False, f"auto: needs {conflicts[0]}")
    if compiled:
        return Choice(False, "auto: torch.compile is on")
    if batch > GRAPHS_BATCH_MAX:
        return Choice(
            False, f"auto: batch {batch} is above {GRAPHS_BATCH_MAX}, where kernel launches no longer bound the step"
        )
    return Choice(True, f"auto: batch {batch} is at most {GRAPHS_BATCH_MAX}")


def cudnn_benchmark_choice(setting: Any, device_type: str, deterministic: bool, planned_steps: int) -> Choice:
    if device_type != "cuda":
        return Choice(False, "not on a GPU")
    if deterministic:
        return Choice(False, "trainer.deterministic=true")
    if setting != "auto":
        return Choice(bool(setting), f"trainer.cudnn_benchmark={str(setting).lower()}")
    if planned_steps < CUDNN_PAYS_AFTER_STEPS:
        return Choice(
            False, f"auto: {planned_steps:,} steps, fewer than the {CUDNN_PAYS_AFTER_STEPS:,} that repay its search"
        )
    return Choice(True, f"auto: {planned_steps:,} steps repay its search")


def data_on_gpu_choice(
    setting: Any,
    device_type: str,
    augment: str,
    store_bytes: Callable[[], int],
    free_bytes: Optional[int],
    step_bytes: Callable[[], int],
) -> Choice:
    """Whether the decoded training images live on the GPU. `store_bytes()`: what they need there, `step_bytes()`:
    what the training step will need (only asked where it decides: files the scan did not size have their headers read);
    `free_bytes`: the GPU's free memory. The images may take ON_GPU_MEMORY_SHARE of it, and no more than what
    the step leaves."""
    if setting is False:
        return Choice(False, "data.on_gpu=false")
    conflicts = [
        why
        for why, present in (
            ("a CUDA device", device_type != "cuda"),
            (f"data.augment=flip_crop or none (not {augment})", augment not in ("flip_crop", "none")),
        )
        if present
    ]
    if setting is True:
        if conflicts:
            raise UserError(f"data.on_gpu=true needs {' and '.join(conflicts)}; use data.on_gpu=auto or false")
        return Choice(True, "data.on_gpu=true")
    if conflicts:
        return Choice(False, f"auto: needs {conflicts[0]}")
    images, step, free = store_bytes(), step_bytes(), free_bytes or 0
    if images > ON_GPU_MEMORY_SHARE * free:
        return Choice(
            False,
            f"auto: the images need {images / 2**30:.2f} GiB, more than {ON_GPU_MEMORY_SHARE:.0%} of the free {free / 2**30:.1f} GiB",
        )
    if images > free - step:
        return Choice(
            False,
            f"auto: the images need {images / 2**30:.2f} GiB, more than the free {free / 2**30:.1f} GiB leaves "
            f"beside the training step's {step / 2**30:.1f} GiB",
        )
    return Choice(
        True,
        f"auto: the images need {images / 2**30:.2f} GiB of the free {free / 2**30:.1f} GiB "
        f"(the training step {step / 2**30:.1f} GiB)",
    )


def step_reserve(model: nn.Module, batch: int, size: int, channels_last: bool, graphs: bool) -> int:
    """Bytes the training step of `model` will take on its device beyond what it holds now (its weights): the
    activations one training forward pass of `batch` images of `size` px saves for its backward, counted in
    fp32 (autocast keeps about 0.65 of that), twice with CUDA graphs (the graphs' own memory pool holds one set,
    eager passes need another), plus gradients and optimizer state (3 x the weights). Counted on the meta
    device: nothing is allocated, no random number drawn, no BatchNorm statistic updated."""
    tensors = {
        name: torch.empty_like(t, device="meta").requires_grad_(t.requires_grad)
        for name, t in [*model.named_parameters(), *model.named_buffers()]
    }
    weights = {id(t) for t in tensors.values()}
    x = torch.empty(batch, 3, size, size, device="meta")
    saved = [0]

    def count(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights:
            saved[0] += t.numel() * t.element_size()
        return t

    training = model.training
    model.train()
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            torch.func.functional_call(
                model, tensors, (x.contiguous(memory_format=torch.channels_last) if channels_last else x,)
            )
    finally:
        model.train(training)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return saved[0] * (2 if graphs else 1) + 3 * weight_bytes


def share_compiled_code() -> Path:
    """Turn on torch.compile's on-disk caches in the folder every run of this user shares (see the module's
    docstring); returns the folder."""
    import torch._functorch.config
    import torch._inductor.config

    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(user_cache_home() / "rethink" / "inductor")))
    torch._inductor.config.fx_graph_cache = True
    if hasattr(torch._functorch.config, "enable_autograd_cache"):
        torch._functorch.config.enable_autograd_cache = True
    return folder


def forward_modules(
    model: nn.Module,
    compiled: bool,
    graphs: bool,
    autocast: Callable,
    wrap: Callable[[nn.Module], nn.Module] = lambda module: module,
) -> tuple[nn.Module, nn.Module]:
    """(what evaluates, what trains) for `model` with these fast paths: the model or torch.compile's (with
    `graphs` too, compile's own CUDA graphs, mode="reduce-overhead"); what trains is that, passed through
    `wrap` (DDP wraps after compiling, as PyTorch asks), with CUDA graphs replaying its training passes."""
    forward = model
    if compiled:
        share_compiled_code()
        forward = torch.compile(model, mode="reduce-overhead" if graphs else None)
    trained = wrap(forward)
    if graphs and not compiled:
        trained = GraphedForward(trained, autocast)
    return forward, trained
