"""What an exported Hugging Face checkpoint dir holds besides its weights, and where one may be written.

- ``config.json`` (with bitsandbytes' ``quantization_config`` for a 4-bit export), ``generation_config.json``
  and the tokenizer files (an adapter dir's own win: training may have saved them);
- ``qlora_kit.json``: the marker that the dir is a merged export (``generate`` loads it dense, ``--force``
  may replace it) with the prompt template recorded with the adapter;
- the ``--out`` rules: never over what the export reads, an existing dir only with ``--force`` and only
  when it is an earlier export (or empty), and parent dirs the export created removed again if it fails.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from qlora_kit.adapter import METADATA_NAME, read_metadata
from qlora_kit.errors import QloraKitError

SINGLE_FILE = "model.safetensors"
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


def shard_name(index: int, count: int) -> str:
    """transformers' file name of shard ``index`` (1-based) of ``count``."""
    return SINGLE_FILE if count == 1 else f"model-{index:05d}-of-{count:05d}.safetensors"


# --- where the export goes --------------------------------------------------------------------------------


def check_out(out: Path, force: bool, protected: dict[str, Path]) -> None:
    """Refuse an ``--out`` the export must not write: a dir it reads, an existing dir without ``--force``, or
    (even with it) a non-empty dir that is not an earlier export."""
    resolved = out.resolve()
    for what, path in protected.items():
        path = path.resolve()
        if resolved == path or resolved in path.parents:
            raise QloraKitError(f"--out {out} would replace the {what} the export reads ({path}); choose another dir")
    if out.exists() and not force:
        raise QloraKitError(f"--out {out} already exists; pass --force to replace it")
    if out.is_dir() and not is_export(out):
        names = sorted(p.name for p in out.iterdir())
        if names:  # --force replaces an earlier export, never someone's other files
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise QloraKitError(
                f"--out {out} is not an earlier qlora-kit export (it has no {METADATA_NAME} saying so) and is not "
                f"empty: it holds {shown}. --force only replaces an earlier export; choose another --out, or move "
                "those files away yourself"
            )


def is_export(directory: Path) -> bool:
    try:
        return read_metadata(directory).get("kind") == "export"
    except QloraKitError:  # a damaged marker: not provably an export
        return False


def make_parents(out: Path) -> list[Path]:
    """Create the missing parent dirs of ``out``; return those created (deepest last), to remove on failure."""
    missing = [p for p in reversed(out.absolute().parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_empty(missing)
        raise unwritable(out, e) from None
    return missing


def remove_empty(directories: list[Path]) -> None:
    for directory in reversed(directories):
        try:
            directory.rmdir()
        except OSError:
            return  # not there, or not empty: nothing of ours to undo further up


def unwritable(out: Path, error: OSError) -> QloraKitError:
    where = error.filename or out.parent
    earlier = f" The earlier export at {out} is intact." if out.is_dir() else ""
    return QloraKitError(
        f"cannot write the export to {out}: {where} is not writable ({error.strerror or error}). Nothing was "
        f"written.{earlier} Choose an --out in a directory you can write to (or fix its permissions)"
    )


# --- what goes beside the weights ----------------------------------------------------------------------------


def write_config(config, directory: Path, out_dtype: torch.dtype, quantize: str | None) -> None:
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


def copy_side_files(base_dir: Path, adapter_dir: Path, directory: Path, config) -> list[str]:
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


def export_metadata(
    adapter_dir: Path, adapter_metadata: dict, base_dir: Path, dtype: str, merge_into: str, quantize: str | None
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
    template = adapter_metadata.get("template")
    if template is not None:
        metadata["template"] = template
    return metadata
