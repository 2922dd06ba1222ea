"""The README's main job, timed: `qlora-kit train recipes/smollm2_alpaca.yaml` as a user runs it.

    python bench/default_recipe.py [--out DIR] [overrides ...]

Runs the default recipe in a fresh process (a fresh output dir, so nothing is resumed) and records what
issue 3 asks of it: wall time (the whole command, load and samples included; goal < 10 min on a 2-core
CPU), eval loss on the held-out split before and after (goal: at least 30% lower), training tokens/s,
and the process's peak RSS. The figures come from the run's own summary.json; the wall time is measured
around the command.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import MB, busy_machine_note, markdown_table, save_results

RECIPE = "recipes/smollm2_alpaca.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/qlora-kit-bench/default-recipe"))
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides passed to qlora-kit train")
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]
    shutil.rmtree(args.out, ignore_errors=True)
    command = ["qlora-kit", "train", RECIPE, f"output.dir={args.out}", *args.overrides]
    print("running:", " ".join(command), flush=True)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall_s = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"the default recipe failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    summary = json.loads((args.out / "summary.json").read_text())
    drop = 1 - summary["eval_loss_end"] / summary["eval_loss_start"]
    samples = json.loads((args.out / "samples_after.json").read_text())
    result = {
        "command": " ".join(command),
        "wall_s": round(wall_s, 1),
        "fit_and_eval_s": summary["wall_s"],
        "eval_loss_start": round(summary["eval_loss_start"], 4),
        "eval_loss_end": round(summary["eval_loss_end"], 4),
        "eval_loss_drop": round(drop, 4),
        "tokens_per_s": summary["tokens_per_s"],
        "steps": summary["steps"],
        "peak_rss_mib": round(peak_rss / MB),
        "samples_after": samples,
        "load_avg_1m_at_start": load_at_start,
    }
    rows = [
        ["wall time (whole command)", f"{wall_s:.0f} s", "< 600 s", "yes" if wall_s < 600 else "**no**"],
        [
            "eval loss, held-out split",
            f"{result['eval_loss_start']} -> {result['eval_loss_end']} ({100 * drop:.1f}% lower)",
            ">= 30% lower",
            "yes" if drop >= 0.3 else "**no**",
        ],
        ["training tokens/s", f"{summary['tokens_per_s']:.0f}", "", ""],
        ["peak RSS", f"{peak_rss / MB:,.0f} MiB", "", ""],
    ]
    markdown = "\n\n".join(
        part
        for part in [
            "# The default recipe on this machine",
            f"`{' '.join(command)}` ({summary['steps']} steps), in a fresh output dir.",
            busy_machine_note(load_at_start),
            markdown_table(["figure", "measured", "goal", "met"], rows),
        ]
        if part
    )
    print("\n" + markdown + "\n")
    save_results("default_recipe", result, markdown)


if __name__ == "__main__":
    main()
