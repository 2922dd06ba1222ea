"""Optimizer and learning-rate schedule of a run.

make_optimizer(name, param_groups, train_cfg, device)   torch AdamW or bitsandbytes' (paged) AdamW
make_scheduler(optimizer, train_cfg, total_steps)       linear warmup, then constant / cosine / linear
total_steps(train_cfg, batches_per_epoch)               optimizer steps the run takes
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from qlora_kit.config import TrainConfig
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import auto_optimizer


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """``name`` (``auto`` resolved by ``facts.auto_optimizer``) over ``params`` with the run's lr, betas, decay."""
    if name == "auto":
        name = auto_optimizer(device.type)
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    if name.startswith("paged") and device.type != "cuda":
        raise QloraKitError(
            f"train.optimizer={name} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; "
            "on CPU use train.optimizer=adamw (or adamw_8bit)"
        )
    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    return classes[name](params, **kwargs)


def total_steps(cfg: TrainConfig, batches_per_epoch: int) -> int:
    """``max_steps`` when set, else ``num_epochs`` worth of optimizer steps (at least one)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / cfg.gradient_accumulation_steps))


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warmup, then constant / cosine / linear decay to 0."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule over ``steps`` optimizer steps; warmup_steps > 0 overrides warmup_ratio."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup, steps))
