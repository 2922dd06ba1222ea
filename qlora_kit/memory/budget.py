"""A recipe's memory: the plan of its largest micro-batch, and the ``model.max_memory_gb`` check that refuses a
run which cannot fit, before anything is loaded (``train.setup`` calls it).
"""

from __future__ import annotations

import logging

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import GiB
from qlora_kit.memory.plan import MemoryPlan, plan_memory
from qlora_kit.memory.shapes import checkpoint_shape

logger = logging.getLogger(__name__)


def largest_micro_batch(cfg, data) -> tuple[int, int, int]:
    """(rows, width, labelled positions) that bound every training micro-batch of the run.

    ``train.micro_batch_size`` rows (fewer when there are fewer examples) as wide as the longest example,
    or as the packing block (``data.cutoff_len``); the labelled positions are those of the examples with
    the most labels, at most ``rows x (width - 1)`` (the loss predicts each token from the one before).
    """
    from qlora_kit.data import trainable_tokens

    rows = min(cfg.train.micro_batch_size, len(data.train))
    width = cfg.data.cutoff_len if cfg.data.packing else data.stats.max_length
    labelled = rows * (width - 1)
    if not cfg.data.packing:  # one example per row
        labelled = min(labelled, sum(sorted((trainable_tokens(e) for e in data.train), reverse=True)[:rows]))
    return rows, width, labelled


def recipe_knobs(cfg, device, dtype, adapter_dtype) -> dict:
    """The planner's settings for a recipe as it runs on ``device`` (all but the batch's shape)."""
    from qlora_kit.loading import dtype_name

    knobs = dict(rank=cfg.lora.r, targets=cfg.lora.targets, optimizer=cfg.train.optimizer, device=device.type)
    knobs |= dict(checkpointing=cfg.model.gradient_checkpointing, lora_dropout=cfg.lora.dropout)
    knobs |= dict(compute_dtype=dtype_name(dtype), adapter_dtype=dtype_name(adapter_dtype))
    knobs |= dict(grad_accumulation=cfg.train.gradient_accumulation_steps, master_weights=cfg.train.fp32_master_weights)
    knobs |= dict(variant=cfg.lora.variant, init=cfg.lora.init)
    knobs |= dict(trainable_tokens=len(cfg.lora.trainable_tokens), modules_to_save=list(cfg.lora.modules_to_save))
    knobs |= dict(base_adapter_params=base_adapter_params(cfg.lora.base_adapters))
    resident = cfg.model.resident_layers
    knobs |= dict(offload_weights=cfg.model.offload_weights, offload_activations=cfg.train.offload_activations)
    return knobs | dict(resident_layers=resident if isinstance(resident, int) else None)


def base_adapter_params(directories: list[str]) -> int:
    """The frozen A/B values of ``lora.base_adapters`` (their files' own tensors), 0 for none."""
    if not directories:
        return 0
    from qlora_kit.adapters import read_stack

    return sum(t.numel() for adapter in read_stack(directories) for t in adapter.state.values())


def plan_run(cfg, data, gpu_bytes: int | None = None) -> MemoryPlan:
    """The plan of a recipe's largest micro-batch, from the checkpoint's ``config.json`` alone."""
    from qlora_kit.train import resolve_run_dtypes

    rows, width, labelled = largest_micro_batch(cfg, data)
    knobs = recipe_knobs(cfg, *resolve_run_dtypes(cfg))
    # padded: batches of several rows are padded to the longest (by plan_memory's default); packed rows hold
    # several examples, which transformers separates with a 4-D mask as it does padding
    knobs |= dict(padded=True if cfg.data.packing else None)
    shape = checkpoint_shape(cfg.model.name_or_path)
    return plan_memory(shape, seq_len=width, batch_size=rows, label_tokens=labelled, **knobs, gpu_bytes=gpu_bytes)


def check_budget(cfg, data) -> MemoryPlan | None:
    """Refuse a run whose planned peak exceeds ``model.max_memory_gb`` (GiB), before anything is loaded.

    The error holds the plan's table, its verdict and the changes that fit, as ``qlora-kit train``
    overrides. Nothing is checked (None) without a budget.
    """
    from qlora_kit.train import resolve_run_dtypes

    budget = cfg.model.max_memory_gb
    if budget is None:
        return None
    resolve_run_dtypes(cfg)  # its errors (device=cuda without a GPU) are the recipe's, not the planner's
    try:
        plan = plan_run(cfg, data, gpu_bytes=int(budget * GiB))
    except QloraKitError as e:
        raise QloraKitError(
            f"model.max_memory_gb = {budget:g}: the memory planner cannot plan this run ({e}); "
            "set model.max_memory_gb=null to train without the check"
        ) from None
    s = plan.settings
    batch = f"{s['batch_size']} x {s['seq_len']} tokens, {s['label_tokens']:,} labelled"
    if plan.fits:
        logger.info(
            "memory plan: %.2f GiB of the %g GiB budget (largest micro-batch %s)", plan.total / GiB, budget, batch
        )
        return plan
    raise QloraKitError(
        f"model.max_memory_gb = {budget:g} GiB: this run does not fit; nothing was loaded or written. The plan of "
        f"its largest micro-batch ({batch}):\n{plan.table(recipe=True)}\n"
        "Apply a change with its override [in brackets], or raise model.max_memory_gb (null: no check)."
    )
