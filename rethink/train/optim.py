"""Optimizers (SGD, AdamW, TensorFlow's RMSProp) and learning-rate schedules as per-step factors."""

import math
from typing import Any, Mapping

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters in two groups: weights that decay, and BN/bias (1-d) parameters that
    don't unless `decay_norm_and_bias`."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim > 1 or decay_norm_and_bias else no_decay).append(p)
    return [
        g
        for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow implements it, which the EfficientNet papers trained with: the
    squared-gradient average starts at 1 (not 0), epsilon sits inside the square root, and momentum
    accumulates the lr-scaled update. Weight decay is L2 added to the gradient."""

    def __init__(self, params, lr=1e-3, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p)
                    if group["momentum"] > 0:
                        state["momentum_buffer"] = torch.zeros_like(p)
                square_avg = state["square_avg"]
                square_avg.mul_(group["alpha"]).addcmul_(grad, grad, value=1 - group["alpha"])
                denom = square_avg.add(group["eps"]).sqrt_()
                if group["momentum"] > 0:
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).addcdiv_(grad, denom, value=group["lr"])
                    p.sub_(buf)
                else:
                    p.addcdiv_(grad, denom, value=-group["lr"])
        return loss


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    name = cfg["name"]
    groups = param_groups(model, cfg["weight_decay"], cfg["decay_norm_and_bias"])
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=cfg["lr"], momentum=cfg["momentum"], nesterov=cfg["nesterov"])
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg["lr"], betas=tuple(cfg["betas"]), eps=cfg["eps"])
    if name == "rmsprop_tf":
        return RMSpropTF(groups, lr=cfg["lr"], alpha=cfg["alpha"], eps=cfg["eps"], momentum=cfg["momentum"])
    raise ValueError(f"optimizer.name: unknown optimizer '{name}'")


def lr_factor(step: int, steps_per_epoch: int, epochs: int, cfg: Mapping[str, Any]) -> float:
    """The learning rate at optimizer step `step` (0-based), as a fraction of optimizer.lr.

    Every schedule starts with an optional linear warmup from `warmup_start_ratio`; then
    cosine: per step, from 1 down to `min_lr_ratio` at the end of training;
    study_cosine: per epoch e, ((1 + cos(pi * e / E)) / 2) * (1 - min_lr_ratio) + min_lr_ratio;
    step: decay_rate ** floor(epoch / decay_epochs), the epoch counted fractionally;
    constant: 1.
    """
    name = cfg["name"]
    total = max(1, steps_per_epoch * epochs)
    warmup = min(int(round(cfg["warmup_epochs"] * steps_per_epoch)), total - 1)
    if step < warmup:
        start = cfg["warmup_start_ratio"]
        return start + (1.0 - start) * step / warmup
    if name == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return cfg["min_lr_ratio"] + (1 - cfg["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    if name == "study_cosine":
        epoch = step // steps_per_epoch
        return ((1 + math.cos(math.pi * epoch / epochs)) / 2) * (1 - cfg["min_lr_ratio"]) + cfg["min_lr_ratio"]
    if name == "step":
        return cfg["decay_rate"] ** math.floor((step - warmup) / steps_per_epoch / cfg["decay_epochs"])
    if name == "constant":
        return 1.0
    raise ValueError(f"scheduler.name: unknown schedule '{name}'")


def build_scheduler(optimizer, steps_per_epoch: int, epochs: int, cfg: Mapping[str, Any]):
    """A LambdaLR stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, epochs, cfg))
