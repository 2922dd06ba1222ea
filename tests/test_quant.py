"""NF4 + double quantization: the format, the bytes, and that backward keeps no dense weight."""

from __future__ import annotations

import bitsandbytes.functional as bnbf
import pytest
import torch

from qlora_kit.quant import QUANTIZE_SLICE, NF4Linear, dequantize_nf4_reference, quantized_bytes


@pytest.mark.parametrize("shape", [(576, 1536), (100, 37), (64, 64), (3, 1000)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_equals_bitsandbytes_bit_for_bit(shape, dtype):
    torch.manual_seed(0)
    weight = torch.randn(shape) * 0.02
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    state.dtype = dtype
    expected = bnbf.dequantize_4bit(codes, state)

    layer = NF4Linear.from_weight(weight)
    assert torch.equal(layer.codes, codes.view(-1))
    assert torch.equal(layer.dequantize(dtype), expected)  # our buffers -> bnb's kernel
    assert torch.equal(dequantize_nf4_reference(layer, dtype), expected)  # the format in plain torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sliced_quantization_equals_one_bitsandbytes_call(dtype):
    # load_weight quantizes in slices of QUANTIZE_SLICE values to bound its temporaries; on a weight of
    # several slices with a ragged last block and an odd value count, every buffer must still equal the
    # one-call bnb.functional.quantize_4bit result.
    torch.manual_seed(1)
    weight = (torch.randn(1001, 2113) * 0.02).to(dtype)
    assert weight.numel() > 2 * QUANTIZE_SLICE and weight.numel() % 2 == 1 and weight.numel() % 64
    codes, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    layer = NF4Linear.from_weight(weight)
    assert torch.equal(layer.codes, codes.view(-1))
    assert torch.equal(layer.absmax_codes, state.absmax)
    assert torch.equal(layer.absmax_scales.view(torch.float32), state.state2.absmax)
    assert torch.equal(layer.absmax_offset.view(torch.float32), state.offset.reshape(()))


def test_quantization_error_is_nf4_sized():
    torch.manual_seed(0)
    weight = torch.randn(256, 512)
    rel = (NF4Linear.from_weight(weight).dequantize() - weight).norm() / weight.norm()
    assert 0.05 < rel < 0.12  # NF4 on Gaussian weights: ~9% relative error; 0 would mean no quantization


def test_bits_per_parameter_is_4_127():
    layer = NF4Linear.from_weight(torch.randn(2048, 2048))
    report = quantized_bytes(layer)
    assert report.codes == 2048 * 2048 // 2
    assert report.absmax == 2048 * 2048 // 64
    assert report.nested_stats == 4 * (2048 * 2048 // 64 // 256) + 4
    assert report.bits_per_quantized_param == pytest.approx(4.127, abs=0.01)


def test_forward_matches_dense_linear_with_bias():
    torch.manual_seed(0)
    dense = torch.nn.Linear(96, 80)
    layer = NF4Linear.from_weight(dense.weight.detach(), dense.bias.detach())
    x = torch.randn(3, 5, 96)
    expected = torch.nn.functional.linear(x, layer.dequantize(), dense.bias)
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)


def test_to_does_not_requantize():
    # bitsandbytes' Params4bit quantizes as a side effect of .to(); ours moves bytes and nothing else.
    layer = NF4Linear.from_weight(torch.randn(64, 128))
    before = layer.dequantize()
    layer.to(torch.float64).to("cpu")
    assert layer.codes.dtype == torch.uint8 and layer.absmax_codes.dtype == torch.uint8
    assert torch.equal(layer.dequantize(), before)


def test_backward_saves_no_dense_weight():
    """The only tensors saved for backward through a 4-bit layer are small; no (out x in) weight."""
    torch.manual_seed(0)
    out_features, in_features = 192, 160
    layer = NF4Linear.from_weight(torch.randn(out_features, in_features))
    x = torch.randn(4, 7, in_features, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    dense = [t for t in saved if t.is_floating_point() and t.numel() >= out_features * in_features]
    assert dense == [], f"saved dense tensors: {[tuple(t.shape) for t in dense]}"
    torch.testing.assert_close(x.grad, torch.ones(4, 7, out_features) @ layer.dequantize())


def test_dense_linear_would_be_caught():
    # The hook above does see a dense weight when one is saved: the check can fail.
    weight = torch.randn(192, 160, requires_grad=True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        torch.nn.functional.linear(torch.randn(4, 160, requires_grad=True), weight)
    assert any(t.numel() == 192 * 160 for t in saved)
