"""Memory of a QLoRA run: planned before anything is loaded, measured over real steps.

- ``shapes``: model shapes (presets, a checkpoint's ``config.json``) and the linears LoRA targets.
- ``activations``: the activation model (``ACTIVATION_COEFFS``) and the candidate peaks of a step.
- ``plan``: ``plan_memory`` (peak by category), ``max_fitting``; ``budget``: a recipe's plan and ``check_budget``.
- ``advice``: why a plan cannot fit and the changes that make it fit.
- ``render``: a plan (and a measured profile) as a table, markdown, JSON, PNG.
- ``paper``: the QLoRA paper's LLaMA-7B figures beside ours.
- ``profile``: measured peaks by phase (imports torch, so it is loaded only when one of its names is used:
  the planner and ``qlora-kit plan`` stay torch-free).

The CLI entry points (``qlora-kit plan``, ``qlora-kit profile``) are in ``qlora_kit.cli``; the shared facts
(dtype bytes, NF4 bytes, the loss chunk, sizes) in ``qlora_kit.facts``. See docs/memory.md.
"""

from __future__ import annotations

from qlora_kit.memory.activations import (
    ACTIVATION_COEFFS,
    Moment,
    first_layer_savings,
    layer_activation_bytes,
    step_moments,
)
from qlora_kit.memory.advice import GPU_SIZES_GIB, limits, recipe_overrides
from qlora_kit.memory.budget import check_budget, largest_micro_batch, plan_run
from qlora_kit.memory.paper import paper_comparison
from qlora_kit.memory.parallel import plan_parallel
from qlora_kit.memory.plan import (
    VARY_KEYS,
    MemoryPlan,
    Row,
    Suggestion,
    lora_param_count,
    max_fitting,
    phase_bytes,
    plan_memory,
)
from qlora_kit.memory.render import format_table, gb_text, gib_text, write_outputs
from qlora_kit.memory.shapes import (
    PRESETS,
    ModelShape,
    checkpoint_shape,
    model_shape,
    shape_from_config,
    target_linears,
)

_PROFILE_NAMES = (
    "PHASES",
    "Measurement",
    "PhaseMemory",
    "PhaseRow",
    "live_tensor_bytes",
    "measure_phases",
    "PhaseRecorder",
    "peak_rss_bytes",
    "profile_run",
)

__all__ = [
    "ACTIVATION_COEFFS",
    "GPU_SIZES_GIB",
    "PRESETS",
    "VARY_KEYS",
    "MemoryPlan",
    "ModelShape",
    "Moment",
    "Row",
    "Suggestion",
    "check_budget",
    "checkpoint_shape",
    "first_layer_savings",
    "format_table",
    "gb_text",
    "gib_text",
    "largest_micro_batch",
    "layer_activation_bytes",
    "limits",
    "lora_param_count",
    "max_fitting",
    "model_shape",
    "paper_comparison",
    "phase_bytes",
    "plan_memory",
    "plan_parallel",
    "plan_run",
    "recipe_overrides",
    "shape_from_config",
    "step_moments",
    "target_linears",
    "write_outputs",
    *_PROFILE_NAMES,
]


def __getattr__(name: str):
    """The measuring names, imported (with torch) on first use."""
    if name in _PROFILE_NAMES:
        from qlora_kit.memory import profile

        return getattr(profile, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
