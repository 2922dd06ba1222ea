"""One process vs two under torchrun (ddp, fsdp) on SmolLM2-135M: training tokens/s, per-process peak memory,
and the 4-bit base bytes each process holds (fsdp: about half).

    python bench/distributed.py [--steps N] [--nproc N]

CPU (gloo) by default; with CUDA visible it runs one process per GPU (nccl, ``--nproc`` defaults to the GPU
count) and reports ``torch.cuda.max_memory_allocated`` per process as well. Every configuration trains the
same global batch (one process: accumulation = processes; each of N processes: 1), from a fresh output dir.
Each process runs this script's ``--worker`` mode (prepare, setup, fit: the library's own steps) and writes its
figures; results go to ``bench/results/distributed.json`` and ``.md``.

On a CPU, N processes share the machine's cores (each with OMP_NUM_THREADS=1 here): tokens/s compares the
engines' overheads, not what N GPUs would gain.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import busy_machine_note, markdown_table, save_results

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "smollm2_alpaca.yaml"
MiB = 2**20


def _overrides(out: Path, steps: int, accumulation: int, device: str, parallel: str) -> list[str]:
    return [
        "model.device=" + device,
        "data.max_samples=64",
        "data.cutoff_len=128",
        "data.val_path=null",
        "lora.dropout=0",  # dropout draws from each process's RNG: the losses would differ from one process's
        "train.micro_batch_size=2",
        f"train.gradient_accumulation_steps={accumulation}",
        f"train.max_steps={steps}",
        "train.save_steps=0",
        f"train.parallel={parallel}",
        "train.resume=none",
        f"output.dir={out}",
        "output.sample_prompts=[]",
    ]


def worker(out: Path, overrides: list[str]) -> None:
    """Train as ``qlora-kit train`` does, then write this process's figures to ``out/rankN.json``."""
    import torch

    from qlora_kit.config import load_config
    from qlora_kit.distributed import nf4_bytes

    training = importlib.import_module("qlora_kit.train")
    inputs = training.prepare(load_config(RECIPE, overrides))
    try:
        run = training.setup(inputs)
        resident, whole = nf4_bytes(run.model)
        rss_after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result = training.fit(run)
        record = {
            "rank": inputs.world.rank,
            "nf4_resident": resident,
            "nf4_whole": whole,
            "peak_rss_load": rss_after_load,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "tokens_per_s": result.tokens_per_s,
            "losses": result.train_losses,
        }
        if inputs.device.type == "cuda":
            record["cuda_peak"] = torch.cuda.max_memory_allocated(inputs.device)
        (out / f"rank{inputs.world.rank}.json").write_text(json.dumps(record))
    finally:
        inputs.world.stop()


def run_config(nproc: int, parallel: str, steps: int, max_procs: int, device: str, work: Path) -> dict:
    out = work / f"{nproc}-{parallel}"
    out.mkdir(parents=True)
    overrides = _overrides(out / "run", steps, max_procs // nproc, device, parallel)
    script = [str(Path(__file__).resolve()), "--worker", str(out), *overrides]
    if nproc == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{done.stderr[-4000:]}")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]
    return {
        "processes": nproc,
        "parallel": parallel,
        "wall_s": round(time.perf_counter() - started, 1),
        "tokens_per_s": ranks[0]["tokens_per_s"],
        "ranks": ranks,
    }


def _label(result: dict) -> str:
    return f"{result['processes']} x {result['parallel']}" if result["processes"] > 1 else "1 process"


def report(results: list[dict], steps: int, note: str) -> str:
    one = results[0]["tokens_per_s"]
    rows = []
    for r in results:
        for rank in r["ranks"]:
            cuda = f"{rank['cuda_peak'] / MiB:,.0f}" if "cuda_peak" in rank else "-"
            rows.append(
                [
                    _label(r),
                    rank["rank"],
                    f"{r['tokens_per_s']:,.0f} ({r['tokens_per_s'] / one:.2f}x)",
                    f"{rank['nf4_resident'] / MiB:,.1f} of {rank['nf4_whole'] / MiB:,.1f}",
                    f"{rank['peak_rss_load'] / MiB:,.0f}",
                    f"{rank['peak_rss'] / MiB:,.0f}",
                    cuda,
                ]
            )
    headers = ["run", "rank", "tokens/s (vs 1 process)", "NF4 MiB held", "peak RSS after load MiB", "peak RSS MiB"]
    losses = {_label(r): r["ranks"][0]["losses"] for r in results}
    return "\n\n".join(
        [
            f"# One process vs torchrun (ddp, fsdp) on SmolLM2-135M, {steps} steps of the same global batch",
            note,
            markdown_table([*headers, "CUDA peak MiB"], rows),
            "Step losses (equal up to float reduction order): "
            + "; ".join(f"{k}: {', '.join(f'{x:.5f}' for x in v)}" for k, v in losses.items()),
        ]
    )


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=torch.cuda.device_count() if torch.cuda.is_available() else 2)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    note = busy_machine_note(os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="qlora-kit-dist-") as tmp:
        work = Path(tmp)
        results = [run_config(1, "ddp", args.steps, args.nproc, device, work)]
        for parallel in ("ddp", "fsdp"):
            results.append(run_config(args.nproc, parallel, args.steps, args.nproc, device, work))
    data = {"steps": args.steps, "device": device, "nproc": args.nproc, "results": results}
    save_results("distributed", data, report(results, args.steps, note))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]), sys.argv[3:])
    else:
        main()
