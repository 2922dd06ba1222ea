"""What to do when a plan does not fit: why no batch, sequence or checkpointing knob can help when the
fixed part alone is over budget (``limits``), and the changes that fit, each replanned (``suggestions``):
one knob at a time, the fewest knobs together, and the smallest memory that holds the run as it is.
``advice_lines`` writes them under a plan's verdict, as ``qlora-kit train`` overrides where asked.
"""

from __future__ import annotations

import math

from qlora_kit.facts import MB, GiB
from qlora_kit.memory.plan import VARIED, MemoryPlan, Suggestion, max_fitting, plan_memory
from qlora_kit.memory.render import gb_text, gib_text

GPU_SIZES_GIB = (24, 40, 48, 80, 141)  # common single-GPU sizes, for the "bigger GPU" suggestion
TRIED = ("checkpointing", "the largest batch and sequence", "rank / 4", "attention-only targets", "8-bit optimizer")
TRIED += ("all of them together", "a common GPU size (up to 141 GiB)")
# how each planner knob is set in a recipe (qlora-kit train overrides), for the suggestions of check_budget
RECIPE_KEYS = {
    "checkpointing": "model.gradient_checkpointing",
    "batch_size": "train.micro_batch_size",
    "seq_len": "data.cutoff_len",
    "rank": "lora.r",
    "targets": "lora.targets",
    "optimizer": "train.optimizer",
    "master_weights": "train.fp32_master_weights",
    "offload_weights": "model.offload_weights",
    "offload_activations": "train.offload_activations",
}
# Dropping the fp32 master copies trades update precision for memory: offered on its own, never in combinations.
NO_MASTER_COPIES = "no fp32 master copies of the adapters (updates below half a bf16 step then round away)"


# --- text under the verdict --------------------------------------------------------------------------------


def recipe_overrides(knob: dict) -> str:
    """A suggestion's change as ``qlora-kit train`` overrides, e.g. ``train.micro_batch_size=2``."""
    out = []
    for key, value in knob.items():
        if key == "gpu_bytes":
            out.append(f"model.max_memory_gb={gib_text(value)}")
        else:
            out.append(f"{RECIPE_KEYS[key]}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(out)


def limits(plan: MemoryPlan) -> str:
    """When the fixed part alone is over budget, why no batch, sequence or checkpointing knob can help."""
    if plan.fits is not False or plan.fixed_bytes <= plan.gpu_bytes:
        return ""
    budget = f"more than the {gib_text(plan.gpu_bytes)} GiB budget"
    if plan.weight_bytes > plan.gpu_bytes:
        return (
            f"the 4-bit weights and embeddings alone are {gb_text(plan.weight_bytes)}, {budget}: no batch, "
            f"sequence, checkpointing, rank, target or optimizer setting can fit"
            + ("; streaming the layers from host RAM can (below)" if _can_offload(plan) else "")
            + f"; this run as planned needs {plan.total / GiB:.2f} GiB"
        )
    return (
        f"the weights, LoRA parameters, optimizer states and runtime alone are {gb_text(plan.fixed_bytes)}, "
        f"{budget}: no batch, sequence or checkpointing setting can fit; only a smaller rank, fewer "
        "targets, a lighter optimizer or more memory can"
    )


def advice_lines(plan: MemoryPlan, recipe: bool = False) -> list[str]:
    """The lines under the verdict of a plan that does not fit: the limits, then what fits (``recipe``:
    with each change as a ``qlora-kit train`` override)."""
    if plan.fits is not False:
        return []
    lines = [limits(plan)] if limits(plan) else []
    if not plan.suggestions:
        return [*lines, "nothing tried fits (" + ", ".join(TRIED) + ")"]
    lines.append("what fits (each replanned):")
    for s in plan.suggestions:
        saves = f": saves {s.saves / MB:,.0f} MB -> {s.total / GiB:.2f} GiB" if s.saves else ""
        lines.append(f"  - {s.change}{saves}" + (f"  [{recipe_overrides(s.knob)}]" if recipe else ""))
    return lines


# --- the changes that fit ----------------------------------------------------------------------------------


def suggestions(plan: MemoryPlan) -> list[Suggestion]:
    """Changes that make the run fit, each replanned: one knob at a time, the fewest knobs together (when
    it takes more than one), and the smallest memory that holds the run as it is. Only what fits."""
    changes = _knob_changes(plan)
    out = [sugg for text, knob in changes if (sugg := _replanned(plan, text, knob)).fits]
    combinable = [(text, knob) for text, knob in changes if not {*knob} & {*VARIED, "master_weights"}]
    together = _fewest_together(plan, combinable)
    if together is not None and len(together.knob) > 1:
        out.append(together)
    offload = _offload(plan)
    out += [offload] if offload is not None and offload.fits else []
    bigger = _bigger_memory(plan)
    return [*out, bigger] if bigger is not None else out


def _can_offload(plan: MemoryPlan) -> bool:
    return plan.settings["device"] == "cuda" and not plan.settings.get("offload_weights")


def _offload(plan: MemoryPlan) -> Suggestion | None:
    """Weight streaming (and, under checkpointing, activation offload), with as many layers resident as fit."""
    if not _can_offload(plan):
        return None
    knob = {"offload_weights": True, "offload_activations": bool(plan.settings["checkpointing"])}
    text = "stream the 4-bit layers from host RAM" + (
        " and offload the layer inputs" if knob["offload_activations"] else ""
    )
    sugg = _replanned(plan, text, {**knob, "resident_layers": None})
    sugg.knob = knob
    return sugg


def _bigger_memory(plan: MemoryPlan) -> Suggestion | None:
    """The smallest common GPU that holds the run as it is (on CPU: the plan's total, rounded up to 0.01 GiB);
    None when the run is larger than every common GPU."""
    need = plan.total
    if plan.settings["device"] == "cuda":
        bigger = next((g * GiB for g in GPU_SIZES_GIB if g * GiB >= need), None)
        text = f"a {(bigger or 0) // GiB} GiB GPU"
    else:  # a CPU run's budget is host memory
        bigger = math.ceil(math.ceil(100 * need / GiB) * GiB / 100)
        text = f"a budget of {gib_text(bigger)} GiB"
    return Suggestion(text, {"gpu_bytes": bigger}, need, 0, True) if bigger else None


def _knob_changes(plan: MemoryPlan) -> list[tuple[str, dict]]:
    """Each knob turned on its own, the least invasive first; batch, sequence and checkpointing only when
    the fixed part fits at all."""
    s, changes = plan.settings, []
    if plan.fixed_bytes <= plan.gpu_bytes:
        if not s["checkpointing"]:
            changes.append(("turn on gradient checkpointing", {"checkpointing": True}))
        for key, vary in VARIED.items():
            best = max_fitting(plan.model, plan.gpu_bytes, vary=vary, **s) if s[key] > 1 else 0
            if best:  # the largest value that fits (0: not even 1 does)
                changes.append((f"{vary} {s[key]} -> {best}", {key: best}))
    if not s["optimizer"].endswith("8bit"):  # paged optimizers need CUDA
        eight = "paged_adamw_8bit" if s["device"] == "cuda" else "adamw_8bit"
        changes.append((f"{eight} optimizer", {"optimizer": eight}))
    if s["rank"] > 8:
        changes.append((f"rank {s['rank']} -> {s['rank'] // 4}", {"rank": s["rank"] // 4}))
    if s["targets"] != "attention":
        changes.append(("LoRA on attention only (q,k,v,o)", {"targets": "attention"}))
    if any(row.item == "fp32 master weights" for row in plan.rows):
        changes.append((NO_MASTER_COPIES, {"master_weights": False}))
    return changes


def _replanned(plan: MemoryPlan, text: str, knob: dict) -> Suggestion:
    new = plan_memory(plan.model, **{**plan.settings, **knob}, gpu_bytes=plan.gpu_bytes, suggest=False)
    return Suggestion(text, knob, new.total, plan.total - new.total, bool(new.fits))


def _fewest_together(plan: MemoryPlan, changes: list[tuple[str, dict]]) -> Suggestion | None:
    """The first of ``changes`` (in their order), each time with the largest batch, else sequence, that
    fits with them, until the run fits; None if even all of them do not make it fit."""
    texts, knob = [], {}
    for text, change in changes:
        texts, knob = [*texts, text], {**knob, **change}
        together = _replanned(plan, ", ".join(texts), knob)
        for key, vary in VARIED.items():
            now = {**plan.settings, **knob}[key]
            if together.fits or now == 1:
                continue
            best = max_fitting(plan.model, plan.gpu_bytes, vary, **{**plan.settings, **knob})
            if best:  # then it fits: max_fitting's answer does by definition
                together = _replanned(plan, f"{together.change}, {vary} {now} -> {best}", {**knob, key: best})
        if together.fits:
            return together
    return None
