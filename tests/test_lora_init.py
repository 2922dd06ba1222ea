"""PiSSA / LoftQ init at load time (lora_init): less 4-bit error at step 0 on real SmolLM2 layers; the saved
adapter is PEFT's rank-2r conversion, usable over the original base; merged export is the residual + adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from qlora_kit.adapter import read_adapter, save_adapter
from qlora_kit.config.schema import LoRAConfig
from qlora_kit.errors import QloraKitError
from qlora_kit.export import export_merged
from qlora_kit.generate import load_for_generation
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora, lora_layers, lora_scaling
from qlora_kit.lora_init import finish_svd_init, init_residual, make_svd_init
from qlora_kit.quant import NF4Linear
from tests.conftest import save_tiny_checkpoint
from tests.test_lora_variants import _logits, _randomize
from tests.test_train import tiny_model_dir  # noqa: F401  (a fixture)

SMOLLM2_LAYERS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.10.mlp.down_proj.weight",
    "model.layers.29.mlp.gate_proj.weight",
]


def _step0_error(weight: torch.Tensor, method: str | None, r: int = 16, scaling: float = 2.0, iters: int = 1) -> float:
    """||W - (deq(nf4(base)) + s B0 A0)||_F / ||W||_F for an init (None: plain NF4, no adapter)."""
    w = weight.float()
    if method is None:
        return float((w - NF4Linear.from_weight(w).dequantize()).norm() / w.norm())
    residual, a0, b0 = init_residual(w, r, scaling, method, iters)
    approx = torch.addmm(NF4Linear.from_weight(residual).dequantize(), b0, a0, alpha=scaling)
    return float((w - approx).norm() / w.norm())


@pytest.mark.parametrize("name", SMOLLM2_LAYERS)
def test_pissa_and_loftq_start_closer_to_the_16bit_weight_than_plain_nf4(smollm2_dir, name):
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        weight = f.get_tensor(name)
    plain = _step0_error(weight, None)
    pissa, loftq = _step0_error(weight, "pissa"), _step0_error(weight, "loftq", iters=2)
    assert pissa < plain and loftq < plain, (name, plain, pissa, loftq)
    assert loftq < 0.98 * plain  # LoftQ fits the quantization error itself: a clear gain, not noise


def test_init_is_seeded_and_deterministic():
    torch.manual_seed(0)
    weight = torch.randn(96, 160)
    first, second = init_residual(weight, 8, 2.0, "loftq", 2), init_residual(weight, 8, 2.0, "loftq", 2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def _pissa_model(base: Path, method: str = "pissa") -> torch.nn.Module:
    """The training-time model of lora.init=``method`` (r 8, alpha 16), adapters moved as training would."""
    lora = LoRAConfig(r=8, alpha=16, dropout=0.0, init=method, init_iters=2)
    hook = make_svd_init(lora, str(base), torch.float32)
    model = load_model(base, device="cpu", weight_hook=hook)
    add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    finish_svd_init(model, hook, str(base))
    _randomize(model)
    return model


@pytest.mark.parametrize("method", ["pissa", "loftq"])
def test_the_converted_adapter_over_the_original_base_is_the_trained_model(tmp_path, method):
    from peft import PeftModel

    base = save_tiny_checkpoint(tmp_path / "base")
    ours = _pissa_model(base, method)
    adapter = save_adapter(ours, tmp_path / "adapter", str(base))
    saved = read_adapter(adapter)
    assert saved.config.r == 16 and saved.config.lora_alpha == 32  # rank 2r, the same scaling
    # The trained adapters over the dense residual base (W - s B0 A0: what the 4-bit base quantizes, unquantized)
    reference = load_model(base, device="cpu", quantize=False, dtype=torch.float32)
    scaling = lora_scaling(16, 8)
    add_lora(reference, "all-linear", r=8, alpha=16, dropout=0.0)
    with torch.no_grad():
        for name, layer in lora_layers(reference).items():
            trained = lora_layers(ours)[name]
            layer.base.weight.sub_(scaling * trained.init_b @ trained.init_a)
            layer.lora_a.weight.copy_(trained.lora_a.weight)
            layer.lora_b.weight.copy_(trained.lora_b.weight)
    original = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(original, adapter)
    torch.testing.assert_close(_logits(theirs), _logits(reference), rtol=0, atol=1e-4)
    # and merged export is the 4-bit residual + adapter: exactly what training computed
    export_merged(adapter, tmp_path / "export", dtype="fp32", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), _logits(ours), rtol=0, atol=1e-4)


def test_generate_loads_a_pissa_adapter_as_it_was_trained(tiny_model_dir, tmp_path):  # noqa: F811
    ours = _pissa_model(tiny_model_dir)
    adapter = save_adapter(ours, tmp_path / "adapter", str(tiny_model_dir))
    loaded, _, _ = load_for_generation(str(tiny_model_dir), str(adapter), "cpu", "fp32", None, merge_adapter=False)
    torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=1e-5)  # the 4-bit residual, not W


def test_init_needs_the_16bit_weights(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    lora = LoRAConfig(r=8, alpha=16, init="pissa")
    hook = make_svd_init(lora, str(base), torch.float32)
    model = load_model(base, device="cpu")  # the hook never ran, as for a checkpoint stored in 4 bits
    add_lora(model, "all-linear", r=8, alpha=16)
    with pytest.raises(QloraKitError, match="needs each target layer's 16-bit weight while loading"):
        finish_svd_init(model, hook, str(base))
