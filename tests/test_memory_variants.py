"""The planner's rows for lora.variant and lora.init (memory.variants), checked against the real layers."""

from __future__ import annotations

import pytest

from qlora_kit import lora_init, lora_variants
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora
from qlora_kit.memory import plan_memory, shape_from_config
from qlora_kit.memory import variants as planned
from qlora_kit.memory.shapes import PRESETS
from qlora_kit.quant import quantized_bytes
from tests.conftest import save_tiny_checkpoint

LLAMA_7B = PRESETS["llama-7b"]


def _rows(**knobs) -> dict[str, int]:
    return {row.item: row.bytes for row in plan_memory(LLAMA_7B, device="cpu", **knobs).rows}


def test_the_torch_free_constants_are_the_layers_own():
    assert planned.DORA_NORM_ROWS_NUMEL == lora_variants.DORA_NORM_ROWS_NUMEL
    assert planned.SVD_OVERSAMPLE == lora_init.SVD_OVERSAMPLE


@pytest.mark.parametrize("variant, rank", [("lora", 8), ("dora", 8), ("vera", 32)])
def test_planned_adapter_parameters_are_what_add_lora_makes(tmp_path, variant, rank):
    base = save_tiny_checkpoint(tmp_path / "base")
    model = load_model(base, device="cpu")
    report = add_lora(model, "all-linear", r=rank, variant=variant)
    shape = shape_from_config(model.config, "tiny")
    names = tuple(shape.linears())
    assert planned.adapter_param_count(shape, rank, names, variant) == report.trainable_params
    if variant == "vera":  # the one shared projection: its bytes are the plan's row
        layer = next(m for m in model.modules() if isinstance(m, lora_variants.VeRALinear))
        held = sum(t.numel() * t.element_size() for t in layer.projection)
        rows = {r.item: r.bytes for r in plan_memory(shape, rank=rank, variant="vera", device="cpu").rows}
        assert rows["VeRA shared projection"] == held
    # every layer holds views of the one projection: the model's bytes count it once, as the plan does
    bare = quantized_bytes(load_model(base, device="cpu"))
    adapted = quantized_bytes(model)
    extra = held if variant == "vera" else 0
    assert adapted.non_quantized == bare.non_quantized + extra


def test_variant_rows_on_llama_7b():
    lora, dora = _rows(rank=64), _rows(rank=64, variant="dora")
    magnitudes = 32 * sum(o for o, _ in LLAMA_7B.linears().values())  # one per output row of each linear
    assert dora["LoRA parameters"] - lora["LoRA parameters"] == 4 * magnitudes  # fp32 adapters on cpu
    assert dora["DoRA norm temporaries"] > 0 and "DoRA norm temporaries" not in lora
    vera = _rows(rank=256, variant="vera")
    assert vera["LoRA parameters"] < lora["LoRA parameters"] / 50  # two vectors per layer, not two matrices
    assert vera["VeRA shared projection"] == 4 * 256 * (11008 + 11008)
    pissa = _rows(rank=64, init="pissa")
    assert pissa["pissa initial A0, B0"] == lora["LoRA parameters"]


@pytest.mark.parametrize(
    "knobs, problem",
    [
        ({"variant": "bogus"}, "variant 'bogus' is not one of: lora, dora, vera"),
        ({"init": "svd"}, "init 'svd' is not one of: default, pissa, loftq"),
        ({"variant": "dora", "init": "pissa"}, "init pissa applies to variant lora only"),
    ],
)
def test_bad_variant_knobs_are_refused(knobs, problem):
    with pytest.raises(QloraKitError, match=problem):
        plan_memory(LLAMA_7B, **knobs)
