"""Checkpoints already in bitsandbytes 4-bit: which ones qlora-kit reads, and reading their weights as they are.

A checkpoint that is bitsandbytes NF4 with double quantization (``qlora-kit export --quantize nf4``, or
transformers' ``save_pretrained`` of such a model) is read as it is: each weight's codes and serialized
``QuantState`` go into the ``NF4Linear`` buffers unchanged (no dequantize/re-quantize round trip), so the
weights are bit for bit the ones bitsandbytes' ``dequantize_4bit`` gives for the file. Other bitsandbytes
formats (8-bit, FP4, 4-bit without double quantization) are refused with a clear error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from qlora_kit.errors import QloraKitError
from qlora_kit.quant import ABSMAX_BLOCKSIZE, NF4_BLOCKSIZE, NF4Linear, _absmax_table, _nf4_table
from qlora_kit.weights import TensorEntry, read_tensor


def bnb_quantization(config) -> dict | None:
    """The checkpoint's bitsandbytes ``quantization_config`` (from a loaded config or config.json's dict)."""
    raw = (
        config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config", None)
    )
    if raw is not None and not isinstance(raw, dict):
        raw = raw.to_dict()
    return raw if raw and raw.get("quant_method") == "bitsandbytes" else None


def is_nf4_double_quant(quantization: dict | None) -> bool:
    """Whether a bitsandbytes checkpoint holds what ``NF4Linear`` holds: 4-bit NF4 with double quantization."""
    return bool(
        quantization
        and quantization.get("load_in_4bit")
        and quantization.get("bnb_4bit_quant_type") == "nf4"
        and quantization.get("bnb_4bit_use_double_quant")
        and quantization.get("bnb_4bit_quant_storage", "uint8") == "uint8"
    )


def check_prequantized(config, model_dir: Path, quantize: bool) -> bool:
    """True for a checkpoint whose decoder linears are already NF4 + double-quantized; refuse what cannot load."""
    quantization = bnb_quantization(config)
    if quantization is None:
        return False
    if not is_nf4_double_quant(quantization):
        keys = ("load_in_4bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant", "bnb_4bit_quant_storage")
        settings = ", ".join(f"{key}={quantization.get(key)}" for key in keys)
        raise QloraKitError(
            f"{model_dir} is a bitsandbytes checkpoint with {settings}; qlora-kit reads 4-bit checkpoints only "
            "in NF4 with double quantization and uint8 storage (what `qlora-kit export --quantize nf4` writes). "
            "Load it with transformers, or use the 16-bit model it was made from"
        )
    if not quantize:
        raise QloraKitError(
            f"{model_dir} holds 4-bit NF4 weights (config.json has a bitsandbytes quantization_config); their 16-bit "
            "originals are not in it, so it cannot be loaded dense. Load it in 4-bit (drop --no-quantize), or use "
            "an export made without --quantize"
        )
    return True


def load_packed_weight(layer: NF4Linear, name: str, entries: dict[str, TensorEntry], device: torch.device) -> None:
    """Read the 4-bit weight ``name`` (its codes and the state serialized beside it) into ``layer`` as it is."""
    codes = read_tensor(entries[name]).to(device)
    _load_nf4_state(layer, codes, _read_quant_state(name, entries, device), entries[name])


def _read_quant_state(weight_name: str, entries: dict[str, TensorEntry], device: torch.device):
    """The bitsandbytes ``QuantState`` serialized beside ``weight_name`` (``<name>.absmax``, ``.quant_map``, ...)."""
    import bitsandbytes.functional as bnbf

    prefix = f"{weight_name}."
    parts = {name[len(prefix) :]: read_tensor(entry) for name, entry in entries.items() if name.startswith(prefix)}
    file = entries[weight_name].file
    if "nested_absmax" not in parts:
        found = ", ".join(sorted(parts)) or "nothing"
        raise QloraKitError(
            f"{file}: the 4-bit weight {weight_name!r} has no double-quantized state (found {found}); "
            "config.json says bnb_4bit_use_double_quant, so the file is damaged or belongs to another config"
        )
    try:
        return bnbf.QuantState.from_dict(parts, device=device)
    except (AssertionError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
        raise QloraKitError(
            f"{file}: the bitsandbytes quantization state of {weight_name!r} cannot be read ({e!r}); "
            "the file is damaged or was written by an incompatible bitsandbytes"
        ) from None


def _load_nf4_state(layer: NF4Linear, codes: torch.Tensor, state, entry: TensorEntry) -> None:
    """Put a serialized NF4 weight into ``layer``'s buffers as it is; refuse a layout it would not reproduce."""
    numel = layer.in_features * layer.out_features
    n_blocks = -(-numel // NF4_BLOCKSIZE)
    device = codes.device
    checks = [
        (state.quant_type == "nf4", f"quant_type {state.quant_type!r}, not 'nf4'"),
        (tuple(state.shape) == (layer.out_features, layer.in_features), f"shape {tuple(state.shape)}"),
        (codes.dtype == torch.uint8 and codes.numel() == -(-numel // 2), f"{codes.numel()} {codes.dtype} codes"),
        (state.blocksize == NF4_BLOCKSIZE, f"blocksize {state.blocksize}"),
        (state.absmax.dtype == torch.uint8 and state.absmax.numel() == n_blocks, f"{state.absmax.numel()} absmax"),
        (torch.equal(state.code.float(), _nf4_table(device)), "a code table other than NF4's"),
        # _read_quant_state made sure it is nested (double-quantized)
        (state.state2.blocksize == ABSMAX_BLOCKSIZE, f"nested blocksize {state.state2.blocksize}"),
        (state.state2.absmax.dtype == torch.float32, f"nested absmax in {state.state2.absmax.dtype}"),
        (state.state2.absmax.numel() == -(-n_blocks // ABSMAX_BLOCKSIZE), "a wrong count of nested absmax"),
        (torch.equal(state.state2.code.float(), _absmax_table(device)), "a nested code table other than bnb's"),
    ]
    wrong = [what for ok, what in checks if not ok]
    if wrong:
        raise QloraKitError(
            f"{entry.file}: the 4-bit weight for {layer.out_features}x{layer.in_features} has {', '.join(wrong)}; "
            "qlora-kit holds NF4 with block 64 and double quantization (block 256) only"
        )
    layer.codes = codes.reshape(-1)
    layer.absmax_codes = state.absmax
    layer.absmax_scales = state.state2.absmax.view(torch.int32)
    layer.absmax_offset = state.offset.to(torch.float32).reshape(()).view(torch.int32)
