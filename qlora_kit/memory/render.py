"""Rendering: a plan as a text table, markdown or JSON (and back), and a measured profile (``qlora-kit
profile``) as a table, ``profile.json``, ``profile.md`` and ``profile.png``.

Figures are decimal MB (10^6 bytes) and GiB, and say which.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from qlora_kit.facts import MB, GiB
from qlora_kit.memory.activations import ACTIVATION_COEFFS, is_padded
from qlora_kit.memory.plan import MemoryPlan, Row, Suggestion
from qlora_kit.memory.shapes import ModelShape

# --- sizes -------------------------------------------------------------------------------------------------


def gb_text(nbytes: float) -> str:
    """Decimal GB (or MB, under 1 GB) and GiB: ``34.5 GB (32.09 GiB)``."""
    decimal = f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / MB:,.1f} MB"
    return f"{decimal} ({nbytes / GiB:.2f} GiB)"


def gib_text(nbytes: int) -> str:
    """A budget in GiB as it was written: budgets are int(GiB x value), within a byte of the value."""
    return f"{round(nbytes / GiB, 6):g}"


# --- a plan --------------------------------------------------------------------------------------------------


def plan_title(plan: MemoryPlan) -> str:
    s = plan.settings
    padded = " (padded: 4-D attention mask)" if is_padded(s) else ""
    return (
        f"{plan.model.name}: seq {s['seq_len']} x batch {s['batch_size']}{padded}, LoRA r={s['rank']} on "
        f"{s['targets']}, {s['optimizer']}, checkpointing {'on' if s['checkpointing'] else 'off'}, "
        f"{s['compute_dtype']} on {s['device']}{offload_title(s)}{_per_process(s)}"
    )


def _per_process(s: dict) -> str:
    """A torchrun plan's (``memory.parallel``): whose memory it is."""
    if s.get("gpus", 1) <= 1:
        return ""
    offload = " + cpu offload" if s.get("fsdp_cpu_offload") else ""
    return f"; per process of {s['gpus']} ({s['parallel']}{offload})"


def offload_title(settings: dict) -> str:
    """The title's offload part: "" without offload."""
    parts = [name for name in ("weights", "activations") if settings.get(f"offload_{name}")]
    return f", offload {'+'.join(parts)}" if parts else ""


def offload_lines(plan: MemoryPlan) -> list[str]:
    """Where an offload plan keeps what, what it copies per step and what that costs in time ([] without)."""
    o = plan.offload
    if not o:
        return []
    lines = []
    if o["streamed_layers"]:
        lines.append(
            f"weight streaming: {o['resident_layers']} of {o['layers']} decoder layers stay on the GPU, "
            f"{o['streamed_layers']} stream from pinned host RAM ({o['layer_nf4_bytes'] / MB:,.1f} MB of NF4 each)"
        )
    parts = [("streamed layers", o["pinned_weight_bytes"]), ("offloaded layer inputs", o["pinned_activation_bytes"])]
    parts_text = ", ".join(f"{what} {gb_text(n)}" for what, n in parts if n)
    host = f"host RAM: {gb_text(o['pinned_host_bytes'])} pinned ({parts_text or 'nothing'})"
    if o["paged_host_bytes"]:
        host += f" + {gb_text(o['paged_host_bytes'])} of paged optimizer states (managed memory)"
    lines.append(host)
    if not o["streamed_layers"]:
        return lines
    accum = plan.settings["grad_accumulation"]
    lines.append(
        f"moved per step: {gb_text(o['bytes_moved_per_step'])} host->GPU ({o['moved_layers_per_micro_batch']} layer "
        f"copies per micro-batch: forward {o['streamed_layers']}, backward {o['streamed_layers'] - 1}, the last "
        f"layer being still there{f'; x {accum} micro-batches' if accum > 1 else ''})"
    )
    rates = f"at {o['pcie_gbps']:g} GB/s (--pcie-gbps) and {o['tflops']:g} TFLOPS (--tflops)"
    lines.append(
        f"estimated step time: {o['step_s']:,.1f} s {rates}; compute alone {o['compute_s']:,.1f} s, copies alone "
        f"{o['transfer_s']:,.1f} s (an estimate from FLOPs and bytes, not measured: dequantization not included)"
    )
    per_layer = f"a layer's copy takes {o['layer_copy_ms']:,.1f} ms, its forward {o['layer_forward_ms']:,.1f} ms"
    hide = f"the copies hide behind compute from {o['hide_from_tokens']:,} tokens per micro-batch"
    if o["transfer_bound"]:
        slower = o["step_s"] / o["compute_s"] - 1
        lines.append(
            f"TRANSFER-BOUND: {per_layer}; at {o['tokens_per_micro_batch']:,} tokens per micro-batch PCIe sets the "
            f"pace, {slower:.0%} slower than compute alone; {hide} (raise the batch or sequence, or keep more "
            "layers resident)"
        )
    else:
        lines.append(f"compute-bound: {per_layer}; {hide}, and this run has {o['tokens_per_micro_batch']:,}")
    return lines


def plan_assumptions(plan: MemoryPlan) -> str:
    """The line that names the plan's unmeasured figures (their rows' notes say "assumed")."""
    k = ACTIVATION_COEFFS
    slack = f"the allocator slack ({k['allocator_slack']:.0%} of gradients + activations + transient)"
    if plan.settings["device"] == "cuda":
        return (
            f"Assumed, not yet measured on a GPU: {slack}, the CUDA context ({k['cuda_context_bytes'] / MB:,.0f} MB) "
            f"and the cuBLAS workspaces ({k['cublas_workspaces']} of them); bench/gpu_memory_check.py measures them."
        )
    return f"Assumed: {slack} and the process runtime ({k['cpu_runtime_bytes'] / MB:,.0f} MB, RSS measured once)."


def plan_verdict(plan: MemoryPlan) -> str:
    text = f"total {plan.total / MB:,.0f} MB ({plan.total / GiB:.2f} GiB)"
    if plan.gpu_bytes is None:
        return text
    budget, margin = f"{gib_text(plan.gpu_bytes)} GiB", abs(plan.gpu_bytes - plan.total) / MB
    if plan.fits:
        return f"{text}: fits in {budget} with {margin:,.0f} MB to spare"
    text += f": does NOT fit in {budget} (over by {margin:,.0f} MB)"
    if plan.pageable_bytes and plan.total - plan.pageable_bytes <= plan.gpu_bytes:
        text += "; it would run, slower, with the paged optimizer's states moved to host RAM"
    return text


def _cells(plan: MemoryPlan) -> list[tuple[str, str, str, str]]:
    rows = [(r.category, r.item, f"{r.bytes / MB:,.1f}", r.note) for r in plan.rows]
    return [*rows, ("total", "", f"{plan.total / MB:,.1f}", f"{plan.total / GiB:.2f} GiB")]


def plan_table(plan: MemoryPlan, recipe: bool = False) -> str:
    """Title, one line per row (MB), the verdict and, when it does not fit, the advice (``recipe``: with
    each change as a ``qlora-kit train`` override)."""
    cells = _cells(plan)
    w = [max(len(row[i]) for row in cells) for i in range(3)]
    out = [plan_title(plan), f"{'category':<{w[0]}}  {'item':<{w[1]}}  {'MB':>{w[2]}}  explanation"]
    out += [f"{c:<{w[0]}}  {i:<{w[1]}}  {b:>{w[2]}}  {n}" for c, i, b, n in cells]
    return "\n".join([*out, *offload_lines(plan), plan_assumptions(plan), plan_verdict(plan), *plan.advice(recipe)])


def plan_markdown(plan: MemoryPlan) -> str:
    out = [
        f"**{plan_title(plan)}**",
        "",
        "| category | item | MB | explanation |",
        "| --- | --- | ---: | --- |",
    ]
    out += [f"| {c} | {i} | {b} | {n} |" for c, i, b, n in _cells(plan)]
    advice = [line if line.startswith("  - ") else f"- {line}" for line in plan.advice()]
    offload = [f"- {line}" for line in offload_lines(plan)]
    return "\n".join(
        [*out, "", *offload, *([""] if offload else []), plan_assumptions(plan), "", plan_verdict(plan), *advice]
    )


def plan_to_json(plan: MemoryPlan) -> str:
    extra = {"total": plan.total, "fits": plan.fits, "fixed_bytes": plan.fixed_bytes}
    return json.dumps({**asdict(plan), **extra}, indent=2)


def plan_from_json(text: str) -> MemoryPlan:
    d = json.loads(text)
    rows, suggestions = [Row(**r) for r in d["rows"]], [Suggestion(**s) for s in d["suggestions"]]
    plan = MemoryPlan(ModelShape(**d["model"]), d["settings"], rows, d["gpu_bytes"], d["pageable_bytes"], suggestions)
    plan.phases, plan.peak_moment = d["phases"], d["peak_moment"]
    plan.offload = d.get("offload", {})
    return plan


# --- a measured profile (memory.profile.profile_run's result) ---------------------------------------------------

HEADER = ("phase", "measured MB", "planned MB", "planned/measured", "peak RSS MB")


def _step_peak(result: dict) -> tuple[int, int]:
    """Measured and planned peak of the training step: the highest phase of each (the per-phase plans
    leave the optimizer states out of step 1's forward and backward, as the measurement does)."""
    step = [p for p in result["phases"] if p.phase != "load"]
    return max(p.measured for p in step), max(p.planned for p in step)


def _table(result: dict) -> list[tuple[str, str, str, str, str]]:
    rows = [
        (p.phase, f"{p.measured / MB:,.1f}", f"{p.planned / MB:,.1f}", f"{p.ratio:.3f}", f"{p.peak_rss / MB:,.0f}")
        for p in result["phases"]
    ]
    step = [p for p in result["phases"] if p.phase != "load"]
    measured, planned = _step_peak(result)
    rows.append(
        (
            "training step (peak)",
            f"{measured / MB:,.1f}",
            f"{planned / MB:,.1f}",
            f"{planned / measured:.3f}",
            f"{max(p.peak_rss for p in step) / MB:,.0f}",
        )
    )
    return rows


def paged_line(result: dict) -> str:
    """Where the paged optimizer states are: not in the phases ("" when the run has none)."""
    paged = result.get("paged") or {"measured": 0, "planned": 0}
    if not paged["measured"] and not paged["planned"]:
        return ""
    return (
        f"paged optimizer states: {paged['measured'] / MB:,.1f} MB measured, {paged['planned'] / MB:,.1f} MB "
        "planned, in CUDA managed memory (cudaMallocManaged; host-visible, resident on the GPU unless evicted): "
        "not in torch.cuda.max_memory_allocated, so neither in the measured nor in the planned phases above"
    )


def format_table(result: dict) -> str:
    cells = [HEADER, *_table(result)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    lines = [
        "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        for row in cells
    ]
    return "\n".join([*lines, paged_line(result)] if paged_line(result) else lines)


def _method(device: str) -> str:
    if device == "cuda":
        return (
            "torch.cuda.max_memory_allocated per phase on the run's device (reset_peak_memory_stats before each): "
            "torch's caching allocator, cuBLAS workspaces included, paged optimizer states not"
        )
    return (
        "live CPU tensor bytes: exact count of the storages live at the start + the running sum of "
        "torch.profiler's allocator events (profile_memory=True); peak RSS is the process high-water mark"
    )


def _steps_json(result: dict) -> list[dict]:
    return [
        {
            "step": r["step"],
            "seq_len": r["seq_len"],
            "batch_size": r["batch_size"],
            "label_tokens": r["label_tokens"],
            "padded": r.get("padded", False),
            "drift_bytes": r["measured"].drift,
            "phases": {
                p.name: {
                    "measured": p.peak,
                    "start": p.start,
                    "end": p.end,
                    "peak_rss": p.peak_rss,
                    "seconds": round(p.seconds, 3),
                    "planned": r["planned"][p.name],
                }
                for p in r["measured"].phases
            },
        }
        for r in result["steps"]
    ]


def write_outputs(result: dict, out: Path) -> dict[str, Path]:
    """``profile.json``, ``profile.md`` and ``profile.png`` in ``out``; their paths."""
    out.mkdir(parents=True, exist_ok=True)
    plan, steps = result["plan"], _steps_json(result)
    data = {
        "device": result["device"],
        "method": _method(result["device"]),
        "phases": [{**asdict(p), "ratio": round(p.ratio, 4)} for p in result["phases"]],
        "step_peak": dict(zip(("measured", "planned"), _step_peak(result), strict=True)),
        "paged_optimizer_states": result.get("paged", {"measured": 0, "planned": 0}),
        "steps": steps,
        "plan": json.loads(plan.to_json()),
    }
    paths = {"json": out / "profile.json", "md": out / "profile.md", "png": out / "profile.png"}
    paths["json"].write_text(json.dumps(data, indent=2) + "\n")
    md = [
        "# Memory profile: measured vs planned",
        "",
        f"Device: {result['device']}. Measured: {_method(result['device'])}.",
        f"{len(steps)} steps of one micro-batch each; the planned figure is the plan for the batch of the measured "
        "peak (its sequence length, batch size and labelled tokens).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    md += ["| " + " | ".join(row) + " |" for row in _table(result)]
    md += ["", paged_line(result)] if paged_line(result) else []
    md += ["", "## The plan (peak of the step)", "", plan.to_markdown(), ""]
    paths["md"].write_text("\n".join(md))
    _chart(result, paths["png"])
    return paths


def _chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    phases, plan = result["phases"], result["plan"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    x = range(len(phases))
    left.bar([i - 0.2 for i in x], [p.measured / MB for p in phases], 0.4, label="measured")
    left.bar([i + 0.2 for i in x], [p.planned / MB for p in phases], 0.4, label="planned")
    left.set_xticks(list(x), [p.phase for p in phases])
    left.set_ylabel("MB (peak of allocated tensors)")
    left.set_title(f"peak memory by phase ({result['device']})")
    left.legend()
    bottom = 0.0
    for row in plan.rows:
        if row.category != "runtime" and row.bytes > 0:
            right.bar(0, row.bytes / MB, 0.5, bottom=bottom, label=f"{row.item} {row.bytes / MB:,.1f}")
            bottom += row.bytes / MB
    right.set_xticks([0], ["planned step peak"])
    right.set_ylabel("MB")
    right.set_title(f"planner categories ({plan.peak_moment})", fontsize=9)
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
