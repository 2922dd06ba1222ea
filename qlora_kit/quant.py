"""NF4 + double-quantized weight storage, on bitsandbytes' functional API.

The format is bitsandbytes' NF4 (QLoRA): a weight of ``n`` values is cut into blocks of 64; each value
becomes a 4-bit index into the 16-entry NF4 table, scaled by its block's absmax. Double quantization then
stores the absmax values themselves in 8 bits: subtract their mean (the offset), quantize in blocks of
256 with bitsandbytes' signed 8-bit dynamic map, keep one fp32 scale per 256 absmax values. That is

    4 + 8/64 + 32/(64*256) = 4.127 bits per parameter.

``NF4Linear`` is a frozen linear layer holding exactly those tensors as plain buffers. Unlike
bitsandbytes' ``Params4bit`` nothing is quantized as a side effect of ``.to()``: quantization happens once,
explicitly, in ``NF4Linear.from_weight``; moving the module moves the codes as they are.

The forward pass goes through ``_NF4Matmul``, which dequantizes the weight, multiplies, and lets the
dense weight go. Backward dequantizes again instead of keeping it: the codes are already resident, so the
only saved state of a frozen 4-bit layer is nothing at all (the input is not needed, the weight has no grad).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import bitsandbytes.functional as bnbf
import torch
from torch import nn

from qlora_kit.facts import ABSMAX_BLOCKSIZE, NF4_BLOCKSIZE

QUANTIZE_SLICE = 1 << 20  # values quantized per call in load_weight: a multiple of NF4_BLOCKSIZE (and even)


@functools.cache
def _nf4_table(device: torch.device) -> torch.Tensor:
    return bnbf.get_4bit_type("nf4", device=device)


@functools.cache  # built once per device: rebuilding it cost ~0.25 ms per dequantize
def _absmax_table(device: torch.device) -> torch.Tensor:
    return bnbf.create_dynamic_map(signed=True).to(device)


class NF4Linear(nn.Module):
    """A frozen ``y = x W^T + b`` whose ``W`` is stored in NF4 with double-quantized absmax."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        numel = in_features * out_features
        n_blocks = math.ceil(numel / NF4_BLOCKSIZE)
        # Allocated empty (on `device`, "meta" for a model skeleton) and filled by `load_weight`.
        self.register_buffer("codes", torch.empty(math.ceil(numel / 2), dtype=torch.uint8, device=device))
        self.register_buffer("absmax_codes", torch.empty(n_blocks, dtype=torch.uint8, device=device))
        # The fp32 second-level scales and offset are kept as their raw bits (int32), so that a
        # `model.to(torch.bfloat16)` can never round them: integer buffers are left alone by `.to(dtype)`.
        self.register_buffer(
            "absmax_scales",
            torch.empty(math.ceil(n_blocks / ABSMAX_BLOCKSIZE), dtype=torch.int32, device=device),
        )
        self.register_buffer("absmax_offset", torch.empty((), dtype=torch.int32, device=device))
        # The bias, if any, stays in the compute dtype and frozen, as in any QLoRA base layer.
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype), False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None) -> NF4Linear:
        """Quantize a dense ``(out, in)`` weight on its own device."""
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, bias=bias is not None, device=weight.device)
        layer.load_weight(weight)
        if bias is not None:
            layer.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        return layer

    @torch.no_grad()
    def load_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (any float dtype, on the device it should live on) into this layer's buffers."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit NF4Linear({self.in_features}, {self.out_features})"
            )
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            # bitsandbytes' CUDA quantize kernel takes only these (an F64 or F8 checkpoint tensor would end in an
            # UnboundLocalError inside it); fp32 holds F8 and F16 values exactly and F64 ones to fp32 precision.
            weight = weight.float()
        flat = weight.contiguous().view(-1)
        # Quantized in slices: bitsandbytes' CPU quantizer (plain torch) makes ~16 bytes of fp32/int32
        # temporaries per value, over 1 GB for one 8192x8192 weight, which would dominate the loader's and
        # the exporter's peak memory. Blocks never straddle a slice (slices are whole blocks), so codes and
        # absmax are those of one whole-tensor call; the double quantization below is bnb's own
        # (offset = mean of all absmax, then 8-bit blocks of 256), so the result is bit-identical.
        codes, absmax = [], []
        for start in range(0, flat.numel(), QUANTIZE_SLICE):
            packed, block_absmax = torch.ops.bitsandbytes.quantize_4bit.default(
                flat[start : start + QUANTIZE_SLICE], NF4_BLOCKSIZE, "nf4", torch.uint8
            )
            codes.append(packed.view(-1))
            absmax.append(block_absmax)
        absmax_all = torch.cat(absmax)
        offset = absmax_all.mean()
        absmax_codes, nested = bnbf.quantize_blockwise(absmax_all - offset, blocksize=ABSMAX_BLOCKSIZE)
        # Buffers are replaced, not copied into: a skeleton's buffers live on the meta device.
        self.codes = torch.cat(codes) if len(codes) > 1 else codes[0]
        self.absmax_codes = absmax_codes
        self.absmax_scales = nested.absmax.view(torch.int32)
        self.absmax_offset = offset.reshape(()).view(torch.int32)

    def quant_state(self, dtype: torch.dtype) -> bnbf.QuantState:
        """The bitsandbytes ``QuantState`` these buffers stand for (dequantizing to ``dtype``)."""
        device = self.codes.device
        nested = bnbf.QuantState(
            absmax=self.absmax_scales.view(torch.float32),
            code=_absmax_table(device),
            blocksize=ABSMAX_BLOCKSIZE,
            dtype=torch.float32,
        )
        return bnbf.QuantState(
            absmax=self.absmax_codes,
            shape=torch.Size((self.out_features, self.in_features)),
            code=_nf4_table(device),
            blocksize=NF4_BLOCKSIZE,
            quant_type="nf4",
            dtype=dtype,
            offset=self.absmax_offset.view(torch.float32),
            state2=nested,
        )

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``(out, in)`` weight, through bitsandbytes' own kernel for this device."""
        return bnbf.dequantize_4bit(self.codes.view(-1, 1), self.quant_state(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _NF4Matmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nf4+dq"


class _NF4Matmul(torch.autograd.Function):
    """``x @ dequant(W)^T`` that saves nothing for backward and dequantizes again there."""

    @staticmethod
    def forward(x: torch.Tensor, layer: NF4Linear) -> torch.Tensor:  # type: ignore[override]
        return x @ layer.dequantize(x.dtype).t()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        # The layer (whose codes are resident anyway) rides on ctx as a plain reference, not a saved tensor.
        ctx.layer = inputs[1]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad_out @ ctx.layer.dequantize(grad_out.dtype), None


def dequantize_nf4_reference(layer: NF4Linear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The format spelled out in plain torch ops: what ``NF4Linear.dequantize`` must equal bit for bit.

    Used by the tests to pin our reading of the format (the byte accounting and the 4-bit export
    depend on it) and by ``bench/dequant.py`` as the unfused baseline.
    """
    device = layer.codes.device
    n_blocks = layer.absmax_codes.numel()
    scales = layer.absmax_scales.view(torch.float32).repeat_interleave(ABSMAX_BLOCKSIZE)[:n_blocks]
    absmax = _absmax_table(device)[layer.absmax_codes.long()] * scales + layer.absmax_offset.view(torch.float32)
    # Two values per byte, the first in the high nibble.
    nibbles = torch.stack([layer.codes >> 4, layer.codes & 0x0F], dim=1).view(-1).long()
    numel = layer.in_features * layer.out_features
    values = _nf4_table(device)[nibbles[:numel]]
    padded = torch.nn.functional.pad(values, (0, n_blocks * NF4_BLOCKSIZE - numel))
    dense = (padded.view(n_blocks, NF4_BLOCKSIZE) * absmax[:, None]).view(-1)[:numel]
    return dense.view(layer.out_features, layer.in_features).to(dtype)


@dataclass
class QuantizedBytes:
    """Exact bytes of a model by storage category, counted from the real tensors."""

    codes: int = 0  # packed 4-bit values
    absmax: int = 0  # 8-bit absmax per block of 64
    nested_stats: int = 0  # fp32 scale per 256 absmax + the fp32 offset
    non_quantized: int = 0  # frozen embeddings, norms, lm_head, biases (compute dtype)
    lora: int = 0  # trainable parameters: the adapters (everything else in a QLoRA model is frozen)
    quantized_params: int = 0  # number of weights stored in NF4

    @property
    def quantized_total(self) -> int:
        return self.codes + self.absmax + self.nested_stats

    @property
    def bits_per_quantized_param(self) -> float:
        return 8 * self.quantized_total / max(self.quantized_params, 1)

    @property
    def total(self) -> int:
        return self.quantized_total + self.non_quantized + self.lora


def quantized_bytes(model: nn.Module) -> QuantizedBytes:
    """Walk the model's tensors once and sort their bytes by category: each storage counts once, whole, so
    tied tensors and views of one shared tensor (VeRA's projections) are the bytes they really hold.

    Trainable parameters count as the adapters: this module knows NF4 storage, not LoRA's names."""
    report = QuantizedBytes()
    seen: set[object] = set()

    def nbytes(t: torch.Tensor) -> int:
        if t.device.type == "meta":  # no storage to share: each tensor is its own
            key, size = id(t), t.numel() * t.element_size()
        else:
            storage = t.untyped_storage()
            key, size = (t.device, storage.data_ptr()), storage.nbytes()
        if key in seen:
            return 0
        seen.add(key)
        return size

    for module in model.modules():
        if isinstance(module, NF4Linear):
            report.codes += nbytes(module.codes)
            report.absmax += nbytes(module.absmax_codes)
            report.nested_stats += nbytes(module.absmax_scales) + nbytes(module.absmax_offset)
            report.quantized_params += module.in_features * module.out_features
    for param in model.parameters():
        if param.requires_grad:
            report.lora += nbytes(param)
        else:
            report.non_quantized += nbytes(param)
    for buf in model.buffers():  # what is left: e.g. rotary inv_freq
        report.non_quantized += nbytes(buf)
    return report
