"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `rethink_schema` first in its defaults list, so every YAML file and every
command-line override is merged into these dataclasses: a wrong key, a wrong type or an unknown
enum value (say `model.stages.1.block=fusd`) fails while the config is composed, before any task runs.
"""

import copy
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import MISSING, DictConfig, OmegaConf

from . import rundir
from .errors import UserError, user_errors


class Task(Enum):
    train = "train"
    eval = "eval"
    predict = "predict"
    export = "export"
    summary = "summary"
    benchmark = "benchmark"
    compare = "compare"


class Block(Enum):
    mbconv = "mbconv"
    fused = "fused"


class DropPathSchedule(Enum):
    linear = "linear"  # rate * i / N over the global block index (torchvision, timm, the papers)
    uniform = "uniform"  # the same rate for every block


class Freeze(Enum):
    none = "none"
    backbone = "backbone"  # train the classifier only; frozen BatchNorm layers stay in eval mode


class Dataset(Enum):
    flowers = "flowers"
    folder = "folder"
    synthetic = "synthetic"
    flowers102 = "flowers102"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


class Augment(Enum):
    none = "none"
    flip_crop = "flip_crop"
    randaugment = "randaugment"
    trivialaugment = "trivialaugment"


class Amp(Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class OptimizerName(Enum):
    sgd = "sgd"
    adamw = "adamw"
    rmsprop_tf = "rmsprop_tf"


class SchedulerName(Enum):
    cosine = "cosine"  # per step, after a linear warmup
    study_cosine = "study_cosine"  # the seed project's per-epoch cosine to lr * min_lr_ratio
    step = "step"  # the papers' decay: decay_rate every decay_epochs
    constant = "constant"


class EvalSplit(Enum):  # the train split is augmented: scoring it would measure the augmentation
    val = "val"
    test = "test"


class Progressive(Enum):
    none = "none"  # train at model.train_size with fixed regularisation (as without the group)
    v2 = "v2"  # EfficientNetV2's progressive learning: image size and regularisation grow per stage (V2-S's ends)
    v2_m = "v2_m"  # the same with the official V2-M ends (RandAugment 15, mixup 0.2)
    v2_l = "v2_l"  # the same with the official V2-L ends (RandAugment 20, mixup 0.5)


@dataclass
class StageConfig:
    block: Block = Block.mbconv
    expand: float = 1.0
    kernel: int = 3
    stride: int = 1
    out: int = MISSING
    repeats: int = 1
    # Squeeze-excite width as a fraction of the block's input channels; null takes the block type's
    # default (0.25 for mbconv, none for fused), so flipping a stage to fused drops its SE unless asked.
    se: Optional[float] = None


@dataclass
class ModelConfig:
    name: str = MISSING
    width: float = 1.0
    depth: float = 1.0
    stem: int = 32
    head: int = 1280
    train_size: int = 224
    eval_size: int = 224
    dropout: float = 0.2
    bn_eps: float = 1e-5
    bn_momentum: float = 0.1
    drop_path_rate: float = 0.2
    drop_path_schedule: DropPathSchedule = DropPathSchedule.linear
    pretrained: Any = False  # false | true (torchvision's ImageNet weights) | path to a state_dict file
    freeze: Freeze = Freeze.none
    torchvision_weights: Optional[str] = None  # the weights enum behind `pretrained: true`
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    stages: List[StageConfig] = MISSING


@dataclass
class DataConfig:
    name: Dataset = Dataset.flowers
    root: Optional[str] = None  # null: $RETHINK_DATA, else ~/.cache/rethink/data
    batch_size: int = 16
    num_workers: Optional[int] = None  # null: min(8, CPUs available)
    split: List[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])  # train/val/test
    split_seed: int = 0
    augment: Augment = Augment.flip_crop
    randaug_magnitude: float = 3.0  # data.augment=randaugment: the papers' 0-20 scale (3: torchvision's default, bin 9 of 0-30)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    crop_pct: float = 0.875  # eval: resize to eval_size / crop_pct, then centre-crop eval_size
    cache: bool = True
    on_gpu: Any = "auto"  # training images resident on the GPU, cropped and flipped there (auto | true | false)
    cache_dir: Optional[str] = None  # null: $RETHINK_CACHE, else ~/.cache/rethink/images
    # data=synthetic only
    num_classes: int = 4
    images_per_class: int = 120
    image_size: int = 64


@dataclass
class OptimizerConfig:
    name: OptimizerName = OptimizerName.sgd
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    alpha: float = 0.9  # rmsprop_tf: decay of the squared-gradient average
    eps: float = 1e-8
    decay_norm_and_bias: bool = False


@dataclass
class SchedulerConfig:
    name: SchedulerName = SchedulerName.cosine
    warmup_epochs: float = 1.0
    warmup_start_ratio: float = 0.01
    min_lr_ratio: float = 0.01
    decay_rate: float = 0.97
    decay_epochs: float = 2.4


@dataclass
class TrainerConfig:
    epochs: int = 30
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    cpu_threads: Optional[int] = None  # torch's CPU threads; null: $OMP_NUM_THREADS, else one per CPU this process may use
    jobs_per_gpu: int = 1  # sweep jobs launched in parallel share a GPU this many at a time (device=auto)
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over every process's batch
    amp: Amp = Amp.auto
    channels_last: bool = True
    # GPU fast paths, each auto | true | false (README, Performance; rethink/train/fast_paths.py says what auto does)
    compile: Any = "auto"
    cuda_graphs: Any = "auto"
    cudnn_benchmark: Any = "auto"
    deterministic: bool = False
    grad_clip: Optional[float] = None  # max global gradient norm
    # Memory savers (README, Performance): N loader batches (data.batch_size each) per optimizer step; and
    # recompute each stage's activations in the backward pass instead of keeping them.
    grad_accumulation: int = 1
    grad_checkpointing: bool = False
    label_smoothing: float = 0.1
    ema: bool = False
    ema_decay: float = 0.999
    limit_train_batches: Optional[int] = None
    limit_val_batches: Optional[int] = None
    log_every_n_steps: int = 20
    progress: Optional[bool] = None  # null: a progress bar only when stdout is a terminal
    image_grid: bool = True  # log one grid of augmented training images


@dataclass
class EvalConfig:
    split: EvalSplit = EvalSplit.test
    ema: bool = True  # use the checkpoint's EMA weights when it has them


@dataclass
class PredictConfig:
    topk: int = 5
    grid: bool = False
    batch_size: int = 32


@dataclass
class ExportConfig:
    onnx: bool = True  # also write model.onnx when the `onnx` extra is installed
    batch_size: int = 2
    atol: float = 1e-4


@dataclass
class SummaryConfig:
    num_classes: int = 1000  # the ImageNet head, as the papers and torchvision count parameters


@dataclass
class BenchmarkConfig:
    """task=benchmark (rethink/tasks/benchmark.py): the input pipeline against the seed project's, and
    the training step against torchvision's."""

    pipeline: bool = True  # time the input pipeline
    images: int = 256  # samples timed per pipeline
    warmup: int = 16
    threads: int = 1  # per-core figures: one thread, no workers
    training: bool = True  # time the training step (trainer.* settings, trainer.device and its threads)
    image_size: Optional[int] = None  # null: model.train_size
    batch_size: Optional[int] = None  # images per optimizer step; null: batch_per_model[model.name], else data.batch_size
    batch_per_model: Dict[str, int] = field(default_factory=dict)  # for presets that sweep models
    rounds: int = 5  # timed rounds; every run takes its turn in each, the order rotating
    steps: int = 2  # optimizer steps per run per round
    warmup_steps: int = 1  # untimed steps of each run first (torch.compile, cuDNN's search)
    torchvision: bool = True  # also torchvision's network: as most users run it, and with our settings
    # Our step with other trainer settings, each `key:value`, several joined by `+`, e.g.
    # [grad_checkpointing:true, grad_accumulation:4, channels_last:false, amp:off, compile:true, ema:true]
    variants: List[str] = field(default_factory=list)


@dataclass
class CompareConfig:
    """task=compare (rethink/tasks/compare.py): groups runs that differ only in seed and sets them against each other."""

    dirs: List[str] = field(default_factory=lambda: ["outputs"])  # sweep folders, run folders, or outputs/ as a whole
    # key=value conditions (comma-separated; key:value on the command line) that pick the baseline group(s),
    # e.g. model.stages.3.block=mbconv; `model=v2_s` means model.name=v2_s
    baseline: Optional[str] = None
    candidate: Optional[str] = None  # the same for the groups set against it; unset: every other group
    # Keys besides seed (always ignored) in which runs of one group may differ: how a run computes, not what
    # it computes, and the settings of other tasks. A key covers everything under it.
    ignore: List[str] = field(default_factory=lambda: [
        "resume", "ckpt", "inputs", "task", "trainer.device", "trainer.cpu_threads", "trainer.jobs_per_gpu",
        "trainer.progress", "trainer.log_every_n_steps", "trainer.image_grid", "trainer.compile",
        "trainer.cudnn_benchmark", "trainer.channels_last", "trainer.grad_checkpointing", "trainer.deterministic",
        "data.num_workers", "data.root", "data.cache", "data.cache_dir",
        "eval", "predict", "export", "summary", "benchmark", "compare",
    ])
    also_ignore: List[str] = field(default_factory=list)  # more such keys, e.g. [trainer.amp] to pool precisions
    confidence: float = 0.95  # of every interval, and 1 - the level of the test
    power: float = 0.8  # for the smallest difference the seeds could detect
    detect: float = 0.005  # a difference in test accuracy (0.5 points) whose seeds needed the verdict reports


@dataclass
class ProgressiveConfig:
    """Progressive learning (rethink/train/progressive.py): training split into `stages` equal parts; stage k
    of M (0-based) trains at min_size + (model.train_size - min_size) * (k + 1) / M px (a multiple of 8; the last
    stage at model.train_size) with each regulariser at start + (end - start) * k / (M - 1). [start, end] pairs;
    null: the run's own value (model.dropout; data.randaug_magnitude; data.mixup_alpha). The
    defaults are the v2 preset (conf/progressive/v2.yaml says where each value comes from)."""

    name: Progressive = Progressive.none
    stages: int = 4
    min_size: int = 128
    dropout: List[Optional[float]] = field(default_factory=lambda: [0.1, None])
    randaug_magnitude: List[Optional[float]] = field(default_factory=lambda: [5.0, 10.0])  # the papers' scale (0-20)
    mixup_alpha: List[Optional[float]] = field(default_factory=lambda: [0.0, None])


@dataclass
class RethinkConfig:
    task: Task = Task.train
    seed: int = 0
    resume: Optional[str] = None  # a run directory to continue; auto: the run in this run's own folder, if any
    ckpt: Optional[str] = None  # a checkpoint for eval / predict / export
    inputs: Optional[str] = None  # an image, a folder or a glob for predict
    model: ModelConfig = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts, lists, enum values as strings), for code below the tasks."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NULL_OR_AT_LEAST_1 = (lambda v: v is None or v >= 1, "null or at least 1")
_FRACTION = (lambda v: 0 <= v < 1, "in [0, 1)")
_POSITIVE = (lambda v: v > 0, "positive")
_SWITCH = (lambda v: isinstance(v, bool) or v == "auto", "auto, true or false")
_NOT_NEGATIVE = (lambda v: v >= 0, "0 or more")


def _pair(ok, allowed: str):
    """A [start, end] pair, each null (the run's own value) or `allowed`."""
    return (lambda v: len(v) == 2 and all(x is None or ok(x) for x in v), f"[start, end], each null or {allowed}")

# Ranges the schema's types cannot express (the block spec checks its own keys in models/spec.py).
RANGES = {
    "seed": (lambda v: v >= 0, "0 or more"),
    "model.train_size": (lambda v: v >= 8, "at least 8 (pixels)"),
    "model.eval_size": (lambda v: v >= 8, "at least 8 (pixels)"),
    "model.dropout": _FRACTION,
    "data.batch_size": _AT_LEAST_1,
    "data.num_workers": (lambda v: v is None or v >= 0, "null (min(8, CPUs)) or 0 or more"),
    "data.randaug_magnitude": (lambda v: 0 <= v <= 20, "in [0, 20] (the papers' scale; 10 is torchvision's strongest, 15 and 20 the official V2-M and V2-L ends)"),
    "data.mixup_alpha": _NOT_NEGATIVE,
    "data.cutmix_alpha": _NOT_NEGATIVE,
    "data.crop_pct": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.num_classes": (lambda v: v >= 2, "at least 2"),
    "data.images_per_class": _AT_LEAST_1,
    "data.image_size": (lambda v: v >= 8, "at least 8 (pixels)"),
    "optimizer.lr": _POSITIVE,
    "optimizer.momentum": _FRACTION,
    "optimizer.weight_decay": _NOT_NEGATIVE,
    "optimizer.alpha": _FRACTION,
    "optimizer.eps": _POSITIVE,
    "scheduler.warmup_epochs": _NOT_NEGATIVE,
    "scheduler.warmup_start_ratio": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "scheduler.min_lr_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "scheduler.decay_rate": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "scheduler.decay_epochs": _POSITIVE,
    "trainer.epochs": _AT_LEAST_1,
    "trainer.compile": _SWITCH,
    "trainer.cuda_graphs": _SWITCH,
    "trainer.cudnn_benchmark": _SWITCH,
    "data.on_gpu": _SWITCH,
    "trainer.cpu_threads": _NULL_OR_AT_LEAST_1,
    "trainer.jobs_per_gpu": _AT_LEAST_1,
    "trainer.grad_clip": (lambda v: v is None or v > 0, "null (off) or positive"),
    "trainer.grad_accumulation": _AT_LEAST_1,
    "trainer.label_smoothing": _FRACTION,
    "trainer.ema_decay": _FRACTION,
    "trainer.limit_train_batches": _NULL_OR_AT_LEAST_1,
    "trainer.limit_val_batches": _NULL_OR_AT_LEAST_1,
    "trainer.log_every_n_steps": _AT_LEAST_1,
    "progressive.stages": _AT_LEAST_1,
    "progressive.min_size": (lambda v: v >= 8, "at least 8 (pixels)"),
    "progressive.dropout": _pair(lambda v: 0 <= v < 1, "in [0, 1)"),
    "progressive.randaug_magnitude": _pair(lambda v: 0 <= v <= 20, "in [0, 20] (the papers' scale; 10 is torchvision's strongest, 15 and 20 the official V2-M and V2-L ends)"),
    "progressive.mixup_alpha": _pair(lambda v: v >= 0, "0 or more"),
    "predict.topk": _AT_LEAST_1,
    "predict.batch_size": _AT_LEAST_1,
    "export.batch_size": _AT_LEAST_1,
    "export.atol": _POSITIVE,
    "summary.num_classes": _AT_LEAST_1,
    "benchmark.images": _AT_LEAST_1,
    "benchmark.warmup": _NOT_NEGATIVE,
    "benchmark.threads": _AT_LEAST_1,
    "benchmark.image_size": (lambda v: v is None or v >= 32, "null (model.train_size) or at least 32 (pixels)"),
    "benchmark.batch_size": _NULL_OR_AT_LEAST_1,
    "benchmark.rounds": _AT_LEAST_1,
    "benchmark.steps": _AT_LEAST_1,
    "benchmark.warmup_steps": _NOT_NEGATIVE,
    "compare.confidence": (lambda v: 0 < v < 1, "in (0, 1)"),
    "compare.power": (lambda v: 0 < v < 1, "in (0, 1)"),
    "compare.detect": (lambda v: 0 < v < 1, "in (0, 1), a difference of accuracy as a fraction (0.005 = 0.5 points)"),
}


def validate(cfg: DictConfig) -> None:
    """Every key of RANGES within its range, or a UserError that names the first one that is not."""
    for key, (ok, allowed) in RANGES.items():
        setting = OmegaConf.select(cfg, key)
        if not ok(setting):
            raise UserError(f"{key}={setting}: must be {allowed}")


def config_from_checkpoint(saved: dict) -> DictConfig:
    """A saved run's config (plain dict) as a typed config again."""
    return OmegaConf.merge(OmegaConf.structured(RethinkConfig), saved)


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys a command line's overrides set (`stages=...` sets model.stages)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not key.startswith("hydra"):
            keys.append("model.stages" if key == "stages" else key)
    return keys


def changed_keys(cfg: DictConfig, reference: DictConfig) -> list[str]:
    """The keys (leaves; lists as a whole) whose values differ between two configs."""
    keys = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in a:
                walk(a[k], b.get(k), f"{prefix}{k}.")
        elif a != b:
            keys.append(prefix[:-1])

    walk(plain(cfg), plain(reference), "")
    return keys


def apply_overrides(base: DictConfig, current: DictConfig, keys: Sequence[str], skip: Sequence[str] = ()) -> tuple[DictConfig, list[str]]:
    """`base` (a saved run's config) with each of `keys` (what the command line set) taken from
    `current` (the config composed from that command line); a group key (`data`) takes the whole
    group. Returns the new config and the keys it took."""
    merged = copy.deepcopy(base)
    taken = []
    for key in keys:
        if key in skip:
            continue
        if key == "experiment":
            raise UserError("experiment= cannot be applied to a saved run; set the keys you need one by one")
        OmegaConf.update(merged, key, OmegaConf.select(current, key), merge=False)
        taken.append(key)
    return merged, taken


def register_configs() -> None:
    """Make the schema and the resolvers available to conf/config.yaml (run.py calls this first)."""
    ConfigStore.instance().store(name="rethink_schema", node=RethinkConfig)
    OmegaConf.register_new_resolver("rethink.value", value, replace=True)
    OmegaConf.register_new_resolver("rethink.run_dir", rundir.run_dir, replace=True)
    OmegaConf.register_new_resolver("rethink.record_dir", rundir.record_dir, replace=True)
    # cached: a sweep's jobs (copies of its config, in this process or another) all get the folder it claimed
    OmegaConf.register_new_resolver("rethink.claim", rundir.claim, replace=True, use_cache=True)
    OmegaConf.register_new_resolver("rethink.job_dir", rundir.job_dir, replace=True)


def value(option: Any) -> Any:
    """An enum config value as its plain value ("train", not "Task.train"); anything else as it is."""
    return getattr(option, "value", option)


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python run.py OVERRIDES...` would run with (without its `hydra` node), for notebooks,
    tests and tasks. Safe to call inside a running Hydra app: the app's global state is put back after.
    A mistake in `overrides` is a UserError with the one line `python run.py` would print."""
    if not (CONF_DIR / "config.yaml").is_file():
        raise FileNotFoundError(f"{CONF_DIR} holds no config.yaml; install rethink from its repository (pip install -e .)")
    register_configs()
    global_hydra = GlobalHydra.instance()
    running = global_hydra.hydra
    global_hydra.clear()
    with user_errors(overrides):  # outside the try: explaining may compose again, after the state is put back
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                return compose(config_name="config", overrides=list(overrides))
        finally:
            GlobalHydra.instance().clear()
            if running is not None:
                GlobalHydra.instance().initialize(running)
