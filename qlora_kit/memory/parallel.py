"""Per-process memory of a torchrun run: ``qlora-kit plan --gpus N --parallel ddp|fsdp [--fsdp-cpu-offload]``.

``plan_parallel(plan, gpus, parallel, cpu_offload)`` turns a one-process plan (its micro-batch is each
process's) into the plan of one of ``gpus`` processes:

    ddp   every process holds the whole 4-bit base, adapters and optimizer states, plus DDP's gradient
          buckets (a flat copy of the adapters' gradients that it all-reduces)
    fsdp  the 4-bit base, adapters, gradients and optimizer states are 1/N each (``fully_shard``); on top,
          the all-gathered tensors: the root group (embeddings, lm_head, final norm) stays whole for the step
          beside its shard (FSDP2 does not reshard the root after forward), and two decoder layers are whole
          at a time (the one computing and the next, prefetched)
    + cpu offload: the shards, gradients and optimizer states live in host memory (FSDP2's
          ``CPUOffloadPolicy``; the optimizer steps on the CPU); the device holds what is all-gathered

Under fsdp ``train.optimizer=auto`` is torch's AdamW (it steps the DTensor shards), so ``plan`` plans that.

Activations, the loss and the runtime are each process's own and stay as planned.
"""

from __future__ import annotations

import dataclasses
import math

from qlora_kit.facts import MB
from qlora_kit.memory.plan import MemoryPlan, Row

NF4_ROWS = ("NF4 codes", "NF4 absmax", "NF4 nested stats")
SHARDED_ADAPTER_ROWS = ("LoRA parameters", "LoRA gradients")  # + the optimizer's rows
PREFETCHED_LAYERS = 2  # whole decoder layers on the device at a time under fsdp: the current and the next


def plan_parallel(plan: MemoryPlan, gpus: int, parallel: str, cpu_offload: bool = False) -> MemoryPlan:
    """The plan of one of ``gpus`` processes (``parallel``: ddp | fsdp; ``cpu_offload``: fsdp only)."""
    if gpus <= 1:
        return plan
    rows = _ddp_rows(plan) if parallel == "ddp" else _fsdp_rows(plan, gpus, cpu_offload)
    settings = {**plan.settings, "gpus": gpus, "parallel": parallel, "fsdp_cpu_offload": cpu_offload}
    pageable = 0 if cpu_offload else (plan.pageable_bytes if parallel == "ddp" else plan.pageable_bytes // gpus)
    ours = dataclasses.replace(plan, settings=settings, rows=rows, pageable_bytes=pageable, suggestions=[])
    # the step's phases (profile's planned column) move by what this process holds more or less; "load" stays
    # the one-process figure (each process loads, then shards or wraps: its peak is at most that)
    delta = ours.tensor_bytes - plan.tensor_bytes
    ours.phases = {name: b if name == "load" else b + delta for name, b in plan.phases.items()}
    return ours


def _bytes(plan: MemoryPlan, item: str) -> int:
    return sum(row.bytes for row in plan.rows if row.item == item)


def _ddp_rows(plan: MemoryPlan) -> list[Row]:
    """The whole plan, plus the gradient buckets DDP all-reduces (``gradient_as_bucket_view`` is off)."""
    grads = Row(
        "adapters",
        "DDP gradient buckets",
        _full_gradient_bytes(plan),
        "DDP copies the adapters' gradients into flat buckets to all-reduce them: one more copy of them",
    )
    rows = list(plan.rows)
    at = next(i for i, row in enumerate(rows) if row.item == "LoRA gradients") + 1
    return [*rows[:at], grads, *rows[at:]]


def _full_gradient_bytes(plan: MemoryPlan) -> int:
    """One gradient per adapter parameter, in the adapters' dtype: the size of the LoRA parameters row."""
    return _bytes(plan, "LoRA parameters")


def _fsdp_rows(plan: MemoryPlan, gpus: int, cpu_offload: bool) -> list[Row]:
    where = "in host memory (fsdp cpu offload), not on the device" if cpu_offload else "on the device"
    rows = []
    for row in plan.rows:
        sharded = row.item in NF4_ROWS or row.item in SHARDED_ADAPTER_ROWS or row.category == "optimizer"
        if sharded:
            shard = math.ceil(row.bytes / gpus)
            note = f"1/{gpus} of {row.bytes / MB:,.1f} MB (fully_shard) {where}"
            rows.append(Row(row.category, row.item, 0 if cpu_offload else shard, f"{note}; {row.note}"))
        elif row.item == "non-quantized weights":  # gathered for the whole step, beside its own shard
            shard = 0 if cpu_offload else math.ceil(row.bytes / gpus)
            note = f"the root group, all-gathered for the whole step, + its 1/{gpus} shard {where}; {row.note}"
            rows.append(Row(row.category, row.item, row.bytes + shard, note))
        else:
            rows.append(row)
    layers = plan.model.layers
    per_layer = (sum(_bytes(plan, item) for item in NF4_ROWS) + _bytes(plan, "LoRA parameters")) / layers
    note = (
        f"{PREFETCHED_LAYERS} decoder layers all-gathered at a time (the one computing, the next prefetched): "
        f"NF4 storage and adapters, {per_layer / MB:,.1f} MB each"
    )
    at = next(i for i, row in enumerate(rows) if row.item == "non-quantized weights") + 1
    return [*rows[:at], Row("weights", "all-gathered layers", int(PREFETCHED_LAYERS * per_layer), note), *rows[at:]]
