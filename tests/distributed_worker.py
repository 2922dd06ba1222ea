"""Run under torchrun by tests/test_distributed.py (not a test module itself):

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py MODE RECIPE [key=value ...]

MODE raise-on-rank-1: train, with rank 1's second step raising (rank 0 then waits in that step's all-reduce).
"""

from __future__ import annotations

import importlib
import sys
import time

training = importlib.import_module("qlora_kit.train")  # the module (the package exports the function `train`)


def raise_on_rank_1(recipe: str, overrides: list[str]) -> None:
    step = training.train_step

    def failing_step(run, batches, *args, **kwargs):
        if run.world.rank == 1 and run.step == 1:
            raise RuntimeError(f"injected failure on rank 1 at {time.time():.3f}")
        return step(run, batches, *args, **kwargs)

    training.train_step = failing_step  # fault injection in this process only
    training.train(recipe, overrides)


if __name__ == "__main__":
    mode, recipe, *rest = sys.argv[1:]
    if mode != "raise-on-rank-1":
        raise SystemExit(f"unknown mode {mode!r}")
    raise_on_rank_1(recipe, rest)
