"""LoRALinear and add_lora on 4-bit and dense bases."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model
from qlora_kit.lora import LoRALinear, add_lora, dropout_mask, lora_layers, set_lora_enabled
from qlora_kit.quant import NF4Linear


def _pair(out_features=96, in_features=160, r=8, alpha=16.0, seed=0):
    """The same LoRA on an NF4 base and on a dense nn.Linear holding the dequantized weight."""
    torch.manual_seed(seed)
    quantized = NF4Linear.from_weight(torch.randn(out_features, in_features) * 0.05)
    dense = nn.Linear(in_features, out_features, bias=False)
    dense.weight.data.copy_(quantized.dequantize())
    dense.requires_grad_(False)
    q_lora = LoRALinear(quantized, r, alpha)
    d_lora = LoRALinear(dense, r, alpha)
    nn.init.normal_(q_lora.lora_b.weight, std=0.1)  # non-zero B so the LoRA path matters
    d_lora.load_state_dict(q_lora.state_dict(), strict=False)
    return q_lora, d_lora


def test_gradient_parity_with_dense_base():
    q_lora, d_lora = _pair()
    x = torch.randn(4, 9, 160)
    grads = []
    for layer in (q_lora, d_lora):
        xi = x.clone().requires_grad_(True)
        loss = (layer(xi) ** 2).mean()
        loss.backward()
        grads.append((xi.grad, layer.lora_a.weight.grad, layer.lora_b.weight.grad))
    # Tolerance: same dense weight, same fp32 ops; only summation order may differ.
    for ours, reference in zip(grads[0], grads[1], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_lora_linear_saves_no_dense_weight():
    q_lora, _ = _pair(out_features=192, in_features=160)
    saved: list[torch.Tensor] = []
    x = torch.randn(2, 5, 160, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q_lora(x)
    y.sum().backward()
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= 192 * 160]
    assert big == []
    assert q_lora.lora_a.weight.grad is not None


def test_b_starts_at_zero_and_a_is_kaiming():
    layer = LoRALinear(nn.Linear(256, 64), r=16, alpha=32)
    assert torch.count_nonzero(layer.lora_b.weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound for fan_in 256
    assert layer.lora_a.weight.abs().max() <= bound and layer.lora_a.weight.std() > bound / 3


def test_scaling_and_rslora():
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=32).scaling == 2.0
    assert LoRALinear(nn.Linear(8, 8), r=16, alpha=32, use_rslora=True).scaling == 8.0


def test_dropout_only_on_lora_path_and_disabled_switch():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8, dropout=0.5).train()
    nn.init.normal_(layer.lora_b.weight)
    x = torch.randn(3, 32)
    layer.disabled = True
    torch.testing.assert_close(layer(x), base(x))  # dropout never touches the base path
    layer.disabled = False
    a, b = layer(x), layer(x)
    assert not torch.allclose(a, b)  # LoRA path sees dropout in training
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_step_zero_is_the_base_model(tmp_path, family):
    from tests.conftest import save_tiny_checkpoint

    model = load_model(save_tiny_checkpoint(tmp_path / family, family), device="cpu")
    ids = torch.randint(0, 320, (2, 12))
    with torch.no_grad():
        base = model(ids).logits
    report = add_lora(model, "all-linear", r=8, alpha=16)
    with torch.no_grad():
        adapted = model(ids).logits
    assert torch.equal(base, adapted)
    assert len(report.adapted) == 2 * 7
    # ... and once B moves, the output does too.
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.05)
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base)
        set_lora_enabled(model, False)
        assert torch.equal(model(ids).logits, base)


def test_targets_presets_and_explicit(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu")
    report = add_lora(model, "attention", r=4, alpha=8)
    assert sorted({n.rsplit(".", 1)[-1] for n in report.adapted}) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert not any("lm_head" in n for n in report.adapted)
    # trainable = r * (in + out) per adapted linear; hidden 128, kv 2 heads of 32 -> k/v out 64
    per_layer = 4 * ((128 + 128) + (128 + 64) + (128 + 64) + (128 + 128))
    assert report.trainable_params == 2 * per_layer
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == report.trainable_params

    model = load_model(tiny_llama_dir, device="cpu")
    report = add_lora(model, ["q_proj", "mlp.down_proj"], r=4, alpha=8)
    assert [n.rsplit(".", 1)[-1] for n in report.adapted] == ["q_proj", "down_proj"] * 2


def test_unknown_target_lists_module_names(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu")
    with pytest.raises(QloraKitError) as err:
        add_lora(model, ["query"], r=4, alpha=8)
    message = str(err.value)
    assert "'query'" in message
    for name in ("q_proj", "k_proj", "gate_proj", "down_proj"):
        assert name in message


def test_all_linear_never_adapts_lm_head(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu")
    add_lora(model, "all-linear", r=4, alpha=8)
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    assert not model.lm_head.weight.requires_grad


def test_dropout_path_matches_plain_autograd_and_saves_no_copies():
    """The fused LoRA node (base + adapter in one) gives plain autograd's output and gradients for the same
    dropout mask, and keeps no dropped copy of x and no mask: backward draws the mask again from its seed."""
    torch.manual_seed(0)
    base = NF4Linear.from_weight(torch.randn(96, 160) * 0.05, torch.randn(96))
    layer = LoRALinear(base, r=8, alpha=16, dropout=0.3).train()
    nn.init.normal_(layer.lora_b.weight, std=0.1)
    x = torch.randn(4, 9, 160, requires_grad=True)
    saved: list[torch.Tensor] = []
    torch.manual_seed(123)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    (y**2).mean().backward()
    fused = (y.detach(), x.grad, layer.lora_a.weight.grad, layer.lora_b.weight.grad)
    assert [t for t in saved if t.numel() >= x.numel() and t.data_ptr() != x.data_ptr()] == []

    torch.manual_seed(123)  # the seed the layer drew, and its mask
    mask, keep_scale = dropout_mask(torch.Size((36, 160)), 0.3, int(torch.randint(2**62, ())), x.device)
    assert 0.25 < mask.float().mean() < 0.35 and keep_scale == pytest.approx(1 / 0.7, rel=1e-4)
    xr = x.detach().clone().requires_grad_(True)
    a = layer.lora_a.weight.detach().clone().requires_grad_(True)
    b = layer.lora_b.weight.detach().clone().requires_grad_(True)
    dropped = (xr.reshape(36, 160) * keep_scale).masked_fill(mask, 0)
    yr = base(xr) + layer.scaling * (dropped @ a.t() @ b.t()).view(4, 9, 96)
    (yr**2).mean().backward()
    for ours, reference in zip(fused, (yr.detach(), xr.grad, a.grad, b.grad), strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_fused_lora_gradcheck():
    from qlora_kit.lora import _LoRAFunction

    dense = nn.Linear(6, 5).double().requires_grad_(False)
    x = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    for p in (0.0, 0.4):
        fn = lambda x, a, b, p=p: _LoRAFunction.apply(x, a, b, dense, dense.bias, 1.5, p, 77)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, a, b))


def test_lora_does_not_import_the_loader():
    """Layering: the loader and LoRA both ask qlora_kit.architecture for the decoder linears; lora stands alone."""
    code = "import sys, qlora_kit.lora; print('qlora_kit.loading' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "False"
