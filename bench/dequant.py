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
run stays within ~3 minutes on a 2-core CPU); contenders are called in turn, round by round, so that other
work on the machine weighs on them alike. Ratio ours/bnb = our throughput / bnb's: 1.00 is parity.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import bitsandbytes as bnb
import bitsandbytes.functional as bnbf
import torch
from _common import busy_machine_note, markdown_table, save_results

from qlora_kit.quant import NF4Linear, dequantize_nf4_reference

SHAPES = [(4096, 4096), (11008, 4096), (576, 1536)]  # (out_features, in_features)
TOKENS = [1, 512]


def time_round_robin(
    fns: dict[str, Callable[[], Any]], device: torch.device, reps: int, budget_s: float
) -> dict[str, tuple[float, float, int]]:
    """(median s, min s, calls) per function, calling them in turn so that all see the same machine load.

    Up to ``reps`` rounds (at least 3), stopping early once ``budget_s`` is spent. Interleaving matters on a
    shared machine: a burst of other work then slows every contender of a round alike, not just one of them.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for fn in fns.values():  # warmup: first-call dispatch, allocator growth, kernel selection
        fn()
        fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    spent = 0.0
    rounds = 0
    while rounds < reps and (rounds < 3 or spent < budget_s):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
            spent += times[name][-1]
        rounds += 1
    return {name: (statistics.median(t), min(t), len(t)) for name, t in times.items()}


def bench_shape(
    out_features: int, in_features: int, device: torch.device, dtype: torch.dtype, reps: int, budget_s: float
) -> dict[str, Any]:
    generator = torch.Generator(device=device).manual_seed(0)
    weight = (torch.randn(out_features, in_features, device=device, generator=generator) * 0.02).to(dtype)
    layer = NF4Linear.from_weight(weight)
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    del weight
    dense = bnbf.dequantize_4bit(codes, state)
    result: dict[str, Any] = {
        "out_features": out_features,
        "in_features": in_features,
        # Same codes, same kernel: the contract is bit-equality; a False here is a bug to report, not noise.
        "dequant_bit_equal": torch.equal(layer.dequantize(dtype), dense),
        "matmul_rel_error": {},
        "dequant": {},
        "matmul": {},
    }
    out_bytes = out_features * in_features * dtype.itemsize
    with torch.no_grad():
        dequantizers = {
            "ours": lambda: layer.dequantize(dtype),
            "reference": lambda: dequantize_nf4_reference(layer, dtype),
            "bnb": lambda: bnbf.dequantize_4bit(codes, state),
        }
        for name, (seconds, fastest, n) in time_round_robin(dequantizers, device, reps, budget_s).items():
            result["dequant"][name] = {
                "ms": seconds * 1e3,
                "min_ms": fastest * 1e3,
                "gb_s": out_bytes / seconds / 1e9,
                "reps": n,
            }

        for tokens in TOKENS:
            x = torch.randn(tokens, in_features, device=device, generator=generator).to(dtype)
            ours, theirs = layer(x).float(), bnb.matmul_4bit(x, codes.t(), quant_state=state).float()
            # Kernels may accumulate in another order (a fused GEMV on CUDA), so compare by relative error.
            result["matmul_rel_error"][str(tokens)] = ((ours - theirs).norm() / theirs.norm()).item()
            flops = 2 * tokens * in_features * out_features
            matmuls = {
                "ours": lambda x=x: layer(x),
                "bnb": lambda x=x: bnb.matmul_4bit(x, codes.t(), quant_state=state),
                "dense": lambda x=x: x @ dense.t(),
            }
            result["matmul"][str(tokens)] = {
                name: {"ms": seconds * 1e3, "min_ms": fastest * 1e3, "gflop_s": flops / seconds / 1e9, "reps": n}
                for name, (seconds, fastest, n) in time_round_robin(matmuls, device, reps, budget_s).items()
            }
    return result


def report(results: list[dict[str, Any]], device: torch.device, dtype: torch.dtype, load_at_start: float) -> str:
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
    checks = [
        f"{r['out_features']}x{r['in_features']}: dequantize bit-equal to bnb: {r['dequant_bit_equal']}; "
        "matmul relative error vs bnb: "
        + ", ".join(f"{e:.1e} ({tokens} tok)" for tokens, e in r["matmul_rel_error"].items())
        for r in results
    ]
    return "\n".join(
        [
            f"# NF4 dequantization and 4-bit matmul throughput ({device.type}, {dtype_name})",
            "",
            "Median of timed calls after warmup, contenders interleaved round by round. "
            "Ratios are throughput ours / bnb (1.00 = parity, < 1 = slower).",
            "",
            busy_machine_note(load_at_start) if device.type == "cpu" else "",
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
            "",
            "## Checks (same codes in both)",
            "",
            *[f"- {line}" for line in checks],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=20, help="timed calls per case (at most)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]  # before our own threads add to it
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    budget_s = 30.0 if use_cuda else 8.0  # per group of contenders; keeps a 2-core CPU run near 3 minutes

    start = time.perf_counter()
    results = []
    for out_features, in_features in SHAPES:
        print(f"{out_features}x{in_features} ...", flush=True)
        results.append(bench_shape(out_features, in_features, device, dtype, args.reps, budget_s))
    markdown = report(results, device, dtype, load_at_start)
    print("\n" + markdown + "\n")
    data = {
        "device": device.type,
        "dtype": str(dtype),
        "reps": args.reps,
        "load_avg_1m_at_start": load_at_start,
        "wall_s": round(time.perf_counter() - start, 1),
        "results": results,
    }
    save_results("dequant", data, markdown)


if __name__ == "__main__":
    main()
