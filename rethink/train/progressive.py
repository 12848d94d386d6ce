"""Progressive learning (EfficientNetV2: Tan & Le 2021, Algorithm 1; the official automl/efficientnetv2 code):
training in stages whose image size and regularisation grow together. `progressive=none` (the default)
changes nothing; `progressive=v2` (conf/progressive/v2.yaml) splits training into M equal stages.

    stage_settings(epoch, epochs, cfg.progressive, cfg.model, cfg.data) -> StageSettings  (pure: the epoch decides)
    schedule = ProgressiveLearning(cfg, num_classes, pin_memory=...)
    loader = schedule.apply(epoch, loader, model, learner)   # before each epoch; acts only when the stage changes
    record.update(schedule.record())                         # the epoch's settings, for the history and TensorBoard

Epoch e (1-based) of E belongs to stage k = floor((e - 1) * M / E). Stage k of M (0-based) trains at
    min_size + (model.train_size - min_size) * (k + 1) / M   px, rounded to a multiple of 8
(main.py's rule: it never trains at min_size; the last stage trains at model.train_size itself) with each
regulariser at start + (end - start) * k / (M - 1) (np.linspace(start, end, M) in main.py; Algorithm 1's
interpolation), the end when M = 1. Evaluation stays at model.eval_size. Because the settings depend on the
epoch alone, a resumed run (at a stage's start, in its middle, or in the middle of an epoch) trains with
exactly the settings an uninterrupted run had; raising trainer.epochs on a resume stretches the stages.

Applying a stage, between epochs and only when it changes: the train transform gets the stage's size and
RandAugment magnitude and the train DataLoader is rebuilt (persistent workers hold the copy of the data set
they started with, so they would keep cropping at the old size: the old loader's workers are shut down
first); the classifier's dropout and the mixup alpha change. The sampler's order and augmentation still
depend on (seed, epoch) alone (`set_epoch` after `apply`). The decoded-image cache stores every image for the
final size (data.transforms.stored_size uses model.train_size), so each stage crops from the same pixels.

With the other features:
- torch.compile recompiles by itself on a new input shape and dropout probability: one recompile per stage,
  not per batch. `ProgressiveLearning` raises dynamo's recompile limit so that many stages cannot exhaust it
  (at the limit dynamo falls back to running the model uncompiled).
- CUDA graphs (train/cuda_graphs.py): a capture holds its input shape and the dropout probabilities, so a
  new stage captures once more by itself (the mixer runs outside the graph); never within a stage.
- DDP: every rank computes the same settings (a pure function of the epoch), rebuilds its own loader (its
  DistributedSampler gets `set_epoch` as now) and sets the dropout on the wrapped module (`ddp.module`).
"""

import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ..config import value
from ..data import make_loader
from ..data.loaders import shut_down_workers
from ..data.transforms import RANDAUG_BINS_PER_LEVEL, batch_mixer, train_transform
from ..errors import UserError

log = logging.getLogger("rethink")

# What a stage sets, logged per epoch as train/<name>
SCALARS = ("image_size", "dropout", "randaug_magnitude", "mixup_alpha")


@dataclass(frozen=True)
class StageSettings:
    stage: int  # 0-based
    image_size: int
    dropout: float
    randaug_magnitude: Optional[
        float
    ]  # the papers' scale, in torchvision's steps of 1/3; None unless data.augment=randaugment
    mixup_alpha: float


def enabled(progressive_cfg) -> bool:
    return value(progressive_cfg.name) != "none"


def stage_of(epoch: int, epochs: int, stages: int) -> int:
    """The 0-based stage of 1-based `epoch` when `epochs` are split into `stages` equal parts."""
    if not 1 <= epoch <= epochs:
        raise ValueError(f"epoch {epoch} is not in 1..{epochs}")
    return (epoch - 1) * stages // epochs


def stage_size(stage: int, stages: int, min_size: int, train_size: int) -> int:
    """min_size + (train_size - min_size) * (stage + 1) / stages, to the nearest multiple of 8 (halves
    up), never above train_size; the last stage is train_size itself."""
    if stage == stages - 1:
        return train_size
    exact = min_size + (train_size - min_size) * (stage + 1) / stages
    return max(8, min(train_size, 8 * math.floor(exact / 8 + 0.5)))


def linear(stage: int, stages: int, start: float, end: float) -> float:
    """start + (end - start) * stage / (stages - 1): start in the first stage, end in the last."""
    return end if stages == 1 else start + (end - start) * stage / (stages - 1)


def stage_settings(epoch: int, epochs: int, cfg, model_cfg, data_cfg) -> StageSettings:
    """What epoch `epoch` of `epochs` trains with under the progressive config `cfg`. A pure function."""
    k, stages = stage_of(epoch, epochs, cfg.stages), cfg.stages

    def scheduled(pair: Sequence[Optional[float]], own: float) -> float:
        start, end = (own if v is None else float(v) for v in pair)
        return linear(k, stages, start, end)

    magnitude = None
    if value(data_cfg.augment) == "randaugment":
        level = scheduled(cfg.randaug_magnitude, float(data_cfg.randaug_magnitude))
        magnitude = round(level * RANDAUG_BINS_PER_LEVEL) / RANDAUG_BINS_PER_LEVEL  # what RandAugment can apply
    return StageSettings(
        stage=k,
        image_size=stage_size(k, stages, cfg.min_size, model_cfg.train_size),
        dropout=scheduled(cfg.dropout, float(model_cfg.dropout)),
        randaug_magnitude=magnitude,
        mixup_alpha=scheduled(cfg.mixup_alpha, float(data_cfg.mixup_alpha)),
    )


def check(cfg: DictConfig) -> None:
    """The progressive keys against the rest of the run (single keys are checked by config.RANGES)."""
    p = cfg.progressive
    if p.min_size > cfg.model.train_size:
        raise UserError(
            f"progressive.min_size={p.min_size}: must be at most model.train_size={cfg.model.train_size}, where the last stage trains"
        )
    if p.stages > cfg.trainer.epochs:
        raise UserError(
            f"progressive.stages={p.stages}: needs trainer.epochs of at least {p.stages} (one epoch per stage or more; "
            f"trainer.epochs={cfg.trainer.epochs}), or fewer stages"
        )


def hparams(cfg: DictConfig) -> dict:
    """The schedule's spans for TensorBoard's HPARAMS table, first epoch to last (`40->64`; `none` without one);
    its keys (`progressive.name`, ...) are there under their own names."""
    p, on = cfg.progressive, enabled(cfg.progressive)
    first = stage_settings(1, cfg.trainer.epochs, p, cfg.model, cfg.data) if on else None
    last = stage_settings(cfg.trainer.epochs, cfg.trainer.epochs, p, cfg.model, cfg.data) if on else None

    def span(key: str) -> str:
        start, end = getattr(first, key, None), getattr(last, key, None)
        return f"{start:g}->{end:g}" if on and start is not None else "none"

    return {
        "progressive_sizes": span("image_size"),
        "progressive_dropout": span("dropout"),
        "progressive_randaug": span("randaug_magnitude"),
        "progressive_mixup": span("mixup_alpha"),
    }


def allow_recompiles(stages: int) -> None:
    """torch.compile compiles once more for each stage (a new input shape, a new dropout); keep dynamo's limit
    above that, so that a run with many stages does not fall back to running uncompiled."""
    config = torch._dynamo.config
    for name in (
        "recompile_limit",
        "cache_size_limit",
    ):  # the newer name first; which one reads depends on the torch build
        try:
            limit = getattr(config, name)
        except AttributeError:
            continue
        setattr(config, name, max(limit, 2 * stages + 8))
        return


class ProgressiveLearning:
    """Puts each epoch's StageSettings into effect between epochs; with progressive=none it does nothing."""

    def __init__(
        self,
        cfg: DictConfig,
        num_classes: int,
        *,
        pin_memory: bool = False,
        shard: tuple[int, int] = (0, 1),
        compiled: bool = False,
    ):
        self.cfg, self.num_classes, self.pin_memory, self.shard = cfg, num_classes, pin_memory, shard
        self.enabled = enabled(cfg.progressive)
        self.current: Optional[StageSettings] = None
        if self.enabled:
            check(cfg)
            if compiled:
                allow_recompiles(cfg.progressive.stages)

    def apply(self, epoch: int, loader: DataLoader, model, learner) -> DataLoader:
        """The train loader for `epoch`: `loader` itself within a stage (and always with progressive=none);
        at a new stage a new loader with the stage's transform (the old one's workers shut down), with the
        model's classifier dropout and the learner's mixer set for the stage."""
        if not self.enabled:
            return loader
        c = self.cfg
        settings = stage_settings(epoch, c.trainer.epochs, c.progressive, c.model, c.data)
        if settings == self.current:
            return loader
        model.set_dropout(settings.dropout)
        learner.mixer = batch_mixer(c.data, self.num_classes, mixup_alpha=settings.mixup_alpha)
        self.current = settings
        log.info(_stage_line(settings, c.progressive.stages, c.trainer.epochs))
        if hasattr(loader, "resized"):  # data.on_gpu: crops on the device at the stage's size (no RandAugment there)
            return loader.resized(settings.image_size)
        dataset = loader.dataset
        dataset.transform = train_transform(
            c.model, c.data, size=settings.image_size, randaug_magnitude=settings.randaug_magnitude
        )
        shut_down_workers(loader)
        return make_loader(dataset, c.data, train=True, seed=c.seed, pin_memory=self.pin_memory, shard=self.shard)

    def record(self) -> dict:
        """The settings of the epoch just trained, for its history record ({} with progressive=none)."""
        if self.current is None:
            return {}
        return {k: v for k, v in asdict(self.current).items() if v is not None}


def _stage_line(s: StageSettings, stages: int, epochs: int) -> str:
    first, last = -(-s.stage * epochs // stages) + 1, -(-(s.stage + 1) * epochs // stages)
    magnitude = f", RandAugment magnitude {s.randaug_magnitude:.3g}" if s.randaug_magnitude is not None else ""
    return (
        f"progressive learning: stage {s.stage + 1}/{stages} (epochs {first}-{last}): {s.image_size} px, "
        f"dropout {s.dropout:.3g}{magnitude}, mixup alpha {s.mixup_alpha:.3g}"
    )
