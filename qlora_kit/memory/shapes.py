"""Model shapes: what the planner knows about a model (sizes of its layers), from a preset or a ``config.json``,
and which linears of one Llama-shaped decoder layer a LoRA ``targets`` setting selects.

Nothing is loaded: a checkpoint's shape comes from its ``config.json`` alone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import LINEAR_NAMES, TARGET_PRESETS, select_targets


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear in one decoder layer."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        shapes = [(q, h), (kv, h), (kv, h), (h, q), (self.ffn, h), (self.ffn, h), (h, self.ffn)]
        return dict(zip(LINEAR_NAMES, shapes, strict=True))

    @property
    def quantized_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linears().values())

    @property
    def non_quantized_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        biases = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return embeddings + norms + biases

    @property
    def params(self) -> int:
        return self.quantized_params + self.non_quantized_params


def _preset(name: str, h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, **kw) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, h // heads, ffn, vocab, **kw)


# From the public config.json of each model.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in [
        _preset("llama-7b", 4096, 32, 32, 32, 11008, 32000),
        _preset("llama-13b", 5120, 40, 40, 40, 13824, 32000),
        _preset("llama-33b", 6656, 60, 52, 52, 17920, 32000),
        _preset("llama-65b", 8192, 80, 64, 64, 22016, 32000),
        _preset("llama-2-70b", 8192, 80, 64, 8, 28672, 32000),
        _preset("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),
        _preset("llama-3-70b", 8192, 80, 64, 8, 28672, 128256),
        _preset("mistral-7b", 4096, 32, 32, 8, 14336, 32000),
        _preset("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
        _preset("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, qkv_bias=True),
    ]
}


def shape_from_config(config, name: str) -> ModelShape:
    """A ``ModelShape`` from a transformers config (Llama / Mistral / Qwen2 style decoders)."""
    config = getattr(config, "text_config", None) or config
    try:
        hidden, heads = config.hidden_size, config.num_attention_heads
        layers, ffn, vocab = config.num_hidden_layers, config.intermediate_size, config.vocab_size
    except AttributeError as e:
        raise QloraKitError(f"{name}: config.json lacks a field the planner needs ({e})") from None
    return ModelShape(
        name=name,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        ffn=ffn,
        vocab=vocab,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
    )


def model_shape(spec: str) -> ModelShape:
    """A preset name (case-insensitive), a local HF checkpoint dir, a short id or a hub id."""
    if spec.strip().lower() in PRESETS:
        return PRESETS[spec.strip().lower()]
    from qlora_kit.models import SHORT_IDS

    if not Path(spec).expanduser().exists() and spec.lower() not in SHORT_IDS and spec.count("/") != 1:
        raise QloraKitError(
            f"model {spec!r} is not a preset ({', '.join(PRESETS)}), a checkpoint directory, a short id "
            f"({', '.join(SHORT_IDS)}) or a hub id (owner/name)"
        )
    return checkpoint_shape(spec)


def checkpoint_shape(name_or_path: str) -> ModelShape:
    """The shape in a checkpoint's ``config.json`` (dir, short id or hub id, as the loader resolves it)."""
    from qlora_kit.loading import load_config
    from qlora_kit.models import resolve_model_dir

    model_dir = resolve_model_dir(name_or_path)
    return shape_from_config(load_config(model_dir), name=Path(model_dir).name)


def target_linears(targets: str | Iterable[str]) -> tuple[str, ...]:
    """The linears of one Llama-shaped decoder layer that LoRA ``targets`` selects, in layer order.

    ``targets``: a preset, names (``[q_proj, v_proj]``) or the plan CLI's comma-separated form
    (``q_proj,v_proj``). Selection is ``facts.select_targets``, the rule the model uses, over the layer's leaf
    names; a dotted name counts as its leaf in every layer (the planner has one shape for all layers, so a
    name such as ``layers.0.mlp.up_proj`` is planned on the safe side, as up_proj everywhere).
    """
    if isinstance(targets, str) and targets not in TARGET_PRESETS:
        targets = targets.split(",")
    if not isinstance(targets, str):
        targets = [name.strip().rsplit(".", 1)[-1] for name in targets]
    try:
        selected = select_targets(targets, LINEAR_NAMES)
    except QloraKitError as e:
        raise QloraKitError(
            f"LoRA targets cannot be planned (the planner models Llama-shaped decoder layers): {e}"
        ) from None
    if not selected:
        raise QloraKitError(
            f"LoRA targets {targets!r} select no linear: name at least one of {', '.join(LINEAR_NAMES)}"
        )
    return tuple(selected)
