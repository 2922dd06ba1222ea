"""What a CUDA device adds to a plan beyond tensors' bytes: the cuBLAS workspaces torch keeps, and which
optimizer states bitsandbytes pages (CUDA managed memory, outside torch's allocator).
"""

from __future__ import annotations

import re

from qlora_kit.memory.shapes import ModelShape
from qlora_kit.memory.variants import adapter_tensor_numels

PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages a state only for parameters of >= 1e5 values (get_state_buffer)
CUBLAS_WORKSPACE_SM90 = 4096 * 8 * 1024  # torch's default per workspace on Hopper (sm90): 32 MiB
CUBLAS_WORKSPACE_OLDER = 4096 * 1024 * 2 + 16 * 1024 * 8  # before Hopper: ":4096:2:16:8", 8 MiB + 128 KiB


def paged_bytes(shape: ModelShape, rank: int, targets: tuple[str, ...], optimizer: str, variant: str = "lora") -> int:
    """The optimizer states bitsandbytes puts in CUDA managed memory (``F.get_paged``: cudaMallocManaged,
    wrapped as CPU-typed tensors): state1 and state2 of each parameter of at least ``PAGED_MIN_NUMEL``
    values (smaller ones, and the 8-bit absmax, are ordinary device tensors). 0 for other optimizers."""
    if not optimizer.startswith("paged"):
        return 0
    per_value = 2 if optimizer.endswith("8bit") else 8  # 2 uint8 or 2 fp32 states
    numels = adapter_tensor_numels(shape, rank, targets, variant)
    return shape.layers * sum(per_value * n for n in numels if n >= PAGED_MIN_NUMEL)


def cublas_workspace_size(config: str | None, hopper: bool = True) -> int:
    """Bytes of one cuBLAS workspace by torch 2.13's rule (``parseChosenWorkspaceSize`` in
    ``aten/src/ATen/cuda/CublasHandlePool.cpp``): the ``:SIZE:COUNT`` pairs of ``CUBLAS_WORKSPACE_CONFIG``
    (SIZE KiB x COUNT, summed), else 32 MiB on Hopper (``hopper``) and 8 MiB + 128 KiB before it."""
    pairs = re.findall(r":([0-9]+):([0-9]+)", config or "")
    if pairs:
        return sum(int(size) * 1024 * int(count) for size, count in pairs)
    return CUBLAS_WORKSPACE_SM90 if hopper else CUBLAS_WORKSPACE_OLDER
