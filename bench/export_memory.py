"""Peak host memory of a merged export: ``qlora-kit export`` (streamed) vs the usual transformers + peft route.

The claim under test (DESIGN.md, "Memory is streamed"): exporting never holds a full 16-bit model; peak host
memory is about one output shard plus a working set, independent of the model's size.

    python bench/export_memory.py [--workdir DIR] [--sizes 0.5gb,2gb] [--shard-size 500MB]

1. Builds (once, cached in ``--workdir``) synthetic Llama-shaped bf16 checkpoints of ~0.5 GB and ~2.2 GB
   (random weights, written shard by shard), and for each a random LoRA adapter (r=16 on every decoder
   linear, non-zero B) in PEFT's layout, written straight from the shapes: no model is ever built.
2. For each checkpoint, in fresh subprocesses (so ``ru_maxrss`` starts clean), side by side:
     ours:  ``export_merged(adapter, out, dtype="bf16", max_shard_size=--shard-size)``
     usual: ``AutoModelForCausalLM.from_pretrained(bf16)`` + ``PeftModel.from_pretrained`` +
            ``merge_and_unload()`` + ``save_pretrained(out, max_shard_size=--shard-size)``
   Baseline = RSS after importing everything either route needs; peak = ``ru_maxrss`` at the end. A sampler
   thread also records heap (anon) and file-backed (mmap) resident pages separately.
The two routes do not compute the same weights: ours merges into the NF4-dequantized base (what QLoRA
training saw), the usual route into the original bf16 weights. The memory comparison is the point here.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from _common import (
    MB,
    RssSampler,
    llama_tensor_shapes,
    markdown_table,
    peak_rss_bytes,
    rss_bytes,
    save_results,
    write_synthetic_llama,
)

# Llama shapes: ~0.54 GB and (TinyLlama-1.1B's) ~2.2 GB of bf16 weights; untied embeddings.
SIZES: dict[str, dict[str, Any]] = {
    "0.5gb": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "vocab_size": 32000,
    },
    "2gb": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },
}
BASE_SHARD_BYTES = 1000 * 1000 * 1000  # how the synthetic base checkpoints are sharded
LORA = {"r": 16, "alpha": 32.0}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RESULT_MARKER = "RESULT "


# --- synthetic inputs -----------------------------------------------------------------------------------


def build_inputs(workdir: Path, size: str) -> tuple[Path, Path]:
    """The base checkpoint dir and the adapter dir for ``size`` (reused when complete)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from qlora_kit.adapter import CONFIG_NAME, WEIGHTS_NAME, AdapterConfig
    from qlora_kit.lora import PEFT_PREFIX

    shape = SIZES[size]
    base, adapter = workdir / f"base-{size}", workdir / f"adapter-{size}"
    marker = workdir / f"complete-{size}.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return base, adapter
    shutil.rmtree(base, ignore_errors=True)
    shutil.rmtree(adapter, ignore_errors=True)
    base.mkdir(parents=True)
    adapter.mkdir(parents=True)
    print(f"building {base} and {adapter} (once) ...", flush=True)
    LlamaConfig(**shape, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(base)

    write_synthetic_llama(base, shape, BASE_SHARD_BYTES)

    # The adapter from shapes alone: A (r, in) and B (out, r) for each decoder linear, fp32 as on CPU.
    lora: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(1)
    for name, (out_features, in_features) in (s for s in llama_tensor_shapes(shape) if s[0].split(".")[-2] in TARGETS):
        module = name.removesuffix(".weight")
        lora[f"{PEFT_PREFIX}{module}.lora_A.weight"] = torch.randn(LORA["r"], in_features, generator=generator) * (
            1 / math.sqrt(in_features)
        )
        lora[f"{PEFT_PREFIX}{module}.lora_B.weight"] = torch.randn(out_features, LORA["r"], generator=generator) * 0.01
    save_file(lora, str(adapter / WEIGHTS_NAME), metadata={"format": "pt"})
    config = AdapterConfig(LORA["r"], LORA["alpha"], 0.0, TARGETS, base_model_name_or_path=str(base))
    (adapter / CONFIG_NAME).write_text(json.dumps(config.to_peft_json(), indent=2) + "\n")
    marker.write_text(json.dumps(shape))
    return base, adapter


# --- one measurement, in a child process ----------------------------------------------------------------


def measure(route: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict[str, Any]:
    # Everything either route imports is imported before the baseline, so the figure is the export alone.
    import peft
    import torch
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_kit.export import export_merged

    AutoConfig.from_pretrained(base)  # config parsing and its lazy imports, outside the measurement
    gc.collect()
    baseline = rss_bytes()
    result: dict[str, Any] = {"route": route, "baseline_rss": baseline["rss"], "baseline_anon": baseline["anon"]}
    result["baseline_file"] = baseline["file"]
    # ru_maxrss survives execve: a child starts with its parent's RSS at fork as its "peak". The parent
    # stays small for that reason (inputs are built in their own process); this records that it worked.
    result["peak_rss_at_baseline"] = peak_rss_bytes()
    start = time.perf_counter()
    with RssSampler() as sampler:
        if route == "ours":
            export_merged(adapter, out, dtype="bf16", max_shard_size=shard_size, device="cpu", force=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
            model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
            model.save_pretrained(out, max_shard_size=shard_size)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["peak_rss"] = peak_rss_bytes()
    result["peak_anon_sampled"] = sampler.peak["anon"]
    result["peak_file_sampled"] = sampler.peak["file"]
    result["output_bytes"] = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    result["output_files"] = len(list(out.glob("*.safetensors")))
    return result


def run_child(route: str, base: Path, adapter: Path, out: Path, shard_size: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", route, "--base", str(base), "--adapter", str(adapter)]
    command += ["--out", str(out), "--shard-size", shard_size]
    print(f"measuring {route} on {base.name} ...", flush=True)
    # OMP_WAIT_POLICY=PASSIVE: torch and bitsandbytes each bring their own OpenMP runtime, whose idle
    # threads spin and starve each other on a small CPU; it changes the time, not the memory.
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    shutil.rmtree(out, ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return {"route": route, "error": f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}"}


# --- report ---------------------------------------------------------------------------------------------


def mib(n: float) -> str:
    return f"{n / MB:,.0f}"


ROUTE_NAMES = {
    "ours": "qlora-kit export (streamed)",
    "usual": "transformers + peft merge_and_unload + save_pretrained",
}


def report(rows: list[dict[str, Any]], shard_size: str) -> str:
    lines = [
        "# Peak host memory of a merged export (CPU, bf16 output)",
        "",
        f"Synthetic Llama bf16 checkpoints + a random LoRA adapter (r={LORA['r']}, all 7 decoder linears). "
        f"Both routes write `{shard_size}` shards. Each row is a fresh process: baseline = RSS after imports; "
        "peak = `ru_maxrss` at the end; anon / file = sampled peaks (every 5 ms) of heap and file-backed "
        "(mmap) resident pages above the baseline's. Figures in MiB.",
        "",
    ]
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["size"], ROUTE_NAMES[r["route"]], "failed", "", "", "", "", ""])
            continue
        table.append(
            [
                f"{r['checkpoint_bytes'] / 1e9:.2f} GB",
                ROUTE_NAMES[r["route"]],
                mib(r["baseline_rss"]),
                mib(r["peak_rss"]),
                f"**{mib(r['peak_rss'] - r['baseline_rss'])}**",
                f"{mib(r['peak_anon_sampled'] - r['baseline_anon'])} / "
                f"{mib(r['peak_file_sampled'] - r['baseline_file'])}",
                f"{r['output_files']} x, {r['output_bytes'] / 1e9:.2f} GB",
                r["seconds"],
            ]
        )
    headers = ["checkpoint", "route", "baseline", "peak", "peak - baseline", "anon / file", "output", "s"]
    lines.append(markdown_table(headers, table))
    lines.append("")
    by_size: dict[str, dict[str, dict[str, Any]]] = {}
    for r in rows:
        by_size.setdefault(r["size"], {})[r["route"]] = r
    for _size, pair in by_size.items():
        ours, usual = pair.get("ours", {}), pair.get("usual", {})
        if "peak_rss" in ours and "peak_rss" in usual:
            above_ours = ours["peak_rss"] - ours["baseline_rss"]
            above_usual = usual["peak_rss"] - usual["baseline_rss"]
            lines.append(
                f"- {ours['checkpoint_bytes'] / 1e9:.2f} GB checkpoint: above baseline, ours {mib(above_ours)} MiB vs "
                f"usual {mib(above_usual)} MiB ({above_usual / max(above_ours, 1):.1f}x); largest output tensor "
                f"{mib(ours['largest_tensor_bytes'])} MiB."
            )
    lines += [
        "",
        "Reading it: the usual route holds the whole bf16 model (plus peft's copies while merging), so its "
        "peak grows with the model. Ours holds one output shard (at most the shard size) plus the working set "
        "of one weight: reading it, NF4-quantizing it exactly as the loader does (in 1M-value slices), "
        "dequantizing to fp32, adding scaling * B @ A (one fused addmm), casting: about 12 bytes per value of "
        "that weight. That grows with the largest linear (here 2048 x 5632), not with the number of layers. "
        "Ours is slower on CPU because it re-quantizes every decoder linear to reproduce the weights training "
        "saw; the usual route merges into the original bf16 weights instead (a different, less faithful result).",
    ]
    for r in rows:
        if r.get("peak_rss_at_baseline", 0) > r.get("baseline_rss", 0) + 64 * MB:
            lines.append(f"- WARNING {r['size']} {r['route']}: ru_maxrss was already above the baseline at start")
        if "error" in r:
            lines.append(f"- {r['size']} {ROUTE_NAMES[r['route']]} failed: `{r['error'].splitlines()[-1][:300]}`")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/qlora-kit-bench/export"))
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, from {', '.join(SIZES)}")
    parser.add_argument("--shard-size", default="500MB")
    parser.add_argument("--build", help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=["ours", "usual"], help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = measure(args.child, args.base, args.adapter, args.out, args.shard_size)
        print(RESULT_MARKER + json.dumps(result), flush=True)
        return
    if args.build:
        base, adapter = build_inputs(args.workdir, args.build)
        from qlora_kit.loading import checkpoint_index

        entries = checkpoint_index(base)
        facts = {
            "size": args.build,
            "shape": SIZES[args.build],
            "base": str(base),
            "adapter": str(adapter),
            "checkpoint_bytes": sum(e.end - e.start for e in entries.values()),
            "largest_tensor_bytes": max(e.end - e.start for e in entries.values()),
        }
        print(RESULT_MARKER + json.dumps(facts), flush=True)
        return

    rows = []
    for size in args.sizes.split(","):
        # Built in a separate process, so this one never grows (see peak_rss_at_baseline).
        build = [sys.executable, __file__, "--build", size, "--workdir", str(args.workdir)]
        output = subprocess.run(build, capture_output=True, text=True, check=True).stdout
        facts = json.loads(
            next(line for line in output.splitlines() if line.startswith(RESULT_MARKER))[len(RESULT_MARKER) :]
        )
        base, adapter = Path(facts["base"]), Path(facts["adapter"])
        for route in ("ours", "usual"):
            rows.append({**facts, **run_child(route, base, adapter, args.workdir / f"out-{route}", args.shard_size)})
    markdown = report(rows, args.shard_size)
    print("\n" + markdown + "\n")
    save_results("export_memory", {"shard_size": args.shard_size, "lora": LORA, "results": rows}, markdown)


if __name__ == "__main__":
    main()
