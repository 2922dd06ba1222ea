"""qlora-kit: QLoRA fine-tuning on one GPU (NF4 base model, our own LoRA, planned and measured memory).

The public API (the CLI ``qlora-kit`` is built on the same functions)::

    from qlora_kit import load_model, load_tokenizer, add_lora, save_adapter, train, load_recipe

    cfg = load_recipe("recipes/smollm2_alpaca.yaml", ["train.max_steps=5"])
    result = train(cfg)                                  # setup -> fit -> finish, as `qlora-kit train`

    model = load_model("smollm2-135m-instruct")          # one 4-bit base, many adapters:
    load_adapter(model, "runs/a/adapter", name="a")      # each wraps the same NF4 layers (its own bytes only)
    load_adapter(model, "runs/b/adapter", name="b")
    set_adapter(model, "b"); disable_adapters(model)     # switch per request: no copy, no reload

Names are imported on first use, so ``import qlora_kit`` stays light (no torch) until one is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "QloraKitError": "qlora_kit.errors",
    "RunConfig": "qlora_kit.config",
    "load_recipe": "qlora_kit.config",
    "load_model": "qlora_kit.loading",
    "load_tokenizer": "qlora_kit.loading",
    "add_lora": "qlora_kit.lora",
    "LoRALinear": "qlora_kit.lora",
    "NF4Linear": "qlora_kit.quant",
    "prepare_data": "qlora_kit.data",
    "BatchPlan": "qlora_kit.data",
    "train": "qlora_kit.train",
    "prepare": "qlora_kit.train",
    "setup": "qlora_kit.train",
    "train_step": "qlora_kit.train",
    "TrainState": "qlora_kit.run",
    "evaluate": "qlora_kit.train",
    "fit": "qlora_kit.train",
    "finish": "qlora_kit.train",
    "save_adapter": "qlora_kit.adapter",
    "load_adapter": "qlora_kit.adapters",
    "set_adapter": "qlora_kit.adapters",
    "disable_adapters": "qlora_kit.adapters",
    "active_adapter": "qlora_kit.adapters",
    "stack_adapters": "qlora_kit.adapters",
    "add_trainable_embeddings": "qlora_kit.embeddings",
    "export_merged": "qlora_kit.export",
    "plan_memory": "qlora_kit.memory",
    "model_shape": "qlora_kit.memory",
    "generate_text": "qlora_kit.generate",
}
_ALIASES = {"load_recipe": "load_config"}  # the public name differs from the module's

__all__ = [
    "BatchPlan",
    "LoRALinear",
    "NF4Linear",
    "QloraKitError",
    "RunConfig",
    "TrainState",
    "active_adapter",
    "add_lora",
    "add_trainable_embeddings",
    "disable_adapters",
    "evaluate",
    "export_merged",
    "finish",
    "fit",
    "generate_text",
    "load_adapter",
    "load_model",
    "load_recipe",
    "load_tokenizer",
    "model_shape",
    "plan_memory",
    "prepare",
    "prepare_data",
    "save_adapter",
    "set_adapter",
    "setup",
    "stack_adapters",
    "train",
    "train_step",
]  # the keys of _API

if TYPE_CHECKING:
    from qlora_kit.adapter import save_adapter
    from qlora_kit.adapters import active_adapter, disable_adapters, load_adapter, set_adapter, stack_adapters
    from qlora_kit.config import RunConfig
    from qlora_kit.config import load_config as load_recipe
    from qlora_kit.data import BatchPlan, prepare_data
    from qlora_kit.embeddings import add_trainable_embeddings
    from qlora_kit.errors import QloraKitError
    from qlora_kit.export import export_merged
    from qlora_kit.generate import generate_text
    from qlora_kit.loading import load_model, load_tokenizer
    from qlora_kit.lora import LoRALinear, add_lora
    from qlora_kit.memory import model_shape, plan_memory
    from qlora_kit.quant import NF4Linear
    from qlora_kit.run import TrainState
    from qlora_kit.train import evaluate, finish, fit, prepare, setup, train, train_step


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'qlora_kit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), _ALIASES.get(name, name))
    globals()[name] = value  # imported once
    return value
