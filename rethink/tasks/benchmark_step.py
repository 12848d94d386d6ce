"""task=benchmark, the training step: ours against torchvision's same network, in one process.

Runs, each with its own model, optimizer and batch on the device:
  ours                      our model through the trainer's own `Learner` with the run's trainer.* settings
                            (channels_last, amp, compile, ema, grad_accumulation, grad_checkpointing, ...)
  torchvision               torchvision's efficientnet_<model> as most users train it: NCHW, a plain loop
                            (forward, loss, backward, optimizer step), fp32 on the CPU, fp16 autocast with a
                            gradient scaler on a GPU
  torchvision_our_settings  torchvision's network through the same `Learner` and settings as ours (without
                            gradient checkpointing, which it does not have)
  ours+KEY:VALUE            ours with other trainer settings (benchmark.variants): what an option buys or costs

One step is one optimizer step over `batch` images of `image_size` px (with grad_accumulation N, N micro-
batches of batch / N), on one fixed random batch: uint8 images for the `Learner`, which normalises them on
the device as the trainer does; for the plain loop, images already normalised on the device in its memory
format, so the reference does slightly less work. The same optimizer (build_optimizer with optimizer.*)
and label smoothing everywhere. After `warmup_steps` untimed steps of each run (torch.compile, cuDNN's
search), `rounds` rounds each time `steps` steps of every run, in an order that rotates from round to round;
a run's speed is its median images per second of wall time (synchronised on a GPU; on the CPU also per
second of the process's CPU time, steadier on a shared machine).

Memory of a run: `held_mb`, what it holds between steps (weights, gradients, optimizer state, EMA, its
batch); `saved_for_backward_mb`, what one forward pass of a (micro-)batch keeps until its backward (the
activations that the memory savers cut); on a GPU `peak_memory_mb`, held plus the most its steps took
above what a round began with (the allocator's peak). On the CPU held and saved are glibc's count of
allocated bytes (Linux), and there is no peak: the resident memory that could give one keeps what the
allocator holds on to.
"""

import copy
import ctypes
import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
import torchvision
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ..config import BENCHMARK_VARIANTS, plain, validate, value
from ..data import normalize
from ..environment import cpu_model
from ..errors import UserError
from ..models import build_model
from ..models.profile import count_params
from ..train.fast_paths import cuda_graphs_choice, forward_modules
from ..train.loop import Inputs, Network, build_learner
from ..train.optim import build_optimizer
from ..train.runtime import Precision, resolve_device, resolve_precision, seed_everything, set_cpu_threads

log = logging.getLogger("rethink")

NUM_CLASSES = 1000  # torchvision's default head
TORCHVISION_MODELS = ("b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "v2_s", "v2_m", "v2_l")
SCHEDULED_STEPS = 1000  # loader batches per epoch for the learning-rate schedule: its values cost nothing


@dataclass
class Run:
    name: str
    settings: dict  # how it trains, for benchmark.json
    step: Optional[Callable[[], None]]  # one optimizer step
    forward: Optional[Callable[[], torch.Tensor]]  # the forward pass of one (micro-)batch, as the step runs it
    saved_mb: float = 0.0  # what that forward keeps for the backward pass
    own_mb: float = 0.0  # memory it holds between steps: weights, gradients, optimizer state, EMA
    first_step_s: float = 0.0
    img_s: list = field(default_factory=list)  # per round
    img_per_cpu_s: list = field(default_factory=list)
    rise_mb: list = field(default_factory=list)  # per round on a GPU: the most memory above what its round began with
    error: Optional[str] = None  # "out of memory": not timed further


def plan(cfg: DictConfig) -> tuple[torch.device, list[tuple[str, DictConfig, Precision]]]:
    """The device, and our runs (ours and each variant: name, config, precision), checked: a mistake in
    them is a UserError before anything is timed."""
    batch = batch_size(cfg)
    variants = [(f"ours+{spec}", variant_config(cfg, spec)) for spec in cfg.benchmark.variants]
    device = resolve_device(cfg.trainer.device)
    plans = [(name, run_cfg, _precision(name, run_cfg, device)) for name, run_cfg in [("ours", cfg), *variants]]
    for name, run_cfg, _ in plans:
        micro_batch(batch, run_cfg.trainer.grad_accumulation, name)
    return device, plans


def measure(cfg: DictConfig) -> dict:
    """The training-step part of benchmark.json (see the module's docstring)."""
    t, b = cfg.trainer, cfg.benchmark
    size, batch = b.image_size or cfg.model.train_size, batch_size(cfg)
    device, plans = plan(cfg)
    builders = [
        (name, partial(_ours, name, run_cfg, device, precision, size, batch)) for name, run_cfg, precision in plans
    ]
    skipped = _torchvision_mismatch(cfg) if b.torchvision else "benchmark.torchvision=false"
    if skipped is None:
        builders[1:1] = [
            ("torchvision", partial(_torchvision_plain, cfg, device, size, batch)),
            ("torchvision_our_settings", partial(_torchvision_ours, cfg, device, plans[0][2], size, batch)),
        ]
    else:
        log.info(f"torchvision not timed: {skipped}")
    threads, cudnn_benchmark = torch.get_num_threads(), torch.backends.cudnn.benchmark
    runs: list[Run] = []
    try:
        cpu_threads = set_cpu_threads(t.cpu_threads)
        torch.backends.cudnn.benchmark = (
            t.cudnn_benchmark is not False and device.type == "cuda"
        )  # auto: a benchmark is all steady steps
        for name, build in builders:
            runs.append(_prepared(name, build, b.warmup_steps, device))
        for r in range(b.rounds):
            for run in runs[r % len(runs) :] + runs[: r % len(runs)]:
                if run.error is None:
                    _time_round(run, b.steps, batch, device)
        return {
            **_report(cfg, runs, device, cpu_threads, size, batch, skipped),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
        }
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark
        compiled = any(r.settings.get("compile") for r in runs)
        del runs
        if compiled:
            torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def batch_size(cfg: DictConfig) -> int:
    b = cfg.benchmark
    return b.batch_size or b.batch_per_model.get(cfg.model.name) or cfg.data.batch_size


def micro_batch(batch: int, accumulation: int, run: str) -> int:
    if batch % accumulation:
        raise UserError(
            f"benchmark ({run}): a batch of {batch} images does not split into trainer.grad_accumulation={accumulation} "
            f"equal micro-batches; set benchmark.batch_size to a multiple of {accumulation}"
        )
    return batch // accumulation


def variant_config(cfg: DictConfig, spec: str) -> DictConfig:
    """The run's config with a variant's settings (`key:value`, several joined by `+`) applied."""
    changed = copy.deepcopy(cfg)
    for part in spec.split("+"):
        key, sep, setting = part.partition(":")
        key = key.strip().removeprefix("trainer.")
        if not sep or key not in BENCHMARK_VARIANTS:
            raise UserError(
                f"benchmark.variants: '{spec}': each setting is key:value with key one of {', '.join(BENCHMARK_VARIANTS)} (several joined by +)"
            )
        try:
            OmegaConf.update(
                changed, f"trainer.{key}", yaml.safe_load(setting.strip())
            )  # as the command line reads it: true, 4, fp16
        except OmegaConfBaseException:
            raise UserError(f"benchmark.variants: '{spec}': trainer.{key} cannot be '{setting.strip()}'") from None
    try:
        validate(changed)
    except UserError as e:
        raise UserError(f"benchmark.variants: '{spec}': {e}") from None
    return changed


def _precision(run: str, cfg: DictConfig, device: torch.device) -> Precision:
    try:
        return resolve_precision(value(cfg.trainer.amp), device)
    except UserError as e:
        raise UserError(f"benchmark ({run}): {e}" if run != "ours" else str(e)) from None


def _model_input(cfg: DictConfig, device: torch.device, size: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch: uint8 images (as a loader gives them) and labels, on the device."""
    generator = torch.Generator().manual_seed(cfg.seed)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)
    return images.to(device), labels.to(device)


def _ours(name: str, cfg: DictConfig, device: torch.device, precision: Precision, size: int, batch: int) -> Run:
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    before = _held_mb(device)
    model = build_model(cfg.model, NUM_CLASSES)
    model.set_grad_checkpointing(cfg.trainer.grad_checkpointing)
    return _learner_run(name, model, cfg, device, precision, size, batch, before)


def _torchvision_ours(cfg: DictConfig, device: torch.device, precision: Precision, size: int, batch: int) -> Run:
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    before = _held_mb(device)
    run = _learner_run("torchvision_our_settings", _torchvision_model(cfg), cfg, device, precision, size, batch, before)
    run.settings["grad_checkpointing"] = False
    return run


def _learner_run(
    name: str, model, cfg: DictConfig, device, precision: Precision, size: int, batch: int, before: float
) -> Run:
    """A run through the trainer's `Learner`, built as `fit` builds it."""
    t = cfg.trainer
    model.to(device).train()
    if t.channels_last:
        model.to(memory_format=torch.channels_last)
    micro = micro_batch(batch, t.grad_accumulation, name)
    compiled = t.compile is True  # auto: off, as for a run too short to repay compiling; see benchmark.variants
    graphs = cuda_graphs_choice(
        t.cuda_graphs, device.type, micro, 1, t.grad_accumulation, bool(t.grad_checkpointing), compiled
    ).on
    module, trained = forward_modules(model, compiled, graphs, precision.autocast)
    inputs = Inputs(device, tuple(cfg.model.mean), tuple(cfg.model.std), t.channels_last)
    learner = build_learner(cfg, Network(model, module, trained, inputs), precision, SCHEDULED_STEPS, NUM_CLASSES)
    images, labels = _model_input(cfg, device, size, batch)
    parts = list(zip(images.split(micro), labels.split(micro)))

    def step() -> None:
        for x, y in parts:
            learner.step(x, y)

    def forward() -> torch.Tensor:  # (not replayed from a CUDA graph: what an eager pass keeps for the backward)
        with precision.autocast():
            return module(inputs(parts[0][0]))

    settings = dict(
        model="rethink",
        loop="Learner",
        memory_format="channels_last" if t.channels_last else "NCHW",
        precision=precision.name,
        compile=compiled,
        cuda_graphs=graphs,
        ema=bool(t.ema),
        grad_accumulation=t.grad_accumulation,
        grad_checkpointing=bool(t.grad_checkpointing),
    )
    return Run(name, settings, step, forward, own_mb=-before)


def _torchvision_plain(cfg: DictConfig, device: torch.device, size: int, batch: int) -> Run:
    """torchvision's network as most users train it: NCHW; fp32 on the CPU, fp16 with a scaler on a GPU."""
    seed_everything(cfg.seed, cfg.trainer.deterministic)
    before = _held_mb(device)
    model = _torchvision_model(cfg).to(device).train()
    precision = Precision(torch.float16 if device.type == "cuda" else None, device.type)
    optimizer = build_optimizer(model, plain(cfg.optimizer))
    scaler = torch.amp.GradScaler(device.type) if precision.needs_scaler else None
    images, labels = _model_input(cfg, device, size, batch)
    x = normalize(images, torch.tensor(cfg.model.mean, device=device), torch.tensor(cfg.model.std, device=device))
    smoothing = cfg.trainer.label_smoothing

    def step() -> None:
        with precision.autocast():
            loss = F.cross_entropy(model(x), labels, label_smoothing=smoothing)
        optimizer.zero_grad(set_to_none=True)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

    def forward() -> torch.Tensor:
        with precision.autocast():
            return model(x)

    settings = dict(
        model="torchvision",
        loop="plain",
        memory_format="NCHW",
        precision=precision.name,
        compile=False,
        cuda_graphs=False,
        ema=False,
        grad_accumulation=1,
        grad_checkpointing=False,
    )
    return Run("torchvision", settings, step, forward, own_mb=-before)


def _torchvision_model(cfg: DictConfig):
    m = cfg.model
    return getattr(torchvision.models, f"efficientnet_{m.name}")(
        num_classes=NUM_CLASSES, dropout=m.dropout, stochastic_depth_prob=m.drop_path_rate
    )


def _torchvision_mismatch(cfg: DictConfig) -> Optional[str]:
    """Why torchvision has no network to set against ours (None when it has the same one)."""
    if cfg.model.name not in TORCHVISION_MODELS:
        return f"torchvision has no model {cfg.model.name}"
    with torch.device("meta"):
        ours, theirs = count_params(build_model(cfg.model, NUM_CLASSES)), count_params(_torchvision_model(cfg))
    if ours != theirs:
        return f"the stage layout differs from torchvision's {cfg.model.name} ({ours:,} parameters against {theirs:,})"
    return None


def _prepared(name: str, build: Callable[[], Run], warmup_steps: int, device: torch.device) -> Run:
    """The run built and warmed up; a run the GPU has no memory for stays in the table as such."""
    try:
        run = build()
        _warm_up(run, warmup_steps, device)
        return run
    except torch.OutOfMemoryError:
        run = None
    _free(device)
    return Run(name, {}, None, None, error="out of memory")


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _warm_up(run: Run, steps: int, device: torch.device) -> None:
    for i in range(steps):
        start = time.perf_counter()
        run.step()
        _synchronize(device)
        if i == 0:
            run.first_step_s = time.perf_counter() - start
    run.own_mb += _held_mb(device)  # own_mb held minus the memory before the run was built
    run.saved_mb = saved_for_backward_mb(run.forward, device)


def saved_for_backward_mb(forward: Callable[[], torch.Tensor], device: torch.device) -> float:
    """MiB that a forward pass leaves held until its backward pass: the activations it saved (what gradient
    checkpointing and smaller micro-batches reduce)."""
    _synchronize(device)
    before = _held_mb(device)
    output = forward()
    _synchronize(device)
    held = _held_mb(device) - before
    del output  # the graph, and what it saved, go with it
    return held


def _time_round(run: Run, steps: int, batch: int, device: torch.device) -> None:
    _synchronize(device)
    held = _held_mb(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    wall, cpu = time.perf_counter(), time.process_time()
    try:
        for _ in range(steps):
            run.step()
        _synchronize(device)
    except torch.OutOfMemoryError:
        run.error, run.step, run.forward = "out of memory", None, None
    if run.error:
        _free(device)
        return
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    run.img_s.append(steps * batch / wall)
    if device.type == "cpu":
        run.img_per_cpu_s.append(steps * batch / cpu)
    if device.type == "cuda":
        run.rise_mb.append(max(0.0, torch.cuda.max_memory_allocated(device) / 2**20 - held))


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _libc():
    """glibc (2.33+), whose mallinfo2 counts the bytes allocated; None elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def _held_mb(device: torch.device) -> float:
    """Memory in use now: by tensors on the GPU; on the CPU, what the process has allocated (glibc's
    count; nan elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    if _LIBC is None:
        return float("nan")
    info = _LIBC.mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _report(
    cfg: DictConfig,
    runs: list[Run],
    device: torch.device,
    cpu_threads: int,
    size: int,
    batch: int,
    skipped: Optional[str],
) -> dict:
    b = cfg.benchmark
    by_name = {}
    for run in runs:
        if run.error and not run.img_s:
            by_name[run.name] = dict(settings=run.settings, error=run.error)
            continue
        entry = dict(
            settings=run.settings,
            img_s=round(statistics.median(run.img_s), 2),
            img_s_min=round(min(run.img_s), 2),
            img_s_max=round(max(run.img_s), 2),
            img_s_rounds=[round(r, 2) for r in run.img_s],
        )
        if run.img_per_cpu_s:
            entry["img_per_cpu_s"] = round(statistics.median(run.img_per_cpu_s), 2)
        entry["peak_memory_mb"] = round(run.own_mb + max(run.rise_mb), 1) if run.rise_mb else None
        entry["held_mb"] = _mb(run.own_mb)
        entry["saved_for_backward_mb"] = _mb(run.saved_mb)
        entry["first_step_s"] = round(run.first_step_s, 3)
        if run.error:
            entry["error"] = f"{run.error} after {len(run.img_s)} rounds"
        by_name[run.name] = entry
    ratios = {}
    pairs = [("ours", "torchvision"), ("ours", "torchvision_our_settings")] + [
        (r.name, "ours") for r in runs if r.name.startswith("ours+")
    ]
    for a, c in pairs:
        if "img_s" in by_name.get(a, {}) and "img_s" in by_name.get(c, {}):
            ratios[f"{a}/{c}"] = _ratio(by_name[a], by_name[c])
    return dict(
        model=cfg.model.name,
        image_size=size,
        batch_size=batch,
        num_classes=NUM_CLASSES,
        device=str(device),
        device_name=_device_name(device),
        cpu_threads=cpu_threads if device.type == "cpu" else None,
        rounds=b.rounds,
        steps_per_round=b.steps,
        warmup_steps=b.warmup_steps,
        memory="cuda_allocated" if device.type == "cuda" else ("cpu_allocated" if _LIBC is not None else None),
        torchvision=skipped or "timed",
        runs=by_name,
        ratios=ratios,
    )


def _mb(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 1)


def _ratio(a: dict, b: dict) -> dict:
    ratio = dict(speed=round(a["img_s"] / b["img_s"], 3))
    if "img_per_cpu_s" in a and "img_per_cpu_s" in b:
        ratio["speed_cpu_time"] = round(a["img_per_cpu_s"] / b["img_per_cpu_s"], 3)
    for key, name in (("peak_memory_mb", "peak_memory"), ("saved_for_backward_mb", "saved_for_backward")):
        if a[key] and b[key]:
            ratio[name] = round(a[key] / b[key], 3)
    return ratio


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return cpu_model()


def format_training(result: dict) -> str:
    """The printed table of the training-step part."""
    threads = result["cpu_threads"]
    where = (
        f"{result['device_name']}, {threads} thread{'s' if threads != 1 else ''}" if threads else result["device_name"]
    )
    runs, ours = result["runs"], result["runs"]["ours"]
    cpu_time = any("img_per_cpu_s" in r for r in runs.values())

    def times(value, reference) -> str:
        return f"{value / reference:6.2f}" if value and reference else f"{'-':>6s}"

    lines = [
        f"training step: {result['model']}, {result['image_size']} px, {result['batch_size']} images per optimizer step, "
        f"{result['device']} ({where}); median of {result['rounds']} rounds x {result['steps_per_round']} steps",
        f"  {'run':38s} {'layout':13s} {'prec':4s} {'img/s':>8s} {'min-max':>13s}"
        + (f" {'img/cpu-s':>9s}" if cpu_time else "")
        + f" {'x ours':>6s} {'peak MiB':>9s} {'x ours':>6s} {'saved MiB':>9s} {'x ours':>6s}",
    ]
    for name, r in runs.items():
        if "img_s" not in r:
            lines.append(f"  {name[:38]:38s} {r['error']}")
            continue
        s = r["settings"]
        extras = [k for k in ("compile", "cuda_graphs", "ema", "grad_checkpointing") if s.get(k)] + (
            [f"accumulation {s['grad_accumulation']}"] if s["grad_accumulation"] > 1 else []
        )
        label = f"{name} ({', '.join(extras)})" if extras and not name.startswith("ours+") else name
        peak, saved = r["peak_memory_mb"], r["saved_for_backward_mb"]
        lines.append(
            f"  {label[:38]:38s} {s['memory_format']:13s} {s['precision']:4s} {r['img_s']:8.1f} {r['img_s_min']:6.1f}-{r['img_s_max']:<6.1f}"
            + (f" {r.get('img_per_cpu_s', 0):9.1f}" if cpu_time else "")
            + f" {times(r['img_s'], ours.get('img_s'))} {_cell(peak)} {times(peak, ours.get('peak_memory_mb'))}"
            + f" {_cell(saved)} {times(saved, ours.get('saved_for_backward_mb'))}"
            + (f"  {r['error']}" if "error" in r else "")
        )
    if result["torchvision"] != "timed":
        lines.append(f"  (torchvision not timed: {result['torchvision']})")
    if result["memory"] != "cuda_allocated":
        lines.append("  (on the CPU no peak memory: see saved MiB, the activations one forward keeps for the backward)")
    return "\n".join(lines)


def _cell(value: Optional[float]) -> str:
    return f"{value:9.1f}" if value is not None else f"{'-':>9s}"
