"""LoRA's variants on the default recipe, side by side: LoRA, rsLoRA, DoRA, VeRA, LoRA+, PiSSA-init, LoftQ-init.

    python bench/variants.py [--steps N] [--out DIR]

Each variant trains the default recipe (recipes/smollm2_alpaca.yaml: SmolLM2-135M, all-linear r=16, the same
data, seed, lr schedule and step count) in its own process, and reports: trainable parameters; the held-out
loss at step 0 and its perplexity ratio to the 16-bit model (exp(loss - loss_16bit): what the 4-bit base, and
an init that cancels part of its error, cost before training); the final held-out loss; training tokens/s;
load time (PiSSA/LoftQ do their SVDs while loading) and the process's peak RSS. Also: the cost of DoRA's row
norm, one SmolLM2-shaped layer's forward + backward against LoRA's, timed side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _common import MB, busy_machine_note, markdown_table, peak_rss_bytes, save_results

RECIPE = "recipes/smollm2_alpaca.yaml"
VARIANTS: dict[str, list[str]] = {
    "LoRA": [],
    "rsLoRA": ["lora.use_rslora=true"],
    "DoRA": ["lora.variant=dora"],
    "VeRA (r=256)": ["lora.variant=vera", "lora.r=256"],
    "LoRA+ (ratio 16)": ["train.loraplus_lr_ratio=16"],
    "PiSSA init": ["lora.init=pissa"],
    "LoftQ init (2 iters)": ["lora.init=loftq", "lora.init_iters=2"],
}


def run_one(name: str, out: Path, steps: int) -> None:
    """In a child process: train one variant, write its figures to out/result.json."""
    from qlora_kit.config import load_config
    from qlora_kit.train import finish, fit, prepare, setup

    overrides = [*VARIANTS[name], f"output.dir={out}", f"train.max_steps={steps}", "train.eval_steps=0"]
    overrides += [f"train.save_steps={steps}", "train.resume=none", "output.sample_max_new_tokens=1"]
    cfg = load_config(RECIPE, overrides)
    inputs = prepare(cfg)
    started = time.perf_counter()
    run = setup(inputs)
    load_s = time.perf_counter() - started
    try:
        result = fit(run)
        finish(run, result)
    finally:
        run.log.close()
    summary = json.loads((out / "summary.json").read_text())
    figures = {**summary, "load_s": round(load_s, 1), "peak_rss_mib": round(peak_rss_bytes() / MB)}
    (out / "result.json").write_text(json.dumps(figures, indent=2) + "\n")


def loss_16bit() -> float:
    """The held-out loss of the 16-bit (unquantized, fp32 compute) model: the reference the ratios divide by."""
    import torch

    from qlora_kit.config import load_config
    from qlora_kit.loading import load_model
    from qlora_kit.train import evaluate, prepare

    cfg = load_config(RECIPE, ["train.resume=none", "output.dir=/tmp/qlora-kit-bench/variants/16bit"])
    inputs = prepare(cfg)
    model = load_model(cfg.model.name_or_path, device="cpu", dtype=torch.float32, quantize=False)
    return evaluate(model, inputs.data, cfg.train.micro_batch_size)


def dora_cost(rounds: int = 5) -> dict[str, float]:
    """Forward + backward of one SmolLM2 MLP-shaped layer (576 -> 1536, NF4 base, r=16) on a micro-batch of the
    recipe's size (8 x 256 tokens): DoRA and LoRA interleaved, medians, and the row norm alone."""
    import torch

    from qlora_kit.lora import LoRALinear
    from qlora_kit.lora_variants import DoRALinear, dora_row_norm
    from qlora_kit.quant import NF4Linear

    torch.manual_seed(0)
    base = NF4Linear.from_weight(torch.randn(1536, 576) * 0.02)
    layers = {"lora": LoRALinear(base, 16, 32.0), "dora": DoRALinear(base, 16, 32.0)}
    x = torch.randn(8, 256, 576)
    times: dict[str, list[float]] = {"lora": [], "dora": [], "norm": []}
    for _ in range(rounds):
        for name, layer in layers.items():
            xi = x.clone().requires_grad_(True)
            started = time.perf_counter()
            layer(xi).sum().backward()
            times[name].append(time.perf_counter() - started)
        weight = base.dequantize()
        a, b = layers["dora"].lora_a.weight.detach(), layers["dora"].lora_b.weight.detach()
        started = time.perf_counter()
        dora_row_norm(weight, a, b, 2.0)
        times["norm"].append(time.perf_counter() - started)
    med = {name: statistics.median(values) for name, values in times.items()}
    return {
        "lora_ms": 1e3 * med["lora"],
        "dora_ms": 1e3 * med["dora"],
        "norm_ms": 1e3 * med["norm"],
        "dora_over_lora": med["dora"] / med["lora"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-kit-bench/variants"))
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args.one, args.out, args.steps)

    load_at_start = os.getloadavg()[0]
    results: dict[str, dict] = {}
    for name in VARIANTS:
        out = args.out / name.split(" ")[0].replace("+", "plus")
        shutil.rmtree(out, ignore_errors=True)
        print(f"training {name} ...", flush=True)
        command = [sys.executable, __file__, "--one", name, "--out", str(out), "--steps", str(args.steps)]
        proc = subprocess.run(command, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        results[name] = json.loads((out / "result.json").read_text())
    reference = loss_16bit()
    cost = dora_cost()
    data = {"steps": args.steps, "loss_16bit": reference, "variants": results, "dora_cost": cost}
    save_results("variants", data, _markdown(args.steps, reference, results, cost, load_at_start))


def _markdown(steps: int, reference: float, results: dict[str, dict], cost: dict, load_at_start: float) -> str:
    rows = []
    for name, r in results.items():
        rows.append(
            [
                name,
                f"{r['trainable_params']:,}",
                f"{r['eval_loss_start']:.4f}",
                f"{math.exp(r['eval_loss_start'] - reference):.3f}",
                f"{r['eval_loss_end']:.4f}",
                f"{r['tokens_per_s']:.0f}",
                f"{r['load_s']:.1f}",
                f"{r['peak_rss_mib']:,}",
            ]
        )
    headers = ["variant", "trainable params", "step-0 held-out loss", "ppl ratio to 16-bit", f"loss after {steps}"]
    headers += ["tokens/s", "load s", "peak RSS MiB"]
    dora = (
        f"DoRA's cost, one SmolLM2 MLP-shaped layer (576 -> 1536, NF4, r=16), forward + backward on 8 x 256 tokens, "
        f"medians of 5 interleaved rounds: LoRA {cost['lora_ms']:.1f} ms, DoRA {cost['dora_ms']:.1f} ms "
        f"({cost['dora_over_lora']:.2f}x); the row norm alone (in {4 * 1536 * 576 / MB:.1f} MB blocks) "
        f"{cost['norm_ms']:.1f} ms. DoRA's backward also recomputes W x + s B h for the magnitude's gradient "
        "instead of keeping it from forward."
    )
    return "\n\n".join(
        part
        for part in [
            "# LoRA's variants on the default recipe",
            f"`recipes/smollm2_alpaca.yaml` (SmolLM2-135M-Instruct, NF4, all-linear r=16, lr 3e-4 cosine), "
            f"{steps} steps each, the same data, seed and schedule; held-out loss on "
            "recipes/data/text_tools_val.jsonl. "
            f"The 16-bit model's held-out loss is {reference:.4f}; the ratio is exp(step-0 loss - that).",
            busy_machine_note(load_at_start),
            "**tokens/s and load times were measured under contention** (other jobs shared the 2 cores): compare "
            "them within this table only, and not to other results.",
            markdown_table(headers, rows),
            dora,
        ]
        if part
    )


if __name__ == "__main__":
    main()
