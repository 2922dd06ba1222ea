"""NF4 dequantization and 4-bit matmul throughput: qlora-kit's NF4Linear vs bitsandbytes called directly.

    python bench/dequant.py [--reps N] [--device auto|cpu|cuda]

Dequantization (GB/s of dense output written):
  ours       ``NF4Linear.dequantize``: bitsandbytes' kernel, reading our buffers (rebuilds a QuantState per call)
  reference  ``dequantize_nf4_reference``: the format in plain torch ops (the unfused baseline)
  bnb        ``bitsandbytes.functional.dequantize_4bit`` on the QuantState ``quantize_4bit`` returned
Matmul (GFLOP/s, 2*tokens*in*out per call, no grad):
  ours       ``NF4Linear.forward`` (dequantize, then a dense matmul)
  bnb        ``bitsandbytes.matmul_4bit(x, codes.t(), quant_state)`` (what ``bnb.nn.Linear4bit`` runs)
  dense      ``x @ W.t()`` with the dequantized weight already in memory: the ceiling, no 4-bit cost

Device and dtype are chosen like training would: CUDA + bf16 when a GPU is visible, else CPU + fp32.
Each figure is the median of ``--reps`` timed calls after warmup (fewer for slow cases on CPU, so the whole
run stays within ~3 minutes on a 2-core CPU). Ratio ours/bnb = our throughput / bnb's: 1.00 is parity.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from _common import markdown_table, save_results

from qlora_kit.quant import NF4Linear, dequantize_nf4_reference

SHAPES = [(4096, 4096), (11008, 4096), (576, 1536)]  # (out_features, in_features)
TOKENS = [1, 512]


def timed_median(fn: Callable[[], Any], device: torch.device, reps: int, budget_s: float) -> tuple[float, int]:
    """Median seconds per call over up to ``reps`` calls (at least 3) or until ``budget_s`` is spent."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):  # warmup: first-call dispatch, allocator growth, kernel selection
        fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < reps and (len(times) < 3 or spent < budget_s):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times), len(times)


def bench_shape(
    out_features: int, in_features: int, device: torch.device, dtype: torch.dtype, reps: int, budget_s: float
) -> dict[str, Any]:
    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(out_features, in_features, device=device, generator=generator) * 0.02).to(dtype)
    layer = NF4Linear.from_weight(weight)
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    del weight
    dense = bnbf.dequantize_4bit(codes, state)
    # Same codes, same kernel: the two must agree bit for bit, or the comparison below means nothing.
    if not torch.equal(layer.dequantize(dtype), dense):
        raise AssertionError(f"NF4Linear.dequantize differs from bitsandbytes for {out_features}x{in_features}")

    result: dict[str, Any] = {"out_features": out_features, "in_features": in_features, "dequant": {}, "matmul": {}}
    out_bytes = out_features * in_features * dtype.itemsize
    with torch.no_grad():
        dequantizers = {
            "ours": lambda: layer.dequantize(dtype),
            "reference": lambda: dequantize_nf4_reference(layer, dtype),
            "bnb": lambda: bnbf.dequantize_4bit(codes, state),
        }
        for name, fn in dequantizers.items():
            seconds, n = timed_median(fn, device, reps, budget_s)
            result["dequant"][name] = {"ms": seconds * 1e3, "gb_s": out_bytes / seconds / 1e9, "reps": n}

        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device=device, generator=generator).to(dtype)
            if not torch.allclose(layer(x), bnb.matmul_4bit(x, codes.t(), quant_state=state), rtol=1e-2, atol=1e-2):
                raise AssertionError(f"NF4Linear and bnb.matmul_4bit disagree for {out_features}x{in_features}")
            flops = 2 * tokens * in_features * out_features
            matmuls = {
                "ours": lambda x=x: layer(x),
                "bnb": lambda x=x: bnb.matmul_4bit(x, codes.t(), quant_state=state),
                "dense": lambda x=x: x @ dense.t(),
            }
            timings = {}
            for name, fn in matmuls.items():
                seconds, n = timed_median(fn, device, reps, budget_s)
                timings[name] = {"ms": seconds * 1e3, "gflop_s": flops / seconds / 1e9, "reps": n}
            result["matmul"][str(tokens)] = timings
    return result


def report(results: list[dict[str, Any]], device: torch.device, dtype: torch.dtype) -> str:
    dtype_name = str(dtype).removeprefix("torch.")
    dequant_rows = []
    for r in results:
        d = r["dequant"]
        dequant_rows.append(
            [
                f"{r['out_features']}x{r['in_features']}",
                f"{d['ours']['gb_s']:.2f} ({d['ours']['ms']:.2f} ms)",
                f"{d['reference']['gb_s']:.2f} ({d['reference']['ms']:.2f} ms)",
                f"{d['bnb']['gb_s']:.2f} ({d['bnb']['ms']:.2f} ms)",
                f"{d['ours']['gb_s'] / d['bnb']['gb_s']:.2f}",
                f"{d['reference']['gb_s'] / d['bnb']['gb_s']:.2f}",
            ]
        )
    matmul_rows = []
    for r in results:
        for tokens, m in r["matmul"].items():
            matmul_rows.append(
                [
                    f"{r['out_features']}x{r['in_features']}",
                    tokens,
                    f"{m['ours']['gflop_s']:.1f} ({m['ours']['ms']:.2f} ms)",
                    f"{m['bnb']['gflop_s']:.1f} ({m['bnb']['ms']:.2f} ms)",
                    f"{m['dense']['gflop_s']:.1f} ({m['dense']['ms']:.2f} ms)",
                    f"{m['ours']['gflop_s'] / m['bnb']['gflop_s']:.2f}",
                ]
            )
    return "\n".join(
        [
            f"# NF4 dequantization and 4-bit matmul throughput ({device.type}, {dtype_name})",
            "",
            "Median of timed calls after warmup. Ratios are throughput ours / bnb (1.00 = parity, < 1 = slower).",
            "",
            "## Dequantize: GB/s of dense output",
            "",
            markdown_table(
                ["weight (out x in)", "ours", "reference (plain torch)", "bnb", "ours/bnb", "reference/bnb"],
                dequant_rows,
            ),
            "",
            "## Matmul y = x W^T: GFLOP/s",
            "",
            markdown_table(
                ["weight (out x in)", "tokens", "ours (NF4Linear)", "bnb.matmul_4bit", "dense (ceiling)", "ours/bnb"],
                matmul_rows,
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed calls per case (at most)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    budget_s = 30.0 if use_cuda else 1.5  # per case; the CPU budget keeps the whole run near 3 minutes

    start = time.perf_counter()
    results = []
    for out_features, in_features in SHAPES:
        print(f"{out_features}x{in_features} ...", flush=True)
        results.append(bench_shape(out_features, in_features, device, dtype, args.reps, budget_s))
    markdown = report(results, device, dtype)
    print("\n" + markdown + "\n")
    data = {
        "device": device.type,
        "dtype": str(dtype),
        "reps": args.reps,
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
    }
    save_results("dequant", data, markdown)


if __name__ == "__main__":
    main()
