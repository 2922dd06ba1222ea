"""A checkpoint's safetensors weights: headers, one tensor at a time, and the one check of a checkpoint
against its config.json.

The files are read with plain ``seek`` + ``readinto`` rather than ``safe_open``: ``safe_open`` memory-maps
the file, and every page it touches stays in this process's resident set until the kernel needs it back,
which makes RSS grow to the checkpoint's size even though no copy is kept.

``check_checkpoint`` is what ``loading.load_model`` and ``export.export_merged`` both ask before they read
a weight: every tensor config.json implies is there, with the shape it implies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import math
import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_kit.architecture import decoder_linear_names
from qlora_kit.errors import QloraKitError
from qlora_kit.quant import NF4Linear

# What a model dir must hold, said the same way by every message about a dir that lacks some of it.
MODEL_DIR_FILES = (
    "config.json, the weights (model.safetensors, or shards with model.safetensors.index.json) and the "
    "tokenizer (tokenizer.json, or tokenizer.model / vocab.json + merges.txt, with tokenizer_config.json)"
)
INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _find_malloc_trim():
    """glibc's malloc_trim, or None (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_MALLOC_TRIM = _find_malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Streaming code frees a large tensor (and its quantizer's fp32 temporaries) per step; glibc keeps those
    holes between the small buffers that stay, so RSS would track the sum of freed sources instead of what
    is live. Measured: 4-bit load of a 1.68 GB checkpoint, peak above baseline 1,005 -> 778 MiB; merged
    export of 0.54 GB with 500 MB shards, 822 -> 568 MiB.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


# --- safetensors, one tensor at a time ------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> dict[str, TensorEntry]:
    """Parse and check a safetensors header; a truncated or corrupt file is a clear error, not a crash later."""
    fix = f"the file is damaged or incomplete; re-download or re-export {path.name}"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise QloraKitError(f"{path} is not a safetensors file (only {size} bytes); {fix}")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > min(size - 8, 100_000_000):
                raise QloraKitError(f"{path} is not a valid safetensors file (bad header length); {fix}")
            header = json.loads(f.read(header_len))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise QloraKitError(f"{path} is not a valid safetensors file (unreadable header); {fix}") from None
    data_start = 8 + header_len
    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info.get("dtype") not in _SAFETENSORS_DTYPES:
            raise QloraKitError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        entry = TensorEntry(
            path,
            _SAFETENSORS_DTYPES[info["dtype"]],
            tuple(info["shape"]),
            data_start + begin,
            data_start + end,
        )
        expected = entry.dtype.itemsize * math.prod(entry.shape)
        if end - begin != expected or entry.end > size:
            raise QloraKitError(
                f"{path} is truncated or corrupt: tensor {name!r} should end at byte {entry.end} "
                f"but the file has {size} bytes; {fix}"
            )
        entries[name] = entry
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    buffer = bytearray(entry.end - entry.start)
    with open(entry.file, "rb") as f:
        f.seek(entry.start)
        if f.readinto(buffer) != len(buffer):
            raise QloraKitError(f"{entry.file} ended early while reading a tensor; re-download it")
    if not buffer:
        return torch.empty(entry.shape, dtype=entry.dtype)
    return torch.frombuffer(buffer, dtype=entry.dtype).reshape(entry.shape)


def checkpoint_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a checkpoint dir (one file, or shards with or without an index) by name."""
    index_file = model_dir / INDEX_FILE
    if index_file.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError):
            raise QloraKitError(f"{index_file} is not a valid safetensors index (no weight_map)") from None
        files = sorted({model_dir / name for name in weight_map.values()})
        for file in files:
            if not file.is_file():
                raise QloraKitError(f"{index_file} lists {file.name}, which is missing from {model_dir}")
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        others = sorted(p.name for p in model_dir.iterdir() if p.suffix in {".bin", ".pt", ".pth", ".gguf"})
        hint = (
            f" It has {', '.join(others[:3])}: convert it to safetensors first (load it with transformers and "
            "call save_pretrained(dir, safe_serialization=True))."
            if others
            else ""
        )
        raise QloraKitError(f"no *.safetensors weights in {model_dir}.{hint} A model dir holds {MODEL_DIR_FILES}.")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        entries.update(read_safetensors_header(file))
    return entries


# --- the checkpoint against its config --------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLayout:
    """The tensors a model built from config.json reads from its checkpoint, with their dense shapes."""

    shapes: dict[str, tuple[int, ...]]
    linears: frozenset[str]  # ``<name>.weight`` of the decoder linears (4-bit in training, merged by export)
    output_key: str  # the output embedding's weight; not needed on disk when ``tied``
    tied: bool


def checkpoint_layout(model: nn.Module) -> CheckpointLayout:
    """The layout of ``model`` (a skeleton on the meta device): an ``NF4Linear``'s weight counts as the dense
    (out, in) weight it is quantized from."""
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters(remove_duplicate=False)}
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            shapes[f"{name}.weight"] = (module.out_features, module.in_features)
    head = model.get_output_embeddings()
    output_key = next(f"{name}.weight" for name, m in model.named_modules() if m is head)
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    linears = frozenset(f"{name}.weight" for name in decoder_linear_names(model))
    return CheckpointLayout(shapes, linears, output_key, tied)


def quant_state_owner(name: str) -> str | None:
    """``X.weight`` for a piece of its serialized 4-bit state (``X.weight.absmax``, ``X.weight.quant_state...``)."""
    head, sep, _ = name.partition(".weight.")
    return f"{head}.weight" if sep else None


def missing_tensors_error(model_dir: Path, missing: Collection[str]) -> QloraKitError:
    shown = ", ".join(sorted(missing)[:5])
    return QloraKitError(
        f"the checkpoint in {model_dir} is missing {len(missing)} tensors that config.json needs "
        f"(e.g. {shown}). The download may be incomplete, or config.json belongs to another model."
    )


def check_checkpoint(
    layout: CheckpointLayout, entries: dict[str, TensorEntry], model_dir: Path, packed: Collection[str] = ()
) -> list[str]:
    """Refuse a checkpoint that lacks a tensor config.json implies, or holds one in another shape; return the
    names of its tensors the model does not use. ``packed``: weights stored in bitsandbytes 4-bit (their
    layout is checked when they are read; the pieces of their quantization state belong to them)."""
    required = set(layout.shapes) - ({layout.output_key} if layout.tied else set())
    missing = required - set(entries)
    if missing:
        raise missing_tensors_error(model_dir, missing)
    for name, entry in entries.items():  # in file order: the first wrong tensor is named, every time
        implied = layout.shapes.get(name)
        if implied is not None and name not in packed and tuple(entry.shape) != implied:
            raise QloraKitError(
                f"{entry.file}: tensor {name!r} has shape {tuple(entry.shape)} but config.json implies {implied}; "
                "the weights and config.json do not belong together"
            )
    return [
        name
        for name in entries
        if name not in layout.shapes and "rotary_emb" not in name and quant_state_owner(name) not in packed
    ]
