"""The memory planner on a real GPU: measured vs planned by phase, and the plan's assumed figures measured.

    python bench/gpu_memory_check.py [--device cuda:N] [--workdir DIR] [--skip-1b]
    python bench/gpu_memory_check.py --device cpu      # a smoke run of this script (tiny model, nothing saved)

What ``qlora-kit profile`` does, for fixed shapes: our loader (NF4), LoRA r=64 on all linears, the optimizer
``auto`` picks (``paged_adamw_32bit`` on CUDA), the training loop's own ``train_step`` with its phases marked by
a ``PhaseRecorder`` (``torch.cuda.max_memory_allocated`` per phase on the given device), each phase next to
the plan of that batch (``memory.profile.planned_phases``). Two Llama shapes with random bf16 weights:

  tiny       hidden 256, ffn 704, 3 layers, 8 heads / 2 kv heads (GQA), vocab 320: 2 x 1024 tokens
  llama-1b   the Llama-3.2-1B shape (bench/train_step.py's GPU_MODELS): 4 x 1024 tokens, written to --workdir

each with checkpointing off and on, and with a batch that is padded (the last row half padding: a 4-D mask,
k/v repeated to the query's width) and one that is not. Step 1 warms up (its phases are planned without the
optimizer states and with one cuBLAS workspace in forward); step 2 is the comparison.

And the figures the plan assumes (its output names them), measured:
  cuBLAS workspaces  what the allocator holds after the steps beyond every live CUDA tensor, in workspaces of
                     ``torch.backends.cuda.cublas_workspace_size()`` (plan: 2)
  CUDA context       device memory in use (``torch.cuda.mem_get_info``) less what torch's allocator reserved,
                     after CUDA is initialized and cuBLAS has run, and again at the end (plan: 500 MB)
  allocator slack    ``max_memory_reserved - max_memory_allocated`` over step 2, as a fraction of the step's
                     dynamic bytes (plan: 10% of gradients + activations + transient)
  paged states       bitsandbytes' managed-memory states (``memory.profile.paged_state_bytes``) vs the plan's
                     ``pageable_bytes``; they are outside max_memory_allocated

Runs in well under 3 minutes on an H100/H200 (the 1B checkpoint is written once, ~2.5 GB). Results:
bench/results/gpu_memory_check.json and .md. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from _common import MB, markdown_table, save_results, synthetic_checkpoint
from train_step import GPU_MODELS

RANK = 64
TINY = {
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 320,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
}
CASES = {"tiny": (TINY, 2, 1024), "llama-1b": (GPU_MODELS["llama-1b"], 4, 1024)}  # shape, rows, tokens per row


def build_checkpoint(model_dir: Path, shape: dict[str, Any]) -> Path:
    """Random bf16 weights of ``shape`` in ``model_dir`` unless a complete one is already there."""
    return synthetic_checkpoint(model_dir, shape, 2 * 1000**3)


def make_batch(vocab: int, rows: int, seq: int, padded: bool, device) -> dict:
    """Random tokens, all labelled; ``padded``: the last row is padding after half its width (as collate pads)."""
    import torch

    ids = torch.randint(3, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids), ids.clone()
    if padded:
        mask[-1, seq // 2 :], labels[-1, seq // 2 :] = 0, -100
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def runtime_outside_torch(device) -> int:
    """Device memory in use that torch's allocator did not reserve: the CUDA context, library handles
    (and whatever other processes hold on the GPU: run this on an idle one)."""
    import torch

    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def run_case(model, shape_name: str, shape, rows: int, seq: int, checkpointing: bool, padded: bool, device) -> dict:
    """Two train_steps of a fresh optimizer, each measured by phase, next to the plans of that batch."""
    import torch

    from qlora_kit.config import TrainConfig
    from qlora_kit.loss import label_count
    from qlora_kit.memory import PhaseRecorder, live_tensor_bytes, plan_memory
    from qlora_kit.memory.profile import batch_is_padded, cublas_workspace_bytes, paged_state_bytes, planned_phases
    from qlora_kit.optim import make_optimizer
    from qlora_kit.run import TrainState
    from qlora_kit.train import train_step

    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("auto", params, TrainConfig(), device)
    state = TrainState(model=model, params=params, optimizer=optimizer, scheduler=None, max_grad_norm=0.3)
    batch = make_batch(model.config.vocab_size, rows, seq, padded, device)
    cuda = device.type == "cuda"
    knobs = dict(
        seq_len=seq, batch_size=rows, rank=RANK, targets="all-linear", optimizer="auto", checkpointing=checkpointing
    )
    knobs |= dict(lora_dropout=0.05, device=device.type, label_tokens=label_count(batch), padded=batch_is_padded(batch))
    knobs |= dict(compute_dtype="bf16" if cuda else "fp32")
    if cuda:
        knobs |= dict(cublas_workspace_bytes=cublas_workspace_bytes(device))
    plan = plan_memory(shape, **knobs, suggest=False)
    steps = []
    for step in (1, 2):
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        began = time.perf_counter()
        with PhaseRecorder(device) as recorder:
            train_step(state, [batch], phase=recorder.phase)
        planned = planned_phases(plan, first_step=step == 1)
        phases = {p.name: {"measured": p.peak, "planned": planned[p.name]} for p in recorder.measurement.phases}
        steps.append({"step": step, "seconds": round(time.perf_counter() - began, 3), "phases": phases})
    result: dict[str, Any] = {"model": shape_name, "rows": rows, "seq": seq, "checkpointing": checkpointing}
    result |= {"padded": knobs["padded"], "steps": steps, "plan_rows": {r.item: r.bytes for r in plan.rows}}
    result["paged"] = {"measured": paged_state_bytes(optimizer), "planned": plan.pageable_bytes}
    if cuda:
        dynamic = sum(r.bytes for r in plan.rows if r.category in ("activations", "transient") or "gradients" in r.item)
        reserved_over = torch.cuda.max_memory_reserved(device) - torch.cuda.max_memory_allocated(device)
        result["slack"] = {"reserved_over_allocated": reserved_over, "planned_dynamic": dynamic}
    del batch, state, optimizer, params
    gc.collect()
    if cuda:
        torch.cuda.synchronize(device)
        held = torch.cuda.memory_allocated(device) - live_tensor_bytes("cuda")
        result["held_beyond_tensors"] = held
        torch.cuda.empty_cache()
    return result


def report(results: list[dict], runtime: dict, workspace: int | None) -> str:
    rows = []
    for r in results:
        case = f"{r['model']} {r['rows']}x{r['seq']} ckpt {'on' if r['checkpointing'] else 'off'}"
        case += " padded" if r["padded"] else ""
        for s in r["steps"]:
            for name, p in s["phases"].items():
                ratio = p["planned"] / max(p["measured"], 1)
                rows.append(
                    [case, s["step"], name, f"{p['measured'] / MB:,.1f}", f"{p['planned'] / MB:,.1f}", f"{ratio:.3f}"]
                )
    lines = ["# GPU memory: measured vs planned by phase", ""]
    lines += [markdown_table(["case", "step", "phase", "measured MiB", "planned MiB", "planned/measured"], rows), ""]
    lines += ["## The plan's assumed figures, measured", ""]
    if workspace:
        held = [r["held_beyond_tensors"] for r in results]
        lines.append(
            f"- cuBLAS workspaces (plan: 2 x {workspace / MB:g} MiB): held beyond live tensors after each case "
            + ", ".join(f"{h / MB:,.2f}" for h in held)
            + f" MiB = {', '.join(f'{h / workspace:.2f}' for h in held)} workspaces"
        )
        lines.append(
            f"- CUDA context (plan: 500 MB): {runtime['start'] / 1e6:,.0f} MB after CUDA init + cuBLAS, "
            f"{runtime['end'] / 1e6:,.0f} MB at the end (device memory in use less torch's reserved memory)"
        )
        for r in results:
            slack = r["slack"]
            frac = slack["reserved_over_allocated"] / max(slack["planned_dynamic"], 1)
            lines.append(
                f"- allocator slack, {r['model']} ckpt {r['checkpointing']} padded {r['padded']}: reserved - "
                f"allocated at peak {slack['reserved_over_allocated'] / MB:,.1f} MiB = {frac:.1%} of the planned "
                "dynamic bytes (plan: 10%)"
            )
    for r in {r["model"]: r for r in results}.values():  # the same LoRA shapes in every case of a model
        lines.append(
            f"- paged states, {r['model']}: measured {r['paged']['measured'] / MB:,.1f} MiB, planned "
            f"{r['paged']['planned'] / MB:,.1f} MiB (CUDA managed memory, outside max_memory_allocated)"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu for a smoke run (default cuda)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-kit-gpu-memory-check"))
    parser.add_argument("--skip-1b", action="store_true", help="the tiny model only")
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible: this check measures GPU memory, so there is nothing to measure here")
        return 0
    from qlora_kit.loading import load_model
    from qlora_kit.lora import add_lora
    from qlora_kit.memory import shape_from_config
    from qlora_kit.memory.profile import cublas_workspace_bytes, cuda_device

    runtime, workspace = {}, None
    if device.type == "cuda":
        device = cuda_device(device)
        torch.cuda.set_device(device)
        warm = torch.ones(64, 64, device=device, dtype=torch.bfloat16)
        (warm @ warm).sum().item()  # CUDA and cuBLAS initialized
        del warm
        runtime["start"], workspace = runtime_outside_torch(device), cublas_workspace_bytes(device)
    names = ["tiny"] if args.skip_1b or device.type == "cpu" else list(CASES)
    results = []
    for name in names:
        shape, rows, seq = CASES[name]
        seq = 128 if device.type == "cpu" else seq  # the smoke run only checks that the script works
        model_dir = build_checkpoint(args.workdir / f"synthetic-{name}", shape)
        model = load_model(model_dir, device=device, dtype="bf16" if device.type == "cuda" else "fp32")
        add_lora(model, "all-linear", r=RANK, dropout=0.05, dtype=model.dtype)
        planned_shape = shape_from_config(model.config, name)
        for checkpointing in (False, True):
            for padded in (False, True):
                print(f"{name}: {rows} x {seq}, checkpointing {checkpointing}, padded {padded}", flush=True)
                results.append(run_case(model, name, planned_shape, rows, seq, checkpointing, padded, device))
        del model
        gc.collect()
    if device.type == "cuda":
        runtime["end"] = runtime_outside_torch(device)
    text = report(results, runtime, workspace)
    print(text)
    if device.type == "cpu":
        print("(CPU smoke run: nothing saved)")
        return 0
    data = {"device": str(device), "cublas_workspace_bytes": workspace, "runtime_outside_torch": runtime}
    save_results("gpu_memory_check", data | {"cases": results}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
