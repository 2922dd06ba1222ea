"""LoRA's variants on the frozen (4-bit) base: DoRA and VeRA, each one autograd node like ``_LoRAFunction``.

    DoRA  y = m * (W x + s B A drop(x)) / ||W + s B A||_row + b       m: (out,) trainable "magnitude"
    VeRA  y = W x + b + lambda_b * (B_shared (lambda_d * (A_shared drop(x))))
                                                                      lambda_d: (r,), lambda_b: (out,) trainable

DoRA's row norm (PEFT calls it the column norm of ``W^T``) is a constant in backward, as in the DoRA paper
(section 4.3) and PEFT: no gradient flows through it, so backward needs no ``(out, in)`` temporary beyond the
dequantized ``W`` it needs anyway. The norm is computed from that same dequantized ``W`` in forward, a block
of rows at a time (``DORA_NORM_ROWS_NUMEL`` values), so the dense ``W + s B A`` never exists whole and ``W``
is freed as soon as the norm and the matmul have it. Neither node saves ``W``: backward dequantizes again.

VeRA's ``A`` (r x in) and ``B`` (out x r) are frozen random matrices drawn once from ``projection_prng_key``
exactly as PEFT draws them (one pair sized for the largest adapted layer, each layer slicing its corner), so
PEFT rebuilds the same matrices from the key; they are also saved with the adapter (``save_projection``).

Known difference from PEFT in *training* with dropout > 0: PEFT's DoRA also applies the LoRA dropout to the
base term of the magnitude correction; here dropout acts on the adapter path only (the formula above). With
dropout off (eval, inference, the parity tests) the two compute the same thing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qlora_kit.lora import LoRALinear, _frozen_base_weight, dropout_mask

VERA_D_INITIAL = 0.1  # PEFT's VeraConfig.d_initial: lambda_d's start value (lambda_b starts at 0)
DORA_NORM_ROWS_NUMEL = 1 << 22  # values of W + s B A held at once while DoRA's row norm is computed


# --- shared pieces of the fused nodes -----------------------------------------------------------------------


def _adapter_input(x2: torch.Tensor, a: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """``dropout(x) @ A^T`` (r wide), the keep scale applied on the narrow result, as ``_LoRAFunction`` does."""
    if p <= 0:
        return x2 @ a.t()
    mask, keep_scale = dropout_mask(x2.shape, p, seed, x2.device)
    return (x2.masked_fill(mask, 0) @ a.t()).mul_(keep_scale)


def _adapter_input_grads(
    ctx, x2: torch.Tensor, a: torch.Tensor, grad_h: torch.Tensor, a_index: int
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """From d loss / d h (r wide): the gradient of ``A`` (None if not needed) and ``x``'s adapter part."""
    mask, keep_scale = None, 1.0
    if ctx.p > 0:
        mask, keep_scale = dropout_mask(x2.shape, ctx.p, ctx.seed, x2.device)
    grad_h = grad_h * keep_scale
    grad_a = None
    if ctx.needs_input_grad[a_index]:
        grad_a = grad_h.t() @ (x2 if mask is None else x2.masked_fill(mask, 0))
    grad_x = grad_h @ a
    if mask is not None:
        grad_x.masked_fill_(mask, 0)
    return grad_a, grad_x


def _dropout_args(layer: LoRALinear) -> tuple[float, int]:
    """The dropout probability in force and a seed for it from torch's RNG (see ``LoRALinear.forward``)."""
    p = layer.dropout.p if layer.training and isinstance(layer.dropout, nn.Dropout) else 0.0
    return p, int(torch.randint(2**62, (), dtype=torch.int64)) if p > 0 else 0


def _fused(layer: LoRALinear, x: torch.Tensor, dtype: torch.dtype) -> bool:
    return not layer.disabled and _frozen_base_weight(layer.base) is not None and dtype == x.dtype


def base_weight(base: nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The base layer's dense ``(out, in)`` weight (dequantized for an ``NF4Linear``), detached."""
    dequantize = getattr(base, "dequantize", None)
    return (dequantize(dtype) if dequantize is not None else base.weight.to(dtype)).detach()


# --- DoRA ----------------------------------------------------------------------------------------------------


def dora_row_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, block: int = DORA_NORM_ROWS_NUMEL
) -> torch.Tensor:
    """``||W + s B A||`` of each output row in fp32, ``block`` values of the sum at a time (never the whole of it).

    fp32 whatever the inputs' dtype: in bf16 the norm would be off by up to ~0.4%, and so would every DoRA output
    (m / norm), step 0 included."""
    rows = max(1, block // max(weight.shape[1], 1))
    norms = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    a = lora_a.float()
    with torch.no_grad():
        for start in range(0, weight.shape[0], rows):
            stop = start + rows
            part = torch.addmm(weight[start:stop].float(), lora_b[start:stop].float(), a, alpha=scaling)
            torch.linalg.vector_norm(part, dim=1, out=norms[start:stop])
    return norms


def dora_merge(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, magnitude: torch.Tensor, scaling: float
) -> torch.Tensor:
    """DoRA merged into a dense weight, in fp32: ``m * (W + s B A) / ||W + s B A||_row``."""
    merged = torch.addmm(weight.float(), lora_b.float(), lora_a.float(), alpha=scaling)
    return merged.mul_((magnitude.float() / torch.linalg.vector_norm(merged, dim=1)).unsqueeze(1))


def vera_merge(
    weight: torch.Tensor, vera_a: torch.Tensor, vera_b: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor
) -> torch.Tensor:
    """VeRA merged into a dense ``(out, in)`` weight, in fp32: ``W + diag(lambda_b) B diag(lambda_d) A``, with A
    and B the shared projection's corner for this shape."""
    out_features, in_features = weight.shape
    scaled_b = vera_b[:out_features].float() * lambda_d.float() * lambda_b.float().unsqueeze(1)
    return torch.addmm(weight.float(), scaled_b, vera_a[:, :in_features].float())


class DoRALinear(LoRALinear):
    """LoRA on the direction of ``W``, a trainable magnitude per output row (PEFT's ``use_dora=True``).

    ``lora_magnitude`` starts at ``||W||`` per row (B is zero), so step 0 is still the base model.
    """

    variant = "dora"

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(base, r, alpha, dropout, use_rslora, dtype)
        norm = dora_row_norm(base_weight(base), self.lora_a.weight.float(), self.lora_b.weight.float(), self.scaling)
        self.lora_magnitude = nn.Parameter(norm.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        a, b, m = self.lora_a.weight, self.lora_b.weight, self.lora_magnitude
        p, seed = _dropout_args(self)
        bias = getattr(self.base, "bias", None)
        if _fused(self, x, a.dtype):
            return _DoRAFunction.apply(x, a, b, m, self.base, bias, self.scaling, p, seed)
        # Any other base or dtype: plain modules, the same formula (the norm a constant, as above).
        weight = base_weight(self.base, a.dtype)
        norm = dora_row_norm(weight, a.detach(), b.detach(), self.scaling)
        del weight
        out = self.base(x)
        if bias is not None:
            out = out - bias
        lora = self.lora_b(self.lora_a(self.dropout(x.to(a.dtype))))
        out = (out.to(a.dtype) + self.scaling * lora) * (m / norm)
        out = out.to(x.dtype)
        return out if bias is None else out + bias.to(out.dtype)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().peft_tensors(), "lora_magnitude_vector": self.lora_magnitude}

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return dora_merge(weight, self.lora_a.weight, self.lora_b.weight, self.lora_magnitude, self.scaling)


class _DoRAFunction(torch.autograd.Function):
    """DoRA's forward as one node. Saved: ``x``, ``h = drop(x) A^T``, A, B, m and the (out,) norm; no ``W``.

    Backward dequantizes ``W`` again (for ``x``'s gradient, as LoRA does) and recomputes ``W x + s B h``
    from it for m's gradient instead of keeping that output-sized tensor from forward.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, magnitude, base, bias, scaling, p, seed):  # type: ignore[override]
        ctx.base, ctx.scaling, ctx.p, ctx.seed = base, scaling, p, seed
        x2 = x.reshape(-1, x.shape[-1])
        weight = _frozen_base_weight(base)(x.dtype)
        out = x2 @ weight.t()
        norm = dora_row_norm(weight, lora_a, lora_b, scaling)
        del weight  # the dense weight goes here: nothing below needs it
        h = _adapter_input(x2, lora_a, p, seed)
        out.addmm_(h, lora_b.t(), alpha=scaling).mul_((magnitude.float() / norm).to(out.dtype))
        if bias is not None:
            out += bias.to(out.dtype)
        ctx.save_for_backward(x, h, lora_a, lora_b, magnitude, norm)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, h, lora_a, lora_b, magnitude, norm = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        weight = _frozen_base_weight(ctx.base)(g.dtype)
        grad_m = None
        if ctx.needs_input_grad[3]:  # d y / d m = (W x + s B h) / norm
            lin = (x2 @ weight.t()).addmm_(h, lora_b.t(), alpha=ctx.scaling)
            grad_m = ((g * lin).sum(0).float() / norm).to(magnitude.dtype)
            del lin
        gs = g * (magnitude.float() / norm).to(g.dtype)  # d loss / d (W x + s B h)
        grad_b = (gs.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        grad_a, grad_x = _adapter_input_grads(ctx, x2, lora_a, (gs @ lora_b).mul_(ctx.scaling), 1)
        grad_x = grad_x.addmm_(gs, weight).view(x.shape) if ctx.needs_input_grad[0] else None
        return grad_x, grad_a, grad_b, grad_m, None, None, None, None, None


# --- VeRA ----------------------------------------------------------------------------------------------------


def vera_kaiming(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's ``vera.model._kaiming_init``: uniform in +-sqrt(3) * sqrt(2) / sqrt(fan_in), fan_in = shape[1]."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    with torch.no_grad():
        return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def vera_projection(r: int, shapes: Sequence[tuple[int, int]], key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The shared frozen ``A`` (r x largest in) and ``B`` (largest out x r) for layers of ``shapes`` (out, in),
    drawn from ``key`` on the CPU as PEFT draws them (``VeraConfig.projection_prng_key``)."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    largest_out, largest_in = max(s[0] for s in shapes), max(s[1] for s in shapes)
    vera_a = vera_kaiming((r, largest_in), generator)
    vera_b = vera_kaiming((largest_out, r), generator)
    return vera_a, vera_b


class VeRALinear(LoRALinear):
    """VeRA (PEFT's ``VeraConfig``): shared frozen random ``A``/``B``, trainable ``lambda_d`` (r) and ``lambda_b``
    (out). ``lambda_b`` starts at zero, so step 0 is the base model. No ``lora_a``/``lora_b`` and no scaling.

    ``vera_a``/``vera_b`` are non-persistent buffers viewing the shared projection (one copy in memory).
    """

    variant = "vera"

    def __init__(
        self,
        base: nn.Module,
        r: int,
        projection: tuple[torch.Tensor, torch.Tensor],
        dropout: float = 0.0,
        dtype: torch.dtype = torch.float32,
        alpha: float = 1.0,
        projection_prng_key: int = 0,
    ) -> None:
        nn.Module.__init__(self)  # LoRALinear's A/B are not made: VeRA's are shared and frozen
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora, self.scaling = r, alpha, False, 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.disabled = False
        vera_a, vera_b = projection
        self.projection = projection  # the shared pair itself, saved once as base_model.vera_A / vera_B
        self.projection_prng_key = projection_prng_key  # the seed it was drawn from (adapter_config.json)
        self.register_buffer("vera_a", vera_a[:, : self.in_features], persistent=False)
        self.register_buffer("vera_b", vera_b[: self.out_features], persistent=False)
        self.vera_lambda_d = nn.Parameter(torch.full((r,), VERA_D_INITIAL, dtype=dtype, device=vera_a.device))
        self.vera_lambda_b = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=vera_a.device))

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            self.vera_lambda_d.fill_(VERA_D_INITIAL)
            self.vera_lambda_b.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        ld, lb = self.vera_lambda_d, self.vera_lambda_b
        a, b = self.vera_a.to(ld.dtype), self.vera_b.to(ld.dtype)
        if _fused(self, x, ld.dtype):
            p, seed = _dropout_args(self)
            bias = getattr(self.base, "bias", None)
            return _VeRAFunction.apply(x, ld, lb, a, b, self.base, bias, p, seed)
        out = self.base(x)
        delta = lb * nn.functional.linear(ld * nn.functional.linear(self.dropout(x.to(ld.dtype)), a), b)
        return out + delta.to(out.dtype)

    def peft_tensors(self) -> dict[str, torch.Tensor]:
        return {"vera_lambda_b": self.vera_lambda_b, "vera_lambda_d": self.vera_lambda_d}

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return vera_merge(weight, self.vera_a, self.vera_b, self.vera_lambda_d, self.vera_lambda_b)

    def extra_repr(self) -> str:
        return f"r={self.r}, vera"


class _VeRAFunction(torch.autograd.Function):
    """VeRA's forward as one node. Saved: ``x``, ``h = drop(x) A^T`` (r wide), the lambdas, A and B; no ``W``."""

    @staticmethod
    def forward(ctx, x, lambda_d, lambda_b, vera_a, vera_b, base, bias, p, seed):  # type: ignore[override]
        ctx.base, ctx.p, ctx.seed = base, p, seed
        x2 = x.reshape(-1, x.shape[-1])
        bias = None if bias is None else bias.to(x.dtype)
        out = torch.nn.functional.linear(x2, _frozen_base_weight(base)(x.dtype), bias)
        h = _adapter_input(x2, vera_a, p, seed)
        out.addcmul_((h * lambda_d) @ vera_b.t(), lambda_b)
        ctx.save_for_backward(x, h, lambda_d, lambda_b, vera_a, vera_b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, h, lambda_d, lambda_b, vera_a, vera_b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_lb = None
        if ctx.needs_input_grad[2]:  # d y / d lambda_b = B (lambda_d * h), recomputed (output-sized)
            grad_lb = (g * ((h * lambda_d) @ vera_b.t())).sum(0)
        g_hd = (g * lambda_b) @ vera_b  # d loss / d (lambda_d * h), r wide
        grad_ld = (g_hd * h).sum(0) if ctx.needs_input_grad[1] else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            _, grad_x = _adapter_input_grads(ctx, x2, vera_a, g_hd * lambda_d, 3)
            grad_x = grad_x.addmm_(g, _frozen_base_weight(ctx.base)(g.dtype)).view(x.shape)
        return grad_x, grad_ld, grad_lb, None, None, None, None, None, None
