"""Typed schemas for every config group, registered in Hydra's ConfigStore.

`conf/config.yaml` puts `rethink_schema` first in its defaults list, so every YAML file and every
command-line override is merged into these dataclasses: a wrong key, a wrong type or an unknown
enum value (say `model.stages.1.block=fusd`) fails while the config is composed, before any task runs.
"""

import copy
import functools
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Dict, List, Optional, Sequence

from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError
from .keys import HOW, SEED, TASK, WHAT, Allowed, KeyTable, key


class Task(Enum):
    train = "train"
    eval = "eval"
    predict = "predict"
    export = "export"
    summary = "summary"
    benchmark = "benchmark"
    compare = "compare"
    pack = "pack"


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
    imagenet = "imagenet"
    synthetic = "synthetic"
    flowers102 = "flowers102"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


class Augment(Enum):
    none = "none"
    flip_crop = "flip_crop"
    randaugment = "randaugment"
    trivialaugment = "trivialaugment"


class Decode(Enum):
    cpu = "cpu"
    device = "device"


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


class Correction(Enum):  # for the family of a comparison's verdicts (rethink/stats.py)
    holm = "holm"  # Holm's step-down: the chance of any false better/worse stays at most the level
    bonferroni = "bonferroni"  # the same, more conservative
    none = "none"  # each verdict on its own: with many pairs, some are false


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


# Ranges the schema's types cannot express (the block spec checks its own keys in models/spec.py)
AT_LEAST_1 = Allowed(lambda v: v >= 1, "at least 1")
NULL_OR_AT_LEAST_1 = Allowed(lambda v: v is None or v >= 1, "null or at least 1")
NOT_NEGATIVE = Allowed(lambda v: v >= 0, "0 or more")
POSITIVE = Allowed(lambda v: v > 0, "positive")
FRACTION = Allowed(lambda v: 0 <= v < 1, "in [0, 1)")
PIXELS = Allowed(lambda v: v >= 8, "at least 8 (pixels)")
SWITCH = Allowed(lambda v: isinstance(v, bool) or v == "auto", "auto, true or false")
RANDAUG_LEVEL = (
    "in [0, 20] (the papers' scale; 10 is torchvision's strongest, 15 and 20 the official V2-M and V2-L ends)"
)


def _pair(ok: Callable[[Any], bool], allowed: str) -> Allowed:
    """A [start, end] pair, each null (the run's own value) or `allowed`."""
    return Allowed(
        lambda v: len(v) == 2 and all(x is None or ok(x) for x in v), f"[start, end], each null or {allowed}"
    )


@dataclass
class ModelConfig:
    name: str = key(WHAT, MISSING)
    width: float = key(WHAT, 1.0)
    depth: float = key(WHAT, 1.0)
    stem: int = key(WHAT, 32)
    head: int = key(WHAT, 1280)
    train_size: int = key(WHAT, 224, allowed=PIXELS)
    eval_size: int = key(WHAT, 224, allowed=PIXELS)
    dropout: float = key(WHAT, 0.2, allowed=FRACTION)
    bn_eps: float = key(WHAT, 1e-5)
    bn_momentum: float = key(WHAT, 0.1)
    drop_path_rate: float = key(WHAT, 0.2)
    drop_path_schedule: DropPathSchedule = key(WHAT, DropPathSchedule.linear)
    pretrained: Any = key(WHAT, False)  # false | true (torchvision's ImageNet weights) | path to a state_dict file
    freeze: Freeze = key(WHAT, Freeze.none)
    torchvision_weights: Optional[str] = key(WHAT, None)  # the weights enum behind `pretrained: true`
    mean: List[float] = key(WHAT, factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = key(WHAT, factory=lambda: [0.229, 0.224, 0.225])
    stages: List[StageConfig] = key(WHAT, MISSING)


@dataclass
class DataConfig:
    name: Dataset = key(WHAT, Dataset.flowers)
    root: Optional[str] = key(
        HOW, None
    )  # null: $RETHINK_DATA, else ~/.cache/rethink/data (where the data lies; what it is: its split's fingerprint)
    batch_size: int = key(WHAT, 16, allowed=AT_LEAST_1)
    num_workers: Optional[int] = key(
        HOW, None, allowed=Allowed(lambda v: v is None or v >= 0, "null (min(8, CPUs)) or 0 or more")
    )  # null: min(8, CPUs available)
    split: List[float] = key(WHAT, factory=lambda: [0.7, 0.15, 0.15])  # train/val/test
    split_seed: int = key(WHAT, 0)
    augment: Augment = key(WHAT, Augment.flip_crop)
    randaug_magnitude: float = key(
        WHAT, 3.0, allowed=Allowed(lambda v: 0 <= v <= 20, RANDAUG_LEVEL)
    )  # data.augment=randaugment: the papers' 0-20 scale (3: torchvision's default, bin 9 of 0-30)
    mixup_alpha: float = key(WHAT, 0.0, allowed=NOT_NEGATIVE)
    cutmix_alpha: float = key(WHAT, 0.0, allowed=NOT_NEGATIVE)
    crop_pct: float = key(
        WHAT, 0.875, allowed=Allowed(lambda v: 0 < v <= 1, "in (0, 1]")
    )  # eval: resize to eval_size / crop_pct, then centre-crop eval_size
    cache: Any = key(
        HOW, "auto", allowed=SWITCH
    )  # the same pixels with or without it (data/cache.py); auto: on where it fits half the free space
    cache_max_gb: Optional[float] = key(
        HOW, None, allowed=Allowed(lambda v: v is None or v > 0, "null (no cap) or a positive number of GB")
    )  # the most the image cache may hold of a run's images (1 GB = 10^9 bytes)
    on_gpu: Any = key(
        HOW, "auto", allowed=SWITCH
    )  # training images resident on the GPU, cropped and flipped there (auto | true | false)
    # where training images are decoded: cpu (loader workers, the default) | device (the training device decodes each
    # batch's JPEGs and crops them there; loader workers read bytes: rethink/data/device_decode.py)
    decode: Decode = key(WHAT, Decode.cpu)  # a what-key: the crops come from another decode of the image
    cache_dir: Optional[str] = key(HOW, None)  # null: $RETHINK_CACHE, else ~/.cache/rethink/images
    # data=synthetic only
    num_classes: int = key(WHAT, 4, allowed=Allowed(lambda v: v >= 2, "at least 2"))
    images_per_class: int = key(WHAT, 120, allowed=AT_LEAST_1)
    image_size: int = key(WHAT, 64, allowed=PIXELS)


@dataclass
class OptimizerConfig:
    name: OptimizerName = key(WHAT, OptimizerName.sgd)
    lr: float = key(WHAT, 0.01, allowed=POSITIVE)
    momentum: float = key(WHAT, 0.9, allowed=FRACTION)
    nesterov: bool = key(WHAT, False)
    weight_decay: float = key(WHAT, 1e-4, allowed=NOT_NEGATIVE)
    betas: List[float] = key(WHAT, factory=lambda: [0.9, 0.999])
    alpha: float = key(WHAT, 0.9, allowed=FRACTION)  # rmsprop_tf: decay of the squared-gradient average
    eps: float = key(WHAT, 1e-8, allowed=POSITIVE)
    decay_norm_and_bias: bool = key(WHAT, False)


@dataclass
class SchedulerConfig:
    name: SchedulerName = key(WHAT, SchedulerName.cosine)
    warmup_epochs: float = key(WHAT, 1.0, allowed=NOT_NEGATIVE)
    warmup_start_ratio: float = key(WHAT, 0.01, allowed=Allowed(lambda v: 0 < v <= 1, "in (0, 1]"))
    min_lr_ratio: float = key(WHAT, 0.01, allowed=Allowed(lambda v: 0 <= v <= 1, "in [0, 1]"))
    decay_rate: float = key(WHAT, 0.97, allowed=Allowed(lambda v: 0 < v <= 1, "in (0, 1]"))
    decay_epochs: float = key(WHAT, 2.4, allowed=POSITIVE)


@dataclass
class TrainerConfig:
    epochs: int = key(WHAT, 30, allowed=AT_LEAST_1, resumable=True)  # a resume may continue a run for longer
    device: str = key(HOW, "auto")  # auto | cpu | cuda | cuda:N
    cpu_threads: Optional[int] = key(
        HOW, None, allowed=NULL_OR_AT_LEAST_1
    )  # torch's CPU threads; null: $OMP_NUM_THREADS, else one per CPU this process may use
    jobs_per_gpu: int = key(
        HOW, 1, allowed=AT_LEAST_1
    )  # sweep jobs launched in parallel share a GPU this many at a time (device=auto)
    sync_bn: bool = key(WHAT, False)  # under torchrun on GPUs: BatchNorm statistics over every process's batch
    dist_timeout_min: float = key(
        HOW, 60.0, allowed=POSITIVE
    )  # under torchrun: how long a collective (a barrier at set-up included) waits for the other processes
    amp: Amp = key(HOW, Amp.auto, variant=True)
    channels_last: bool = key(HOW, True, variant=True)
    # GPU fast paths, each auto | true | false (README, Performance; rethink/train/fast_paths.py says what auto does)
    compile: Any = key(HOW, "auto", allowed=SWITCH, variant=True)
    cuda_graphs: Any = key(HOW, "auto", allowed=SWITCH, variant=True)
    cudnn_benchmark: Any = key(HOW, "auto", allowed=SWITCH)
    deterministic: bool = key(HOW, False)
    grad_clip: Optional[float] = key(
        WHAT, None, allowed=Allowed(lambda v: v is None or v > 0, "null (off) or positive")
    )  # max global gradient norm
    # Memory savers (README, Performance): N loader batches (data.batch_size each) per optimizer step (BatchNorm
    # then sees each micro-batch alone: what); and recompute each stage's activations in the backward pass (how).
    grad_accumulation: int = key(WHAT, 1, allowed=AT_LEAST_1, variant=True)
    grad_checkpointing: bool = key(HOW, False, variant=True)
    label_smoothing: float = key(WHAT, 0.1, allowed=FRACTION)
    ema: bool = key(WHAT, False, variant=True)
    ema_decay: float = key(WHAT, 0.999, allowed=FRACTION)
    limit_train_batches: Optional[int] = key(WHAT, None, allowed=NULL_OR_AT_LEAST_1)
    limit_val_batches: Optional[int] = key(WHAT, None, allowed=NULL_OR_AT_LEAST_1)  # which images validate
    log_every_n_steps: int = key(HOW, 20, allowed=AT_LEAST_1)
    progress: Optional[bool] = key(HOW, None)  # null: a progress bar only when stdout is a terminal
    image_grid: bool = key(HOW, True)  # log one grid of augmented training images


@dataclass
class EvalConfig:
    split: EvalSplit = key(TASK, EvalSplit.test)
    ema: bool = key(TASK, True)  # use the checkpoint's EMA weights when it has them


@dataclass
class PredictConfig:
    topk: int = key(TASK, 5, allowed=AT_LEAST_1)
    grid: bool = key(TASK, False)
    batch_size: int = key(TASK, 32, allowed=AT_LEAST_1)


@dataclass
class ExportConfig:
    onnx: bool = key(TASK, True)  # also write model.onnx when the `onnx` extra is installed
    batch_size: int = key(TASK, 2, allowed=AT_LEAST_1)
    atol: float = key(TASK, 1e-4, allowed=POSITIVE)


@dataclass
class SummaryConfig:
    num_classes: int = key(
        TASK, 1000, allowed=AT_LEAST_1
    )  # the ImageNet head, as the papers and torchvision count parameters


@dataclass
class BenchmarkConfig:
    """task=benchmark (rethink/tasks/benchmark.py): the input pipeline against the seed project's, and
    the training step against torchvision's."""

    pipeline: bool = key(TASK, True)  # time the input pipeline
    images: int = key(TASK, 256, allowed=AT_LEAST_1)  # samples timed per pipeline
    warmup: int = key(TASK, 16, allowed=NOT_NEGATIVE)
    threads: int = key(TASK, 1, allowed=AT_LEAST_1)  # per-core figures: one thread, no workers
    training: bool = key(TASK, True)  # time the training step (trainer.* settings, trainer.device and its threads)
    image_size: Optional[int] = key(
        TASK, None, allowed=Allowed(lambda v: v is None or v >= 32, "null (model.train_size) or at least 32 (pixels)")
    )
    batch_size: Optional[int] = key(
        TASK, None, allowed=NULL_OR_AT_LEAST_1
    )  # images per optimizer step; null: batch_per_model[model.name], else data.batch_size
    batch_per_model: Dict[str, int] = key(TASK, factory=dict)  # for presets that sweep models
    rounds: int = key(TASK, 5, allowed=AT_LEAST_1)  # timed rounds; every run takes its turn in each, the order rotating
    steps: int = key(TASK, 2, allowed=AT_LEAST_1)  # optimizer steps per run per round
    warmup_steps: int = key(
        TASK, 1, allowed=NOT_NEGATIVE
    )  # untimed steps of each run first (torch.compile, cuDNN's search)
    torchvision: bool = key(TASK, True)  # also torchvision's network: as most users run it, and with our settings
    # Our step with other trainer settings, each `key:value`, several joined by `+`, e.g.
    # [grad_checkpointing:true, grad_accumulation:4, channels_last:false, amp:off, compile:true, ema:true]
    # (the keys: those declared variant=True in TrainerConfig)
    variants: List[str] = key(TASK, factory=list)


@dataclass
class PackConfig:
    """task=pack (rethink/data/packed.py): a file-based data set written once into tar shards with an index;
    a run then takes `data.root=<pack.out>` and starts in seconds."""

    out: Optional[str] = key(TASK, None)  # the pack's folder (required); an unfinished pack there is continued
    files_per_shard: int = key(TASK, 5000, allowed=AT_LEAST_1)  # ImageNet's photos: ~0.55 GB a shard
    workers: Optional[int] = key(TASK, None, allowed=NULL_OR_AT_LEAST_1)  # processes; null: the CPUs this may use


@dataclass
class CompareConfig:
    """task=compare (rethink/tasks/compare.py): groups runs that differ only in seed and sets them against each other."""

    dirs: List[str] = key(TASK, factory=lambda: ["outputs"])  # sweep folders, run folders, or outputs/ as a whole
    # key=value conditions (comma-separated; key:value on the command line) that pick the baseline group(s),
    # e.g. model.stages.3.block=mbconv; `model=v2_s` means model.name=v2_s
    baseline: Optional[str] = key(TASK, None)
    candidate: Optional[str] = key(TASK, None)  # the same for the groups set against it; unset: every other group
    # Keys besides seed (always ignored) in which runs of one group may differ; a key covers everything under it.
    # Default: every how-key and every task setting (their roles in this file; `COMPARE_IGNORED`).
    ignore: List[str] = key(TASK, factory=lambda: list(COMPARE_IGNORED))
    also_ignore: List[str] = key(TASK, factory=list)  # more such keys, e.g. [trainer.grad_accumulation]
    confidence: float = key(
        TASK, 0.95, allowed=Allowed(lambda v: 0 < v < 1, "in (0, 1)")
    )  # of every interval, and 1 - the level of the test
    power: float = key(
        TASK, 0.8, allowed=Allowed(lambda v: 0 < v < 1, "in (0, 1)")
    )  # for the smallest difference the seeds could detect
    detect: float = key(
        TASK,
        0.005,
        allowed=Allowed(lambda v: 0 < v < 1, "in (0, 1), a difference of accuracy as a fraction (0.005 = 0.5 points)"),
    )  # a difference in test accuracy (0.5 points) whose seeds needed the verdict reports
    correction: Correction = key(
        TASK, Correction.holm
    )  # of the p-values of all of a comparison's verdicts, as one family
    margin: float = key(
        TASK,
        0.005,
        allowed=Allowed(lambda v: 0 < v < 1, "in (0, 1), a difference of accuracy as a fraction (0.005 = 0.5 points)"),
    )  # equivalent: the difference shown to lie within +-margin (two one-sided tests)
    bootstrap: int = key(
        TASK, 10000, allowed=Allowed(lambda v: v == 0 or v >= 100, "0 (none) or at least 100")
    )  # draws of the bootstrap over seeds and test images


@dataclass
class ProgressiveConfig:
    """Progressive learning (rethink/train/progressive.py): training split into `stages` equal parts; stage k
    of M (0-based) trains at min_size + (model.train_size - min_size) * (k + 1) / M px (a multiple of 8; the last
    stage at model.train_size) with each regulariser at start + (end - start) * k / (M - 1). [start, end] pairs;
    null: the run's own value (model.dropout; data.randaug_magnitude; data.mixup_alpha). The
    defaults are the v2 preset (conf/progressive/v2.yaml says where each value comes from)."""

    name: Progressive = key(WHAT, Progressive.none)
    stages: int = key(WHAT, 4, allowed=AT_LEAST_1)
    min_size: int = key(WHAT, 128, allowed=PIXELS)
    dropout: List[Optional[float]] = key(
        WHAT, factory=lambda: [0.1, None], allowed=_pair(lambda v: 0 <= v < 1, "in [0, 1)")
    )
    randaug_magnitude: List[Optional[float]] = key(
        WHAT, factory=lambda: [5.0, 10.0], allowed=_pair(lambda v: 0 <= v <= 20, RANDAUG_LEVEL)
    )  # the papers' scale (0-20)
    mixup_alpha: List[Optional[float]] = key(
        WHAT, factory=lambda: [0.0, None], allowed=_pair(lambda v: v >= 0, "0 or more")
    )


@dataclass
class RethinkConfig:
    task: Task = key(TASK, Task.train)
    seed: int = key(SEED, 0, allowed=NOT_NEGATIVE)
    resume: Optional[str] = key(
        TASK, None, named=False
    )  # a run directory to continue; auto: the run in this run's own folder, if any
    ckpt: Optional[str] = key(TASK, None)  # a checkpoint for eval / predict / export
    inputs: Optional[str] = key(TASK, None)  # an image, a folder or a glob for predict
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
    pack: PackConfig = field(default_factory=PackConfig)


# Every list of keys, derived from the roles above (rethink/keys.py says what each role means).
KEYS = KeyTable(RethinkConfig)
RANGES = KEYS.ranges()
RESUMABLE = KEYS.collapsed(KEYS.where(lambda k: k.may_change_on_resume))  # what `resume=` may change
COMPARE_IGNORED = KEYS.collapsed(
    KEYS.where(lambda k: k.pooled_by_compare)
)  # what runs of one compare group may differ in
BENCHMARK_VARIANTS = tuple(leaf.removeprefix("trainer.") for leaf in KEYS.where(lambda k: k.variant))


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts, lists, enum values as strings), for code below the tasks."""
    if OmegaConf.is_config(node):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


def flatten(node: Any, prefix: str = "") -> dict:
    """Nested dicts and lists as dotted keys (`model.stages.3.block`); an empty container is one leaf."""
    if isinstance(node, dict) and node:
        items = node.items()
    elif isinstance(node, list) and node:
        items = enumerate(node)
    else:
        return {prefix[:-1]: json.dumps(node) if isinstance(node, (dict, list)) else node}
    flat = {}
    for name, child in items:
        flat.update(flatten(child, f"{prefix}{name}."))
    return flat


def what_the_run_is(cfg: DictConfig) -> dict:
    """The config's what-keys and its seed, flat (`model.stages.3.block` -> "fused"): what tells one run from
    another, under the names the command line and task=compare use."""
    return {
        name: v
        for name, v in flatten(plain(cfg)).items()
        if (k := KEYS.role_of(name)) is not None and k.role in (WHAT, SEED)
    }


def validate(cfg: DictConfig) -> None:
    """Every key of RANGES within its range, or a UserError that names the first one that is not."""
    for name, (ok, allowed) in RANGES.items():
        setting = OmegaConf.select(cfg, name)
        if not ok(setting):
            raise UserError(f"{name}={setting}: must be {allowed}")


def config_from_checkpoint(saved: dict) -> DictConfig:
    """A saved run's config (plain dict) as a typed config again."""
    return OmegaConf.merge(_schema(), saved)  # merge copies its first config: the cached schema stays as it is


@functools.cache
def _schema() -> DictConfig:
    return OmegaConf.structured(RethinkConfig)  # built once: task=compare reads hundreds of run records


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


def apply_overrides(
    base: DictConfig, current: DictConfig, keys: Sequence[str], skip: Sequence[str] = ()
) -> tuple[DictConfig, list[str]]:
    """`base` (a saved run's config) with each of `keys` (what the command line set) taken from
    `current` (the config composed from that command line); a group key (`data`) takes the whole
    group. Returns the new config and the keys it took."""
    merged = copy.deepcopy(base)
    taken = []
    for name in keys:
        if name in skip:
            continue
        if name == "experiment":
            raise UserError("experiment= cannot be applied to a saved run; set the keys you need one by one")
        OmegaConf.update(merged, name, OmegaConf.select(current, name), merge=False)
        taken.append(name)
    return merged, taken


def value(option: Any) -> Any:
    """An enum config value as its plain value ("train", not "Task.train"); anything else as it is."""
    return getattr(option, "value", option)
