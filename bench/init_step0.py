"""Is PiSSA's / LoftQ's step-0 loss a verdict? The spread of NF4's held-out loss over error realizations.

    python bench/init_step0.py [--permutations N]

bench/variants.py found PiSSA and LoftQ lowering every layer's 4-bit error on SmolLM2-135M-Instruct yet not the
model's step-0 held-out loss. This asks how much that loss moves when only the *realization* of the 4-bit error
changes, not its size: each decoder linear is quantized with the same NF4 quantizer over its input columns in a
random order (so other weights share a block's absmax), then put back in order. Same quantizer, same error size,
another draw. Every model here is the dense fp32 transformers model with each decoder linear's weight replaced
by a dequantized one (plain NF4 gives exactly the loss of our 4-bit model), evaluated as training evaluates
(``qlora_kit.train.evaluate``, the default recipe's held-out file). PiSSA/LoftQ: ``dequant(nf4(residual)) + s B0 A0``
with the recipe's r=16, alpha=32 (LoftQ 2 iterations, as bench/variants.py).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from _common import markdown_table, save_results
from transformers import AutoModelForCausalLM

from qlora_kit.config import load_config
from qlora_kit.data.prepare import prepare_data
from qlora_kit.loading import load_tokenizer
from qlora_kit.lora import lora_scaling
from qlora_kit.lora_init import init_residual
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import NF4Linear
from qlora_kit.train import evaluate

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2_alpaca.yaml"


def nf4(weight: torch.Tensor) -> torch.Tensor:
    return NF4Linear.from_weight(weight).dequantize(torch.float32)


def nf4_permuted(weight: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """NF4 of ``weight`` with its input columns shuffled into other 64-value blocks, then put back in order."""
    order = torch.randperm(weight.shape[1], generator=generator)
    return nf4(weight[:, order].contiguous())[:, torch.argsort(order)]


def svd_init(method: str, r: int, scaling: float, iters: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def weight(w: torch.Tensor) -> torch.Tensor:
        residual, a0, b0 = init_residual(w, r, scaling, method, iters)
        return torch.addmm(nf4(residual), b0, a0, alpha=scaling)

    return weight


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--permutations", type=int, default=3, help="NF4 error realizations besides the natural one")
    args = parser.parse_args()
    cfg = load_config(RECIPE, [])
    model_dir = resolve_model_dir(str(cfg.model.name_or_path))
    data = prepare_data(cfg.data, load_tokenizer(str(model_dir)), verbose=False)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    dense = {n: m.weight.detach().clone() for n, m in linears.items()}
    scaling = lora_scaling(cfg.lora.alpha, cfg.lora.r, cfg.lora.use_rslora)
    generator = torch.Generator().manual_seed(0)
    weights: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"16-bit": lambda w: w, "NF4": nf4}
    for k in range(1, args.permutations + 1):
        weights[f"NF4, permuted blocks #{k}"] = lambda w: nf4_permuted(w, generator)
    weights["PiSSA: nf4(W - s B0 A0) + s B0 A0"] = svd_init("pissa", cfg.lora.r, scaling, 1)
    weights["LoftQ (2 iters)"] = svd_init("loftq", cfg.lora.r, scaling, 2)
    rows = []
    for label, make in weights.items():
        errors = []
        with torch.no_grad():
            for name, linear in linears.items():
                linear.weight.copy_(make(dense[name]))
                errors.append(((linear.weight - dense[name]).norm() / dense[name].norm()).item())
        loss = evaluate(model, data, cfg.train.micro_batch_size)
        rows.append({"weights": label, "mean_rel_weight_error": sum(errors) / len(errors), "held_out_loss": loss})
        print(f"{label:40s} weight error {rows[-1]['mean_rel_weight_error']:.4f}  held-out loss {loss:.4f}", flush=True)
    nf4_losses = [r["held_out_loss"] for r in rows if r["weights"].startswith("NF4")]
    data_out = {"model": str(model_dir), "rows": rows, "nf4_loss_min": min(nf4_losses), "nf4_loss_max": max(nf4_losses)}
    table = markdown_table(
        ["decoder linears", "mean relative weight error", "step-0 held-out loss"],
        [[r["weights"], f"{r['mean_rel_weight_error']:.4f}", f"{r['held_out_loss']:.4f}"] for r in rows],
    )
    intro = (
        "# Step 0 under NF4: how much the held-out loss moves with the error's realization\n\n"
        f"SmolLM2-135M-Instruct, {len(linears)} decoder linears, held-out file of `recipes/smollm2_alpaca.yaml` "
        f"({len(data.val)} rows), fp32 on CPU. {__doc__.split(chr(10) + chr(10), 2)[2].strip().replace('``', '`')}\n\n"
    )
    save_results("init_step0", data_out, intro + table)


if __name__ == "__main__":
    main()
