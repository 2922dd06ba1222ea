"""What LoRA's variants and SVD inits add to the plan (``plan_memory(variant=..., init=...)``).

lora   A r x in, B out x r per target linear
dora   + a magnitude (out) per linear; per layer's forward a block of W + s B A (DORA_NORM_ROWS_NUMEL values)
       while the row norm is taken, and in its backward W x + s B h and the scaled output gradient (2 x tokens
       x out in the compute dtype), both transient
vera   lambda_d (r) + lambda_b (out) per linear, and ONE shared frozen projection A r x max_in, B max_out x r
       (fp32, as PEFT draws it), however many layers
pissa / loftq  the initial (A0, B0) kept beside the adapters for the conversion on save (as many bytes as the
       adapters); while loading, an SVD working set on the device (fp32 W, its residual, svd_lowrank's
       (out + in) x (r + 8) bases; LoftQ also a dequantized copy): load time only, not in the step's peak
"""

from __future__ import annotations

from qlora_kit.facts import DTYPE_BYTES, LORA_INITS, LORA_VARIANTS, MB
from qlora_kit.memory.shapes import ModelShape

DORA_NORM_ROWS_NUMEL = 1 << 22  # = lora_variants.DORA_NORM_ROWS_NUMEL (torch-free copy; a test pins them equal)
SVD_OVERSAMPLE = 8  # = lora_init.SVD_OVERSAMPLE
VARIANT_PARAMS = {  # the trainable tensors of each adapted linear, as the plan's LoRA parameters row says
    "lora": "A r x in, B out x r",
    "dora": "A r x in, B out x r, magnitude out",
    "vera": "VeRA lambda_d r, lambda_b out",
}


def adapter_tensor_numels(shape: ModelShape, rank: int, targets: tuple[str, ...], variant: str) -> list[int]:
    """The sizes of one decoder layer's trainable adapter tensors."""
    numels: list[int] = []
    for o, i in (shape.linears()[name] for name in targets):
        if variant == "vera":
            numels += [rank, o]  # lambda_d, lambda_b
        else:
            numels += [rank * i, o * rank] + ([o] if variant == "dora" else [])  # A, B (, magnitude)
    return numels


def adapter_param_count(shape: ModelShape, rank: int, targets: tuple[str, ...], variant: str) -> int:
    return shape.layers * sum(adapter_tensor_numels(shape, rank, targets, variant))


def check_variant(variant: str, init: str) -> str | None:
    """What is wrong with the pair, or None."""
    if variant not in LORA_VARIANTS:
        return f"variant {variant!r} is not one of: {', '.join(LORA_VARIANTS)}"
    if init not in LORA_INITS:
        return f"init {init!r} is not one of: {', '.join(LORA_INITS)}"
    if init != "default" and variant != "lora":
        return f"init {init} applies to variant lora only"
    return None


def variant_rows(shape: ModelShape, s: dict, n_lora: int) -> list[tuple[str, str, int, str]]:
    """(category, item, bytes, note) rows the variant and init add; none for plain LoRA."""
    rank, targets = s["rank"], s["targets_resolved"]
    linears = [shape.linears()[name] for name in targets]
    c, a = DTYPE_BYTES[s["compute_dtype"]], DTYPE_BYTES[s["adapter_dtype"]]
    rows = []
    if s["variant"] == "dora":
        max_out, max_in = max(o for o, _ in linears), max(i for _, i in linears)
        block = min(DORA_NORM_ROWS_NUMEL, max_out * max_in) * 4  # the norm is taken in fp32
        tokens = s["batch_size"] * s["seq_len"]
        backward = 2 * tokens * max_out * c
        note = (
            f"{block / MB:,.1f} MB block of W + sBA for the row norm (forward) or {backward / MB:,.1f} MB of "
            "W x + sBh and the scaled gradient (backward), one layer at a time; the magnitudes are in the LoRA row"
        )
        rows.append(("adapters", "DoRA norm temporaries", max(block, backward), note))
    if s["variant"] == "vera":
        max_out, max_in = max(o for o, _ in linears), max(i for _, i in linears)
        note = f"frozen A {rank} x {max_in}, B {max_out} x {rank} in fp32, shared by all {len(targets)} x "
        note += f"{shape.layers} adapted linears (lambda_d, lambda_b are the LoRA parameters row)"
        rows.append(("adapters", "VeRA shared projection", 4 * rank * (max_in + max_out), note))
    if s["init"] != "default":
        o, i = max(linears, key=lambda oi: oi[0] * oi[1])
        working = 4 * (3 * o * i + (o + i) * (rank + SVD_OVERSAMPLE))
        note = (
            f"the initial A0, B0 ({s['adapter_dtype']}) kept for the rank-2r conversion on save; loading also "
            f"needs ~{working / MB:,.1f} MB of SVD working set for the largest linear (load time only)"
        )
        rows.append(("adapters", f"{s['init']} initial A0, B0", a * n_lora, note))
    return rows
