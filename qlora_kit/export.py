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
Everything is checked before anything is written (the adapter by ``adapter.read_adapter``, the base
checkpoint by ``weights.check_checkpoint``, the same checks the loader makes), then written through
``atomic.atomic_dir``: a failure (disk full included) leaves no partial export and an earlier export at
``out`` intact. What goes beside the weights, and where an export may go, is ``hf_dir``'s.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from qlora_kit.adapter import CONFIG_NAME, INIT_KEY, Adapter, find_adapter_dir, read_adapter, write_metadata
from qlora_kit.adapters import read_stack, stacked_base_adapters
from qlora_kit.atomic import atomic_dir
from qlora_kit.embeddings import merged_rows
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import DTYPE_NAMES, EMBEDDING_MODULES, NF4_BLOCKSIZE, nf4_bytes, parse_size
from qlora_kit.hf_dir import (
    check_out,
    copy_side_files,
    export_metadata,
    make_parents,
    remove_empty,
    shard_name,
    unwritable,
    write_config,
)
from qlora_kit.loading import DTYPES, build_skeleton, load_config, resolve_device
from qlora_kit.lora import VERA_A_KEY, VERA_B_KEY, lora_scaling, merge_lora_weight
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import NF4Linear
from qlora_kit.weights import (
    INDEX_FILE,
    CheckpointLayout,
    TensorEntry,
    check_checkpoint,
    checkpoint_index,
    checkpoint_layout,
    read_tensor,
    release_freed_memory,
)

logger = logging.getLogger(__name__)

MERGE_TARGETS = ("dequantized", "original")
QUANTIZE_FORMATS = ("nf4",)
ORIGINAL_MERGE_WARNING = (
    "--merge-into original adds the adapter to the original 16-bit weights. The adapter was "
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
    lora: Callable[[torch.Tensor], torch.Tensor] | None  # W -> W with the adapter merged, when one targets it
    out_bytes: int
    residual: Callable[[torch.Tensor], torch.Tensor] | None = None  # PiSSA/LoftQ: W -> the base training quantized
    stacked: list[tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=list)  # frozen (A, B, scaling)
    rows: Callable[[torch.Tensor], torch.Tensor] | None = None  # an embedding the adapter trains: its new value


@dataclass
class _Plan:
    """Everything an export writes, checked before the first byte is."""

    adapter: Adapter
    base_dir: Path
    config: object  # the base model's transformers config, written as the export's config.json
    units: list[_Unit]
    shards: list[list[_Unit]]
    planned: int  # bytes of all shards
    out_dtype: torch.dtype
    merge_into: str
    quantize: str | None
    device: torch.device  # where weights are quantized and merged

    @property
    def scaling(self) -> float:
        return _scaling(self.adapter)


def _scaling(adapter: Adapter) -> float:
    config = adapter.config
    return lora_scaling(config.lora_alpha, config.r, config.use_rslora)


def _human(nbytes: int) -> str:
    """Decimal GB (10^9 bytes), or MB (10^6) under 0.1 GB."""
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


# --- the plan -------------------------------------------------------------------------------------------


def _base_model_dir(adapter: Adapter, base_model: str | Path | None) -> Path:
    config_file = adapter.directory / CONFIG_NAME
    if base_model is None and not adapter.config.base_model_name_or_path:
        raise QloraKitError(
            f"{config_file} does not name its base model (base_model_name_or_path); pass it with --base-model PATH"
        )
    name = str(base_model) if base_model is not None else str(adapter.config.base_model_name_or_path)
    try:
        return resolve_model_dir(name)
    except QloraKitError as e:
        source = "--base-model" if base_model is not None else f"{config_file}'s base_model_name_or_path"
        raise QloraKitError(f"the base model from {source} cannot be used: {e}. Pass --base-model PATH") from None


def _check_adapter_fits(layout: CheckpointLayout, adapter: Adapter, base_dir: Path) -> None:
    """Every adapter pair must land on a decoder linear of this base with matching shapes."""
    for module, tensors in adapter.modules().items():
        key = f"{module}.weight"
        if key not in layout.linears:
            raise QloraKitError(
                f"adapter {adapter.directory} has LoRA weights for {module!r}, which is not a decoder linear of the "
                f"base model in {base_dir}; the adapter was trained on a different base model "
                "(pass the right one with --base-model)"
            )
        out_features, in_features = layout.shapes[key]
        if adapter.config.variant == "vera":
            vera_a, vera_b = adapter.state[VERA_A_KEY], adapter.state[VERA_B_KEY]
            shapes = f"lambda_b {tuple(tensors['vera_lambda_b'].shape)} and the projection {tuple(vera_a.shape)}"
            fits = tensors["vera_lambda_b"].numel() == out_features and vera_a.shape[1] >= in_features
            fits = fits and vera_b.shape[0] >= out_features
        else:
            a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
            shapes = f"A {tuple(a.shape)} and B {tuple(b.shape)}"
            fits = a.shape[1] == in_features and b.shape[0] == out_features
        if not fits:
            raise QloraKitError(
                f"adapter {adapter.directory}: {module} has {shapes}, which do not "
                f"fit the base weight {layout.shapes[key]} in {base_dir}; the adapter was trained on a different "
                "base model"
            )


def _plan(adapter: Adapter, base_dir: Path, out_dtype: torch.dtype, max_bytes: int, options: dict) -> _Plan:
    """Check the base checkpoint against its config and the adapter; list what goes into which shard.
    ``options``: ``merge_into``, ``quantize`` and ``device`` of the export."""
    quantize = options["quantize"]
    config = load_config(base_dir)
    entries = checkpoint_index(base_dir)
    skeleton = build_skeleton(config, out_dtype, quantize=False)  # meta device: shapes, no memory
    if not getattr(config, "architectures", None):  # from_pretrained picks the class by this entry
        config.architectures = [type(skeleton).__name__]
    layout = checkpoint_layout(skeleton)
    unused = check_checkpoint(layout, entries, base_dir)
    _check_adapter_fits(layout, adapter, base_dir)
    stack = read_stack(stacked_base_adapters(adapter))  # lora.base_adapters: merged under the adapter
    vocab = adapter.config.embeddings.vocab_size(adapter.embeddings, config.vocab_size)
    if vocab != config.vocab_size:  # new tokens: the export's config says the grown vocabulary
        logger.info(f"the adapter adds tokens: the export's vocabulary is {vocab} (the base's {config.vocab_size})")
        config.vocab_size = vocab
    for below in stack:
        _check_adapter_fits(layout, below, base_dir)
    if unused:
        logger.info(
            f"note: {len(unused)} tensors of {base_dir} are not used by the model and are left out (e.g. {unused[0]})"
        )
    over_residual = options["merge_into"] == "dequantized" and INIT_KEY in adapter.metadata
    merges = {module: adapter.merger(module, over_residual) for module in adapter.modules()}
    residual = adapter.residual() if over_residual else None
    stack_pairs = [(below.pairs(), _scaling(below)) for below in stack]
    units = []
    for name, entry in sorted(entries.items(), key=lambda kv: (kv[1].file, kv[1].start)):
        if name not in layout.shapes:
            continue
        is_linear = name in layout.linears
        if is_linear and quantize:
            out_bytes = nf4_bytes(*entry.shape, serialized=True).total
        else:
            itemsize = out_dtype.itemsize if entry.dtype.is_floating_point else entry.dtype.itemsize
            out_bytes = math.prod(entry.shape) * itemsize
        module = name.removesuffix(".weight")
        merge = merges.get(module)
        stacked = [(*below[module], scaling) for below, scaling in stack_pairs if module in below]
        rows = embedding_rows(name, adapter, config)  # trainable tokens / modules_to_save, merged
        if rows is not None:
            out_bytes = out_bytes // entry.shape[0] * config.vocab_size
        unit_residual = residual if merge is not None else None
        units.append(_Unit(name, entry, is_linear, merge, out_bytes, unit_residual, stacked, rows))
    shards = _shards(units, max_bytes)
    return _Plan(adapter, base_dir, config, units, shards, sum(u.out_bytes for u in units), out_dtype, **options)


def embedding_rows(name: str, adapter: Adapter, config) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """How the export writes a base tensor the adapter's embeddings change (None: as it is)."""
    settings, state = adapter.config.embeddings, adapter.embeddings
    module = name.removesuffix(".weight").rsplit(".", 1)[-1]
    if not settings or module not in EMBEDDING_MODULES or not name.endswith(".weight"):
        return None
    return lambda tensor: merged_rows(name, tensor, settings, state, config.vocab_size)


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
        tensor = tensor if unit.rows is None else unit.rows(tensor)
        return {unit.name: tensor.to(out_dtype) if tensor.is_floating_point() else tensor}
    # Exactly what load_model does with this tensor: move it, (PiSSA/LoftQ: take its residual,) quantize it.
    tensor = tensor.to(device)
    if unit.residual is not None:
        tensor = unit.residual(tensor)
    weight = NF4Linear.from_weight(tensor).dequantize(torch.float32) if merge_into == "dequantized" else tensor
    del tensor
    for lora_a, lora_b, stacked_scaling in unit.stacked:  # frozen adapters under the trained one, in order
        weight = merge_lora_weight(weight, lora_a.to(device), lora_b.to(device), stacked_scaling)
    if unit.lora is not None:
        weight = unit.lora(weight)
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


def _nf4_warning(units: list[_Unit]) -> str | None:
    """bitsandbytes' CPU forward (on CPUs with AVX512-BF16) repacks 4-bit weights in rows of 64 input features
    and fails on any other width; qlora-kit's own loader has no such limit."""
    odd = [(u.name, u.entry.shape[-1]) for u in units if u.is_linear and u.entry.shape[-1] % NF4_BLOCKSIZE]
    if not odd:
        return None
    return (
        f"{len(odd)} decoder linears have an input width that is not a multiple of {NF4_BLOCKSIZE} "
        f"(e.g. {odd[0][0]}: {odd[0][1]}). transformers + bitsandbytes cannot run this 4-bit export on a CPU "
        f"with AVX512-BF16 (bitsandbytes' CPU kernel needs multiples of {NF4_BLOCKSIZE}); `qlora-kit generate` "
        "and GPUs load and run it"
    )


# --- the export -----------------------------------------------------------------------------------------


@dataclass
class _Progress:
    file: str | None = None  # the file being written (None: the temp dir is not made yet)
    total_size: int = 0  # tensor bytes written
    tokenizer_files: int = 0


def _check_options(dtype: str, merge_into: str, quantize: str | None) -> None:
    if dtype not in DTYPE_NAMES:
        raise QloraKitError(f"export dtype {dtype!r} is not one of {', '.join(DTYPE_NAMES)}")
    if merge_into not in MERGE_TARGETS:
        raise QloraKitError(f"--merge-into {merge_into!r} is not one of {', '.join(MERGE_TARGETS)}")
    if quantize is not None and quantize not in QUANTIZE_FORMATS:
        raise QloraKitError(f"--quantize {quantize!r} is not supported; use {', '.join(QUANTIZE_FORMATS)}")


def _check_disk(out: Path, planned: int) -> None:
    free = shutil.disk_usage(next(p for p in out.absolute().parents if p.exists())).free
    if free < planned:
        raise QloraKitError(
            f"not enough disk space for the export: it needs about {_human(planned)} in {out.parent}, "
            f"which has {_human(free)} free"
        )


def _write_shards(plan: _Plan, directory: Path, save_shard: ShardWriter, progress: _Progress) -> None:
    """The weights, one shard held at a time, and the index when there are several."""
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(plan.shards, start=1):
        filename = shard_name(index, len(plan.shards))
        progress.file = filename
        tensors: dict[str, torch.Tensor] = {}
        for unit in shard:
            tensors.update(_render(unit, plan.scaling, plan.out_dtype, plan.merge_into, plan.quantize, plan.device))
            release_freed_memory()  # this tensor's temporaries
        save_shard(tensors, str(directory / filename), {"format": "pt"})
        shard_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        progress.total_size += shard_bytes
        weight_map.update(dict.fromkeys(tensors, filename))
        del tensors  # the shard is on disk; only the next one is ever held
        release_freed_memory()
        logger.info(f"wrote {filename} ({_human(shard_bytes)}, {len(shard)} checkpoint tensors)")
    if len(plan.shards) > 1:
        progress.file = INDEX_FILE
        index_json = {"metadata": {"total_size": progress.total_size}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2) + "\n")


def _write_error(out: Path, error: OSError, progress: _Progress, planned: int) -> QloraKitError:
    if progress.file is None:  # the temp dir beside out could not be made
        return unwritable(out, error)
    earlier = " The earlier export there is intact." if out.is_dir() else ""
    if error.errno == errno.ENOSPC:
        return QloraKitError(
            f"export to {out} failed: the disk is full (no space left on device while writing {progress.file}). "
            f"Nothing was written to {out}.{earlier} The export needs about {_human(planned)} free in "
            f"{out.parent}; free some space and run it again."
        )
    return QloraKitError(
        f"export to {out} failed while writing {progress.file}: {error}. Nothing was written to {out}.{earlier}"
    )


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

    ``max_shard_size``: the largest shard, a size as ``facts.parse_size`` reads it (binary: "5GB" is 5 GiB).
    ``device``: where each weight is quantized and merged. Use the training run's device kind: NF4
    codes are computed by that device's bitsandbytes kernel, and ``auto`` picks what training's ``auto``
    picked. ``save_shard`` writes one shard (tests inject a failing writer to simulate a full disk).
    """
    source, out = Path(source), Path(out)
    _check_options(dtype, merge_into, quantize)
    options = {"merge_into": merge_into, "quantize": quantize, "device": resolve_device(device)}
    max_bytes = parse_size(max_shard_size, "--max-shard-size")

    # Everything is checked before anything is written.
    if out.exists() and not out.is_dir():
        raise QloraKitError(f"--out {out} is an existing file; choose a directory path for the export")
    adapter = read_adapter(find_adapter_dir(source))
    base_dir = _base_model_dir(adapter, base_model)
    check_out(out, force, {"base model": base_dir, "adapter": adapter.directory})
    plan = _plan(adapter, base_dir, DTYPES[dtype], max_bytes, options)
    _check_disk(out, plan.planned)
    metadata = export_metadata(adapter.directory, adapter.metadata, base_dir, dtype, merge_into, quantize)
    for warning in (
        ORIGINAL_MERGE_WARNING if merge_into == "original" else None,
        quantize and _nf4_warning(plan.units),
    ):
        if warning:
            logger.warning(warning)

    created = make_parents(out)
    progress = _Progress()
    try:
        with atomic_dir(out) as tmp:
            progress.file = tmp.name
            _write_shards(plan, tmp, save_shard, progress)
            progress.file = tmp.name
            write_config(plan.config, tmp, plan.out_dtype, quantize)
            progress.tokenizer_files = len(copy_side_files(base_dir, adapter.directory, tmp, plan.config))
            write_metadata(tmp, metadata)
    except OSError as e:
        remove_empty(created)
        raise _write_error(out, e, progress, plan.planned) from None
    except BaseException:
        remove_empty(created)
        raise
    if not progress.tokenizer_files:
        logger.info(f"note: {base_dir} has no tokenizer files; the export has none either")
    merged = sum(u.lora is not None or bool(u.stacked) for u in plan.units)
    logger.info(
        f"exported {out}: {merged} LoRA-merged linears into the {merge_into} base, {dtype}"
        f"{' re-quantized to nf4' if quantize else ''}, {len(plan.shards)} shard(s), {_human(progress.total_size)}"
    )
    return out
