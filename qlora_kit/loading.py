"""Load a Hugging Face causal LM with its decoder linears in NF4, streaming tensor by tensor.

    config.json -> skeleton on the meta device (no memory) -> decoder nn.Linear replaced by NF4Linear
    -> check the checkpoint against it (weights.check_checkpoint: every tensor there, in its shape)
    -> for each tensor in the safetensors files: read it alone, move it to the compute device,
       quantize it there (decoder linears) or cast it to the compute dtype (embeddings, norms, lm_head),
       and drop the source.

So peak host memory is the 4-bit model plus about one tensor. Reading the files is ``weights``' job;
checkpoints already in bitsandbytes 4-bit are ``prequantized``'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from qlora_kit.architecture import decoder_layers, decoder_linear_names
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import DTYPE_CHOICES, auto_compute_dtype
from qlora_kit.models import resolve_model_dir
from qlora_kit.prequantized import check_prequantized, load_packed_weight
from qlora_kit.quant import NF4Linear
from qlora_kit.weights import (
    MODEL_DIR_FILES,
    check_checkpoint,
    checkpoint_index,
    checkpoint_layout,
    missing_tensors_error,
    read_tensor,
    release_freed_memory,
)

logger = logging.getLogger(__name__)
LayerLoaded = Callable[[nn.Module, str, nn.Module], None]  # (model, layer name, layer): see load_model

# facts.DTYPE_NAMES as torch dtypes: the one place a dtype name becomes a torch.dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``: the name users type for a compute dtype."""
    return next(name for name, value in DTYPES.items() if value == dtype)


# A tokenizer's vocabulary is in one of these (a fast tokenizer.json, a sentencepiece *.model, BPE or
# WordPiece vocab files); tokenizer_config.json alone only names the class.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "vocab.txt", "merges.txt")
TOKENIZER_VOCAB_SUFFIXES = (".model", ".tiktoken")


# --- devices and dtypes ---------------------------------------------------------------------------------


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise QloraKitError(f"device {device!r} was asked for but no CUDA GPU is visible; use device=cpu")
    return torch.device(device)


def gpu_has_native_bf16(device: torch.device) -> bool:
    """Whether the GPU ``device`` (not the current one) computes bf16 natively (Ampere and newer).

    ``torch.cuda.is_bf16_supported()`` also says True for GPUs that only emulate bf16 (T4, V100: slow matmuls,
    no fused attention), and it asks the current device; so ask the chosen device, without emulation.
    """
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on a bf16-capable GPU, fp16 on older GPUs, fp32 on CPU (bf16 matmul is slow there)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        dtype = auto_compute_dtype(device.type, device.type == "cuda" and gpu_has_native_bf16(device))
    if dtype not in DTYPES:
        raise QloraKitError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_CHOICES)}")
    return DTYPES[dtype]


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
    on_layer: LayerLoaded | None = None,
    place: Callable[[str, nn.Module], None] | None = None,
    weight_hook: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
) -> nn.Module:
    """A causal LM with NF4 decoder linears (or dense ones with ``quantize=False``), ready for ``add_lora``.

    ``name_or_path``: a checkpoint dir, a hub id, or a short id (see ``qlora_kit.models``).
    ``place``: called with each decoder linear's name and module once it is quantized (weight streaming
    moves the streamed layers' codes to host memory there: ``offload.host_placement``).
    ``weight_hook(module_name, weight) -> weight``: called on each decoder linear's 16-bit weight (on the
    device) before it is quantized; what it returns is quantized (``lora_init.SVDInit``: PiSSA/LoftQ).
    The returned model has ``model.name_or_path`` set to the resolved directory and is in eval mode.
    ``on_layer(model, name, layer)``: called as soon as each decoder layer is read whole, layers in order
    (the tensors are then read layer by layer, the others first); FSDP shards each layer there, so a process
    never holds more than its shards plus one layer (``distributed.World.layer_loader``).
    """
    model_dir = resolve_model_dir(str(name_or_path))
    device = device if isinstance(device, torch.device) else resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    config = load_config(model_dir)
    entries = checkpoint_index(model_dir)
    prequantized = check_prequantized(config, model_dir, quantize)
    model = build_skeleton(config, dtype, quantize)
    layout = checkpoint_layout(model)
    packed = layout.linears if prequantized else frozenset()
    unused = check_checkpoint(layout, entries, model_dir, packed)  # before a single weight is read

    wanted = [n for n in entries if n in layout.shapes and not (layout.tied and n == layout.output_key)]
    layers = _LayerProgress(model, wanted, on_layer) if on_layer is not None else None
    for name in layers.order if layers is not None else wanted:
        entry = entries[name]
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        quantized = name in packed or (isinstance(module, NF4Linear) and attr == "weight")
        if name in packed:
            load_packed_weight(module, name, entries, device)
        elif quantized:
            weight = read_tensor(entry).to(device)
            if weight_hook is not None:
                weight = weight_hook(module_name, weight)
            module.load_weight(weight)  # the dense source goes at once: only codes stay
            del weight
        else:
            setattr(module, attr, nn.Parameter(read_tensor(entry).to(device).to(dtype), requires_grad=False))
        if place is not None and quantized:
            place(module_name, module)
        if layers is not None:
            layers.loaded(name)
        release_freed_memory()

    if layout.tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    _materialize_buffers(model, config, device)
    _check_complete(model, model_dir)
    if unused:
        logger.warning(f"{len(unused)} tensors in {model_dir} are not used by the model (e.g. {unused[0]})")
    model.name_or_path = str(model_dir)
    model.config.name_or_path = str(model_dir)
    return model.eval()


class _LayerProgress:
    """Which decoder layer each tensor belongs to; calls ``on_layer`` when a layer's last tensor is in."""

    def __init__(self, model: nn.Module, names: list[str], on_layer: LayerLoaded) -> None:
        self.model, self.on_layer = model, on_layer
        layers = decoder_layers(model)
        self.prefix = next(name for name, module in model.named_modules() if module is layers) + "."
        self.left: dict[int, set[str]] = {}
        for name in names:
            index = self._layer_of(name)
            if index is not None:
                self.left.setdefault(index, set()).add(name)
        # the tensors outside the layers first, then layer by layer (in the files' order within a layer)
        self.order = sorted(names, key=lambda n: -1 if self._layer_of(n) is None else self._layer_of(n))

    def _layer_of(self, name: str) -> int | None:
        if not name.startswith(self.prefix):
            return None
        return int(name[len(self.prefix) :].split(".", 1)[0])

    def loaded(self, name: str) -> None:
        index = self._layer_of(name)
        if index is None:
            return
        self.left[index].discard(name)
        if not self.left[index]:
            layer_name = f"{self.prefix}{index}"
            self.on_layer(self.model, layer_name, self.model.get_submodule(layer_name))


def _materialize_buffers(model: nn.Module, config, device: torch.device) -> None:
    """Rebuild modules whose only state is computed at init (rotary embeddings' ``inv_freq``)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and name.endswith("rotary_emb"):
            parent_name, _, child = name.rpartition(".")
            fresh = type(module)(config=config).to(device)
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def _check_complete(model: nn.Module, model_dir: Path) -> None:
    """What check_checkpoint cannot see from the skeleton: a state the checkpoint gave no value for."""
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise missing_tensors_error(model_dir, missing)


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
