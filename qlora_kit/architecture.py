"""Where a transformers causal LM keeps what qlora-kit works on: its decoder layers and their linears.

The loader quantizes these linears, LoRA adapts (a choice of) them, export dequantizes and merges them: all
three ask here, so they agree on which layers those are.
"""

from __future__ import annotations

from torch import nn

from qlora_kit.errors import QloraKitError
from qlora_kit.quant import NF4Linear


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a transformers causal LM (``model.model.layers`` for Llama/Mistral/Qwen2)."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and (n_layers is None or len(module) == n_layers):
            return module
    raise QloraKitError(f"{type(model).__name__} has no list of decoder layers; it is not a supported architecture")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, NF4Linear))


def decoder_linear_names(model: nn.Module) -> list[str]:
    """Full names of every linear inside the decoder layers (the candidates for quantization and LoRA).

    On a model with LoRA the adapted layers themselves are not linears; their ``base``, ``lora_a`` and
    ``lora_b`` inside are, and are listed under those names.
    """
    layers = decoder_layers(model)
    prefix = next(name for name, module in model.named_modules() if module is layers)
    return [f"{prefix}.{name}" for name, module in layers.named_modules() if _is_linear(module)]
