"""The state of a run, as plain dataclasses: what ``train.py``'s functions take and return.

RunInputs     what a run needs before its weights are loaded (``train.prepare``)
TrainState    what one optimizer step acts on (``train.train_step``): model, params, optimizer, schedule
Run           both, plus the metrics log: a run ready to fit (``train.setup``)
StepStats     what one step did; TrainResult: what a run did
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.checkpoint import Checkpoint
from qlora_kit.config import RunConfig
from qlora_kit.data import BatchPlan, PreparedData
from qlora_kit.distributed import World
from qlora_kit.lora import LoRAReport
from qlora_kit.runlog import RunLog


@dataclass(kw_only=True)
class RunInputs:
    """What a run needs before its weights are loaded."""

    cfg: RunConfig
    out: Path
    device: torch.device
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    tokenizer: Any
    data: PreparedData
    batches: BatchPlan
    total_steps: int
    resume_from: Checkpoint | None
    started: float = field(default_factory=time.perf_counter)  # for the run's wall time
    world: World = field(default_factory=World)  # torchrun's processes (one: World())

    @property
    def complete(self) -> bool:
        """An earlier run in ``out`` already took every step and saved its adapter."""
        done = self.resume_from is not None and self.resume_from.step >= self.total_steps
        return done and (self.out / "adapter").is_dir()


@dataclass(kw_only=True)
class TrainState:
    """What ``train_step`` acts on: the model, its trainable parameters, optimizer and schedule, the step."""

    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None  # None: the optimizer's lr throughout
    max_grad_norm: float = 0.0  # 0: no clipping
    grad_scaler: torch.amp.GradScaler | None = None  # dynamic loss scaling, for fp16 compute
    step: int = 0
    world: World = field(default_factory=World)  # the step's collectives and DDP/FSDP wrapper (one process: none)


@dataclass(kw_only=True)
class Run(RunInputs, TrainState):
    """A run ready to fit: its inputs and its training state, plus its metrics log."""

    lora_report: LoRAReport
    log: RunLog
    optimizer_name: str  # resolved ("auto" -> what this machine uses), saved with the optimizer's state
    eval_loss_start: float | None = None
    nf4_held: list[int] | None = None  # under fsdp: the NF4 bytes each process holds (its shards)


@dataclass
class StepStats:
    loss: float  # mean loss per labelled token of the step
    label_tokens: int
    tokens: int  # input positions processed, padding included
    grad_norm: float | None  # before clipping; None when clipping is off
    lr: float  # the learning rate the step used


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    status: str  # "completed" | "interrupted"
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    train_losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0
