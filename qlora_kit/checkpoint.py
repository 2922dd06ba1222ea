"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step-000123/`` holding

    adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's layout (usable on its own)
    training_state.pt                                 optimizer, scheduler, data position, RNG states, step
    checkpoint.json                                   step and a summary, written last

It is written into a temp dir beside it and renamed into place, so a crash mid-save leaves the previous
checkpoints as they were and never a directory that looks complete but is not.

A checkpoint whose files cannot be read (a torn copy, a bad disk) is "damaged": resuming from it is an error
that names the file and the ways on; ``train.resume=auto`` never passes over it silently to an older one,
and pruning neither counts nor deletes it.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.adapter import AdapterFileError, LoRASettings, read_adapter, write_adapter_files
from qlora_kit.atomic import atomic_dir
from qlora_kit.embeddings import load_embedding_state_dict
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import load_lora_state_dict

STATE_NAME = "training_state.pt"
SHARDED_STATE_NAME = "training_state"  # a torchrun run's: torch.distributed.checkpoint's dir (dist_checkpoint)
MARKER_NAME = "checkpoint.json"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for index, device_state in cuda_rng_to_restore(state.get("cuda", []), torch.cuda.device_count()):
            torch.cuda.set_rng_state(device_state, index)


def cuda_rng_to_restore(saved: list[torch.Tensor], visible: int) -> list[tuple[int, torch.Tensor]]:
    """(GPU index, state) for each saved GPU RNG state this machine has a GPU for.

    A run resumed with fewer GPUs visible than it saved (another machine, CUDA_VISIBLE_DEVICES) restores the
    ones it has; ``torch.cuda.set_rng_state_all`` would raise IndexError. Training draws its randomness from the
    CPU generator (the dropout seeds), so the GPUs' states matter only to code outside qlora-kit.
    """
    return list(enumerate(saved[:visible]))


@dataclass
class Checkpoint:
    path: Path
    step: int
    damage: str | None = None  # why its checkpoint.json cannot be read (the step then comes from the dir name)


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    base_model_name_or_path: str | None,
    keep_last: int,
    lora: LoRASettings | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` checkpoints.

    ``lora``: the run's LoRA config, which the checkpoint's adapter_config.json is written from (see
    ``adapter.adapter_config_of``); ``metadata``: the adapter's qlora_kit.json, if any (``write_metadata``).
    """
    target = checkpoint_dir(run_dir) / f"step-{step:06d}"
    try:
        with atomic_dir(target) as tmp:
            write_adapter_files(model, tmp, base_model_name_or_path, metadata, lora=lora)
            torch.save({**training_state, "step": step, "rng": rng_state()}, tmp / STATE_NAME)
            (tmp / MARKER_NAME).write_text(json.dumps({"step": step}) + "\n")
    except OSError as e:
        raise QloraKitError(
            f"could not write checkpoint {target} ({e}); earlier checkpoints are untouched. "
            "Free disk space (or lower train.save_total_limit) and resume with train.resume=auto"
        ) from None
    prune_checkpoints(run_dir, keep_last)
    return target


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` intact checkpoints.

    Only intact checkpoints count and are pruned: a damaged one is left for the user to look at or delete
    (resume=auto refuses to pass over it silently), and it never pushes a good one out.
    """
    intact = [c for c in list_checkpoints(run_dir) if c.damage is None]
    for old in intact[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints with a marker, oldest first, damaged ones included (temp dirs and unmarked dirs are not)."""
    return _scan(checkpoint_dir(run_dir))


def _scan(root: Path) -> list[Checkpoint]:
    found = []
    for path in root.glob("step-*"):
        if not (path / MARKER_NAME).is_file():
            continue
        step, damage = _read_marker(path)
        if step is None:
            number = path.name.removeprefix("step-")
            if not number.isdigit():
                continue  # not a name save_checkpoint writes
            step = int(number)
        found.append(Checkpoint(path, step, damage))
    return sorted(found, key=lambda c: c.step)


def _read_marker(path: Path) -> tuple[int | None, str | None]:
    """``(step, None)``, or ``(None, what is wrong)`` for a marker that is unreadable or not ours."""
    try:
        step = json.loads((path / MARKER_NAME).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or bad UTF-8
        return None, f"{type(e).__name__}: {e}"
    if not isinstance(step, int) or isinstance(step, bool):
        return None, f"its step is {step!r}, not a whole number"
    return step, None


def damaged_checkpoint_error(path: Path, file: str, problem: str) -> QloraKitError:
    """The one message for a damaged checkpoint: which file, and the ways on (another checkpoint, or anew)."""
    others = [c for c in _scan(path.parent) if c.damage is None and c.path != path]
    if others:
        way_on = (
            f"Resume from the newest other checkpoint with train.resume={others[-1].path}, or delete "
            f"{path} and resume with train.resume=auto"
        )
    else:
        way_on = f"No other checkpoint is left: delete {path}, and train.resume=auto starts the run afresh"
    return QloraKitError(
        f"checkpoint {path} is damaged ({file}: {problem}); the other checkpoints are untouched. {way_on}"
    )


def find_resume_checkpoint(resume: str, run_dir: Path) -> Checkpoint | None:
    """``none`` -> None; ``auto`` -> the newest checkpoint of this run, if any; else the one at a path.

    A damaged newest checkpoint is an error that names the ways on, never a silent step back to an older one.
    """
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            return None
        path, step, damage = found[-1].path, found[-1].step, found[-1].damage
    else:
        path = Path(resume)
        has_state = (path / STATE_NAME).is_file() or (path / SHARDED_STATE_NAME).is_dir()
        if not (path / MARKER_NAME).is_file() or not has_state:
            raise QloraKitError(
                f"train.resume={resume!r} is not a complete checkpoint dir (it needs {MARKER_NAME} and "
                f"{STATE_NAME}); checkpoints are in OUTPUT_DIR/checkpoints/step-NNNNNN, or use train.resume=auto"
            )
        step, damage = _read_marker(path)
    if damage is not None or step is None:
        raise damaged_checkpoint_error(path, MARKER_NAME, damage or "no step")
    return Checkpoint(path, step)


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load the adapter weights into ``model``; return the training state (RNG already restored)."""
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged file (torch raises several kinds): say which, and what to do
        raise damaged_checkpoint_error(path, STATE_NAME, f"{type(e).__name__}: {e}") from None
    try:
        adapter = read_adapter(path)
    except AdapterFileError as e:
        raise damaged_checkpoint_error(path, e.file, str(e)) from None
    load_lora_state_dict(model, adapter.state, source=str(path))
    load_embedding_state_dict(model, adapter.embeddings, source=str(path))  # trainable tokens, modules_to_save
    set_rng_state(state["rng"])
    return state
