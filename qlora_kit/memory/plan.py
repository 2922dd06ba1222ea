"""The plan: peak memory of one training step by category (``plan_memory``), the largest batch or sequence
that fits (``max_fitting``), and the plan of a recipe's run with its budget check (``check_budget``,
``model.max_memory_gb``, called by ``train`` before anything is loaded).

Weights are counted exactly (the shapes of the tensors ``NF4Linear`` stores, ``facts.nf4_bytes``); the
activations come from ``memory.activations``. Rendering (``memory.render``) and the suggestions of a plan
that does not fit (``memory.advice``) live beside it; ``MemoryPlan``'s methods of that kind delegate there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import (
    DTYPE_BYTES,
    DTYPE_NAMES,
    MASTER_STEP_NUMEL,
    MB,
    OPTIMIZERS,
    PCIE_GBPS,
    TFLOPS,
    auto_compute_dtype,
    auto_optimizer,
    nf4_bytes,
    resolve_adapter_dtype,
)
from qlora_kit.memory import offload as offloading
from qlora_kit.memory.activations import (
    ACTIVATION_COEFFS,
    Moment,
    _optimizer_temporaries,
    activation_knobs,
    checkpointed_mask_bytes,
    is_padded,
    layer_activation_bytes,
    step_moments,
)
from qlora_kit.memory.cuda import CUBLAS_WORKSPACE_OLDER, PAGED_MIN_NUMEL, cublas_workspace_size, paged_bytes
from qlora_kit.memory.extras import LOADED_EXTRAS, extra_rows
from qlora_kit.memory.shapes import ModelShape, target_linears
from qlora_kit.memory.variants import (
    VARIANT_PARAMS,
    adapter_param_count,
    adapter_tensor_numels,
    check_variant,
    variant_rows,
)

logger = logging.getLogger(__name__)

FIXED = ("LoRA parameters", "cuBLAS workspaces", "CUDA context", "process runtime", *LOADED_EXTRAS)  # rows outside
# weights/optimizer that no batch, sequence or checkpointing knob changes (MemoryPlan.fixed_bytes)
VARIED = {"batch_size": "batch", "seq_len": "seq"}  # the knobs max_fitting searches, and their names there
VARY_KEYS = {name: key for key, name in VARIED.items()}  # max_fitting's vary= -> the knob


@dataclass
class Row:
    category: str
    item: str
    bytes: int
    note: str


@dataclass
class Suggestion:
    change: str
    knob: dict  # what it changes, e.g. {"checkpointing": True}: plan_memory(**settings, **knob) replans it
    total: int  # the plan's total with this one change
    saves: int
    fits: bool


@dataclass
class MemoryPlan:
    model: ModelShape
    settings: dict  # the resolved knobs: plan_memory(model, **settings) gives this plan again
    rows: list[Row]
    gpu_bytes: int | None = None
    pageable_bytes: int = 0  # what a paged optimizer may move to host RAM under pressure
    suggestions: list[Suggestion] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)  # planned peak tensor bytes by phase (see phase_bytes)
    peak_moment: str = ""
    offload: dict = field(default_factory=dict)  # host RAM, bytes moved, step time (memory.offload.offload_summary)

    @property
    def total(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def tensor_bytes(self) -> int:
        """The peak of allocated tensors: what ``torch.cuda.max_memory_allocated`` (or, on CPU, the
        profiler's count of live tensor bytes) measures; the total less the runtime rows and less the paged
        optimizer states, which bitsandbytes keeps in CUDA managed memory, outside torch's allocator."""
        return sum(row.bytes for row in self.rows if row.category != "runtime") - self.pageable_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes

    @property
    def weight_bytes(self) -> int:
        """The 4-bit linears and the weights kept in the compute dtype (embeddings, lm_head, norms)."""
        return sum(row.bytes for row in self.rows if row.category == "weights")

    @property
    def fixed_bytes(self) -> int:
        """What no batch, sequence or checkpointing setting changes: weights, LoRA parameters, optimizer
        states and the CUDA context / process runtime."""
        return sum(row.bytes for row in self.rows if row.category in ("weights", "optimizer") or row.item in FIXED)

    # Text and JSON: the functions of memory.render and memory.advice (imported here, when called, because
    # both modules build on this one).

    def title(self) -> str:
        from qlora_kit.memory.render import plan_title

        return plan_title(self)

    def verdict(self) -> str:
        from qlora_kit.memory.render import plan_verdict

        return plan_verdict(self)

    def limits(self) -> str:
        from qlora_kit.memory.advice import limits

        return limits(self)

    def advice(self, recipe: bool = False) -> list[str]:
        from qlora_kit.memory.advice import advice_lines

        return advice_lines(self, recipe)

    def table(self, recipe: bool = False) -> str:
        from qlora_kit.memory.render import plan_table

        return plan_table(self, recipe)

    def to_markdown(self) -> str:
        from qlora_kit.memory.render import plan_markdown

        return plan_markdown(self)

    def to_json(self) -> str:
        from qlora_kit.memory.render import plan_to_json

        return plan_to_json(self)

    @classmethod
    def from_json(cls, text: str) -> MemoryPlan:
        from qlora_kit.memory.render import plan_from_json

        return plan_from_json(text)


# --- adapters and optimizer states ---------------------------------------------------------------------------


def lora_param_count(shape: ModelShape, rank: int, targets: str | list[str] | tuple[str, ...]) -> int:
    """A: r x in plus B: out x r for every target linear in every layer."""
    names = target_linears(targets)
    return shape.layers * sum(rank * (o + i) for name, (o, i) in shape.linears().items() if name in names)


def _optimizer_bytes(
    shape: ModelShape, rank: int, targets: tuple[str, ...], optimizer: str, a: int, variant: str = "lora"
) -> int:
    total = 0
    for numel in adapter_tensor_numels(shape, rank, targets, variant):  # A, B (DoRA: + m; VeRA: lambda_d, lambda_b)
        total += state_bytes(numel, optimizer, a)
    return total * shape.layers


def state_bytes(numel: int, optimizer: str, a: int) -> int:
    """The optimizer's states of one tensor of ``numel`` values (``a``: bytes per value of torch AdamW's)."""
    if optimizer == "adamw":  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
        return 2 * a * numel
    if optimizer.endswith("8bit") and numel >= 4096:  # bnb keeps tensors < 4096 values in 32 bit
        return 2 * numel + 2 * 4 * math.ceil(numel / 256)  # 2 uint8 states + fp32 absmax per 256
    return 8 * numel  # 2 fp32 states


# --- the plan ------------------------------------------------------------------------------------------------


def _resolved(settings: dict) -> dict:
    """The knobs with "auto" resolved by the training run's own rules (facts), checked."""
    device = "cuda" if settings["device"].startswith("cuda") else settings["device"]
    compute = settings["compute_dtype"]
    compute = auto_compute_dtype(device) if compute == "auto" else compute
    optimizer = auto_optimizer(device) if settings["optimizer"] == "auto" else settings["optimizer"]
    settings |= dict(device=device, compute_dtype=compute, optimizer=optimizer)
    settings["adapter_dtype"] = resolve_adapter_dtype(settings["adapter_dtype"], compute)
    for key, allowed in [
        ("device", ("cuda", "cpu")),
        ("compute_dtype", DTYPE_NAMES),
        ("adapter_dtype", DTYPE_NAMES),
        ("optimizer", OPTIMIZERS),
    ]:
        if settings[key] not in allowed:
            raise QloraKitError(f"{key} {settings[key]!r} is not one of: {', '.join(allowed)}")
    seq_len, batch_size, rank = settings["seq_len"], settings["batch_size"], settings["rank"]
    if min(seq_len, batch_size, rank) < 1:
        raise QloraKitError(f"seq_len, batch_size, rank must be >= 1 (got {seq_len}, {batch_size}, {rank})")
    target_linears(settings["targets"])  # refuses what the planner cannot shape
    if not isinstance(settings["targets"], str):
        settings["targets"] = list(settings["targets"])
    problem = check_variant(settings.get("variant", "lora"), settings.get("init", "default"))
    if problem:
        raise QloraKitError(problem)
    if settings["padded"] not in (None, True, False):
        raise QloraKitError(f"padded must be true, false or null (by batch size), not {settings['padded']!r}")
    _check_offload(settings)
    workspace = settings["cublas_workspace_bytes"]
    if device == "cuda" and workspace is None:  # torch reads the same variable when it makes a workspace
        settings["cublas_workspace_bytes"] = cublas_workspace_size(os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    elif workspace is not None and (not isinstance(workspace, int) or workspace < 0):
        raise QloraKitError(f"cublas_workspace_bytes must be a byte count >= 0, not {workspace!r}")
    return settings


def _check_offload(settings: dict) -> None:
    """The offload knobs: a resident layer count >= 0 (None: auto), a copy rate and a compute rate > 0."""
    resident = settings["resident_layers"]
    if resident is not None and (not isinstance(resident, int) or isinstance(resident, bool) or resident < 0):
        raise QloraKitError(f"resident_layers must be a number of layers >= 0 or auto, not {resident!r}")
    for key in ("pcie_gbps", "tflops"):
        if not (isinstance(settings[key], int | float) and 0 < settings[key] < math.inf):
            raise QloraKitError(f"{key} must be a number > 0, not {settings[key]!r}")
    if settings["offload_activations"] and not settings["checkpointing"]:
        raise QloraKitError("activation offload moves the checkpointed layer inputs: it needs checkpointing on")


def _weight_rows(shape: ModelShape, compute_dtype: str, layers_on_device: int | None = None) -> list[Row]:
    """Every decoder linear in NF4 (the tensors NF4Linear stores), the rest in the compute dtype; with weight
    streaming, only ``layers_on_device`` layers' NF4 tensors are on the device."""
    L, nf4 = shape.layers, [nf4_bytes(o, i) for o, i in shape.linears().values()]
    note = f"{shape.quantized_params / 1e9:.2f}B params in {7 * L} decoder linears, 4 bits each"
    if layers_on_device is not None:
        note += f"; streamed: {layers_on_device} of {L} layers on the device (resident + 2 streaming buffers)"
        L = layers_on_device
    embeddings = "embeddings (tied: lm_head is the same tensor)" if shape.tied else "embeddings, lm_head"
    other = f"{embeddings}, norms{', q/k/v biases' if shape.qkv_bias else ''} in {compute_dtype}"
    # + the rotary inv_freq and original_inv_freq buffers: head_dim/2 fp32 values each
    other_bytes = DTYPE_BYTES[compute_dtype] * shape.non_quantized_params + 4 * shape.head_dim
    return [
        Row("weights", "NF4 codes", L * sum(b.codes for b in nf4), note),
        Row("weights", "NF4 absmax", L * sum(b.absmax for b in nf4), "one uint8 absmax per block of 64 values"),
        Row("weights", "NF4 nested stats", L * sum(b.nested for b in nf4), "fp32 scale per 256 absmax + offset"),
        Row("weights", "non-quantized weights", int(other_bytes), other),
    ]


def _adapter_rows(shape: ModelShape, s: dict, n_lora: int, optimizer_bytes: int, at: Moment) -> list[Row]:
    """LoRA parameters, their gradients as live at the peak, the optimizer's states (and master copies)."""
    a, dtype, optimizer = DTYPE_BYTES[s["adapter_dtype"]], s["adapter_dtype"], s["optimizer"]
    masters = _has_master_copy(s)
    params = (
        f"{n_lora / 1e6:.1f}M params: {VARIANT_PARAMS[s['variant']]} on {len(target_linears(s['targets']))} linears x "
    )
    params += f"{shape.layers} layers, {dtype}"
    grads = f"{a * n_lora / MB:,.1f} MB in all (one .grad per LoRA parameter, {dtype}); live at the peak"
    states = "2 uint8 states + fp32 absmax per 256: ~2 B/param" if "8bit" in optimizer else "2 fp32 states: 8 B/param"
    states = f"torch AdamW: 2 states in {'fp32' if masters else dtype}" if optimizer == "adamw" else states
    paged = paged_bytes(shape, s["rank"], target_linears(s["targets"]), optimizer, s["variant"])
    paged = paged if s["device"] == "cuda" else 0
    if paged:
        states += (
            f"; paged: {paged / MB:,.1f} MB of them (tensors of >= {PAGED_MIN_NUMEL:,} values) in CUDA managed "
            "memory, resident unless evicted to host RAM under pressure; outside torch's allocator, so not in "
            "torch.cuda.max_memory_allocated nor in the planned phases"
        )
    rows = [
        Row("adapters", "LoRA parameters", a * n_lora, params),
        Row("adapters", "LoRA gradients", at.gradients, f"{grads}: backward creates them as it frees activations"),
        Row("optimizer", f"{optimizer} states", optimizer_bytes, states),
    ]
    if masters:  # after the states: profile counts the first optimizer row as allocated by the first step
        note = f"an fp32 copy of each {dtype} adapter weight, the one the optimizer steps: 4 B/param"
        rows.append(Row("optimizer", "fp32 master weights", 4 * n_lora, note + " (train.fp32_master_weights)"))
    return rows


def _has_master_copy(s: dict) -> bool:
    """The optimizer keeps fp32 master copies: asked for, and the adapters are 16-bit (optim.MasterWeights)."""
    return s["master_weights"] and DTYPE_BYTES[s["adapter_dtype"]] == 2


def plan_moments(shape: ModelShape, s: dict, n_lora: int) -> dict[str, Moment]:
    """``activations.step_moments``, with the optimizer step of fp32 master copies where the plan has them."""
    moments = step_moments(shape, s, n_lora=n_lora)
    for name, at in moments.items():  # activation offload: the checkpointed inputs wait in host RAM
        moments[name] = dataclasses.replace(at, activations=offloading.activations_on_device(shape, s, at.activations))
    if _has_master_copy(s):
        moments["optimizer step"] = _master_step(shape, s, n_lora, moments["optimizer step"])
    return moments


def _master_step(shape: ModelShape, s: dict, n_lora: int, at: Moment) -> Moment:
    """The optimizer step with master copies: it steps them a chunk at a time (facts.MASTER_STEP_NUMEL values,
    or one larger tensor), each chunk with its gradients upcast to fp32 and the inner optimizer's temporaries
    for that chunk, in fp32."""
    rank, names = s["rank"], target_linears(s["targets"])
    largest = max(max(rank * i, o * rank) for name, (o, i) in shape.linears().items() if name in names)
    chunk = min(n_lora, max(MASTER_STEP_NUMEL, largest))
    what = "one chunk of fp32 gradients for the master copies + the optimizer's temporaries for it"
    return dataclasses.replace(
        at, transient=4 * chunk + _optimizer_temporaries(shape, s, 4, chunk), transient_what=what
    )


def _live(live: int, full: int) -> str:
    return "" if live == full else f"; at the peak {live / MB:,.1f} of {full / MB:,.1f} MB are still live"


def _activation_rows(shape: ModelShape, s: dict, moments: dict[str, Moment], peak: str) -> list[Row]:
    """The activations kept for backward, as many as are still live at the peak, and the peak's transient."""
    at, c, L = moments[peak], DTYPE_BYTES[s["compute_dtype"]], shape.layers
    tokens = s["batch_size"] * s["seq_len"]
    if s["checkpointing"]:  # non-reentrant per-layer checkpointing keeps each layer's input, recomputes the rest
        mask = checkpointed_mask_bytes(s["batch_size"], s["seq_len"], is_padded(s))
        note = f"{L} layers x b*s*hidden in {s['compute_dtype']}"
        note += f" + the boolean 4-D attention mask, b*s*s ({mask / MB:,.1f} MB)" if mask else ""
        note += _live(at.activations, L * tokens * shape.hidden * c + mask)
        rows = [Row("activations", "checkpointed layer inputs", int(at.activations), note)]
    else:
        terms = layer_activation_bytes(shape, **activation_knobs(s))
        detail = ", ".join(f"{name} {b * tokens / MB:,.1f}" for name, b in terms.items())
        note = f"{L} layers x ({detail}) MB, less what layer 0 keeps not (its input needs no grad)"
        note += _live(at.activations, moments["forward"].activations)
        rows = [Row("activations", "saved activations", int(at.activations), note)]
    note = (
        "chunked loss: the grad of the labelled tokens' hidden states (computed in forward), the final norm's "
        "fp32 input, rope cos/sin (logits exist one chunk at a time: transient)"
    )
    note += _live(at.loss_kept, moments["forward"].loss_kept)
    rows.append(Row("activations", "logits + loss", int(at.loss_kept), note))
    # each moment's gradients + activations + loss + transient (the peak's is the sum of those rows above)
    others = ", ".join(f"{m} {moments[m].total / MB:,.1f}" for m in moments if m != peak)
    note = f"peak in {peak}: {at.transient_what}; beyond weights, adapters and optimizer states it holds "
    note += f"{at.total / MB:,.1f} MB, the other moments less ({others} MB)"
    return [*rows, Row("transient", "largest transient", int(at.transient), note)]


def _offloaded_states(rows: list[Row], paged: int) -> int:
    """With weight streaming the device is full of layers: the paged optimizer states live in host RAM (CUDA
    managed memory that bitsandbytes pages in for the optimizer step). Their bytes leave the states row."""
    if not paged:
        return 0
    row = next(row for row in rows if row.category == "optimizer")
    row.bytes -= paged
    row.note += (
        f"; with weight offload: {paged / MB:,.1f} MB of paged states live in host RAM (managed memory paged in "
        "for the optimizer step), not counted here"
    )
    return paged


def _runtime_rows(rows: list[Row], device: str) -> list[Row]:
    """Allocator slack (fragmentation hits what is allocated and freed every step: gradients, activations,
    transients) and the runtime's own memory."""
    k = ACTIVATION_COEFFS
    dynamic = sum(r.bytes for r in rows if r.category in ("activations", "transient") or "gradients" in r.item)
    note = f"assumed {k['allocator_slack']:.0%} of gradients + activations + transient (fragmentation)"
    slack = Row("runtime", "allocator slack", int(k["allocator_slack"] * dynamic), note)
    if device == "cuda":
        note = "assumed: the driver's context, kernels and library handles (outside torch's allocator)"
        runtime = Row("runtime", "CUDA context", int(k["cuda_context_bytes"]), note)
    else:
        runtime = Row(
            "runtime", "process runtime", int(k["cpu_runtime_bytes"]), "assumed: Python + torch + libraries (RSS)"
        )
    return [slack, runtime]


def _workspace_rows(s: dict) -> list[Row]:
    """CUDA: the cuBLAS workspaces torch takes from its caching allocator (so max_memory_allocated sees them);
    one per (handle, stream), and a step uses two handles (ACTIVATION_COEFFS["cublas_workspaces"])."""
    if s["device"] != "cuda":
        return []
    n, size = ACTIVATION_COEFFS["cublas_workspaces"], s["cublas_workspace_bytes"]
    note = (
        f"assumed: {n} x {size / 2**20:g} MiB, one per thread that runs matmuls (forward; autograd's backward "
        "thread), torch keeping one workspace per cuBLAS handle and stream; the size is torch 2.13's rule: "
        f"CUBLAS_WORKSPACE_CONFIG, else 32 MiB on Hopper (sm90), {CUBLAS_WORKSPACE_OLDER / 2**20:g} MiB before it"
    )
    return [Row("workspace", "cuBLAS workspaces", n * size, note)]


def plan_memory(
    shape: ModelShape,
    *,
    seq_len: int = 512,
    batch_size: int = 1,
    rank: int = 64,
    targets: str | list[str] = "all-linear",
    optimizer: str = "auto",
    checkpointing: bool = True,
    compute_dtype: str = "auto",
    adapter_dtype: str = "auto",
    master_weights: bool = True,
    lora_dropout: float = 0.05,
    device: str = "cuda",
    grad_accumulation: int = 1,
    label_tokens: int | None = None,
    padded: bool | None = None,
    cublas_workspace_bytes: int | None = None,
    gpu_bytes: int | None = None,
    suggest: bool = True,
    offload_weights: bool = False,
    offload_activations: bool = False,
    resident_layers: int | None = None,
    pcie_gbps: float = PCIE_GBPS,
    tflops: float = TFLOPS,
    variant: str = "lora",
    init: str = "default",
    trainable_tokens: int = 0,
    modules_to_save: list[str] | tuple[str, ...] = (),
    base_adapter_params: int = 0,
    extra_adapters: int = 0,
) -> MemoryPlan:
    """Peak memory of one training step of our stack, by category (formulas: docs/memory.md).

    ``label_tokens``: labelled positions per micro-batch (the loss computes logits for those only); default
    ``batch_size * (seq_len - 1)``, every next-token position. ``grad_accumulation`` > 1 keeps the previous
    micro-batches' gradients live through the next forward and backward. ``padded``: the batches carry a
    4-D attention mask (padding, or packed rows of several examples: ``activations.is_padded``); None (the
    default) means padded when ``batch_size`` > 1. ``cublas_workspace_bytes``: one cuBLAS workspace (CUDA);
    None means torch's rule for a Hopper GPU (``cublas_workspace_size``); ``profile`` passes the real one.
    ``master_weights``: ``train.fp32_master_weights`` (an fp32 copy of 16-bit adapters in the optimizer).
    ``offload_weights``: stream the decoder layers from host RAM, keeping ``resident_layers`` on the device
    (None: as many as fit in ``gpu_bytes``; all stream without it); ``offload_activations``: the checkpointed
    layer inputs in host RAM; ``pcie_gbps`` and ``tflops``: the rates of the step-time estimate (memory.offload).
    ``variant``, ``init``: ``lora.variant`` and ``lora.init`` (their rows: ``memory.variants``).
    ``trainable_tokens``, ``modules_to_save``, ``base_adapter_params`` (frozen values of ``lora.base_adapters``)
    and ``extra_adapters`` (more adapters like this one loaded beside it): rows of ``memory.extras``.
    """
    s = dict(seq_len=seq_len, batch_size=batch_size, rank=rank, targets=targets, optimizer=optimizer)
    s |= dict(checkpointing=checkpointing, compute_dtype=compute_dtype, adapter_dtype=adapter_dtype)
    s |= dict(master_weights=master_weights)
    s |= dict(lora_dropout=lora_dropout, device=device, grad_accumulation=grad_accumulation)
    s |= dict(padded=padded, cublas_workspace_bytes=cublas_workspace_bytes, variant=variant, init=init)
    s |= dict(offload_weights=offload_weights, offload_activations=offload_activations, resident_layers=resident_layers)
    s |= dict(pcie_gbps=pcie_gbps, tflops=tflops)
    s |= dict(trainable_tokens=trainable_tokens, modules_to_save=list(modules_to_save))
    s |= dict(base_adapter_params=base_adapter_params, extra_adapters=extra_adapters)
    s = _resolved(s | dict(label_tokens=label_tokens))
    if s["resident_layers"] is not None:
        s["resident_layers"] = min(s["resident_layers"], shape.layers)
    elif offload_weights:  # auto: as many as fit
        s["resident_layers"] = offloading.fitting_resident_layers(
            lambda n: plan_memory(shape, **{**s, "resident_layers": n}, suggest=False).total, shape.layers, gpu_bytes
        )
    names, a = target_linears(s["targets"]), DTYPE_BYTES[s["adapter_dtype"]]
    n_lora = adapter_param_count(shape, rank, names, variant)
    opt = _optimizer_bytes(shape, rank, names, s["optimizer"], 4 if _has_master_copy(s) else a, variant)
    moments = plan_moments(shape, s, n_lora)
    peak = max(moments, key=lambda m: moments[m].total)
    on_device = offloading.weight_layers_on_device(shape, s) if offload_weights else None
    rows = _weight_rows(shape, s["compute_dtype"], on_device) + _adapter_rows(shape, s, n_lora, opt, moments[peak])
    rows += [Row(*row) for row in variant_rows(shape, {**s, "targets_resolved": names}, n_lora)]
    rows += extra_rows(shape, s, n_lora)  # trainable embeddings, stacked and extra adapters (none: no rows)
    rows += _activation_rows(shape, s, moments, peak)
    paged = paged_bytes(shape, rank, names, s["optimizer"], variant) if s["device"] == "cuda" else 0
    paged_host = _offloaded_states(rows, paged) if offload_weights else 0
    rows += _workspace_rows(s) + _runtime_rows(rows, s["device"])

    plan = MemoryPlan(shape, s, rows, gpu_bytes, paged - paged_host)
    plan.offload = offloading.offload_summary(shape, s, paged_host)
    plan.peak_moment = peak
    plan.phases = phase_bytes(plan, moments)
    if suggest and plan.fits is False:
        from qlora_kit.memory.advice import suggestions  # advice replans with plan_memory

        plan.suggestions = suggestions(plan)
    return plan


def phase_bytes(plan: MemoryPlan, moments: dict[str, Moment]) -> dict[str, int]:
    """Planned peak tensor bytes of each phase ``qlora-kit profile`` measures (no runtime rows).

    load: the weights and the adapters. The loader's working set (one source tensor, read into a host
    buffer, and its quantizer's slice temporaries) is not planned: bench/load_memory.py measures it. The
    step's phases: weights + adapters + optimizer states (allocated by the first optimizer step, live from
    then on; paged ones excluded: they are outside torch's allocator; fp32 master weights: made with the
    optimizer) + the cuBLAS workspaces (CUDA: made by the first matmuls of the first step, kept) + the phase's
    largest moment.
    """
    by_item = {row.item: row.bytes for row in plan.rows}
    weights = sum(row.bytes for row in plan.rows if row.category == "weights") + by_item["LoRA parameters"]
    weights += sum(row.bytes for row in plan.rows if row.item in LOADED_EXTRAS and row.category != "weights")
    states = sum(row.bytes for row in plan.rows if row.category == "optimizer") - plan.pageable_bytes
    fixed = weights + states + by_item.get("cuBLAS workspaces", 0)
    backward = ("loss backward", "backward of the last layer", "backward of the first layer")
    return {
        "load": weights,
        "forward": fixed + moments["forward"].total,
        "backward": fixed + max(moments[m].total for m in backward),
        "optimizer step": fixed + moments["optimizer step"].total,
    }


def max_fitting(shape: ModelShape, gpu_bytes: int, vary: str = "batch", **knobs) -> int:
    """The largest batch size (or sequence length) whose plan fits in ``gpu_bytes``; 0 if even 1 does not."""
    key = VARY_KEYS[vary]
    knobs = {name: value for name, value in knobs.items() if name not in (key, "gpu_bytes", "suggest")}

    def fits(n: int) -> bool:  # gpu_bytes: an offload plan's resident layers "auto" fill it
        return plan_memory(shape, **knobs, **{key: n}, gpu_bytes=gpu_bytes, suggest=False).total <= gpu_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= 2**24 and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
