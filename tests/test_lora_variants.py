"""DoRA and VeRA layers (lora_variants): fused gradients against plain autograd, no saved dense weight, PEFT's
on-disk layout both ways, merged export, folding for generate, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from qlora_kit.adapter import CONFIG_NAME, load_adapter, read_adapter, save_adapter
from qlora_kit.config import load_config
from qlora_kit.export import export_merged
from qlora_kit.generate import fold_lora
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora, dropout_mask, lora_layers, lora_state_dict
from qlora_kit.lora_variants import DoRALinear, VeRALinear, dora_row_norm, vera_projection
from qlora_kit.quant import NF4Linear
from qlora_kit.train import train
from tests.conftest import save_tiny_checkpoint
from tests.test_train import _losses, _overrides, tiny_model_dir  # noqa: F401  (a fixture)

IDS = torch.tensor([[1, 5, 9, 23, 7, 42, 3, 11]])


def _layer(variant: str, dropout: float = 0.0, out_features: int = 96, in_features: int = 160) -> nn.Module:
    torch.manual_seed(0)
    base = NF4Linear.from_weight(torch.randn(out_features, in_features) * 0.05)
    if variant == "dora":
        layer = DoRALinear(base, 8, 16.0, dropout)
        nn.init.normal_(layer.lora_b.weight, std=0.1)  # non-zero B so the adapter path matters
    else:
        layer = VeRALinear(base, 8, vera_projection(8, [(out_features, in_features)], 0), dropout)
        nn.init.normal_(layer.vera_lambda_b, std=0.1)
    return layer.train()


def _trained_tensors(layer: nn.Module) -> list[torch.Tensor]:
    if isinstance(layer, DoRALinear):
        return [layer.lora_a.weight, layer.lora_b.weight, layer.lora_magnitude]
    return [layer.vera_lambda_d, layer.vera_lambda_b]


def _reference(layer: nn.Module, x: torch.Tensor, dropped: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The variant's formula in plain autograd ops on leaf copies of its parameters: (output, leaves)."""
    weight = layer.base.dequantize()
    if isinstance(layer, DoRALinear):
        a, b, m = (t.detach().clone().requires_grad_(True) for t in _trained_tensors(layer))
        norm = (weight + layer.scaling * b @ a).norm(dim=1).detach()  # a constant in backward, as in PEFT
        y = (x @ weight.t() + layer.scaling * dropped @ a.t() @ b.t()) * (m / norm)
        return y, [a, b, m]
    ld, lb = (t.detach().clone().requires_grad_(True) for t in _trained_tensors(layer))
    y = x @ weight.t() + lb * ((ld * (dropped @ layer.vera_a.t())) @ layer.vera_b.t())
    return y, [ld, lb]


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("variant", ["dora", "vera"])
def test_fused_gradients_equal_plain_autograd_and_no_dense_weight_is_saved(variant, p):
    layer = _layer(variant, p)
    x = torch.randn(4, 9, 160, requires_grad=True)
    saved: list[torch.Tensor] = []
    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    (y**2).mean().backward()
    assert [tuple(t.shape) for t in saved if t.numel() >= 96 * 160] == []  # no W, no output-sized tensor
    ours = [y.detach(), x.grad, *(t.grad for t in _trained_tensors(layer))]

    torch.manual_seed(123)  # the seed the layer drew for its dropout
    seed = int(torch.randint(2**62, ()))
    xr = x.detach().clone().requires_grad_(True)
    dropped = xr.reshape(36, 160)
    if p > 0:
        mask, keep_scale = dropout_mask(torch.Size((36, 160)), p, seed, x.device)
        dropped = (dropped * keep_scale).masked_fill(mask, 0)
    yr, leaves = _reference(layer, xr.reshape(36, 160), dropped)
    (yr.view(4, 9, 96) ** 2).mean().backward()
    reference = [yr.detach().view(4, 9, 96), xr.grad, *(leaf.grad for leaf in leaves)]
    for got, want in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dora_row_norm_in_blocks_equals_the_whole():
    torch.manual_seed(0)
    w, a, b = torch.randn(300, 70), torch.randn(4, 70), torch.randn(300, 4)
    whole = (w + 2.0 * b @ a).norm(dim=1)
    torch.testing.assert_close(dora_row_norm(w, a, b, 2.0, block=70 * 7), whole)  # 7 rows at a time


def test_vera_projection_is_peft_s_for_the_same_key():
    from peft.tuners.vera.model import _kaiming_init

    generator = torch.Generator().manual_seed(7)
    theirs = _kaiming_init((16, 192), generator), _kaiming_init((128, 16), generator)
    for ours, want in zip(vera_projection(16, [(128, 64), (64, 192)], 7), theirs, strict=True):
        assert torch.equal(ours, want)


def test_variants_start_as_the_base_model(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    plain = _logits(load_model(base, device="cpu"))
    for variant in ("dora", "vera"):
        model = load_model(base, device="cpu")
        add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0, variant=variant)
        torch.testing.assert_close(_logits(model), plain, rtol=0, atol=1e-5)


# --- PEFT's layout --------------------------------------------------------------------------------------------


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(IDS).logits.float()


def _randomize(model: nn.Module, seed: int = 1) -> None:
    """A trained adapter: every trainable tensor moved off its init."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)


def _adapted(base: Path, variant: str, quantize: bool = True) -> nn.Module:
    model = load_model(base, device="cpu", quantize=quantize)
    add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0, variant=variant, projection_prng_key=3)
    _randomize(model)
    return model


def _dequantized_reference(base: Path, model: nn.Module) -> nn.Module:
    """The dense fp32 HF model holding ``model``'s dequantized 4-bit weights."""
    reference = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantize())
    return reference


@pytest.mark.parametrize("variant", ["dora", "vera"])
def test_peft_loads_our_adapter_and_computes_the_same_logits(tmp_path, variant):
    from peft import PeftModel

    base = save_tiny_checkpoint(tmp_path / "base")
    ours = _adapted(base, variant)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    config = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert config["peft_type"] == ("VERA" if variant == "vera" else "LORA")
    assert config.get("use_dora", False) is (variant == "dora")
    theirs = PeftModel.from_pretrained(_dequantized_reference(base, ours), tmp_path / "adapter")
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-4)


def _peft_written(base: Path, directory: Path, variant: str, save_projection: bool = True) -> nn.Module:
    from peft import LoraConfig, VeraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    if variant == "vera":
        config = VeraConfig(r=8, target_modules=targets, projection_prng_key=5, save_projection=save_projection)
    else:
        config = LoraConfig(r=8, lora_alpha=16, target_modules=targets, use_dora=True)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), config)
    _randomize(model, seed=2)
    model.save_pretrained(directory)
    return model


@pytest.mark.parametrize("variant, save_projection", [("dora", True), ("vera", True), ("vera", False)])
def test_we_load_peft_written_adapters_of_each_variant(tmp_path, variant, save_projection):
    base = save_tiny_checkpoint(tmp_path / "base")
    theirs = _peft_written(base, tmp_path / "adapter", variant, save_projection)
    ours = load_model(base, device="cpu", quantize=False)
    config = load_adapter(ours, tmp_path / "adapter")
    assert config.variant == variant and len(lora_layers(ours)) == 2 * 7
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-4)
    save_adapter(ours, tmp_path / "again")  # and saved again, it says what PEFT wrote
    again = json.loads((tmp_path / "again" / CONFIG_NAME).read_text())
    written = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    keys = ("projection_prng_key",) if variant == "vera" else ("use_dora", "lora_alpha")
    assert {k: again[k] for k in ("peft_type", "r", *keys)} == {k: written[k] for k in ("peft_type", "r", *keys)}


def test_a_variant_adapter_missing_a_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    base = save_tiny_checkpoint(tmp_path / "base")
    adapter = save_adapter(_adapted(base, "dora"), tmp_path / "adapter", str(base))
    state = load_file(adapter / "adapter_model.safetensors")
    state.pop(next(k for k in state if k.endswith("lora_magnitude_vector")))
    save_file(state, adapter / "adapter_model.safetensors")
    with pytest.raises(Exception, match=r"no complete DoRA set \(lora_A, lora_B, lora_magnitude_vector\)"):
        read_adapter(adapter)


# --- merge: export and generate's fold ----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["lora", "dora", "vera"])
def test_export_and_fold_merge_each_variant(tmp_path, variant):
    base = save_tiny_checkpoint(tmp_path / "base")
    ours = _adapted(base, variant)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    export_merged(tmp_path / "adapter", tmp_path / "export", dtype="fp32", device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "export", dtype=torch.float32)
    torch.testing.assert_close(_logits(merged), _logits(ours), rtol=0, atol=1e-4)
    expected = _logits(ours)
    assert fold_lora(ours, torch.float32) == 2 * 7 and not lora_layers(ours)
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ["dora", "vera"])
def test_generate_loads_each_variant(tiny_model_dir, tmp_path, variant):  # noqa: F811
    from qlora_kit.generate import load_for_generation

    ours = _adapted(tiny_model_dir, variant)
    adapter = save_adapter(ours, tmp_path / "adapter", str(tiny_model_dir))
    for merge in (False, True):  # as adapter layers, and folded into dense weights (--merge-adapter)
        loaded, _, _ = load_for_generation(str(tiny_model_dir), str(adapter), "cpu", "fp32", None, merge)
        assert bool(lora_layers(loaded)) is not merge
        torch.testing.assert_close(_logits(loaded), _logits(ours), rtol=0, atol=1e-4)


# --- training: resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"lora.variant": "dora"},
        {"lora.variant": "vera", "lora.r": 32},
        {"train.loraplus_lr_ratio": 16},
        {"lora.init": "pissa"},
        {"lora.init": "loftq", "lora.init_iters": 2},
    ],
    ids=["dora", "vera", "loraplus", "pissa", "loftq"],
)
def test_resume_continues_each_variant_exactly(tiny_model_dir, tmp_path, extra):  # noqa: F811
    common = {"data.max_samples": 16, "train.save_steps": 2, "lora.dropout": 0.1, **extra}
    whole = tmp_path / "whole"
    train(load_config(None, _overrides(tiny_model_dir, whole, **common, **{"train.max_steps": 4})))
    split = tmp_path / "split"
    train(load_config(None, _overrides(tiny_model_dir, split, **common, **{"train.max_steps": 2})))
    train(load_config(None, _overrides(tiny_model_dir, split, **common, **{"train.max_steps": 4})))
    assert _losses(split) == _losses(whole)
    saved = read_adapter(split / "adapter")
    want = {"dora": "dora", "vera": "vera"}.get(extra.get("lora.variant"), "lora")
    assert saved.config.variant == want
    if "lora.init" in extra:  # PEFT's conversion: rank 2r, alpha 2x, so the scaling is unchanged
        assert saved.config.r == 2 * 8 and saved.config.lora_alpha == 32
        assert saved.metadata["lora_init"]["method"] == extra["lora.init"]


def test_loraplus_groups_carry_the_ratio_and_resume_keeps_them(tiny_model_dir, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    common = {"data.max_samples": 16, "train.save_steps": 2, "train.loraplus_lr_ratio": 16, "lora.variant": "dora"}
    train(load_config(None, _overrides(tiny_model_dir, out, **common, **{"train.max_steps": 2})))
    state = torch.load(out / "checkpoints" / "step-000002" / "training_state.pt", weights_only=False)
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert set(groups) == {"a", "b"}
    assert groups["b"]["lr"] == pytest.approx(16 * groups["a"]["lr"]) and groups["a"]["lr"] > 0
    # B matrices and the 1-D magnitudes in group b (as PEFT's create_loraplus_optimizer sorts them)
    n_layers = 2 * 7
    assert len(groups["a"]["params"]) == n_layers and len(groups["b"]["params"]) == 2 * n_layers
    from qlora_kit.train import prepare, setup

    run = setup(prepare(load_config(None, _overrides(tiny_model_dir, out, **common, **{"train.max_steps": 4}))))
    lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert run.step == 2 and lrs["b"] == pytest.approx(16 * lrs["a"])
    assert lrs["a"] == pytest.approx(groups["a"]["lr"])
    run.log.close()


def test_state_dict_keys_are_peft_s(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    dora = lora_state_dict(_adapted(base, "dora"))
    vera = lora_state_dict(_adapted(base, "vera"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in dora
    assert {"base_model.vera_A", "base_model.vera_B"} <= set(vera)
    assert "base_model.model.model.layers.0.mlp.up_proj.vera_lambda_d" in vera
