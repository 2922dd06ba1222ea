"""Checkpoints of a torchrun run: the adapter whole (rank 0), the training state through
``torch.distributed.checkpoint`` (every process writes its own shards), one directory appearing at once.

    OUTPUT_DIR/checkpoints/step-000123/
        adapter_config.json, adapter_model.safetensors   the full adapter in PEFT's layout (rank 0)
        training_state/                                   DCP: adapter and optimizer shards, schedule, data
                                                          position, each process's RNG states
        checkpoint.json                                   step, world size, parallel mode; written last

Rank 0 makes the temp dir (``atomic_dir``) and tells the others its name; all write their DCP shards into
it; rank 0 adds the adapter and marker and renames it into place once every process is done. A crash before
the rename leaves the earlier checkpoints as they were, as in ``checkpoint.py``.

Another number of processes, or another ``train.parallel`` (one process included), resumes too: DCP reshards
the adapter and optimizer states by parameter name; each process restores its own RNG states where the
checkpoint has them. A single process's checkpoint (``training_state.pt``) is not resumed under torchrun.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_kit.adapter import write_adapter_files
from qlora_kit.atomic import atomic_dir
from qlora_kit.checkpoint import (
    MARKER_NAME,
    SHARDED_STATE_NAME,
    STATE_NAME,
    Checkpoint,
    checkpoint_dir,
    damaged_checkpoint_error,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)
from qlora_kit.distributed import full_tensor
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import lora_state_dict
from qlora_kit.optim import MasterWeights

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from qlora_kit.run import Run


def full_lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's whole tensors on every process (under FSDP2 a collective: all processes call it)."""
    return {name: full_tensor(tensor).cpu() for name, tensor in lora_state_dict(model).items()}


def _state_dicts(run: Run) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_state, optimizer_state = get_state_dict(
        run.model, run.optimizer, options=StateDictOptions(ignore_frozen_params=True)
    )
    # the adapters only: buffers are never "frozen parameters" (one process's NF4 storage is held as buffers)
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    return {k: v for k, v in model_state.items() if k in trainable}, optimizer_state


def _master_copies(run: Run) -> dict[str, torch.Tensor]:
    """``optim.MasterWeights``' fp32 copies by parameter name (DCP's optimizer state dict leaves them out)."""
    if not isinstance(run.optimizer, MasterWeights):
        return {}
    names = {id(p): name for name, p in run.model.named_parameters()}
    return {names[id(p)]: m for p, m in run.optimizer.pairs() if m is not p}


@contextlib.contextmanager
def _quiet(logger_name: str) -> Iterator[None]:
    """Silence a logger's warnings for the block (one that would say what the next lines then undo)."""
    log = logging.getLogger(logger_name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def save(run: Run, training_state: dict[str, Any]) -> Path:
    """Write checkpoint ``run.step`` from every process (a collective) and keep the newest ones."""
    import torch.distributed.checkpoint as dcp

    world = run.world
    target = checkpoint_dir(run.out) / f"step-{run.step:06d}"
    adapter = full_lora_state(run.model)
    model_state, optimizer_state = _state_dicts(run)
    state = {
        "model": model_state,
        "optimizer": optimizer_state,
        "masters": _master_copies(run),
        # Python objects go in as single pickled leaves: DCP keeps one copy of a key all processes share
        "progress": pickle.dumps({**training_state, "step": run.step}),
        f"rng_{world.rank}": pickle.dumps(rng_state()),
    }
    try:
        with atomic_dir(target) if world.is_main else contextlib.nullcontext() as tmp:
            tmp = Path(str(world.broadcast(str(tmp))))
            dcp.save(state, checkpoint_id=tmp / SHARDED_STATE_NAME)
            world.barrier()  # every process's shards are written
            if world.is_main:
                write_adapter_files(run.model, tmp, run.cfg.model.name_or_path, lora=run.cfg.lora, state=adapter)
                marker = {"step": run.step, "world_size": world.size, "parallel": world.parallel}
                (tmp / MARKER_NAME).write_text(json.dumps(marker) + "\n")
    except OSError as e:
        raise QloraKitError(
            f"could not write checkpoint {target} ({e}); earlier checkpoints are untouched. "
            "Free disk space (or lower train.save_total_limit) and resume with train.resume=auto"
        ) from None
    world.barrier()  # the checkpoint is in place before any process goes on (or stops)
    if world.is_main:
        prune_checkpoints(run.out, run.cfg.train.save_total_limit)
    return target


def is_sharded(checkpoint: Checkpoint) -> bool:
    """Written by a torchrun run (its training state in DCP's format)."""
    return (checkpoint.path / SHARDED_STATE_NAME).is_dir()


def _marker(checkpoint: Checkpoint) -> dict[str, Any]:
    return json.loads((checkpoint.path / MARKER_NAME).read_text())


def check_compatible(checkpoint: Checkpoint, world_size: int, parallel: str) -> None:
    """Refuse a single process's checkpoint under torchrun; say what changes when a torchrun checkpoint is
    resumed by another number of processes or another ``train.parallel`` (DCP reshards it)."""
    if not is_sharded(checkpoint):
        if world_size > 1:
            raise QloraKitError(
                f"checkpoint {checkpoint.path} was written by a single process ({STATE_NAME}); this run has "
                f"{world_size} processes. Resume it without torchrun (qlora-kit train ...), or start a new run "
                "here with train.resume=none"
            )
        return
    marker = _marker(checkpoint)
    saved, saved_parallel = marker.get("world_size"), marker.get("parallel")
    if saved != world_size or saved_parallel != parallel:
        this = "is one process" if world_size == 1 else f"has {world_size} processes ({parallel})"
        logger.warning(
            f"checkpoint {checkpoint.path} was written by {saved} processes ({saved_parallel}) and this run {this}: "
            "torch.distributed.checkpoint reshards its adapter and optimizer states. "
            f"The global batch is now {world_size} x train.micro_batch_size x train.gradient_accumulation_steps: "
            f"to go on with the run's batch, keep that product what it was ({saved} x ...)"
            + (f"; processes {saved} and up start from fresh RNG states (dropout)" if world_size > saved else "")
        )


def load(run: Run, checkpoint: Checkpoint) -> dict[str, Any]:
    """Restore adapter, optimizer and this process's RNG from ``checkpoint``; return the rest of its state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    world = run.world
    model_state, optimizer_state = _state_dicts(run)
    # each process's own RNG states; a process the checkpoint had no counterpart for keeps its seeded ones
    rng_key = f"rng_{world.rank}" if world.rank < _marker(checkpoint).get("world_size", 1) else None
    masters = _master_copies(run)
    loaded_masters = {name: torch.empty_like(m) for name, m in masters.items()}
    state = {"model": model_state, "optimizer": optimizer_state, "masters": loaded_masters, "progress": b""}
    if rng_key is not None:
        state[rng_key] = b""
    try:
        dcp.load(state, checkpoint_id=checkpoint.path / SHARDED_STATE_NAME)
    except (Exception, dcp.CheckpointException) as e:  # a damaged dir, or one saved with other settings
        # (DCP raises several kinds; its CheckpointException, which gathers every process's, is a BaseException)
        if isinstance(e, dcp.CheckpointException) and e.failures:  # the first process's own error, no traceback
            e = next(iter(e.failures.values()))[0]
        what = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        problem = (
            f"{what}. If train.optimizer, train.fp32_master_weights or the lora settings changed since it was "
            "saved, resume with the ones it was saved with"
        )
        raise damaged_checkpoint_error(checkpoint.path, SHARDED_STATE_NAME, problem) from None
    with _quiet("qlora_kit.optim"):  # MasterWeights warns that its copies are missing: they follow below
        set_state_dict(
            run.model,
            run.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
            # not strict: the frozen base is not in it (dcp.load already failed on any adapter key it lacked)
            options=StateDictOptions(ignore_frozen_params=True, strict=False),
        )
    with torch.no_grad():
        for name, m in masters.items():
            m.copy_(loaded_masters[name])
    if rng_key is not None:
        set_rng_state(pickle.loads(state[rng_key]))
    return pickle.loads(state["progress"])
