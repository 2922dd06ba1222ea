"""Merged export: base checkpoint + LoRA adapter -> a plain Hugging Face checkpoint dir, streamed.

    for each output shard (planned up front from the safetensors headers):
        for each tensor of the base checkpoint that goes into it, read alone from disk:
            decoder linear:  W = dequant(nf4(W_disk)) + scaling * B @ A   (fp32, then cast)
            anything else:   cast to the output dtype (embeddings, norms, lm_head)
        write the shard, free it

``nf4(W_disk)`` is ``NF4Linear.from_weight`` on the tensor exactly as ``loading.load_model`` gets it (the
on-disk dtype, on the same kind of device), so the dequantized weight is bit for bit the one training
saw, and the exported model computes what the training-time model computed. Merging into the original
16-bit weights instead (``merge_into="original"``) re-introduces the quantization error the adapter
never saw; it is offered with that warning.

Peak host memory is one output shard plus the working set of one tensor, whatever the model's size.
Everything is written into a temp dir beside ``out`` and renamed into place at the end, so a failure
(disk full included) leaves no partial export and an earlier export at ``out`` intact; the finished dir gets
the user's umask like any other tool's output. ``qlora_kit.json`` marks the dir as a merged export (so
``generate`` loads it dense and ``--force`` may replace it; a dir holding anything else is never replaced)
and carries the prompt template recorded with the adapter.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qlora_kit.adapter import (
    CONFIG_NAME,
    METADATA_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    apply_umask,
    find_adapter_dir,
    read_adapter_config,
    read_metadata,
    replace_dir,
    write_metadata,
)
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import (
    DTYPES,
    TensorEntry,
    build_skeleton,
    checkpoint_index,
    load_config,
    read_tensor,
    release_freed_memory,
    resolve_device,
)
from qlora_kit.lora import PEFT_PREFIX, decoder_linear_names, lora_scaling, merge_lora_weight
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import ABSMAX_BLOCKSIZE, NF4_BLOCKSIZE, NF4Linear

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
MERGE_TARGETS = ("dequantized", "original")
QUANTIZE_FORMATS = ("nf4",)
ORIGINAL_MERGE_WARNING = (
    "warning: --merge-into original adds the adapter to the original 16-bit weights. The adapter was "
    "trained against the NF4-dequantized weights, so this re-introduces the quantization error it never "
    "saw and the exported model will not compute what the trained model computed. The default "
    "(--merge-into dequantized) does not have this problem."
)

# (tensors, filename, metadata) -> None; safetensors' save_file, or a stand-in a test injects.
ShardWriter = Callable[[dict[str, torch.Tensor], str, dict[str, str]], None]


@dataclass
class _Unit:
    """One tensor of the base checkpoint and what becomes of it in the export."""

    name: str
    entry: TensorEntry
    is_linear: bool  # a decoder linear: the loader quantizes it, so the export dequantizes it
    lora: tuple[torch.Tensor, torch.Tensor] | None  # (A, B) when an adapter targets it
    out_bytes: int


# --- sizes ----------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: str | int) -> int:
    """``"5GB"`` -> 5_000_000_000 (decimal units, as transformers reads them; ``GiB`` is binary)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", size)
    unit = match.group(2).upper() if match else None
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) <= 0:
        raise QloraKitError(f"max shard size {size!r} is not a size; write it like 500MB, 5GB or 2GiB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _human(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _nf4_bytes(numel: int) -> int:
    """Bytes of one weight in bitsandbytes' packed 4-bit serialization (the state blob estimated)."""
    n_blocks = math.ceil(numel / NF4_BLOCKSIZE)
    return math.ceil(numel / 2) + n_blocks + 4 * math.ceil(n_blocks / ABSMAX_BLOCKSIZE) + 16 * 4 + 256 * 4 + 200


# --- inputs ---------------------------------------------------------------------------------------------


def _read_lora_pairs(adapter_dir: Path, r: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapter's (A, B) per module name; the adapter is small, so it is read whole."""
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise QloraKitError(f"{adapter_dir} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise QloraKitError(f"{weights} is damaged or not a safetensors file ({e})") from None
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match is None:
            raise QloraKitError(f"{weights}: unexpected tensor {key!r}; only LoRA A/B weights can be merged")
        pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
    incomplete = sorted(name for name, pair in pairs.items() if len(pair) != 2)
    if incomplete or not pairs:
        raise QloraKitError(f"{weights}: no complete LoRA A/B pair (e.g. {incomplete[:1] or 'no tensors'})")
    for name, pair in pairs.items():  # the scaling comes from the config's r: it must be the weights' rank
        if pair["A"].dim() != 2 or pair["A"].shape[0] != r:
            raise QloraKitError(
                f"{weights}: {name}.lora_A has shape {tuple(pair['A'].shape)} but {CONFIG_NAME} says r={r}; "
                "the adapter files do not belong together"
            )
    return {name: (pair["A"], pair["B"]) for name, pair in pairs.items()}


def _base_model_dir(adapter_dir: Path, config: AdapterConfig, base_model: str | Path | None) -> Path:
    if base_model is None and not config.base_model_name_or_path:
        raise QloraKitError(
            f"{adapter_dir / CONFIG_NAME} does not name its base model (base_model_name_or_path); "
            "pass it with --base-model PATH"
        )
    name = str(base_model) if base_model is not None else str(config.base_model_name_or_path)
    try:
        return resolve_model_dir(name)
    except QloraKitError as e:
        source = "--base-model" if base_model is not None else f"{adapter_dir / CONFIG_NAME}'s base_model_name_or_path"
        raise QloraKitError(f"the base model from {source} cannot be used: {e}. Pass --base-model PATH") from None


def _plan(
    base_dir: Path,
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]],
    adapter_dir: Path,
    out_dtype: torch.dtype,
    quantize: str | None,
) -> tuple[list[_Unit], object]:
    """Check the base checkpoint against its config and the adapter; list what goes into the export."""
    config = load_config(base_dir)
    entries = checkpoint_index(base_dir)
    skeleton = build_skeleton(config, out_dtype, quantize=False)  # meta device: shapes, no memory
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters(remove_duplicate=False)}
    linears = {f"{name}.weight" for name in decoder_linear_names(skeleton)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    head = skeleton.get_output_embeddings()
    output_key = next(f"{n}.weight" for n, m in skeleton.named_modules() if m is head)
    if not getattr(config, "architectures", None):  # from_pretrained picks the class by this entry
        config.architectures = [type(skeleton).__name__]

    required = set(shapes) - ({output_key} if tied else set())
    missing = sorted(required - set(entries))
    if missing:
        raise QloraKitError(
            f"the base checkpoint in {base_dir} is missing {len(missing)} tensors that its config.json needs "
            f"(e.g. {missing[0]}); the download may be incomplete"
        )
    for name in shapes.keys() & entries.keys():
        if tuple(entries[name].shape) != shapes[name]:
            raise QloraKitError(
                f"{entries[name].file}: tensor {name!r} has shape {tuple(entries[name].shape)} but config.json "
                f"implies {shapes[name]}; the weights and config.json do not belong together"
            )

    # Every adapter pair must land on a decoder linear of this base with matching shapes.
    for module, (a, b) in lora.items():
        key = f"{module}.weight"
        if key not in linears:
            raise QloraKitError(
                f"adapter {adapter_dir} has LoRA weights for {module!r}, which is not a decoder linear of the "
                f"base model in {base_dir}; the adapter was trained on a different base model "
                "(pass the right one with --base-model)"
            )
        out_features, in_features = shapes[key]
        if (
            a.dim() != 2
            or b.dim() != 2
            or a.shape[1] != in_features
            or b.shape[0] != out_features
            or (a.shape[0] != b.shape[1])
        ):
            raise QloraKitError(
                f"adapter {adapter_dir}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}, which do not fit "
                f"the base weight {shapes[key]} in {base_dir}; the adapter was trained on a different base model"
            )

    ignored = [n for n in entries if n not in shapes and "rotary_emb" not in n]
    if ignored:
        print(
            f"note: {len(ignored)} tensors of {base_dir} are not used by the model and are left out (e.g. {ignored[0]})"
        )
    units = []
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].file, kv[1].start)):
        if name not in shapes:
            continue
        numel = math.prod(entry.shape)
        itemsize = out_dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
        is_linear = name in linears
        out_bytes = _nf4_bytes(numel) if is_linear and quantize else numel * itemsize
        units.append(_Unit(name, entry, is_linear, lora.get(name.removesuffix(".weight")), out_bytes))
    return units, config


def _shards(units: list[_Unit], max_bytes: int) -> list[list[_Unit]]:
    """Greedy, in checkpoint order, like transformers: a tensor larger than the limit gets a shard alone."""
    shards: list[list[_Unit]] = [[]]
    size = 0
    for unit in units:
        if shards[-1] and size + unit.out_bytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(unit)
        size += unit.out_bytes
    return shards


# --- the tensors ----------------------------------------------------------------------------------------


def _render(
    unit: _Unit,
    scaling: float,
    out_dtype: torch.dtype,
    merge_into: str,
    quantize: str | None,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The output tensor(s) for one checkpoint tensor, on the CPU."""
    tensor = read_tensor(unit.entry)
    if not unit.is_linear:
        return {unit.name: tensor.to(out_dtype) if tensor.is_floating_point() else tensor}
    # Exactly what load_model does with this tensor: move it, quantize it in its on-disk dtype.
    tensor = tensor.to(device)
    weight = NF4Linear.from_weight(tensor).dequantize(torch.float32) if merge_into == "dequantized" else tensor
    del tensor
    if unit.lora is not None:
        lora_a, lora_b = (t.to(device) for t in unit.lora)
        weight = merge_lora_weight(weight, lora_a, lora_b, scaling)
    weight = weight.to(out_dtype)
    if quantize is None:
        return {unit.name: weight.cpu()}
    # bitsandbytes' own serialization (what transformers writes for a 4-bit model and reads back).
    layer = NF4Linear.from_weight(weight)
    state = layer.quant_state(out_dtype).as_dict(packed=True)
    out = {unit.name: layer.codes.view(-1, 1).cpu()}
    # Copies: the code tables are shared between layers (cached in quant.py), and safetensors refuses
    # tensors that share memory.
    out.update({f"{unit.name}.{key}": value.to("cpu", copy=True) for key, value in state.items()})
    return out


# --- the export -----------------------------------------------------------------------------------------


def _check_out(out: Path, force: bool, protected: dict[str, Path]) -> None:
    resolved = out.resolve()
    for what, path in protected.items():
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise QloraKitError(f"--out {out} would replace the {what} the export reads ({path}); choose another dir")
    if out.exists() and not force:
        raise QloraKitError(f"--out {out} already exists; pass --force to replace it")
    if out.is_dir() and not _is_export(out):
        names = sorted(p.name for p in out.iterdir())
        if names:  # --force replaces an earlier export, never someone's other files
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise QloraKitError(
                f"--out {out} is not an earlier qlora-kit export (it has no {METADATA_NAME} saying so) and is not "
                f"empty: it holds {shown}. --force only replaces an earlier export; choose another --out, or move "
                "those files away yourself"
            )


def _is_export(directory: Path) -> bool:
    try:
        return read_metadata(directory).get("kind") == "export"
    except QloraKitError:  # a damaged marker: not provably an export
        return False


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parent dirs of ``out``; return those created (deepest last), to remove on failure."""
    missing = [p for p in reversed(out.absolute().parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _remove_empty(missing)
        raise _unwritable(out, e) from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return  # not there, or not empty: nothing of ours to undo further up


def _unwritable(out: Path, error: OSError) -> QloraKitError:
    where = error.filename or out.parent
    earlier = f" The earlier export at {out} is intact." if out.is_dir() else ""
    return QloraKitError(
        f"cannot write the export to {out}: {where} is not writable ({error.strerror or error}). Nothing was "
        f"written.{earlier} Choose an --out in a directory you can write to (or fix its permissions)"
    )


def _nf4_warning(units: list[_Unit]) -> str | None:
    """bitsandbytes' CPU forward (on CPUs with AVX512-BF16) repacks 4-bit weights in rows of 64 input features
    and fails on any other width; qlora-kit's own loader has no such limit."""
    odd = [(u.name, u.entry.shape[-1]) for u in units if u.is_linear and u.entry.shape[-1] % NF4_BLOCKSIZE]
    if not odd:
        return None
    return (
        f"warning: {len(odd)} decoder linears have an input width that is not a multiple of {NF4_BLOCKSIZE} "
        f"(e.g. {odd[0][0]}: {odd[0][1]}). transformers + bitsandbytes cannot run this 4-bit export on a CPU "
        f"with AVX512-BF16 (bitsandbytes' CPU kernel needs multiples of {NF4_BLOCKSIZE}); `qlora-kit generate` "
        "and GPUs load and run it"
    )


def _write_config(config, directory: Path, out_dtype: torch.dtype, quantize: str | None) -> None:
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = out_dtype
    config.save_pretrained(directory)
    if quantize == "nf4":
        # What transformers writes for a model loaded with this BitsAndBytesConfig, so it loads it back as such.
        raw = json.loads((directory / "config.json").read_text())
        raw["quantization_config"] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": True,
            "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True,
            "bnb_4bit_compute_dtype": str(out_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": None,
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }
        (directory / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n")


def _copy_side_files(base_dir: Path, adapter_dir: Path, directory: Path, config) -> list[str]:
    """generation_config.json and the tokenizer; an adapter dir's own tokenizer files win (training may set them)."""
    generation = base_dir / "generation_config.json"
    if generation.is_file():
        shutil.copy2(generation, directory / generation.name)
    else:
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(config).save_pretrained(directory)
    source = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
            copied.append(name)
    return copied


def _export_metadata(
    adapter_dir: Path, base_dir: Path, dtype: str, merge_into: str, quantize: str | None
) -> dict[str, object]:
    """The export's qlora_kit.json: that it is a merged export (generate loads it dense, --force may replace
    it) and the prompt template recorded with the adapter (generate's --template auto uses it)."""
    metadata: dict[str, object] = {
        "kind": "export",
        "adapter": str(adapter_dir.absolute()),
        "base_model": str(base_dir.absolute()),
        "dtype": dtype,
        "merge_into": merge_into,
        "quantize": quantize,
    }
    template = read_metadata(adapter_dir).get("template")
    if template is not None:
        metadata["template"] = template
    return metadata


def export_merged(
    source: str | Path,
    out: str | Path,
    dtype: str = "bf16",
    max_shard_size: str | int = "5GB",
    merge_into: str = "dequantized",
    quantize: str | None = None,
    force: bool = False,
    base_model: str | Path | None = None,
    device: str = "auto",
    save_shard: ShardWriter = save_file,
) -> Path:
    """Merge the adapter in ``source`` (adapter dir or run dir) into its base model; write an HF dir at ``out``.

    ``device``: where each weight is quantized and merged. Use the training run's device kind: NF4
    codes are computed by that device's bitsandbytes kernel, and ``auto`` picks what training's ``auto``
    picked. ``save_shard`` writes one shard (tests inject a failing writer to simulate a full disk).
    """
    source, out = Path(source), Path(out)
    if dtype not in DTYPES:
        raise QloraKitError(f"export dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if merge_into not in MERGE_TARGETS:
        raise QloraKitError(f"--merge-into {merge_into!r} is not one of {', '.join(MERGE_TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise QloraKitError(f"--quantize {quantize!r} is not supported; use {', '.join(QUANTIZE_FORMATS)}")
    out_dtype = DTYPES[dtype]
    max_bytes = parse_size(max_shard_size)
    compute_device = resolve_device(device)

    # Everything is checked before anything is written.
    if out.exists() and not out.is_dir():
        raise QloraKitError(f"--out {out} is an existing file; choose a directory path for the export")
    adapter_dir = find_adapter_dir(source)
    adapter_config = read_adapter_config(adapter_dir)
    lora = _read_lora_pairs(adapter_dir, adapter_config.r)
    base_dir = _base_model_dir(adapter_dir, adapter_config, base_model)
    _check_out(out, force, {"base model": base_dir, "adapter": adapter_dir})
    units, config = _plan(base_dir, lora, adapter_dir, out_dtype, quantize)
    shards = _shards(units, max_bytes)
    planned = sum(u.out_bytes for u in units)
    free = shutil.disk_usage(next(p for p in out.absolute().parents if p.exists())).free
    if free < planned:
        raise QloraKitError(
            f"not enough disk space for the export: it needs about {_human(planned)} in {out.parent}, "
            f"which has {_human(free)} free"
        )
    metadata = _export_metadata(adapter_dir, base_dir, dtype, merge_into, quantize)
    for warning in (ORIGINAL_MERGE_WARNING if merge_into == "original" else None, quantize and _nf4_warning(units)):
        if warning:
            print(warning, file=sys.stderr)
    scaling = lora_scaling(adapter_config.lora_alpha, adapter_config.r, adapter_config.use_rslora)

    created = _make_parents(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        _remove_empty(created)
        raise _unwritable(out, e) from None
    current = tmp
    try:
        weight_map: dict[str, str] = {}
        total_size = 0
        for index, shard in enumerate(shards, start=1):
            filename = SINGLE_FILE if len(shards) == 1 else f"model-{index:05d}-of-{len(shards):05d}.safetensors"
            current = tmp / filename
            tensors: dict[str, torch.Tensor] = {}
            for unit in shard:
                tensors.update(_render(unit, scaling, out_dtype, merge_into, quantize, compute_device))
                release_freed_memory()  # this tensor's temporaries
            save_shard(tensors, str(current), {"format": "pt"})
            shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
            total_size += shard_bytes
            weight_map.update(dict.fromkeys(tensors, filename))
            del tensors  # the shard is on disk; only the next one is ever held
            release_freed_memory()
            print(f"wrote {filename} ({_human(shard_bytes)}, {len(shard)} checkpoint tensors)")
        if len(shards) > 1:
            index_json = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            current = tmp / INDEX_FILE
            current.write_text(json.dumps(index_json, indent=2) + "\n")
        current = tmp
        _write_config(config, tmp, out_dtype, quantize)
        tokenizer_files = _copy_side_files(base_dir, adapter_dir, tmp, config)
        write_metadata(tmp, metadata)
        apply_umask(tmp)
        replace_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        earlier = " The earlier export there is intact." if out.is_dir() else ""
        if e.errno == errno.ENOSPC:
            raise QloraKitError(
                f"export to {out} failed: the disk is full (no space left on device while writing {current.name}). "
                f"Nothing was written to {out}.{earlier} The export needs about {_human(planned)} free in "
                f"{out.parent}; free some space and run it again."
            ) from None
        raise QloraKitError(
            f"export to {out} failed while writing {current.name}: {e}. Nothing was written to {out}.{earlier}"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    if not tokenizer_files:
        print(f"note: {base_dir} has no tokenizer files; the export has none either")
    merged = sum(u.lora is not None for u in units)
    print(
        f"exported {out}: {merged} LoRA-merged linears into the {merge_into} base, {dtype}"
        f"{' re-quantized to nf4' if quantize else ''}, {len(shards)} shard(s), {_human(total_size)}"
    )
    return out


def export_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="qlora-kit export",
        description="Merge a trained LoRA adapter into its base model and write a standard Hugging Face "
        "checkpoint dir (streamed shard by shard; peak memory about one shard).",
    )
    parser.add_argument(
        "source", metavar="RUN_OR_ADAPTER_DIR", help="a training run dir (with adapter/) or an adapter dir"
    )
    parser.add_argument("--out", required=True, help="the directory to write (refused if it exists, unless --force)")
    parser.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of the exported weights")
    parser.add_argument("--max-shard-size", default="5GB", help="largest shard file, e.g. 500MB, 5GB (default 5GB)")
    parser.add_argument(
        "--merge-into",
        default="dequantized",
        choices=MERGE_TARGETS,
        help="dequantized (default): the NF4 weights training saw; original: the 16-bit checkpoint weights "
        "(re-introduces quantization error the adapter never saw)",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE_FORMATS, default=None, help="re-quantize the merged model in bitsandbytes 4-bit"
    )
    parser.add_argument(
        "--force", action="store_true", help="replace an earlier export at --out (never a dir holding other files)"
    )
    parser.add_argument("--base-model", default=None, help="base model path or id (default: the adapter config's)")
    parser.add_argument(
        "--device", default="auto", help="where weights are quantized and merged: auto, cpu, cuda (match training)"
    )
    args = parser.parse_args(argv)
    export_merged(
        args.source,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        merge_into=args.merge_into,
        quantize=args.quantize,
        force=args.force,
        base_model=args.base_model,
        device=args.device,
    )
    return 0
