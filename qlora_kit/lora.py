"""LoRA adapters: ``LoRALinear``, ``add_lora``, and the pure functions around them.

    y = base(x) + scaling * B(A(dropout(x)))      scaling = alpha / r   (rsLoRA: alpha / sqrt(r))

``base`` is a frozen ``NF4Linear`` in training, or a dense ``nn.Linear`` (the parity tests use one holding
the dequantized weight). A is Kaiming-uniform and B is zero, so a freshly adapted model computes exactly
what its base computes: step 0 is the base model.

On disk adapters use PEFT's layout and key names, so ``peft.PeftModel.from_pretrained`` and serving
stacks that read that layout load them; ``peft`` itself is never imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_kit.architecture import decoder_linear_names
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import LORA_VARIANTS, select_targets
from qlora_kit.quant import NF4Linear


def lora_scaling(alpha: float, r: int, use_rslora: bool = False) -> float:
    """The factor on ``B @ A``: alpha/r, or alpha/sqrt(r) for rank-stabilized LoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


class LoRALinear(nn.Module):
    variant = "lora"  # lora.variant: DoRALinear and VeRALinear (lora_variants) say theirs

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.base = base
        self.in_features: int = base.in_features
        self.out_features: int = base.out_features
        self.r = r
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(alpha, r, use_rslora)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = next(base.buffers(), next(base.parameters(), None))
        device = device.device if device is not None else None
        self.lora_a = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.disabled = False  # True: behave exactly like the base layer
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))  # nn.Linear's own init, as in PEFT
        nn.init.zeros_(self.lora_b.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base(x)
        p = self.dropout.p if self.training and isinstance(self.dropout, nn.Dropout) else 0.0
        a, b = self.lora_a.weight, self.lora_b.weight
        if _frozen_base_weight(self.base) is not None and a.dtype == x.dtype:
            # One autograd node for base + adapter: see _LoRAFunction. The dropout seed comes from torch's
            # global RNG, so seeding, checkpoint/resume and gradient checkpointing's recompute all see it.
            seed = int(torch.randint(2**62, (), dtype=torch.int64)) if p > 0 else 0
            bias = getattr(self.base, "bias", None)
            return _LoRAFunction.apply(x, a, b, self.base, bias, self.scaling, p, seed)
        out = self.base(x)  # any other base, or adapters in another dtype than the input: plain modules
        lora = self.lora_b(self.lora_a(self.dropout(x.to(self.lora_a.weight.dtype))))
        return out + (self.scaling * lora).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"

    # What the PEFT-layout state dict and the merge read (the variants in lora_variants override them).
    def peft_tensors(self) -> dict[str, torch.Tensor]:
        """This layer's adapter tensors under PEFT's key suffixes (``lora_A.weight``, ...).

        After a PiSSA/LoftQ init (``init_a``/``init_b`` set, see ``lora_init``) they are written as PEFT's own
        conversion writes them: the rank-2r LoRA ``[A; A0]``, ``[B, -B0]`` whose ``B'A' = BA - B0A0`` applies to the
        ORIGINAL base weight (alpha doubles with r, so the scaling stays; see ``adapter.AdapterConfig``).
        """
        a, b = self.lora_a.weight, self.lora_b.weight
        if getattr(self, "init_a", None) is not None:
            a = torch.cat([a.detach(), self.init_a.to(a.dtype)], dim=0)
            b = torch.cat([b.detach(), -self.init_b.to(b.dtype)], dim=1)
        return {"lora_A.weight": a, "lora_B.weight": b}

    @torch.no_grad()
    def load_peft_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy what ``peft_tensors`` names into this layer (the trained first r of a converted PiSSA/LoftQ pair)."""
        converted = getattr(self, "init_a", None) is not None
        for suffix, ours in self.peft_tensors().items():
            tensor = tensors[suffix]
            if converted and suffix == "lora_A.weight":
                self.lora_a.weight.copy_(tensor[: self.r])
            elif converted and suffix == "lora_B.weight":
                self.lora_b.weight.copy_(tensor[:, : self.r])
            else:
                ours.copy_(tensor)

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the base's dense weight) with this adapter merged in, in fp32."""
        return merge_lora_weight(weight, self.lora_a.weight, self.lora_b.weight, self.scaling)


def _frozen_base_weight(base: nn.Module) -> Callable[[torch.dtype], torch.Tensor] | None:
    """How ``_LoRAFunction`` gets the base's dense weight, or None where it cannot be used for ``base``."""
    bias = getattr(base, "bias", None)
    if bias is not None and bias.requires_grad:
        return None
    if isinstance(base, NF4Linear):
        return base.dequantize
    if type(base) is nn.Linear and not base.weight.requires_grad:
        return lambda dtype: base.weight.to(dtype)
    return None


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """A bool mask of the elements to drop (each with probability ``p``) and the scale for those kept.

    Same distribution as ``nn.Dropout`` (independent per element), drawn as 16-bit uniforms from a generator
    seeded with ``seed``, so backward can draw it again instead of keeping it. ``p`` is rounded to a multiple
    of 2**-16 (0.05 -> 0.0500031) and the scale is the exact inverse of the keep probability, so the output is
    unbiased. Why not ``bernoulli_``: on CPU it costs ~8 ms per million elements (a 135M model's LoRA
    dropout took a fifth of the training step); 64 random bits per draw here give four elements for one.
    """
    numel = math.prod(shape)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None, generator=generator)
    dropped = round(p * 65536)
    mask = words.view(torch.int16)[:numel].view(shape) < (dropped - 32768)
    return mask, 65536 / (65536 - dropped)


class _LoRAFunction(torch.autograd.Function):
    """``y = x W^T + b + scaling * dropout(x) A^T B^T`` for a frozen ``W``, as one autograd node.

    Saved for backward: ``x`` (one tensor for all the adapters that read it: q/k/v, gate/up), ``h =
    dropout(x) A^T`` (r wide), A and B; never ``W`` (dequantized again in backward, as ``_NF4Matmul`` does),
    no dropped copy of ``x`` and no dropout mask (both drawn again from the seed). The plain-module path
    would keep a dropped copy of ``x`` and a mask per adapter, and add the adapter's output through three
    output-sized temporaries; this one adds it in place (``addmm_``).
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, base, bias, scaling, p, seed):  # type: ignore[override]
        ctx.base, ctx.scaling, ctx.p, ctx.seed = base, scaling, p, seed
        x2 = x.reshape(-1, x.shape[-1])
        bias = None if bias is None else bias.to(x.dtype)
        out = torch.nn.functional.linear(x2, _frozen_base_weight(base)(x.dtype), bias)
        if p > 0:  # the keep scale goes on the r-wide h, not on the input-sized dropped x
            mask, keep_scale = dropout_mask(x2.shape, p, seed, x.device)
            h = (x2.masked_fill(mask, 0) @ lora_a.t()).mul_(keep_scale)
            del mask
        else:
            h = x2 @ lora_a.t()
        out.addmm_(h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, h, lora_a, lora_b)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, h, lora_a, lora_b = ctx.saved_tensors
        x2 = x.reshape(-1, x.shape[-1])
        g = grad_out.reshape(-1, grad_out.shape[-1])
        mask, keep_scale = None, 1.0
        if ctx.p > 0:
            mask, keep_scale = dropout_mask(x2.shape, ctx.p, ctx.seed, x.device)
        # d loss / d h, times the dropout keep scale (applied here, r wide, instead of on the dropped x)
        grad_h = (g @ lora_b).mul_(ctx.scaling * keep_scale)  # (tokens, r)
        grad_b = (g.t() @ h).mul_(ctx.scaling) if ctx.needs_input_grad[2] else None
        grad_a = None
        if ctx.needs_input_grad[1]:
            grad_a = grad_h.t() @ (x2 if mask is None else x2.masked_fill(mask, 0))
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_h @ lora_a
            if mask is not None:
                grad_x.masked_fill_(mask, 0)
            grad_x.addmm_(g, _frozen_base_weight(ctx.base)(g.dtype))
            grad_x = grad_x.view(x.shape)
        return grad_x, grad_a, grad_b, None, None, None, None, None


@dataclass
class LoRAReport:
    """What ``add_lora`` did."""

    adapted: list[str] = field(default_factory=list)  # full module names now wrapped in LoRALinear
    trainable_params: int = 0
    total_params: int = 0  # counts each 4-bit weight as its number of values, not its bytes

    def __str__(self) -> str:
        pct = 100 * self.trainable_params / max(self.total_params, 1)
        return (
            f"LoRA on {len(self.adapted)} linears: trainable params {self.trainable_params:,} "
            f"|| all params {self.total_params:,} || trainable {pct:.3f}%"
        )


def resolve_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the linears ``targets`` selects: a preset name or explicit (leaf or dotted) names."""
    return select_targets(targets, decoder_linear_names(model))


def add_lora(
    model: nn.Module,
    targets: str | Iterable[str] = "all-linear",
    r: int = 16,
    alpha: float = 32.0,
    dropout: float = 0.05,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    variant: str = "lora",
    projection_prng_key: int = 0,
    around: Callable[[nn.Module], AbstractContextManager] | None = None,
) -> LoRAReport:
    """Freeze ``model`` and wrap each target linear in a ``LoRALinear`` (in place): plain LoRA, or the
    ``variant`` "dora" / "vera" (``lora_variants``; VeRA's shared matrices are drawn from ``projection_prng_key``).
    ``around(base)``: a context each linear is wrapped in (weight streaming puts its layer's weights on the
    device there, for DoRA's initial norms: ``offload.Offload.weights_ready``)."""
    if r <= 0:
        raise QloraKitError(f"LoRA rank r must be > 0, got {r}")
    names = resolve_targets(model, targets)
    model.requires_grad_(False)
    make = _layer_maker(model, names, r, variant, projection_prng_key)
    wrap_linears(model, names, r, alpha, dropout, use_rslora, dtype, make, around)
    return lora_report(model, names)


def wrap_linears(
    model: nn.Module,
    names: Iterable[str],
    r: int,
    alpha: float,
    dropout: float,
    use_rslora: bool,
    dtype: torch.dtype,
    make: Callable[..., LoRALinear] = LoRALinear,
    around: Callable[[nn.Module], AbstractContextManager] | None = None,
) -> None:
    """Wrap each linear ``names`` lists in a ``make`` layer, in order (each draws its A from torch's RNG)."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        with around(base) if around is not None else nullcontext():
            setattr(parent, child, make(base, r, alpha, dropout, use_rslora, dtype))


def lora_report(model: nn.Module, adapted: list[str]) -> LoRAReport:
    """The counts of a model with adapters: each 4-bit weight counts as its number of values, whether its NF4
    storage is held as buffers or (sharded by FSDP2) as frozen parameters."""
    report = LoRAReport(adapted=adapted)
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NF4Linear):
            report.total_params += module.in_features * module.out_features
            seen.update(id(t) for t in module.parameters(recurse=False) if t is not module.bias)
    for param in model.parameters():
        if id(param) not in seen:
            seen.add(id(param))
            report.total_params += param.numel()
            report.trainable_params += param.numel() if param.requires_grad else 0
    return report


def _layer_maker(model: nn.Module, names: list[str], r: int, variant: str, key: int) -> Callable[..., LoRALinear]:
    """The constructor of ``variant``'s layers (the variants live in ``lora_variants``, which imports this module)."""
    from qlora_kit import lora_variants

    if variant == "lora":
        return LoRALinear
    if variant == "dora":
        return lora_variants.DoRALinear
    if variant == "vera":  # one shared pair for all the layers, on the device of their base weights
        shapes = [(m.out_features, m.in_features) for m in map(model.get_submodule, names)]
        held = next(model.get_submodule(names[0]).buffers(), next(model.get_submodule(names[0]).parameters(), None))
        projection = tuple(t.to(held.device) for t in lora_variants.vera_projection(r, shapes, key))
        return lambda base, r, alpha, dropout, use_rslora, dtype: lora_variants.VeRALinear(
            base, r, projection, dropout, dtype, alpha, key
        )
    raise QloraKitError(f"unknown LoRA variant {variant!r}; use one of {', '.join(LORA_VARIANTS)}")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def set_lora_enabled(model: nn.Module, enabled: bool) -> None:
    for layer in lora_layers(model).values():
        layer.disabled = not enabled


# --- state dicts in PEFT's layout ---------------------------------------------------------------------
# PEFT names the weights of our `model.layers.0.self_attn.q_proj.lora_a.weight`
# `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.

PEFT_PREFIX = "base_model.model."
VERA_A_KEY, VERA_B_KEY = "base_model.vera_A", "base_model.vera_B"  # VeRA's shared projection, saved once


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names (each layer's ``peft_tensors``; VeRA's shared projection
    under ``base_model.vera_A`` / ``base_model.vera_B``, as PEFT saves it with ``save_projection=True``)."""
    state: dict[str, torch.Tensor] = {}
    for name, layer in lora_layers(model).items():
        for suffix, tensor in layer.peft_tensors().items():
            state[f"{PEFT_PREFIX}{name}.{suffix}"] = tensor.detach()
        projection = getattr(layer, "projection", None)
        if projection is not None:
            state[VERA_A_KEY], state[VERA_B_KEY] = (t.detach() for t in projection)
    return state


def _peft_key_on_disk(key: str) -> str:
    """PEFT's in-memory key (with the adapter name ``default``) as it is on disk."""
    return key.replace(".default.weight", ".weight").removesuffix(".default")


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Copy PEFT-keyed adapter weights into the model's adapter layers; shapes and names must match."""
    layers = lora_layers(model)
    expected = lora_state_dict(model)
    state = {_peft_key_on_disk(k): v for k, v in state.items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} not in the model (e.g. {unexpected[0]})")
        raise QloraKitError(
            f"{source} does not match this model's LoRA layers: {'; '.join(details)}. "
            "Check that the adapter was trained on this base model with the same target modules and variant."
        )
    for key, ours in expected.items():
        if state[key].shape != ours.shape:
            raise QloraKitError(
                f"{source}: {key.removeprefix(PEFT_PREFIX)} has shape {tuple(state[key].shape)} but the model needs "
                f"{tuple(ours.shape)}; the adapter was trained on a different base model or rank"
            )
    with torch.no_grad():
        for name, layer in layers.items():
            prefix = f"{PEFT_PREFIX}{name}."
            layer.load_peft_tensors({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            projection = getattr(layer, "projection", None)
            if projection is not None:  # the layers' buffers view these: one copy for all
                projection[0].copy_(state[VERA_A_KEY])
                projection[1].copy_(state[VERA_B_KEY])


def merge_lora_weight(
    base_weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``W + scaling * B @ A`` computed in fp32 (the caller casts to the output dtype).

    One fused ``addmm``: no separate ``B @ A`` temporary of the weight's size (the export's working set).
    """
    return torch.addmm(base_weight.float(), lora_b.float(), lora_a.float(), alpha=scaling)
