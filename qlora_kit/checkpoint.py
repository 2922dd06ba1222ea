"""Atomic checkpoints and exact resume.

A checkpoint is a directory ``OUTPUT_DIR/checkpoints/step-000123/`` holding

    adapter_config.json, adapter_model.safetensors   the adapter, in PEFT's layout (usable on its own)
    training_state.pt                                 optimizer, scheduler, data position, RNG states, step
    checkpoint.json                                   step and a summary, written last

It is written into a temp dir beside it and renamed into place, so a crash mid-save leaves the previous
checkpoints as they were and never a directory that looks complete but is not.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qlora_kit.adapter import WEIGHTS_NAME, replace_dir, write_adapter_files
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import load_lora_state_dict

STATE_NAME = "training_state.pt"
MARKER_NAME = "checkpoint.json"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    path: Path
    step: int


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: nn.Module,
    training_state: dict[str, Any],
    base_model_name_or_path: str | None,
    keep_last: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep_last`` checkpoints."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=root))
    try:
        write_adapter_files(model, tmp, base_model_name_or_path)
        torch.save({**training_state, "step": step, "rng": rng_state()}, tmp / STATE_NAME)
        (tmp / MARKER_NAME).write_text(json.dumps({"step": step}) + "\n")
        replace_dir(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise QloraKitError(
            f"could not write checkpoint {target} ({e}); earlier checkpoints are untouched. "
            "Free disk space (or lower train.save_total_limit) and resume with train.resume=auto"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old.path, ignore_errors=True)
    return target


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Complete checkpoints, oldest first (temp dirs and dirs without the marker are ignored)."""
    found = []
    for path in checkpoint_dir(run_dir).glob("step-*"):
        if (path / MARKER_NAME).is_file():
            found.append(Checkpoint(path, json.loads((path / MARKER_NAME).read_text())["step"]))
    return sorted(found, key=lambda c: c.step)


def find_resume_checkpoint(resume: str, run_dir: Path) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint of this run, if any; else a path."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1].path if found else None
    path = Path(resume)
    if not (path / MARKER_NAME).is_file() or not (path / STATE_NAME).is_file():
        raise QloraKitError(
            f"train.resume={resume!r} is not a complete checkpoint dir (it needs {MARKER_NAME} and {STATE_NAME}); "
            f"checkpoints are in OUTPUT_DIR/checkpoints/step-NNNNNN, or use train.resume=auto"
        )
    return path


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load the adapter weights into ``model``; return the training state (RNG already restored)."""
    from safetensors.torch import load_file

    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
        adapter = load_file(path / WEIGHTS_NAME)
    except Exception as e:  # a damaged file: say which, and what to do
        raise QloraKitError(
            f"checkpoint {path} is damaged ({type(e).__name__}: {e}); resume from an earlier one with train.resume=PATH"
        ) from None
    load_lora_state_dict(model, adapter, source=str(path))
    set_rng_state(state["rng"])
    return state
