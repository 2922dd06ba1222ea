"""Load a Hugging Face causal LM with its decoder linears in NF4, streaming tensor by tensor.

    config.json -> skeleton on the meta device (no memory) -> decoder nn.Linear replaced by NF4Linear
    -> for each tensor in the safetensors files: read it alone, move it to the compute device,
       quantize it there (decoder linears) or cast it to the compute dtype (embeddings, norms, lm_head),
       and drop the source.

So peak host memory is the 4-bit model plus about one tensor. The safetensors files are read with plain
``seek`` + ``readinto`` rather than ``safe_open``: ``safe_open`` memory-maps the file, and every page it
touches stays in this process's resident set until the kernel needs it back, which makes RSS grow to the
checkpoint's size even though no copy is kept.

A checkpoint that is already bitsandbytes NF4 with double quantization (``qlora-kit export --quantize nf4``,
or transformers' ``save_pretrained`` of such a model) is read as it is: each weight's codes and serialized
``QuantState`` go into the ``NF4Linear`` buffers unchanged (no dequantize/re-quantize round trip), so the
weights are bit for bit the ones bitsandbytes' ``dequantize_4bit`` gives for the file. Other bitsandbytes
formats (8-bit, FP4, 4-bit without double quantization) are refused with a clear error.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qlora_kit.errors import QloraKitError
from qlora_kit.lora import decoder_linear_names
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import ABSMAX_BLOCKSIZE, NF4_BLOCKSIZE, NF4Linear, _absmax_table, _nf4_table

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # facts.DTYPE_NAMES as torch dtypes


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the name users type for a compute dtype."""
    return next(name for name, value in DTYPES.items() if value == dtype)


# What a model dir must hold, said the same way by every message about a dir that lacks some of it.
MODEL_DIR_FILES = (
    "config.json, the weights (model.safetensors, or shards with model.safetensors.index.json) and the "
    "tokenizer (tokenizer.json, or tokenizer.model / vocab.json + merges.txt, with tokenizer_config.json)"
)
# A tokenizer's vocabulary is in one of these (a fast tokenizer.json, a sentencepiece *.model, BPE or
# WordPiece vocab files); tokenizer_config.json alone only names the class.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt")
TOKENIZER_VOCAB_SUFFIXES = (".model", ".tiktoken")

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


# --- devices and dtypes ---------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QloraKitError(f"device {device!r} was asked for but no CUDA GPU is visible; use device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a bf16-capable GPU, fp16 on older GPUs, fp32 on CPU (bf16 matmul is slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPES:
        raise QloraKitError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


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
        expected = entry.dtype.itemsize * _numel(entry.shape)
        if end - begin != expected or entry.end > size:
            raise QloraKitError(
                f"{path} is truncated or corrupt: tensor {name!r} should end at byte {entry.end} "
                f"but the file has {size} bytes; {fix}"
            )
        entries[name] = entry
    return entries


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


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
    index_file = model_dir / "model.safetensors.index.json"
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


# --- the model ------------------------------------------------------------------------------------------


def load_config(model_dir: Path):
    from transformers import AutoConfig

    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise QloraKitError(f"{model_dir} has no config.json; pass a Hugging Face checkpoint directory")
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as e:
        model_type = json.loads(config_file.read_text()).get("model_type", "?")
        raise QloraKitError(
            f"{config_file}: transformers does not know the architecture model_type={model_type!r} ({e}). "
            "Upgrade transformers (pip install -U transformers) or check the config."
        ) from None


def build_skeleton(config, dtype: torch.dtype, quantize: bool = True) -> nn.Module:
    """The model on the meta device, its decoder linears swapped for (empty) ``NF4Linear``s."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as e:
        raise QloraKitError(
            f"transformers has no causal-LM class for {type(config).__name__} ({e}); "
            "qlora-kit fine-tunes decoder-only causal language models"
        ) from None
    if quantize:
        for name in decoder_linear_names(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            linear = getattr(parent, child)
            shell = NF4Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device="meta",
                dtype=dtype,
            )
            setattr(parent, child, shell)
    return model


def load_model(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    quantize: bool = True,
) -> nn.Module:
    """A causal LM with NF4 decoder linears (or dense ones with ``quantize=False``), ready for ``add_lora``.

    ``name_or_path``: a checkpoint dir, a hub id, or a short id (see ``qlora_kit.models``).
    The returned model has ``model.name_or_path`` set to the resolved directory and is in eval mode.
    """
    model_dir = resolve_model_dir(str(name_or_path))
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = load_config(model_dir)
    entries = checkpoint_index(model_dir)
    prequantized = _check_prequantized(config, model_dir, quantize)
    model = build_skeleton(config, dtype, quantize)

    tied = bool(getattr(config, "tie_word_embeddings", False))
    expected = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    nf4_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    expected |= nf4_weights
    output_key = _output_embedding_key(model)
    ignored = []
    for name, entry in entries.items():
        if prequantized and _quant_state_owner(name) in nf4_weights:
            continue  # a 4-bit weight's state (absmax, quant_map, ...): read together with the weight's codes
        if name not in expected or (tied and name == output_key):
            ignored.append(name)
            continue
        tensor = read_tensor(entry).to(device)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, NF4Linear) and attr == "weight" and prequantized:
            _load_nf4_state(module, tensor, _read_quant_state(name, entries, device), entry)
        elif isinstance(module, NF4Linear) and attr == "weight":
            module.load_weight(tensor)
        else:
            _set_parameter(module, attr, tensor.to(dtype), name, entry)
        del tensor  # the dense source goes now; only the 4-bit codes stay
        release_freed_memory()

    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, config, device)
    _check_complete(model, model_dir)
    ignored = [n for n in ignored if "rotary_emb" not in n and not (tied and n == output_key)]
    if ignored:
        print(f"warning: {len(ignored)} tensors in {model_dir} are not used by the model (e.g. {ignored[0]})")
    model.name_or_path = str(model_dir)
    model.config.name_or_path = str(model_dir)
    return model.eval()


# --- checkpoints already in bitsandbytes 4-bit ------------------------------------------------------------


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


def _check_prequantized(config, model_dir: Path, quantize: bool) -> bool:
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


def _quant_state_owner(name: str) -> str | None:
    """``X.weight`` for a piece of its serialized 4-bit state (``X.weight.absmax``, ``X.weight.quant_state...``)."""
    head, sep, _ = name.partition(".weight.")
    return f"{head}.weight" if sep else None


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


def _output_embedding_key(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(f"{name}.weight" for name, m in model.named_modules() if m is head)


def _set_parameter(module: nn.Module, attr: str, tensor: torch.Tensor, name: str, entry: TensorEntry) -> None:
    current = getattr(module, attr)
    if tuple(current.shape) != tuple(tensor.shape):
        raise QloraKitError(
            f"{entry.file}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies "
            f"{tuple(current.shape)}; the weights and config.json do not belong together"
        )
    setattr(module, attr, nn.Parameter(tensor, requires_grad=False))


def _materialize_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Rebuild modules whose only state is computed at init (rotary embeddings' ``inv_freq``)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and name.endswith("rotary_emb"):
            parent_name, _, child = name.rpartition(".")
            fresh = type(module)(config=config).to(device)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def _check_complete(model: nn.Module, model_dir: Path) -> None:
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        shown = ", ".join(sorted({m.removesuffix(".codes").removesuffix(".absmax_codes") for m in missing})[:5])
        raise QloraKitError(
            f"the checkpoint in {model_dir} is missing {len(missing)} tensors that config.json needs "
            f"(e.g. {shown}). The download may be incomplete, or config.json belongs to another model."
        )


def load_tokenizer(name_or_path: str | Path):
    from transformers import AutoTokenizer

    model_dir = resolve_model_dir(str(name_or_path))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        names = [p.name for p in model_dir.iterdir()]
        if not any(n in TOKENIZER_VOCAB_FILES or n.endswith(TOKENIZER_VOCAB_SUFFIXES) for n in names):
            # transformers would blame a missing sentencepiece for a dir that simply lacks the files
            weights = "" if any(n.endswith(".safetensors") for n in names) else " and no weights (*.safetensors)"
            raise QloraKitError(
                f"{model_dir} has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...){weights}. "
                f"A model dir holds {MODEL_DIR_FILES}: copy the missing files from the model's download, "
                "or pass the complete dir"
            ) from None
        raise QloraKitError(f"could not load a tokenizer from {model_dir} ({e})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked; any id works, eos is always there
    return tokenizer
