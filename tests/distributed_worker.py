"""Run under torchrun by tests/test_distributed.py (not a test module itself):

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODE OUT RECIPE [key=value ...]

MODE shards: set the run up (load, shard, wrap) and write each process's NF4 bytes and peak RSS to OUT/rankN.json.
MODE raise-on-rank-1: train, with rank 1's second step raising (rank 0 then waits in that step's all-reduce).
"""

from __future__ import annotations

import importlib
import json
import resource
import sys
from pathlib import Path

from qlora_kit.config import load_config
from qlora_kit.distributed import nf4_bytes

training = importlib.import_module("qlora_kit.train")  # the module (the package exports the function `train`)


def shards(out: Path, recipe: str, overrides: list[str]) -> None:
    inputs = training.prepare(load_config(recipe, overrides))
    try:
        run = training.setup(inputs)
        resident, whole = nf4_bytes(run.model)
        peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        record = {"resident": resident, "whole": whole, "peak_rss": peak_rss, "size": inputs.world.size}
        (out / f"rank{inputs.world.rank}.json").write_text(json.dumps(record))
    finally:
        inputs.world.stop()


def raise_on_rank_1(recipe: str, overrides: list[str]) -> None:
    step = training.train_step

    def failing_step(run, batches, *args, **kwargs):
        if run.world.rank == 1 and run.step == 1:
            raise RuntimeError("injected failure on rank 1")
        return step(run, batches, *args, **kwargs)

    training.train_step = failing_step  # fault injection in this process only
    training.train(recipe, overrides)


if __name__ == "__main__":
    mode, out, recipe, *rest = sys.argv[1:]
    if mode == "shards":
        shards(Path(out), recipe, rest)
    else:
        raise_on_rank_1(recipe, rest)
