"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, dir)`` loads what ``save_adapter`` writes, and ``load_adapter``
loads what peft writes (LoRA on linear layers, bias "none"). Writes are atomic: files go to a temp dir
beside the target, which is renamed into place only when complete.

qlora-kit's own facts about an adapter or an exported dir (the prompt template the run trained with; for an
export, that it is one) go into ``qlora_kit.json`` beside the peft files, not into ``adapter_config.json``:
peft warns about unknown keys there (0.21) or refuses them (older releases).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_kit.errors import QloraKitError
from qlora_kit.lora import add_lora, decoder_linear_names, load_lora_state_dict, lora_layers, lora_state_dict

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
METADATA_NAME = "qlora_kit.json"


@dataclass
class AdapterConfig:
    r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    def to_peft_json(self) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": None,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


def adapter_config_of(model: nn.Module, base_model_name_or_path: str | None = None) -> AdapterConfig:
    """Describe the model's LoRA layers; target_modules as leaf names when they cover whole layer kinds."""
    layers = lora_layers(model)
    if not layers:
        raise QloraKitError("the model has no LoRA layers to save; call add_lora first")
    first = next(iter(layers.values()))
    adapted = set(layers)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    every_with_leaf = {
        name for name in decoder_linear_names(model) + list(adapted) if name.rsplit(".", 1)[-1] in leaves
    }
    targets = leaves if every_with_leaf == adapted else sorted(adapted)
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    return AdapterConfig(first.r, first.alpha, dropout, targets, first.use_rslora, base_model_name_or_path)


def write_adapter_files(
    model: nn.Module,
    directory: Path,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write the adapter files (and ``metadata`` as qlora_kit.json) into an existing directory.

    No atomicity: callers own the directory.
    """
    config = adapter_config_of(model, base_model_name_or_path)
    state = {k: v.contiguous() for k, v in lora_state_dict(model).items()}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_peft_json(), indent=2) + "\n")
    if metadata is not None:
        write_metadata(directory, {"kind": "adapter", **metadata})


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Atomically (re)write ``directory`` as a PEFT-layout adapter dir (``metadata``: see ``write_metadata``)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise QloraKitError(f"{directory} is a file; choose a directory path for the adapter")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        write_adapter_files(model, tmp, base_model_name_or_path, metadata)
        apply_umask(tmp)
        replace_dir(tmp, directory)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        earlier = " The adapter that was there is intact." if directory.is_dir() else ""
        raise QloraKitError(
            f"could not write the adapter to {directory} ({e}); nothing was written there.{earlier} "
            "Free disk space (or choose another directory) and save again"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def apply_umask(directory: Path) -> None:
    """Give a dir made by ``tempfile.mkdtemp`` (mode 0700) and the files in it the modes any other tool's output
    gets: 0777 / 0666 minus the user's umask (safetensors writes its files 0600, copies keep their source's mode).
    """
    mask = os.umask(0)  # the only way to read the umask; set back at once (this process writes no files meanwhile)
    os.umask(mask)
    for path in [directory, *directory.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """qlora-kit's facts about an adapter or export dir: ``kind`` ("adapter" | "export"), ``template``
    (the prompt template of the training data: "alpaca" | "chat"), and for an export where it came from."""
    (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


def read_metadata(directory: Path) -> dict[str, Any]:
    """What ``write_metadata`` wrote in ``directory``; {} for a dir without it (other tools', older runs')."""
    path = directory / METADATA_NAME
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise QloraKitError(
            f"{path} is damaged ({e}). It only records the prompt template and where the dir came from: "
            "delete it (generate then needs --template alpaca or chat)"
        ) from None
    if not isinstance(metadata, dict):
        raise QloraKitError(
            f"{path} should hold a JSON object; delete it (generate then needs --template alpaca or chat)"
        )
    return metadata


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete dir ``new`` at ``target``; an older ``target`` survives until the new one is in place."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name}")
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)  # put the earlier dir back: a failed replace must not lose it
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        new.rename(target)


def find_adapter_dir(source: Path) -> Path:
    """``source`` itself when it is an adapter dir, or the ``adapter/`` inside a training run dir."""
    if not source.exists():
        raise QloraKitError(f"{source} does not exist; pass a training run dir or an adapter dir")
    if not source.is_dir():
        raise QloraKitError(f"{source} is a file; pass a training run dir or an adapter dir")
    for candidate in (source, source / "adapter"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    raise QloraKitError(
        f"{source} is neither an adapter dir nor a training run dir: found no {CONFIG_NAME} in it "
        f"or in {source / 'adapter'}"
    )


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not directory.is_dir():
        raise QloraKitError(f"adapter directory {directory} does not exist")
    if not config_file.is_file():
        raise QloraKitError(
            f"{directory} is not an adapter directory: {CONFIG_NAME} is missing "
            f"(an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME})"
        )
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise QloraKitError(f"{config_file} is not valid JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise QloraKitError(f"{config_file}: peft_type {raw.get('peft_type')!r} is not supported; only LORA is")
    if raw.get("bias", "none") != "none" or raw.get("modules_to_save"):
        raise QloraKitError(f"{config_file}: only bias='none' adapters without modules_to_save are supported")
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise QloraKitError(f"{config_file}: target_modules is a pattern ({targets!r}); list the module names instead")
    try:
        return AdapterConfig(
            r=int(raw["r"]),
            lora_alpha=float(raw["lora_alpha"]),
            lora_dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=list(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise QloraKitError(f"{config_file} lacks a valid {e} entry") from None


def load_adapter(model: nn.Module, directory: str | Path, dtype=None) -> AdapterConfig:
    """Add LoRA layers as the adapter's config says and load its weights into them."""
    directory = Path(directory)
    config = read_adapter_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        hint = (
            " (adapter_model.bin is the old pickle format: re-save it with safetensors)"
            if (directory / "adapter_model.bin").is_file()
            else ""
        )
        raise QloraKitError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}{hint}")
    try:
        state = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise QloraKitError(f"{weights} is damaged or not a safetensors file ({e})") from None
    if dtype is None:
        dtype = next(iter(state.values())).dtype
    try:
        add_lora(
            model, config.target_modules, config.r, config.lora_alpha, config.lora_dropout, config.use_rslora, dtype
        )
    except QloraKitError as e:
        raise QloraKitError(f"adapter {directory} does not fit this base model: {e}") from None
    load_lora_state_dict(model, state, source=str(directory))
    return config
