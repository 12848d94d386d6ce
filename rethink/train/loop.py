"""The training step, one epoch of training, and evaluation."""

import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from ..config import plain
from ..data.transforms import batch_mixer, normalize
from .metrics import confusion_matrix
from .optim import build_optimizer, build_scheduler
from .runtime import Precision


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    """Evaluation stopped early because a stop was requested."""


@dataclass
class Inputs:
    """Turns a loader's uint8 batch into the model's input: on the device, normalised, in the
    model's memory format."""

    device: torch.device
    mean: tuple
    std: tuple
    channels_last: bool

    def __post_init__(self):  # on the device once, not at every step
        self.mean = torch.as_tensor(self.mean, dtype=torch.float32, device=self.device)
        self.std = torch.as_tensor(self.std, dtype=torch.float32, device=self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.layout(normalize(images.to(self.device, non_blocking=True), self.mean, self.std))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the model's memory format."""
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


@dataclass
class Learner:
    """Everything a training step needs. `step` trains on one loader batch. With `grad_accumulation`
    N > 1 that batch is a micro-batch: N of them add up their gradients (each loss divided by N, so the
    sum is the gradient of their mean loss) and every N-th call steps the optimizer, the schedule and
    the EMA. BatchNorm sees each micro-batch on its own (its statistics are per micro-batch)."""

    model: nn.Module  # the module that runs forward: the model itself, or its torch.compile / DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    inputs: Inputs
    precision: Precision
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Optional[torch.optim.swa_utils.AveragedModel] = None
    mixer: Optional[Callable] = None  # mixup / cutmix on the device
    label_smoothing: float = 0.0
    grad_clip: Optional[float] = None
    grad_accumulation: int = 1
    pending: int = field(default=0, init=False)  # micro-batches whose gradients wait for the optimizer step
    scale: Optional[float] = field(default=None, init=False)  # the gradient scaler's scale after the last step

    @property
    def between_steps(self) -> bool:
        """No micro-batch is waiting for its optimizer step: a stop or a checkpoint here loses nothing."""
        return self.pending == 0

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward on one batch, then the optimizer step once `grad_accumulation` batches
        have added their gradients. Returns the batch's loss and its number of correct top-1
        predictions, both still on the device (reading them would synchronise)."""
        loss, correct = self.forward_backward(images, labels)
        if self.pending == self.grad_accumulation:
            self.optimizer_step()
        return loss, correct

    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add one batch's gradients (of its loss / grad_accumulation) to those waiting."""
        if self.pending == 0:
            self.optimizer.zero_grad(set_to_none=True)
        self.pending += 1
        x = self.inputs(images)
        labels = labels.to(x.device, non_blocking=True)
        targets = labels
        if self.mixer is not None:
            x, targets = self.mixer(x, labels)
            x = self.inputs.layout(x)  # MixUp's roll comes back contiguous on CUDA
        last = self.pending == self.grad_accumulation
        # under DDP the gradients are averaged across processes once per optimizer step, not per micro-batch
        with nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            with self.precision.autocast():
                logits = self.model(x)
            loss = F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)
            share = loss / self.grad_accumulation if self.grad_accumulation > 1 else loss
            (self.scaler.scale(share) if self.scaler is not None else share).backward()
        correct = (logits.detach().argmax(1) == labels).sum()
        return loss.detach(), correct

    def optimizer_step(self) -> None:
        """Step the optimizer on the gradients gathered since the last step (clipped to `grad_clip`
        first), then the schedule and the EMA; a step the fp16 gradient scaler skips (an overflow)
        leaves the weights, the schedule and the EMA as they were."""
        stepped = True
        if self.scaler is not None:
            if self.grad_clip:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            scale = self.scale if self.scale is not None else self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scale = self.scaler.get_scale()  # (reading it synchronises: once a step, kept for the next)
            stepped = self.scale >= scale  # the scaler lowers its scale exactly when it skipped the step
        else:
            if self.grad_clip:
                nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
        self.pending = 0
        if stepped:
            self.scheduler.step()
            if self.ema is not None:
                self.ema.update_parameters(self.model)

    def drop_pending(self) -> None:
        """Forget the gradients of micro-batches no optimizer step has used (an incomplete last group)."""
        if self.pending:
            self.optimizer.zero_grad(set_to_none=True)
            self.pending = 0


@dataclass
class Network:
    """A model as a run uses it: the module itself (what checkpoints save), what evaluates it (itself, or
    torch.compile's), what trains it (that, wrapped by DDP, replayed by CUDA graphs: train/fast_paths.py), and
    the step that turns a loader batch into its input."""

    model: nn.Module
    forward: nn.Module
    trained: nn.Module
    inputs: Inputs


def build_learner(cfg, network: Network, precision: Precision, steps_per_epoch: int, num_classes: int) -> Learner:
    """The Learner `cfg` describes for `network` (fit and the benchmark both use it): its optimizer, a schedule
    over `steps_per_epoch` loader batches an epoch, the gradient scaler fp16 needs, the EMA, mixup / cutmix."""
    t = cfg.trainer
    optimizer = build_optimizer(network.model, plain(cfg.optimizer))
    scheduler = build_scheduler(
        optimizer, steps_per_epoch // t.grad_accumulation, t.epochs, plain(cfg.scheduler)
    )  # per optimizer step
    scaler = torch.amp.GradScaler(network.inputs.device.type) if precision.needs_scaler else None
    ema = (
        AveragedModel(network.model, multi_avg_fn=get_ema_multi_avg_fn(t.ema_decay), use_buffers=True)
        if t.ema
        else None
    )
    return Learner(
        network.trained,
        optimizer,
        scheduler,
        network.inputs,
        precision,
        scaler,
        ema,
        batch_mixer(cfg.data, num_classes),
        t.label_smoothing,
        t.grad_clip,
        grad_accumulation=t.grad_accumulation,
    )


@dataclass
class EpochTotals:
    """Running sums of one training epoch; kept in an interrupt checkpoint so a resumed epoch
    reports over all of its batches."""

    loss_sum: float = 0.0
    correct: int = 0
    images: int = 0
    batches: int = 0
    seconds: float = 0.0
    lr: Optional[float] = None  # the learning rate of the epoch's first step
    interrupted: bool = False

    @property
    def loss(self) -> float:
        return self.loss_sum / max(1, self.images)

    @property
    def acc(self) -> float:
        return self.correct / max(1, self.images)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def train_epoch(
    learner: Learner,
    batches: Iterable,
    num_batches: int,
    totals: EpochTotals,
    *,
    log_every: int = 20,
    progress: bool = False,
    description: str = "",
    should_stop: Callable[[], bool] = lambda: False,
) -> EpochTotals:
    """Train on `batches`, the rest of an epoch of `num_batches` batches, adding to `totals`.
    Returns early, with `interrupted` set, when `should_stop()` turns true between optimizer steps.
    Raises NonFiniteLoss when the loss stops being finite (with a gradient scaler: for a whole
    window of steps, since fp16 overflows are skipped by the scaler and are not divergence)."""
    learner.model.train()
    totals.interrupted = False
    device = learner.inputs.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    nonfinite = torch.zeros((), device=device, dtype=torch.int64)
    images, window_start, start = 0, totals.batches, time.perf_counter()
    bar = tqdm(
        total=num_batches,
        initial=totals.batches,
        desc=description,
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
        file=sys.stdout,
    )
    try:
        for images_u8, labels in batches:
            if learner.between_steps and should_stop():  # with gradient accumulation: between optimizer steps
                totals.interrupted = True
                break
            if totals.lr is None:
                totals.lr = learner.optimizer.param_groups[0]["lr"]
            loss, hits = learner.step(images_u8, labels)
            n = labels.shape[0]
            finite = torch.isfinite(loss)
            loss_sum += torch.where(finite, loss, 0.0).double() * n
            nonfinite += (~finite).long()
            correct += hits
            images += n
            totals.batches += 1
            bar.update()
            if totals.batches % log_every == 0 or totals.batches == num_batches:
                _check_finite(nonfinite, totals.batches - window_start, learner.scaler is not None, totals.batches)
                nonfinite.zero_()
                window_start = totals.batches
                elapsed = totals.seconds + time.perf_counter() - start
                seen = totals.images + images
                bar.set_postfix(
                    loss=f"{(totals.loss_sum + loss_sum.item()) / seen:.4f}",
                    acc=f"{(totals.correct + correct.item()) / seen:.3f}",
                    img_s=f"{seen / elapsed:.0f}",
                )
        _check_finite(nonfinite, totals.batches - window_start, learner.scaler is not None, totals.batches)
        learner.drop_pending()  # batches that ran out before a whole group of grad_accumulation (fit never gives such)
    finally:
        bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    totals.seconds += time.perf_counter() - start
    totals.loss_sum += loss_sum.item()
    totals.correct += int(correct.item())
    totals.images += images
    return totals


def _length(batches: Iterable) -> Optional[int]:
    try:
        return len(batches)
    except TypeError:
        return None


def _check_finite(nonfinite: torch.Tensor, window: int, scaled: bool, batch: int) -> None:
    count = int(nonfinite.item())
    if count and (not scaled or count >= window):
        raise NonFiniteLoss(f"the training loss became non-finite (nan or inf) at batch {batch} of the epoch")


@dataclass
class Evaluation:
    loss: float
    acc: float
    images: int
    confusion: torch.Tensor  # counts[true, predicted]
    labels: Optional[torch.Tensor] = None  # per image, in the order scored (the loader's): the true class
    predicted: Optional[torch.Tensor] = None  # and the predicted one


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable,
    inputs: Inputs,
    precision: Precision,
    num_classes: int,
    *,
    progress: bool = False,
    description: str = "",
    should_stop: Callable[[], bool] = lambda: False,
) -> Evaluation:
    """Loss (plain cross entropy, no smoothing), top-1 accuracy, the confusion matrix and each image's true and
    predicted class over all of `batches`. Raises Interrupted when `should_stop()` turns true between batches."""
    model.eval()
    loss_sum = torch.zeros((), device=inputs.device, dtype=torch.float64)
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=inputs.device)
    all_labels, all_predicted = [], []
    with tqdm(
        total=_length(batches), desc=description, disable=not progress, leave=False, dynamic_ncols=True, file=sys.stdout
    ) as bar:
        for images_u8, labels in batches:
            if should_stop():
                raise Interrupted
            x = inputs(images_u8)
            labels = labels.to(x.device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
            loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            predicted = logits.argmax(1)
            confusion += confusion_matrix(predicted, labels, num_classes)
            all_labels.append(labels)
            all_predicted.append(predicted)
            bar.update()
    confusion = confusion.cpu()
    images = int(confusion.sum())
    return Evaluation(
        loss=loss_sum.item() / max(1, images),
        acc=confusion.diag().sum().item() / max(1, images),
        images=images,
        confusion=confusion,
        labels=_joined(all_labels),
        predicted=_joined(all_predicted),
    )


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts).cpu() if parts else torch.zeros(0, dtype=torch.int64)
