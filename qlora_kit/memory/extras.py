"""The plan's rows for what trains or sits beside the LoRA adapters (none of them: no rows, the plan as before).

- **trainable embeddings** (``lora.trainable_tokens``, ``lora.modules_to_save``; ``qlora_kit.embeddings``): their
  values in the compute dtype, as many gradients, the optimizer's states (and fp32 master copies of 16-bit
  ones); a trainable head adds, during the chunked loss, its fp32 gradient (vocab x hidden) and, for token rows,
  the head's merged copy (vocab x hidden in the compute dtype).
- **frozen base adapters** (``lora.base_adapters``): their A and B, kept beside the 4-bit weights.
- **extra adapters** (``qlora_kit.adapters``): more adapters of this shape loaded on the one base, each costing
  its own A and B and nothing else (the base is shared).
"""

from __future__ import annotations

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import DTYPE_BYTES, EMBEDDING_MODULES, MB

LOADED_EXTRAS = ("trainable embeddings", "frozen base adapters", "extra adapters")  # allocated at load, kept


def embedding_tensors(shape, trainable_tokens: int, modules_to_save: list[str]) -> tuple[list[int], bool]:
    """The value counts of the trainable embedding tensors (``embeddings.add_trainable_embeddings``' rules) and
    whether the head trains (then the loss computes its gradient)."""
    tied, hidden, vocab = shape.tied, shape.hidden, shape.vocab
    saved = ["embed_tokens", "lm_head"] if tied and modules_to_save else list(modules_to_save)
    tensors = [vocab * hidden] * (1 if tied and saved else len(saved))
    token_sides = [side for side in ("embed_tokens", "lm_head") if side not in saved] if trainable_tokens else []
    tensors += [trainable_tokens * hidden] * (1 if tied and token_sides else len(token_sides))
    head_trains = "lm_head" in saved or bool(token_sides and (tied or "lm_head" in token_sides))
    return tensors, head_trains


def _check(s: dict) -> None:
    counts = {key: s[key] for key in ("trainable_tokens", "base_adapter_params", "extra_adapters")}
    bad = {key: value for key, value in counts.items() if not isinstance(value, int) or value < 0}
    unknown = sorted(set(s["modules_to_save"]) - set(EMBEDDING_MODULES))
    if bad or unknown:
        problem = f"{', '.join(bad)} must be whole numbers >= 0 (got {bad})" if bad else ""
        problem += "; " if bad and unknown else ""
        problem += f"modules_to_save may hold {', '.join(EMBEDDING_MODULES)}, not {unknown}" if unknown else ""
        raise QloraKitError(problem)


def extra_rows(shape, s: dict, n_lora: int) -> list:
    """Rows of the plan for the settings ``s`` (``plan_memory``'s, resolved); [] when none of them is used."""
    from qlora_kit.memory.plan import Row, state_bytes

    _check(s)
    c, a = DTYPE_BYTES[s["compute_dtype"]], DTYPE_BYTES[s["adapter_dtype"]]
    rows = []
    tensors, head_trains = embedding_tensors(shape, s["trainable_tokens"], s["modules_to_save"])
    if tensors:
        n, dtype = sum(tensors), s["compute_dtype"]
        masters = s["master_weights"] and c == 2
        what = f"{s['trainable_tokens']} token rows" if s["trainable_tokens"] else ""
        what += (" + " if what else "") + ", ".join(s["modules_to_save"]) + " in full" if s["modules_to_save"] else ""
        tied = " (tied: one matrix for both)" if shape.tied else ""
        states = sum(state_bytes(numel, s["optimizer"], 4 if masters else c) for numel in tensors)
        rows += [
            Row("adapters", "trainable embeddings", c * n, f"{n / 1e6:.2f}M values: {what}{tied}, {dtype}"),
            Row("adapters", "embedding gradients", c * n, f"one .grad per trainable embedding value, {dtype}"),
            Row("optimizer", "embedding optimizer states", states, f"{s['optimizer']}, as for the LoRA parameters"),
        ]
        if masters:
            rows.append(Row("optimizer", "embedding fp32 master weights", 4 * n, "train.fp32_master_weights"))
        if head_trains:
            merged = (
                c * shape.vocab * shape.hidden if s["trainable_tokens"] and "lm_head" not in s["modules_to_save"] else 0
            )
            note = "the trainable head in the chunked loss: its fp32 gradient (vocab x hidden)"
            note += " + its merged copy with the token rows" if merged else ""
            rows.append(Row("transient", "trainable head in the loss", 4 * shape.vocab * shape.hidden + merged, note))
    if s["base_adapter_params"]:
        n = s["base_adapter_params"]
        note = (
            f"lora.base_adapters: {n / 1e6:.2f}M frozen A/B values in {s['adapter_dtype']}, added to the 4-bit weights"
        )
        rows.append(Row("weights", "frozen base adapters", a * n, note))
    if s["extra_adapters"]:
        k = s["extra_adapters"]
        note = f"{k} more adapter(s) of this rank loaded beside it on the one base: {a * n_lora / MB:,.1f} MB each"
        rows.append(Row("adapters", "extra adapters", k * a * n_lora, note))
    return rows
