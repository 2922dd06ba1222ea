"""A run's metrics: ``metrics.jsonl`` (one JSON record a line) and, if asked, TensorBoard event files.

Nothing touches the disk until ``start``: a run that fails to set up leaves no output dir behind.
"""

from __future__ import annotations

import json
import resource
from pathlib import Path
from typing import Any

import torch

from qlora_kit.errors import QloraKitError


class RunLog:
    def __init__(self, out: Path, tensorboard: bool = False) -> None:
        self.file = out / "metrics.jsonl"
        self.tensorboard = tensorboard
        self._writer = None

    def start(self, step: int) -> None:
        """A fresh run (step 0) drops an earlier run's records; a resumed one drops those after its step,
        which it writes again."""
        if step == 0 or not self.file.is_file():
            self.file.unlink(missing_ok=True)
        else:
            kept = [line for line in self.file.read_text().splitlines() if json.loads(line)["step"] <= step]
            self.file.write_text("".join(line + "\n" for line in kept))
        if self.tensorboard and self._writer is None:
            self._writer = _tensorboard_writer(self.file.parent)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class QuietLog(RunLog):
    """The metrics log of a process other than rank 0: records nothing (rank 0 writes the run's metrics)."""

    def __init__(self) -> None:
        super().__init__(Path(), False)

    def start(self, step: int) -> None:
        pass

    def write(self, record: dict[str, Any]) -> None:
        pass


def _tensorboard_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QloraKitError("output.tensorboard=true needs TensorBoard: pip install 'qlora-kit[tensorboard]'") from None
    return SummaryWriter(out / "tensorboard")


def memory_gb(device: torch.device) -> float:
    """Peak memory so far in GiB: allocated tensors on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
