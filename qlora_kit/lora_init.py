"""SVD-based LoRA init that cancels part of the 4-bit error: PiSSA and LoftQ, computed while loading.

    PiSSA  A0, B0 = the top-r singular directions of W (s B0 A0 = U_r S_r V_r^T); the base is nf4(W - s B0 A0)
    LoftQ  for t in 1..T: Q = nf4(W - s B A) (B A = 0 at t = 1); A, B = SVD_r((W - deq(Q)) / s); the base is Q

Both are done by ``SVDInit``, a hook ``loading.load_model`` calls on each target linear's 16-bit weight as it
is read (before it is quantized): the hook returns what to quantize and keeps (A0, B0); ``apply_init`` then
puts them into the adapter layers. ``torch.svd_lowrank`` (randomized) runs under a fixed seed, so the same
weight on the same kind of device gives the same A0, B0 and residual: merged export (``residual_weight``)
recomputes exactly the base training saw, from the original checkpoint.

Saved adapters are PEFT's conversion of them (``LoRALinear.peft_tensors``): a rank-2r LoRA whose
``B'A' = BA - B0A0`` applies to the ORIGINAL base weight, so any PEFT-reading stack can use it; over the dense
original base it computes ``W - s B0A0 + s BA``, i.e. the trained adapters over the dense (unquantized)
residual. What training computed is ``nf4(residual) + s BA``: merged export gives that, and so does
``generate`` over the 16-bit base (``ResidualHook``). qlora_kit.json records the init (method, r, iters, seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from qlora_kit.adapter import INIT_KEY, Adapter
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import select_targets
from qlora_kit.lora import lora_layers
from qlora_kit.quant import NF4Linear

SVD_OVERSAMPLE = 8  # extra columns torch.svd_lowrank computes beyond r (its accuracy grows with them)
SVD_NITER = 4  # subspace iterations of torch.svd_lowrank


def _top_r(matrix: torch.Tensor, r: int, scaling: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with ``s B0 A0`` the best rank-r approximation of ``matrix`` (randomized SVD, seeded)."""
    q = min(r + SVD_OVERSAMPLE, *matrix.shape)
    devices = [matrix.device] if matrix.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(matrix, q=q, niter=SVD_NITER)
    root = (s[:r] / scaling).sqrt()
    return root.unsqueeze(1) * v[:, :r].t(), u[:, :r] * root  # A0 (r, in), B0 (out, r)


def init_residual(
    weight: torch.Tensor, r: int, scaling: float, method: str, iters: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(what to quantize as the base, A0, B0) for one 16-bit ``weight``, all fp32 on its device."""
    w = weight.float()
    if method == "pissa":
        a0, b0 = _top_r(w, r, scaling, seed)
        return torch.addmm(w, b0, a0, alpha=-scaling), a0, b0
    if method != "loftq":
        raise ValueError(f"unknown init {method!r}")
    residual = w
    for _ in range(iters):
        error = w - NF4Linear.from_weight(residual).dequantize(torch.float32)
        a0, b0 = _top_r(error, r, scaling, seed)
        last, residual = residual, torch.addmm(w, b0, a0, alpha=-scaling)
    return last, a0, b0


@dataclass
class SVDInit:
    """The load-time hook: ``hook(name, weight) -> weight to quantize`` for the linears ``targets`` selects."""

    targets: object  # str | list[str], as lora.targets
    r: int
    scaling: float
    method: str
    iters: int = 1
    seed: int = 0
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A0, B0)
    _selected: set[str] | None = None

    def select(self, linear_names: list[str]) -> None:
        self._selected = set(select_targets(self.targets, linear_names))

    def __call__(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        if self._selected is not None and module_name not in self._selected:
            return weight
        residual, a0, b0 = init_residual(weight, self.r, self.scaling, self.method, self.iters, self.seed)
        self.pairs[module_name] = (a0, b0)
        return residual  # fp32: the residual is quantized from full precision, not rounded to 16 bits first

    def metadata(self) -> dict:
        return {"method": self.method, "r": self.r, "iters": self.iters, "seed": self.seed}


@torch.no_grad()
def apply_init(model: nn.Module, init: SVDInit) -> int:
    """Start each adapted layer at its (A0, B0) and keep them (``init_a``/``init_b``, not trained, not in the
    state dict) for the conversion on save. Returns the number of layers initialized."""
    layers = lora_layers(model)
    for name, (a0, b0) in init.pairs.items():
        layer = layers[name]
        layer.lora_a.weight.copy_(a0)
        layer.lora_b.weight.copy_(b0)
        layer.register_buffer("init_a", a0.to(layer.lora_a.weight.dtype), persistent=False)
        layer.register_buffer("init_b", b0.to(layer.lora_b.weight.dtype), persistent=False)
        layer.init_info = init.metadata()
    return len(init.pairs)


def residual_weight(weight: torch.Tensor, info: dict, scaling: float) -> torch.Tensor:
    """The base weight a PiSSA/LoftQ run quantized, recomputed from the original ``weight`` (export)."""
    return init_residual(weight, int(info["r"]), scaling, info["method"], int(info["iters"]), int(info["seed"]))[0]


def make_svd_init(lora, name_or_path: str, dtype: torch.dtype) -> SVDInit | None:
    """The load-time hook ``lora`` (a ``config.LoRAConfig``) asks for, targets resolved on the model's skeleton."""
    if lora.init == "default":
        return None
    from qlora_kit.architecture import decoder_linear_names
    from qlora_kit.loading import build_skeleton, load_config
    from qlora_kit.lora import lora_scaling
    from qlora_kit.models import resolve_model_dir

    skeleton = build_skeleton(load_config(resolve_model_dir(str(name_or_path))), dtype)  # meta: no memory
    hook = SVDInit(lora.targets, lora.r, lora_scaling(lora.alpha, lora.r, lora.use_rslora), lora.init, lora.init_iters)
    hook.select(decoder_linear_names(skeleton))
    return hook


def finish_svd_init(model: nn.Module, init: SVDInit, name_or_path: str) -> None:
    """``apply_init``, refusing a base whose weights never passed the hook (a checkpoint stored in 4 bits)."""
    missing = sorted(set(lora_layers(model)) - set(init.pairs))
    if missing:
        raise QloraKitError(
            f"lora.init={init.method} needs each target layer's 16-bit weight while loading, and {name_or_path} "
            f"gave none for {len(missing)} of them (e.g. {missing[0]}): it is stored in 4 bits. Use a 16-bit "
            "checkpoint of the model, or lora.init=default"
        )
    apply_init(model, init)


class ResidualHook:
    """Loading a PiSSA/LoftQ adapter's base for inference as training had it: ``hook(name, weight)`` turns each
    adapted module's 16-bit weight into the residual training quantized (``Adapter.residual``); after
    ``load_adapter``, ``keep_trained(model)`` drops the conversion's ``-B0 A0`` half of the layers whose base
    went through the hook, so they compute ``nf4(residual) + s B A``, exactly the trained model. A base that
    never passes the hook (already 4-bit, or loaded dense) keeps the conversion: PEFT's meaning over W."""

    def __init__(self, adapter: Adapter) -> None:
        self.modules = set(adapter.modules())
        self.residual = adapter.residual()
        self.trained_r = int(adapter.metadata[INIT_KEY]["r"])
        self.done: set[str] = set()

    def __call__(self, module_name: str, weight: torch.Tensor) -> torch.Tensor:
        if module_name not in self.modules:
            return weight
        self.done.add(module_name)
        return self.residual(weight)

    @torch.no_grad()
    def keep_trained(self, model: nn.Module) -> None:
        layers = lora_layers(model)
        for name in self.done:
            layers[name].lora_b.weight[:, self.trained_r :] = 0
