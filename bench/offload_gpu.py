"""Weight streaming and activation offload on a GPU: a LLaMA-65B-shaped model under a 24 GiB cap.

    python bench/offload_gpu.py [--device cuda:N] [--cap-gib 24] [--skip-65b]
    python bench/offload_gpu.py --cpu-smoke      # this script's code path on a tiny shape, on CPU (nothing saved)

The model is synthetic: the LLaMA-65B shape (hidden 8192, 80 layers, 64 heads, ffn 22016, vocab 32000) whose
NF4 tensors are written directly (random codes and absmax codes, scales that keep activations in range), no
dense weights: the streamed layers' tensors go straight to pinned host memory, the resident ones to the GPU.
LoRA r 64 on all linears (bf16), gradient checkpointing, paged AdamW 32-bit (``auto``), seq 2048, batch 1,
``model.offload_weights`` with the planner's ``resident_layers`` for the cap and ``train.offload_activations``,
all under ``torch.cuda.set_per_process_memory_fraction`` = cap / the card's memory. Measured: two training
steps (``train.train_step``) complete, the peak of torch's allocator (<= the cap), step time and tokens/s, the
process's peak RSS (host RAM, pinned copies included), the copies' bytes and the residency counter; then an
8-layer slice of the same shape with and without streaming (every layer streamed): the overhead ratio.
The paged optimizer states live in CUDA managed memory, outside torch's allocator and its cap.

Budget: < 8 minutes on one H100/H200. Results: bench/results/offload_gpu.json and .md. Without CUDA (and
without --cpu-smoke) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import math
import re
import sys
import time
from typing import Any

from _common import markdown_table, peak_rss_bytes, save_results

GiB = 2**30
LLAMA_65B = dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=80, num_attention_heads=64)
LLAMA_65B |= dict(num_key_value_heads=64, vocab_size=32000, max_position_embeddings=2048)
TINY = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8)
TINY |= dict(num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
RANK, SEQ, BATCH = 64, 2048, 1


def synthetic_model(shape: dict[str, Any], device, dtype, resident: int | None):
    """The shape's Llama with NF4 codes written directly; layers >= ``resident`` in pinned host memory."""
    import torch
    from transformers import LlamaConfig

    from qlora_kit.loading import _materialize_buffers, build_skeleton
    from qlora_kit.quant import NF4Linear

    config = LlamaConfig(**shape, tie_word_embeddings=False, pad_token_id=0)
    model = build_skeleton(config, dtype)
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            layer = int(re.search(r"\.(\d+)\.", name).group(1))
            _fill_nf4(module, device, on_host=resident is not None and layer >= resident)
    for name, param in list(model.named_parameters()):
        owner, _, attr = name.rpartition(".")
        value = torch.ones if "norm" in name else lambda *s, **k: torch.randn(*s, **k) * 0.02
        tensor = value(param.shape, dtype=dtype, device=device)
        setattr(model.get_submodule(owner), attr, torch.nn.Parameter(tensor, requires_grad=False))
    _materialize_buffers(model, config, device)
    return model


def _fill_nf4(module, device, on_host: bool) -> None:
    """Random codes and absmax codes; one absmax scale and offset that make the weights ~N(0, 1/in)."""
    import torch

    def place(tensor):
        if not on_host or device.type != "cuda":
            return tensor
        return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True).copy_(tensor)

    numel = module.in_features * module.out_features
    blocks = math.ceil(numel / 64)
    module.codes = place(torch.randint(0, 256, (math.ceil(numel / 2),), dtype=torch.uint8, device=device))
    module.absmax_codes = place(torch.randint(0, 256, (blocks,), dtype=torch.uint8, device=device))
    offset = 2.0 / math.sqrt(module.in_features)  # absmax of a block of 64 values of std 1/sqrt(in)
    scales = torch.full((math.ceil(blocks / 256),), 0.1 * offset, dtype=torch.float32, device=device)
    module.absmax_scales = place(scales.view(torch.int32))
    module.absmax_offset = place(torch.tensor(offset, dtype=torch.float32, device=device).view(torch.int32))


def train_steps(model, device, dtype, steps: int, seq: int, offload: dict | None) -> dict[str, Any]:
    """LoRA + checkpointing + offload on ``model``; ``steps`` train_steps of one sequence; their times."""
    import torch

    from qlora_kit.config import TrainConfig
    from qlora_kit.lora import add_lora
    from qlora_kit.offload import enable_offload
    from qlora_kit.optim import make_optimizer
    from qlora_kit.run import TrainState
    from qlora_kit.train import train_step

    handle = enable_offload(model, device, **offload) if offload else None  # first: LoRA goes where the base is
    add_lora(model, "all-linear", RANK, 16, 0.05, False, dtype)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    state = TrainState(model=model, params=params, optimizer=make_optimizer("auto", params, TrainConfig(), device))
    state.max_grad_norm = 0.3
    ids = torch.randint(3, model.config.vocab_size, (BATCH, seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    times, losses = [], []
    for _ in range(steps):
        began = time.perf_counter()
        stats = train_step(state, [batch])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - began)
        losses.append(stats.loss)
    out: dict[str, Any] = {"step_s": [round(t, 3) for t in times], "losses": losses, "tokens": BATCH * seq}
    out["tokens_per_s"] = round(BATCH * seq / times[-1], 1)
    if handle is not None:
        s = handle.stats
        out |= {"peak_streamed_layers": s.peak_streamed, "bytes_moved": s.bytes_moved}
        out |= {"pinned_weight_bytes": sum(handle.layer_bytes.values()), "left_on_device": handle.resident_copies}
        out |= {
            "activations_offloaded": s.activations_offloaded,
            "peak_activations_on_device": s.peak_activations_on_device,
        }
        out["streamed_layers"] = len(handle.streamed)
    return out


def planned_resident(shape: dict[str, Any], seq: int, cap: int, device_type: str) -> tuple[int, Any]:
    from transformers import LlamaConfig

    from qlora_kit.memory import plan_memory
    from qlora_kit.memory.shapes import shape_from_config

    model_shape = shape_from_config(LlamaConfig(**shape, tie_word_embeddings=False), "synthetic")
    plan = plan_memory(
        model_shape, seq_len=seq, batch_size=BATCH, rank=RANK, device=device_type, gpu_bytes=cap,
        offload_weights=True, offload_activations=True,
    )  # fmt: skip
    return plan.settings["resident_layers"], plan


def run_full(shape, device, dtype, seq: int, cap: int, resident_override: int | None) -> dict[str, Any]:
    import torch

    resident, plan = planned_resident(shape, seq, cap, device.type)
    resident = resident if resident_override is None else resident_override
    began = time.perf_counter()
    model = synthetic_model(shape, device, dtype, resident)
    build_s = time.perf_counter() - began
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = train_steps(model, device, dtype, 2, seq, dict(weights=True, resident_layers=resident, activations=True))
    result |= {"resident_layers": resident, "build_s": round(build_s, 1), "planned_total": plan.total}
    result |= {"planned_offload": plan.offload, "peak_rss": peak_rss_bytes()}
    if device.type == "cuda":
        result["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        result["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    return result


def run_slice(shape, device, dtype, seq: int) -> dict[str, Any]:
    """8 layers of the shape: every layer streamed vs all resident, 3 steps each (the first warms up)."""
    import torch

    sliced = {**shape, "num_hidden_layers": min(8, shape["num_hidden_layers"])}
    out = {}
    for name, resident in (("resident", None), ("streamed", 0)):
        model = synthetic_model(sliced, device, dtype, resident)
        offload = dict(weights=True, resident_layers=0) if resident is not None else None
        out[name] = train_steps(model, device, dtype, 3, seq, offload)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out["overhead_ratio"] = round(out["streamed"]["step_s"][-1] / out["resident"]["step_s"][-1], 3)
    return out


def report(full: dict | None, sliced: dict, cap: int, device_name: str) -> str:
    lines = [f"# Weight streaming + activation offload on {device_name}", ""]
    if full is not None:
        fits = full.get("peak_allocated", 0) <= cap
        rows = [
            ["resident / streamed layers", f"{full['resident_layers']} / {full['streamed_layers']}"],
            ["steps completed, losses", f"{len(full['step_s'])}, {[round(x, 4) for x in full['losses']]}"],
            ["step time (s)", full["step_s"]],
            ["tokens/s (step 2)", full["tokens_per_s"]],
            [
                "peak allocated (GiB)",
                f"{full.get('peak_allocated', 0) / GiB:.2f} (cap {cap / GiB:g}: {'within' if fits else 'OVER'})",
            ],
            ["planned device total (GiB)", f"{full['planned_total'] / GiB:.2f}"],
            ["peak RSS, host (GiB)", f"{full['peak_rss'] / GiB:.2f}"],
            ["pinned NF4 of streamed layers (GiB)", f"{full['pinned_weight_bytes'] / GiB:.2f}"],
            ["bytes moved over 2 steps (GiB)", f"{full['bytes_moved'] / GiB:.2f}"],
            ["peak streamed layers on device", full["peak_streamed_layers"]],
            ["planned step time (s, estimate)", round(full["planned_offload"]["step_s"], 2)],
        ]
        lines += ["## 65B-shaped model, seq 2048, batch 1, r 64", "", markdown_table(["", "measured"], rows), ""]
    rows = [[k, sliced[k]["step_s"], sliced[k]["tokens_per_s"]] for k in ("resident", "streamed")]
    lines += [
        "## 8-layer slice: every layer streamed vs all resident",
        "",
        markdown_table(["", "step s", "tokens/s"], rows),
    ]
    lines += ["", f"overhead ratio (streamed / resident, last step): {sliced['overhead_ratio']}"]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--cap-gib", type=float, default=24.0)
    p.add_argument("--skip-65b", action="store_true", help="only the 8-layer slice")
    p.add_argument("--resident-layers", type=int, help="instead of the planner's count for the cap")
    p.add_argument("--cpu-smoke", action="store_true", help="a tiny shape on CPU: the code path, nothing saved")
    args = p.parse_args()
    import torch

    if args.cpu_smoke:
        device, dtype, shape, seq = torch.device("cpu"), torch.float32, TINY, 64
    elif not torch.cuda.is_available():
        print("no CUDA GPU visible: bench/offload_gpu.py measures a GPU; nothing to do (try --cpu-smoke)")
        return 0
    else:
        device, dtype, shape, seq = torch.device(args.device), torch.bfloat16, LLAMA_65B, SEQ
    cap = int(args.cap_gib * GiB)
    sliced = run_slice(shape, device, dtype, seq)
    print(f"8-layer slice: overhead ratio {sliced['overhead_ratio']} ({sliced})")
    full = None
    if not args.skip_65b:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(
                cap / torch.cuda.get_device_properties(device).total_memory, device
            )
        resident = 1 if args.cpu_smoke and args.resident_layers is None else args.resident_layers
        full = run_full(shape, device, dtype, seq, cap, resident)
        print({k: v for k, v in full.items() if k != "planned_offload"})
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny shape)"
    markdown = report(full, sliced, cap, name)
    print(markdown)
    if device.type == "cuda":
        save_results("offload_gpu", {"full": full, "slice": sliced, "cap_bytes": cap}, markdown)
        ok = full is None or (full["peak_allocated"] <= cap and len(full["step_s"]) == 2)
        return 0 if ok else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
