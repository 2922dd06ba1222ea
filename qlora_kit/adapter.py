"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(base, dir)`` loads what ``save_adapter`` writes, and ``load_adapter``
loads what peft writes (on linear layers, bias "none"): LoRA and rsLoRA; DoRA (``use_dora``, a
``lora_magnitude_vector`` per module); VeRA (``peft_type`` VERA, ``vera_lambda_b``/``vera_lambda_d`` per module
and the shared projection ``base_model.vera_A``/``vera_B``, drawn again from ``projection_prng_key`` when PEFT
saved without it); a PiSSA/LoftQ run's adapter is written as PEFT's rank-2r conversion (``lora_init``).
``read_adapter`` is the one reader of an
adapter's files (``load_adapter``, export and checkpoint resume all go through it); writes go through
``atomic.atomic_dir``.

``adapter_config.json`` is written from the run's LoRA settings (``lora``: r, alpha, dropout, use_rslora),
its ``target_modules`` the adapted layers' leaf names where they cover every layer of a kind, and its
``base_model_name_or_path`` absolute for a local dir, so the file means the same from any working directory.

qlora-kit's own facts about an adapter or an exported dir (the prompt template the run trained with; for an
export, that it is one) go into ``qlora_kit.json`` beside the peft files, not into ``adapter_config.json``:
peft warns about unknown keys there (0.21) or refuses them (older releases).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from qlora_kit.architecture import decoder_linear_names
from qlora_kit.atomic import atomic_dir
from qlora_kit.embeddings import (
    EmbeddingSettings,
    apply_embeddings,
    embedding_settings,
    embedding_settings_from_json,
    embedding_state_dict,
)
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import (
    PEFT_PREFIX,
    VERA_A_KEY,
    VERA_B_KEY,
    add_lora,
    load_lora_state_dict,
    lora_layers,
    lora_scaling,
    lora_state_dict,
    merge_lora_weight,
)
from qlora_kit.lora_variants import VERA_D_INITIAL, dora_merge, vera_merge

INIT_KEY = "lora_init"  # qlora_kit.json: a PiSSA/LoftQ init's method, r, iters, seed (lora_init.SVDInit.metadata)
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
    variant: str = "lora"  # lora | dora (PEFT: use_dora) | vera (PEFT: peft_type VERA)
    projection_prng_key: int = 0  # vera: the seed of the shared projection (saved with it as well)
    embeddings: EmbeddingSettings = field(default_factory=EmbeddingSettings)  # trainable tokens, modules_to_save

    def to_peft_json(self) -> dict:
        embeddings = self.embeddings  # none with vera (validate refuses them together)
        if self.variant == "vera":
            return {
                "peft_type": "VERA",
                "task_type": "CAUSAL_LM",
                "r": self.r,
                "target_modules": self.target_modules,
                "projection_prng_key": self.projection_prng_key,
                "save_projection": True,
                "vera_dropout": self.lora_dropout,
                "d_initial": VERA_D_INITIAL,
                "bias": "none",
                "fan_in_fan_out": False,
                "inference_mode": True,
                "init_weights": True,
                "modules_to_save": None,
                "base_model_name_or_path": self.base_model_name_or_path,
            }
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "lora_dropout": self.lora_dropout,
            "target_modules": self.target_modules,
            "use_rslora": self.use_rslora,
            "use_dora": self.variant == "dora",
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "init_lora_weights": True,
            "modules_to_save": embeddings.modules_to_save or None,
            "trainable_token_indices": embeddings.trainable_token_indices or None,
            "ensure_weight_tying": embeddings.ensure_weight_tying,
            "base_model_name_or_path": self.base_model_name_or_path,
        }


class LoRASettings(Protocol):
    """What an adapter config takes from a LoRA config (``config.LoRAConfig`` is one)."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    # also read when present (config.LoRAConfig has them): variant ("lora"), vera_projection_seed (0)


@dataclass(frozen=True)
class _LayerSettings:
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    variant: str = "lora"

    def __str__(self) -> str:
        return (
            f"r={self.r}, alpha={self.alpha:g}, dropout={self.dropout:g}, use_rslora={self.use_rslora}, "
            f"variant={self.variant}"
        )


# --- writing ----------------------------------------------------------------------------------------------


def stored_base_path(name_or_path: str | Path | None) -> str | None:
    """``base_model_name_or_path`` as adapter_config.json keeps it: an existing local dir as an absolute path
    (export, generate and peft read the file from other working directories); a hub id or short id as it is."""
    if name_or_path is None:
        return None
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.is_dir() else str(name_or_path)


def adapter_config_for(
    lora: LoRASettings, adapted: Sequence[str], linears: Sequence[str], base_model_name_or_path: str | None = None
) -> AdapterConfig:
    """The adapter config of a run: ``lora``'s settings; ``adapted``: the full names of the adapted linears,
    written as leaf names (``q_proj``) when they cover every linear of those kinds among ``linears``."""
    leaves = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    every_with_leaf = {name for name in [*linears, *adapted] if name.rsplit(".", 1)[-1] in leaves}
    targets = leaves if every_with_leaf == set(adapted) else sorted(adapted)
    return AdapterConfig(
        int(lora.r),
        float(lora.alpha),
        float(lora.dropout),
        targets,
        bool(lora.use_rslora),
        stored_base_path(base_model_name_or_path),
        getattr(lora, "variant", "lora"),
        int(getattr(lora, "vera_projection_seed", 0)),
    )


def adapter_config_of(
    model: nn.Module, base_model_name_or_path: str | None = None, lora: LoRASettings | None = None
) -> AdapterConfig:
    """The config of ``model``'s adapter: from ``lora`` (the run's LoRA config, checked against the layers),
    or, without one, as the layers say (a model adapted by hand with ``add_lora``)."""
    layers = lora_layers(model)
    if not layers:
        raise QloraKitError("the model has no LoRA layers to save; call add_lora first")
    held = [
        _LayerSettings(
            layer.r,
            layer.alpha,
            layer.dropout.p if isinstance(layer.dropout, nn.Dropout) else 0.0,
            layer.use_rslora,
            layer.variant,
        )
        for layer in layers.values()
    ]
    if lora is not None:
        given = _LayerSettings(lora.r, lora.alpha, lora.dropout, lora.use_rslora, getattr(lora, "variant", "lora"))
        if set(held) != {given}:
            raise QloraKitError(
                f"the LoRA config to save ({given}) is not what the model's LoRA layers hold "
                f"({'; '.join(sorted(set(map(str, held))))}); save the config the layers were added with"
            )
    settings = lora if lora is not None else held[0]
    config = adapter_config_for(settings, list(layers), decoder_linear_names(model), base_model_name_or_path)
    if config.variant == "vera":  # the seed the layers' projection was drawn from
        config.projection_prng_key = next(iter(layers.values())).projection_prng_key
    if any(getattr(layer, "init_a", None) is not None for layer in layers.values()):
        # PiSSA/LoftQ: written as PEFT's conversion writes it (LoRALinear.peft_tensors): rank 2r, same scaling
        config.r *= 2
        config.lora_alpha *= 2**0.5 if config.use_rslora else 2
    return config


def write_adapter_files(
    model: nn.Module,
    directory: Path,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, Any] | None = None,
    lora: LoRASettings | None = None,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the adapter files (and ``metadata`` as qlora_kit.json) into an existing directory.

    No atomicity: callers own the directory (``save_adapter``, ``checkpoint.save_checkpoint``). ``state``:
    the weights when the model does not hold them whole (FSDP shards: ``distributed.full_lora_state``).
    """
    config = adapter_config_of(model, base_model_name_or_path, lora)
    config.embeddings = embedding_settings(model)
    state = {**(lora_state_dict(model) if state is None else state), **embedding_state_dict(model)}
    state = {k: v.contiguous() for k, v in state.items()}
    init_info = next((layer.init_info for layer in lora_layers(model).values() if hasattr(layer, "init_info")), None)
    if init_info is not None:  # PiSSA/LoftQ: how to recompute the residual base (export, merged)
        metadata = {**(metadata or {}), INIT_KEY: init_info}
    save_file(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(json.dumps(config.to_peft_json(), indent=2) + "\n")
    if metadata is not None:
        write_metadata(directory, {"kind": "adapter", **metadata})


def save_adapter(
    model: nn.Module,
    directory: str | Path,
    base_model_name_or_path: str | None = None,
    metadata: dict[str, Any] | None = None,
    lora: LoRASettings | None = None,
    state: dict[str, torch.Tensor] | None = None,
    tokenizer: Any = None,
) -> Path:
    """Atomically (re)write ``directory`` as a PEFT-layout adapter dir (``metadata``: see ``write_metadata``;
    ``lora``: the run's LoRA config, see ``adapter_config_of``; ``state``: see ``write_adapter_files``;
    ``tokenizer``: saved beside the adapter, for one with added tokens)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise QloraKitError(f"{directory} is a file; choose a directory path for the adapter")
    try:
        with atomic_dir(directory) as tmp:
            write_adapter_files(model, tmp, base_model_name_or_path, metadata, lora, state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as e:
        earlier = " The adapter that was there is intact." if directory.is_dir() else ""
        raise QloraKitError(
            f"could not write the adapter to {directory} ({e}); nothing was written there.{earlier} "
            "Free disk space (or choose another directory) and save again"
        ) from None
    return directory


def write_metadata(directory: Path, metadata: dict[str, Any]) -> None:
    """qlora-kit's facts about an adapter or export dir: ``kind`` ("adapter" | "export"), ``template``
    (the prompt template of the training data: "alpaca" | "chat"), and for an export where it came from."""
    (directory / METADATA_NAME).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")


# --- reading ----------------------------------------------------------------------------------------------


class AdapterFileError(QloraKitError):
    """An adapter file that cannot be used; ``file`` names which (a checkpoint reports it as damaged)."""

    def __init__(self, message: str, file: str) -> None:
        super().__init__(message)
        self.file = file


def read_metadata(directory: Path) -> dict[str, Any]:
    """What ``write_metadata`` wrote in ``directory``; {} for a dir without it (other tools', older runs')."""
    path = directory / METADATA_NAME
    if not path.is_file():
        return {}
    how = "generate then needs --template alpaca or chat"
    try:
        metadata = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(
            f"{path} is damaged ({e}). It only records the prompt template and where the dir came from: "
            f"delete it ({how})",
            METADATA_NAME,
        ) from None
    if not isinstance(metadata, dict):
        raise AdapterFileError(f"{path} should hold a JSON object; delete it ({how})", METADATA_NAME)
    return metadata


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


@dataclass
class Adapter:
    """An adapter dir as read: its config, its weights under PEFT's key names, and qlora_kit.json ({} if none)."""

    directory: Path
    config: AdapterConfig
    state: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    embeddings: dict[str, torch.Tensor] = field(default_factory=dict)  # trainable tokens' / saved modules' tensors

    def pairs(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A, B) per adapted module name (``model.layers.0.self_attn.q_proj``); none for VeRA."""
        prefix, suffix = len(PEFT_PREFIX), len(".lora_A.weight")
        return {
            key[prefix:-suffix]: (tensor, self.state[key.replace(".lora_A.", ".lora_B.")])
            for key, tensor in self.state.items()
            if key.endswith(".lora_A.weight")
        }

    def residual(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A PiSSA/LoftQ adapter's ``W -> residual`` (what training quantized as the base), recomputed from W."""
        from qlora_kit.lora_init import residual_weight

        info, config = self.metadata[INIT_KEY], self.config
        scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
        return lambda w: residual_weight(w, info, scaling)

    def modules(self) -> dict[str, dict[str, torch.Tensor]]:
        """Each adapted module's tensors by PEFT suffix (``lora_A.weight``, ``lora_magnitude_vector``, ...)."""
        held: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in self.state.items():
            if key.startswith(PEFT_PREFIX):
                for suffix in VARIANT_SUFFIXES[self.config.variant]:
                    if key.endswith("." + suffix):
                        held.setdefault(key[len(PEFT_PREFIX) : -len(suffix) - 1], {})[suffix] = tensor
        return held

    def merger(self, module: str, over_residual: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
        """``W -> W`` with this adapter's ``module`` merged in (fp32): LoRA's, DoRA's or VeRA's formula.

        ``over_residual``: a PiSSA/LoftQ adapter (rank-2r conversion, see ``lora_init``) merged as training
        computed it: only its trained first r over the residual base (``residual``), not the conversion over W.
        """
        tensors, config = self.modules()[module], self.config
        if config.variant == "vera":
            held = [self.state[VERA_A_KEY], self.state[VERA_B_KEY], tensors["vera_lambda_d"], tensors["vera_lambda_b"]]
            return lambda w: vera_merge(w, *(t.to(w.device) for t in held))
        a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
        scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
        if over_residual:
            trained = int(self.metadata[INIT_KEY]["r"])
            a, b = a[:trained], b[:, :trained]
        if config.variant == "dora":
            magnitude = tensors["lora_magnitude_vector"]
            return lambda w: dora_merge(w, a.to(w.device), b.to(w.device), magnitude.to(w.device), scaling)
        return lambda w: merge_lora_weight(w, a.to(w.device), b.to(w.device), scaling)


def read_adapter(directory: str | Path) -> Adapter:
    """Read and check an adapter dir: the config, the weights (complete A/B pairs of rank ``r``), the metadata.

    Errors are ``AdapterFileError``s naming the file.
    """
    directory = Path(directory)
    config = read_adapter_config(directory)
    state = _read_weights(directory, config)
    embeddings = {key: state.pop(key) for key in [k for k in state if config.embeddings.holds(k)]}
    return Adapter(directory, config, state, read_metadata(directory), embeddings)


def read_adapter_config(directory: str | Path) -> AdapterConfig:
    directory = Path(directory)
    config_file = directory / CONFIG_NAME
    if not directory.is_dir():
        raise AdapterFileError(f"adapter directory {directory} does not exist", CONFIG_NAME)
    if not config_file.is_file():
        raise AdapterFileError(
            f"{directory} is not an adapter directory: {CONFIG_NAME} is missing "
            f"(an adapter dir holds {CONFIG_NAME} and {WEIGHTS_NAME})",
            CONFIG_NAME,
        )
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFileError(f"{config_file} is not valid JSON ({e})", CONFIG_NAME) from None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"{config_file} should hold a JSON object", CONFIG_NAME)
    return _config_from_json(raw, config_file)


def _config_from_json(raw: dict, config_file: Path) -> AdapterConfig:
    def refuse(problem: str) -> AdapterFileError:
        return AdapterFileError(f"{config_file}: {problem}", CONFIG_NAME)

    peft_type = raw.get("peft_type", "LORA")
    if peft_type not in ("LORA", "VERA"):
        raise refuse(f"peft_type {peft_type!r} is not supported; LORA (with or without use_dora) and VERA are")
    if raw.get("bias", "none") != "none":
        raise refuse("only bias='none' adapters are supported")
    if peft_type == "VERA" and raw.get("modules_to_save"):
        raise refuse("VERA adapters with modules_to_save are not supported")
    try:
        embeddings = embedding_settings_from_json(raw)
    except ValueError as e:
        raise refuse(str(e)) from None
    targets = raw.get("target_modules")
    if isinstance(targets, str):
        raise refuse(f"target_modules is a pattern ({targets!r}); list the module names instead")
    vera = peft_type == "VERA"
    try:
        return AdapterConfig(
            r=int(raw["r"]),
            lora_alpha=1.0 if vera else float(raw["lora_alpha"]),
            lora_dropout=float(raw.get("vera_dropout" if vera else "lora_dropout", 0.0)),
            target_modules=list(targets),
            use_rslora=bool(raw.get("use_rslora", False)),
            base_model_name_or_path=raw.get("base_model_name_or_path"),
            variant="vera" if vera else ("dora" if raw.get("use_dora") else "lora"),
            projection_prng_key=int(raw.get("projection_prng_key", 0)),
            embeddings=embeddings,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise AdapterFileError(f"{config_file} lacks a valid {e} entry", CONFIG_NAME) from None


# Each variant's tensors per adapted module, as PEFT names them on disk (in memory it adds ".default").
VARIANT_SUFFIXES = {
    "lora": ("lora_A.weight", "lora_B.weight"),
    "dora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    "vera": ("vera_lambda_b", "vera_lambda_d"),
}
VARIANT_SETS = {
    "lora": "LoRA A/B pair",
    "dora": "DoRA set (lora_A, lora_B, lora_magnitude_vector)",
    "vera": "VeRA pair (vera_lambda_b, vera_lambda_d)",
}
_TENSOR_KEY = re.compile(
    rf"{re.escape(PEFT_PREFIX)}(.+)\.(lora_[AB]|lora_magnitude_vector|vera_lambda_[bd])(?:\.default)?(\.weight)?"
)
_PROJECTION_KEY = re.compile(r"(base_model\.vera_[AB])(?:\.default)?")


def _load_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        old = (directory / "adapter_model.bin").is_file()
        hint = " (adapter_model.bin is the old pickle format: re-save it with safetensors)" if old else ""
        raise AdapterFileError(
            f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}; the adapter is incomplete{hint}", WEIGHTS_NAME
        )
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as e:
        raise AdapterFileError(f"{weights} is damaged or not a safetensors file ({e})", WEIGHTS_NAME) from None


def _read_weights(directory: Path, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """The weights under PEFT's on-disk names (peft's in-memory ``.default`` dropped), checked module by module:
    each holds its variant's tensors (``VARIANT_SUFFIXES``), ranks as the config's ``r`` says."""
    weights, r, variant = directory / WEIGHTS_NAME, config.r, config.variant
    modules: dict[str, dict[str, torch.Tensor]] = {}
    projection: dict[str, torch.Tensor] = {}
    embeddings: dict[str, torch.Tensor] = {}  # trainable tokens / modules_to_save: checked by embeddings.py
    for key, tensor in _load_safetensors(directory).items():
        if config.embeddings.holds(key):
            embeddings[key] = tensor
            continue
        match, shared = _TENSOR_KEY.fullmatch(key), _PROJECTION_KEY.fullmatch(key)
        kind = match and match.group(2) + (".weight" if match.group(2) in ("lora_A", "lora_B") else "")
        if shared is not None and variant == "vera":
            projection[shared.group(1)] = tensor
        elif match is not None and kind in VARIANT_SUFFIXES[variant]:
            modules.setdefault(match.group(1), {})[kind] = tensor
        else:
            raise AdapterFileError(
                f"{weights}: unexpected tensor {key!r}; a {variant} adapter holds "
                f"{', '.join(VARIANT_SUFFIXES[variant])} per module (see {CONFIG_NAME})",
                WEIGHTS_NAME,
            )
    incomplete = sorted(name for name, held in modules.items() if len(held) != len(VARIANT_SUFFIXES[variant]))
    if incomplete or not modules:
        raise AdapterFileError(
            f"{weights}: no complete {VARIANT_SETS[variant]} (e.g. {incomplete[:1] or 'no tensors'})",
            WEIGHTS_NAME,
        )
    for name, held in modules.items():  # the scaling comes from the config's r: it must be the weights' rank
        for suffix, rank_dim in (("lora_A.weight", 0), ("lora_B.weight", 1), ("vera_lambda_d", 0)):
            tensor = held.get(suffix)
            if tensor is not None and (
                tensor.dim() != (1 if suffix == "vera_lambda_d" else 2) or tensor.shape[rank_dim] != r
            ):
                raise AdapterFileError(
                    f"{weights}: {name}.{suffix.removesuffix('.weight')} has shape {tuple(tensor.shape)} but "
                    f"{CONFIG_NAME} says r={r}; the adapter files do not belong together",
                    WEIGHTS_NAME,
                )
    state = {f"{PEFT_PREFIX}{name}.{suffix}": t for name, held in modules.items() for suffix, t in held.items()}
    return {**state, **projection, **embeddings}


def load_adapter(model: nn.Module, adapter: str | Path | Adapter, dtype: torch.dtype | None = None) -> AdapterConfig:
    """Add LoRA layers as the adapter's config says and load its weights into them (``adapter``: a dir, or
    what ``read_adapter`` read). ``dtype``: of the LoRA weights (default: as stored)."""
    if not isinstance(adapter, Adapter):
        adapter = read_adapter(adapter)
    config = adapter.config
    if dtype is None:
        dtype = next(t for k, t in adapter.state.items() if k.startswith(PEFT_PREFIX)).dtype
    try:
        add_lora(
            model,
            config.target_modules,
            config.r,
            config.lora_alpha,
            config.lora_dropout,
            config.use_rslora,
            dtype,
            config.variant,
            config.projection_prng_key,
        )
    except QloraKitError as e:
        raise QloraKitError(f"adapter {adapter.directory} does not fit this base model: {e}") from None
    state = adapter.state
    if config.variant == "vera" and VERA_A_KEY not in state:  # saved without it: drawn again from its key
        state = {**state, **{k: v for k, v in lora_state_dict(model).items() if k in (VERA_A_KEY, VERA_B_KEY)}}
    load_lora_state_dict(model, state, source=str(adapter.directory))
    apply_embeddings(model, config.embeddings, adapter.embeddings, source=str(adapter.directory))
    return config
