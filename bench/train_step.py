"""One QLoRA training step: qlora-kit vs the standard stack (transformers + bitsandbytes NF4/DQ + peft LoRA).

    python bench/train_step.py [--rounds N] [--warmup N] [--steps N] [--batch B] [--seq S]
                               [--checkpointing off|on] [--cases masked,full] [--gpu auto|on|off]

Both stacks train the same model on the same batch with the same settings:

  ours       ``load_model`` (streaming NF4 + double quant) -> ``add_lora`` -> ``train.train_step`` (the
             training loop's own step: ``loss.causal_lm_loss``, backward, clip, optimizer + schedule step)
  reference  ``AutoModelForCausalLM.from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit,
             nf4, double quant, compute dtype))`` -> ``peft.get_peft_model(LoraConfig)`` -> ``model(**batch,
             labels=...).loss``

LoRA r 16, alpha 32, dropout 0.05 on all linears of the decoder layers (never lm_head); the same gradient
checkpointing setting (non-reentrant when on); torch ``AdamW`` for both; a step is forward + loss, backward,
grad-norm clipping (0.3), optimizer step, ``zero_grad(set_to_none=True)``. peft's
``prepare_model_for_kbit_training`` is not called: it would upcast the reference's non-quantized weights to
fp32, which is not the same compute dtype on GPU (on CPU everything is fp32 anyway).

CPU (always): the real SmolLM2-135M-Instruct, fp32 compute, one batch of ``--batch`` rows of ``--seq`` tokens
built from ``recipes/data/text_tools_train.jsonl`` exactly as the default recipe would with packing (Alpaca
template, prompt tokens masked to -100, examples packed into rows with restarting position ids). Two cases,
same token ids:
  masked     the recipe's labels: only response tokens carry a label (~13% of the tokens here)
  full       every token carries a label (labels = input ids): the case where the loss costs the most
GPU (when CUDA is visible): Llama-shaped models with random bf16 weights at about 1B and 8B parameters
(written once to ``--workdir``), bf16 compute, random token ids, every token labelled, checkpointing on.

Each measurement runs in a fresh subprocess (peak RSS is per process), stacks alternating round by round
(ours, ref, then ref, ours, ...) so that other work on the machine weighs on both alike. In a worker: load,
add LoRA, build the optimizer; then the step phase: ``--warmup`` untimed steps, ``--steps`` timed ones.
Memory reported per worker:
  step peak RSS     the kernel's high-water mark of the step phase (VmHWM, reset with /proc/self/clear_refs
                    after setup), so loading does not count; the headline memory figure on CPU
  process peak RSS  VmHWM over the whole process, loading included
  torch peak        on CPU: the peak of live torch allocations during one extra (profiled) step, above what
                    was live when it started (activations, logits, gradients, temporaries: the step's working
                    set); on GPU: ``torch.cuda.max_memory_allocated`` over the step phase (total, weights in)
Ratios are ours / reference: time < 1 and memory < 1 favour ours. Goals (issue 5): CPU step time <= 0.9x
and peak RSS <= 0.8x; GPU tokens/s >= 1.3x and peak memory <= 0.7x.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import MB, busy_machine_note, load_reference_nf4, markdown_table, save_results, write_synthetic_llama

REPO = Path(__file__).resolve().parent.parent
TRAIN_DATA = REPO / "recipes" / "data" / "text_tools_train.jsonl"
RESULT_MARKER = "RESULT "
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05, "targets": "all-linear"}
LEARNING_RATE = 3e-4
MAX_GRAD_NORM = 0.3
GOALS = {"cpu": {"time": 0.9, "memory": 0.8}, "cuda": {"tokens_s": 1.3, "memory": 0.7}}

# Llama-3.2-1B and Llama-3-8B shapes (GQA, vocab 128256); random bf16 weights, written once.
GPU_MODELS = {
    "llama-1b": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "llama-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}
GPU_BATCH = {"llama-1b": (8, 512), "llama-8b": (4, 512)}  # (rows, tokens per row)


# --- memory readings (Linux) ----------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def vm_hwm() -> int:
    """The kernel's peak resident set of this process (since start or the last reset), bytes."""
    return _status_kib("VmHWM") * 1024


def vm_rss() -> int:
    return _status_kib("VmRSS") * 1024


def reset_vm_hwm() -> bool:
    """Reset VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# --- the batch ------------------------------------------------------------------------------------------


def build_cpu_batches(model_dir: Path, rows: int, seq: int) -> dict[str, dict[str, Any]]:
    """``masked`` and ``full`` batches of ``rows`` x ``seq`` tokens: packed Alpaca rows, as the recipe packs them."""
    import torch

    from qlora_kit.data import IGNORE_INDEX, collate, pack, pack_blocks, tokenize_alpaca
    from qlora_kit.loading import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    examples = []
    for line in TRAIN_DATA.read_text().splitlines():
        row = json.loads(line)
        examples.append(tokenize_alpaca(tokenizer, row["instruction"], row.get("input", ""), row["output"]))
    # The blocks that come closest to `seq` tokens (best-fit packing leaves the last ones short).
    blocks = pack_blocks([len(e["input_ids"]) for e in examples], seq)
    blocks = sorted(blocks, key=lambda b: -sum(len(examples[i]["input_ids"]) for i in b))[:rows]
    if len(blocks) < rows:
        raise SystemExit(f"only {len(blocks)} packed rows of {seq} tokens in {TRAIN_DATA}; lower --batch")
    masked = collate([pack([examples[i] for i in block]) for block in blocks], tokenizer.pad_token_id, seq)
    full = {**masked, "labels": masked["input_ids"].clone()}
    batches = {}
    for name, batch in (("masked", masked), ("full", full)):
        labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        batches[name] = {"batch": batch, "labelled_tokens": labelled, "tokens": batch["input_ids"].numel()}
    torch.manual_seed(0)
    return batches


def random_batch(vocab: int, rows: int, seq: int) -> dict[str, Any]:
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (rows, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# --- one worker: load one stack, run the steps, report --------------------------------------------------


def build_ours(model_dir: str, device, dtype, checkpointing: bool):
    """Our stack, stepped by the training loop's own ``train.train_step`` (the step ``qlora-kit train`` runs)."""
    import torch

    from qlora_kit.loading import load_model
    from qlora_kit.lora import add_lora
    from qlora_kit.run import TrainState
    from qlora_kit.train import train_step

    model = load_model(model_dir, device=device, dtype=dtype)
    add_lora(model, LORA["targets"], LORA["r"], LORA["alpha"], LORA["dropout"], dtype=dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    state = TrainState(model=model, params=params, optimizer=optimizer, max_grad_norm=MAX_GRAD_NORM)

    def step(batch) -> float:
        return train_step(state, [batch]).loss

    return params, step


def build_reference(model_dir: str, device, dtype, checkpointing: bool):
    import torch
    from peft import LoraConfig, get_peft_model

    model = load_reference_nf4(model_dir, dtype, device_map={"": str(device)})
    # As every QLoRA training script does: with the default use_cache=True the model builds a KV cache in
    # training (memory for nothing), and transformers then ignores packed position ids (no per-example mask).
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    for param in model.parameters():  # adapters in the compute dtype, as ours
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
    model.train()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)

    def step(batch) -> float:  # what a transformers + peft training loop does for one micro-batch
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return params, step


def allocator_peak_during(fn) -> int:
    """Peak of live torch CPU allocations while ``fn`` runs, above what was live when it started (profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    checkpointing = args.checkpointing == "on"
    cuda = device.type == "cuda"
    batch = {k: v.to(device) for k, v in torch.load(args.batch_file).items()}
    # Everything either stack imports is imported before the baseline.
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import qlora_kit.train  # noqa: F401

    gc.collect()
    baseline_rss = vm_rss()
    started = time.perf_counter()
    build = build_ours if args.worker == "ours" else build_reference
    torch.manual_seed(0)
    params, step_fn = build(args.model_dir, device, dtype, checkpointing)
    load_s = time.perf_counter() - started
    gc.collect()
    load_peak_rss = vm_hwm()
    setup_rss = vm_rss()
    hwm_reset = reset_vm_hwm()
    if cuda:
        torch.cuda.synchronize()
        setup_allocated = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    losses: list[float] = []

    def step() -> None:
        losses.append(step_fn(batch))

    times = []
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    step_peak_rss = vm_hwm()
    result: dict[str, Any] = {
        "stack": args.worker,
        "case": args.case,
        "device": device.type,
        "dtype": args.dtype,
        "checkpointing": checkpointing,
        "tokens": int(batch["input_ids"].numel()),
        "load_s": round(load_s, 2),
        "step_s": times,
        "median_step_s": statistics.median(times),
        "losses": losses,
        "trainable_params": sum(p.numel() for p in params),
        "baseline_rss": baseline_rss,
        "setup_rss": setup_rss,
        "load_peak_rss": load_peak_rss,
        "step_peak_rss": step_peak_rss if hwm_reset else None,
        "process_peak_rss": max(load_peak_rss, step_peak_rss),
    }
    if cuda:
        result["setup_allocated"] = setup_allocated
        result["step_peak_allocated"] = torch.cuda.max_memory_allocated(device)
        result["step_peak_reserved"] = torch.cuda.max_memory_reserved(device)
    elif args.profile_allocator:
        result["step_torch_peak_above_start"] = allocator_peak_during(step)
    return result


def run_worker(
    stack: str, case: str, model_dir: Path, batch_file: Path, args, device: str, dtype: str, allocator: bool
) -> dict:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        stack,
        "--case",
        case,
        "--model-dir",
        str(model_dir),
        "--batch-file",
        str(batch_file),
        "--device",
        device,
        "--dtype",
        dtype,
        "--checkpointing",
        "on" if device == "cuda" else args.checkpointing,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
    ]
    if allocator:
        command.append("--profile-allocator")
    proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{stack}/{case} worker failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix(RESULT_MARKER))


# --- the parent: alternate, aggregate, report -----------------------------------------------------------


def alternate(cases: dict[str, Path], model_dir: Path, args, device: str, dtype: str) -> dict[str, dict]:
    """Per case: ``--rounds`` measurements of each stack, alternating which goes first round by round."""
    runs: dict[str, dict[str, list[dict]]] = {case: {"ours": [], "ref": []} for case in cases}
    for round_index in range(args.rounds):
        order = ("ours", "ref") if round_index % 2 == 0 else ("ref", "ours")
        for case, batch_file in cases.items():
            for stack in order:
                # The allocator's view is deterministic: one profiled step, in the first round only.
                allocator = args.allocator and round_index == 0
                run = run_worker(stack, case, model_dir, batch_file, args, device, dtype, allocator)
                runs[case][stack].append(run)
                peak = run["step_peak_rss"] or run["process_peak_rss"]
                print(
                    f"  round {round_index + 1}/{args.rounds} {case:>8} {stack:>4}: median step "
                    f"{run['median_step_s']:.3f} s, step peak RSS {peak / MB:.0f} MiB, "
                    f"loss {run['losses'][0]:.4f}",
                    flush=True,
                )
    return runs


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Medians over rounds (each round's figure is itself a median over its timed steps)."""

    def med(key: str) -> float | None:
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    step_s = statistics.median([t for r in runs for t in r["step_s"]])
    summary = {
        "rounds": len(runs),
        "median_step_s": step_s,
        "min_step_s": min(t for r in runs for t in r["step_s"]),
        "tokens_per_s": runs[0]["tokens"] / step_s,
        "load_s": med("load_s"),
        "setup_rss": med("setup_rss"),
        "step_peak_rss": med("step_peak_rss"),
        "process_peak_rss": med("process_peak_rss"),
        "step_torch_peak_above_start": med("step_torch_peak_above_start"),
        "step_peak_allocated": med("step_peak_allocated"),
        "step_peak_reserved": med("step_peak_reserved"),
        "first_loss": runs[0]["losses"][0],
        "trainable_params": runs[0]["trainable_params"],
    }
    return summary


def ratios(ours: dict, ref: dict) -> dict[str, float | None]:
    def ratio(key: str) -> float | None:
        return ours[key] / ref[key] if ours.get(key) and ref.get(key) else None

    return {
        "step_time": ratio("median_step_s"),
        "tokens_per_s": ratio("tokens_per_s"),
        "step_peak_rss": ratio("step_peak_rss"),
        "process_peak_rss": ratio("process_peak_rss"),
        "step_torch_peak_above_start": ratio("step_torch_peak_above_start"),
        "step_peak_allocated": ratio("step_peak_allocated"),
    }


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MB:,.0f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def section_markdown(title: str, results: dict[str, dict], device: str) -> str:
    gpu = device == "cuda"
    headers = ["case", "stack", "median step (s)", "tokens/s", "RSS after load (MiB)", "step peak RSS (MiB)"]
    headers.append("process peak RSS (MiB)")
    headers.append("GPU peak allocated (MiB)" if gpu else "torch step working set (MiB)")
    headers.append("first loss")
    rows, ratio_rows = [], []
    for case, r in results.items():
        for stack in ("ours", "ref"):
            s = r[stack]
            rows.append(
                [
                    case,
                    "qlora-kit" if stack == "ours" else "transformers+bnb+peft",
                    f"{s['median_step_s']:.3f}",
                    f"{s['tokens_per_s']:,.0f}",
                    _mib(s["setup_rss"]),
                    _mib(s["step_peak_rss"]),
                    _mib(s["process_peak_rss"]),
                    _mib(s["step_peak_allocated"] if gpu else s["step_torch_peak_above_start"]),
                    f"{s['first_loss']:.4f}",
                ]
            )
        q = r["ratios"]
        goal = GOALS[device]
        if gpu:
            verdict = (
                f"tokens/s {_x(q['tokens_per_s'])} (goal >= {goal['tokens_s']}x), "
                f"peak allocated {_x(q['step_peak_allocated'])} (goal <= {goal['memory']}x)"
            )
        else:
            verdict = (
                f"time {_x(q['step_time'])} (goal <= {goal['time']}x), "
                f"step peak RSS {_x(q['step_peak_rss'])} (goal <= {goal['memory']}x)"
            )
        ratio_rows.append(
            [
                case,
                _x(q["step_time"]),
                _x(q["tokens_per_s"]),
                _x(q["step_peak_rss"]),
                _x(q["process_peak_rss"]),
                _x(q["step_peak_allocated"] if gpu else q["step_torch_peak_above_start"]),
                verdict,
            ]
        )
    ratio_headers = ["case", "step time", "tokens/s", "step peak RSS", "process peak RSS"]
    ratio_headers += ["GPU peak allocated" if gpu else "torch working set", "against the goals"]
    return "\n".join(
        [
            f"## {title}",
            "",
            markdown_table(headers, rows),
            "",
            "Ratios ours / reference:",
            "",
            markdown_table(ratio_headers, ratio_rows),
        ]
    )


def cpu_section(args, workdir: Path) -> tuple[dict, str]:
    import torch

    from qlora_kit.models import resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m-instruct")
    batches = build_cpu_batches(model_dir, args.batch, args.seq)
    cases = {}
    for case in args.cases:
        path = workdir / f"batch_{case}.pt"
        torch.save(batches[case]["batch"], path)
        cases[case] = path
    print(f"CPU: SmolLM2-135M, batch {args.batch} x {args.seq}, checkpointing {args.checkpointing}", flush=True)
    runs = alternate(cases, model_dir, args, "cpu", "fp32")
    results = {}
    for case in cases:
        ours, ref = summarize(runs[case]["ours"]), summarize(runs[case]["ref"])
        results[case] = {
            "labelled_tokens": batches[case]["labelled_tokens"],
            "tokens": batches[case]["tokens"],
            "ours": ours,
            "ref": ref,
            "ratios": ratios(ours, ref),
            "runs": runs[case],
        }
    labelled = ", ".join(
        f"{case}: {batches[case]['labelled_tokens']} of {batches[case]['tokens']} tokens labelled" for case in cases
    )
    title = (
        f"CPU: SmolLM2-135M-Instruct (real weights), fp32, batch {args.batch} x {args.seq} "
        f"({labelled}), checkpointing {args.checkpointing}"
    )
    return {
        "model": "smollm2-135m-instruct",
        "batch": args.batch,
        "seq": args.seq,
        "checkpointing": args.checkpointing,
        "cases": results,
    }, section_markdown(title, results, "cpu")


def gpu_section(args, workdir: Path) -> tuple[dict, str]:
    import torch
    from transformers import LlamaConfig

    data: dict[str, Any] = {}
    parts = []
    for name, shape in GPU_MODELS.items():
        model_dir = workdir / f"synthetic-{name}"
        marker = model_dir / "bench_complete.json"
        if not (marker.is_file() and json.loads(marker.read_text()) == shape):
            model_dir.mkdir(parents=True, exist_ok=True)
            print(f"writing a random-weight {name} checkpoint to {model_dir} (once) ...", flush=True)
            LlamaConfig(**shape, dtype="bfloat16").save_pretrained(model_dir)
            write_synthetic_llama(model_dir, shape, 2 * 1000**3)
            marker.write_text(json.dumps(shape))
        rows, seq = GPU_BATCH[name]
        batch_file = workdir / f"batch_{name}.pt"
        torch.save(random_batch(shape["vocab_size"], rows, seq), batch_file)
        print(f"GPU: {name}, batch {rows} x {seq}, bf16, checkpointing on", flush=True)
        runs = alternate({"full": batch_file}, model_dir, args, "cuda", "bf16")["full"]
        ours, ref = summarize(runs["ours"]), summarize(runs["ref"])
        data[name] = {
            "shape": shape,
            "batch": rows,
            "seq": seq,
            "ours": ours,
            "ref": ref,
            "ratios": ratios(ours, ref),
            "runs": runs,
        }
        title = f"GPU: {name} (random weights), bf16, batch {rows} x {seq}, all tokens labelled, checkpointing on"
        parts.append(section_markdown(title, {"full": data[name]}, "cuda"))
    return data, "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="subprocess runs per stack and case, alternating")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--checkpointing", choices=["off", "on"], default="off", help="CPU runs (GPU: always on)")
    parser.add_argument("--cases", default="masked,full", help="CPU label cases: masked, full")
    parser.add_argument("--gpu", choices=["auto", "on", "off"], default="auto", help="the GPU section")
    parser.add_argument("--cpu", choices=["on", "off"], default="on", help="the CPU section")
    parser.add_argument("--workdir", type=Path, default=None, help="synthetic GPU checkpoints (default: a tmp dir)")
    parser.add_argument("--no-allocator", dest="allocator", action="store_false", help="skip the profiled step")
    parser.add_argument("--profile-allocator", action="store_true", help=argparse.SUPPRESS)
    # internal: one measurement in this process
    parser.add_argument("--worker", choices=["ours", "ref"], help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--batch-file", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT_MARKER + json.dumps(worker(args)), flush=True)
        return
    args.cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if unknown := set(args.cases) - {"masked", "full"}:
        parser.error(f"unknown --cases {sorted(unknown)}; use masked and/or full")

    import torch

    load_at_start = os.getloadavg()[0]
    use_gpu = args.gpu == "on" or (args.gpu == "auto" and torch.cuda.is_available())
    if args.gpu == "on" and not torch.cuda.is_available():
        parser.error("--gpu on: no CUDA GPU is visible")
    started = time.perf_counter()
    data: dict[str, Any] = {
        "lora": LORA,
        "optimizer": f"torch.optim.AdamW(lr={LEARNING_RATE}), clip {MAX_GRAD_NORM}",
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "goals": GOALS,
        "load_avg_1m_at_start": load_at_start,
    }
    parts = [
        "# One QLoRA training step: qlora-kit vs transformers + bitsandbytes + peft",
        "",
        f"LoRA r {LORA['r']}, alpha {LORA['alpha']:g}, dropout {LORA['dropout']} on all decoder linears; torch "
        f"AdamW; step = forward + loss, backward, clip, optimizer step. Each stack runs in its own subprocess, "
        f"alternating, {args.rounds} rounds x {args.steps} timed steps after {args.warmup} warmup step(s); "
        "figures are medians. Step peak RSS excludes loading (VmHWM reset after setup). "
        "Torch step working set: peak of live torch allocations during one profiled step, above its start.",
    ]
    if note := busy_machine_note(load_at_start):
        parts += ["", note]
    with tempfile.TemporaryDirectory(prefix="train_step_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        if args.cpu == "on":
            data["cpu"], markdown = cpu_section(args, workdir)
            parts += ["", markdown]
        if use_gpu:
            data["gpu"], markdown = gpu_section(args, workdir)
            parts += ["", markdown]
        else:
            parts += ["", "GPU section: skipped (no CUDA GPU visible)."]
    data["wall_s"] = round(time.perf_counter() - started, 1)
    markdown = "\n".join(parts)
    print("\n" + markdown + "\n")
    save_results("train_step", data, markdown)


if __name__ == "__main__":
    main()
