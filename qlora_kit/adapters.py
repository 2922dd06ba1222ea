"""Many adapters on one base: load several, switch between them per request, stack a frozen one under training.

    load_adapter(model, dir, name="a")   that adapter's own wrapper layers around the model's frozen base modules
    set_adapter(model, "a")              its wrappers go into the module tree (the others' come out)
    disable_adapters(model)              the bare base modules go back: the base model itself

Each adapter's wrappers (``LoRALinear`` today: whatever ``adapter.load_adapter`` builds) wrap the **same** base
modules: the ``NF4Linear`` objects are shared, never copied, so an extra adapter costs only its own tensors,
switching is a few ``setattr`` calls (no copy, no reload of the base), and the active adapter's forward is the
single-adapter path exactly (no per-forward dispatch). Inactive wrappers live outside the module tree, in a plain
registry on the model: ``model.to(...)`` does not move them (they are made on their base's device), and
``model.train()``/``eval()`` reach them when they are switched in (``set_adapter`` gives them the model's mode).

Stacking (``lora.base_adapters``): ``stack_adapters`` folds frozen LoRA adapters into the base layers they
target as ``StackedNF4Linear``: an ``NF4Linear`` sharing the original's 4-bit buffers whose ``dequantize`` is
``dequant(W) + sum(scaling_i * B_i @ A_i)`` in fp32. Everything that reads a base weight through ``dequantize``
(the LoRA autograd node, ``fold_lora``) then sees the stacked weight, and a new adapter trained on top learns
against exactly what export merges: ``dequant(W) + the frozen deltas + the new delta``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from qlora_kit import adapter as adapter_files
from qlora_kit.embeddings import bare_module, embedding_paths
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import LoRALinear, lora_layers, lora_scaling
from qlora_kit.quant import NF4Linear

REGISTRY_ATTR = "_qlora_kit_adapters"  # a plain attribute on the model (not a submodule)
DEFAULT_NAME = "default"


@dataclass
class AdapterRegistry:
    """What ``load_adapter`` loaded into one model: per name, module path -> that adapter's wrapper."""

    bases: dict[str, nn.Module] = field(default_factory=dict)  # module path -> the shared base module
    wrappers: dict[str, dict[str, nn.Module]] = field(default_factory=dict)  # name -> path -> wrapper
    configs: dict[str, adapter_files.AdapterConfig] = field(default_factory=dict)
    directories: dict[str, Path] = field(default_factory=dict)
    active: str | None = None


def registry(model: nn.Module) -> AdapterRegistry:
    """The model's adapter registry (an empty one on first use)."""
    found = model.__dict__.get(REGISTRY_ATTR)
    if found is None:
        found = AdapterRegistry()
        model.__dict__[REGISTRY_ATTR] = found  # not nn.Module.__setattr__: no submodule, no state_dict entry
    return found


def _place(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_name, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def adapter_names(model: nn.Module) -> list[str]:
    return list(registry(model).wrappers)


def active_adapter(model: nn.Module) -> str | None:
    """The name of the adapter in the module tree, or None (the base model, or no adapter loaded)."""
    return registry(model).active


def disable_adapters(model: nn.Module) -> None:
    """Put the bare base modules back: the model computes what its base computes."""
    reg = registry(model)
    for path, base in reg.bases.items():
        _place(model, path, base)
    reg.active = None


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` the model's adapter: its wrappers into the module tree, every other position bare."""
    reg = registry(model)
    if name not in reg.wrappers:
        loaded = ", ".join(reg.wrappers) or "none"
        raise QloraKitError(f"no adapter named {name!r} is loaded (loaded: {loaded}); load it with load_adapter")
    disable_adapters(model)
    for path, wrapper in reg.wrappers[name].items():
        if wrapper.training != model.training:  # it was outside the tree while the model's mode changed
            wrapper.train(model.training)  # (skipped otherwise: the recursion is half of a switch's time)
        _place(model, path, wrapper)
    reg.active = name


def load_adapter(
    model: nn.Module,
    adapter: str | Path | adapter_files.Adapter,
    dtype: torch.dtype | None = None,
    *,
    name: str | None = None,
    activate: bool | None = None,
) -> adapter_files.AdapterConfig:
    """Load an adapter dir (or what ``adapter.read_adapter`` read) into ``model`` under ``name``.

    Its wrappers wrap the model's frozen base modules, shared with every other loaded adapter. ``name``:
    default ``"default"``. ``activate``: make it the active adapter; default: only when it is the first one
    (as PEFT's ``load_adapter``). ``dtype``: of the adapter weights (default: as stored).
    """
    reg = registry(model)
    name = DEFAULT_NAME if name is None else name
    if not name or name in {"off", "none"}:
        raise QloraKitError(f"{name!r} cannot name an adapter (it is empty or means 'no adapter'); choose another")
    if name in reg.wrappers:
        raise QloraKitError(
            f"an adapter named {name!r} is already loaded (from {reg.directories[name]}); give this one another "
            "name (load_adapter(..., name=...), or --adapter NAME=DIR)"
        )
    if not isinstance(adapter, adapter_files.Adapter):
        adapter = adapter_files.read_adapter(adapter)
    _check_embeddings_alone(reg, adapter, name)
    previous = reg.active
    disable_adapters(model)
    stray = lora_layers(model)
    if stray:  # added with add_lora or adapter.load_adapter, outside the registry: we could not switch them out
        raise QloraKitError(
            f"the model already has LoRA layers outside qlora_kit.adapters (e.g. {next(iter(stray))}); load every "
            "adapter of a model with qlora_kit.adapters.load_adapter (or qlora_kit.load_adapter), or start from "
            "a fresh base model"
        )
    try:
        config = adapter_files.load_adapter(model, adapter, dtype=dtype)
        wrappers = _wrappers_in_tree(model)
        for path, wrapper in wrappers.items():
            base = _bare(wrapper)
            if reg.bases.setdefault(path, base) is not base and isinstance(wrapper, LoRALinear):
                raise QloraKitError(f"internal: {path}'s base module changed between adapters")  # never expected
            reg.bases[path] = base  # an embedding's: the resized one, when the adapter grew the vocabulary
    except BaseException:  # nothing of it stays in the model; the adapter that was active is again
        _take_out_added(model)
        if previous is not None:
            set_adapter(model, previous)
        raise
    _take_out_added(model)  # the registry puts it in below, when it is to be active
    reg.wrappers[name], reg.configs[name], reg.directories[name] = wrappers, config, adapter.directory
    if activate or (activate is None and previous is None and len(reg.wrappers) == 1):
        set_adapter(model, name)
    elif previous is not None:
        set_adapter(model, previous)
    return config


def _wrappers_in_tree(model: nn.Module) -> dict[str, nn.Module]:
    """The adapter modules in the module tree: LoRA layers, and trainable embeddings (tokens, saved modules)."""
    found: dict[str, nn.Module] = dict(lora_layers(model))
    for path in embedding_paths(model):
        module = model.get_submodule(path)
        if bare_module(module) is not module:
            found[path] = module
    return found


def _bare(wrapper: nn.Module) -> nn.Module:
    return wrapper.base if isinstance(wrapper, LoRALinear) else bare_module(wrapper)


def _take_out_added(model: nn.Module) -> None:
    """Every adapter module out of the tree (also those of a load that failed half-way), bases in."""
    for path, wrapper in _wrappers_in_tree(model).items():
        _place(model, path, _bare(wrapper))
    disable_adapters(model)


def _check_embeddings_alone(reg: AdapterRegistry, adapter: adapter_files.Adapter, name: str) -> None:
    """An adapter that trains embeddings (new tokens: another vocabulary) is loaded alone: the others would
    share a base whose vocabulary it changed."""
    with_embeddings = [n for n, config in reg.configs.items() if config.embeddings]
    if reg.wrappers and (adapter.config.embeddings or with_embeddings):
        which = f"{name!r} ({adapter.directory})" if adapter.config.embeddings else repr(with_embeddings[0])
        raise QloraKitError(
            f"adapter {which} trains embeddings (lora.trainable_tokens or lora.modules_to_save), which change "
            "the vocabulary or the embeddings every other adapter would share; load it alone"
        )


def adapter_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the tensors that adapter ``name`` holds beyond the shared base (its parameters and buffers)."""
    reg = registry(model)
    base_tensors = {id(t) for base in reg.bases.values() for t in (*base.parameters(), *base.buffers())}
    seen: set[int] = set()
    total = 0
    for wrapper in reg.wrappers[name].values():
        for tensor in (*wrapper.parameters(), *wrapper.buffers()):
            if id(tensor) not in base_tensors and id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel() * tensor.element_size()
    return total


# --- stacking: frozen adapters folded into the base ----------------------------------------------------------


class StackedNF4Linear(NF4Linear):
    """An ``NF4Linear`` whose weight is ``dequant(W) + sum(scaling_i * B_i @ A_i)`` for frozen adapters ``i``.

    It shares the 4-bit buffers of the layer it stacks on (no copy) and holds the frozen A/B pairs as buffers
    (in the dtype they were saved in; they are never trained). ``dequantize`` adds the deltas in fp32, as
    export merges them, so a LoRA trained over this layer sees what the export computes.
    """

    def __init__(self, base: NF4Linear) -> None:
        nn.Module.__init__(self)  # not NF4Linear.__init__: the buffers are the base's own tensors
        self.in_features, self.out_features = base.in_features, base.out_features
        for buffer_name in ("codes", "absmax_codes", "absmax_scales", "absmax_offset"):
            self.register_buffer(buffer_name, getattr(base, buffer_name))
        self.bias = base.bias
        self.scalings: list[float] = []

    def add_delta(self, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> None:
        index = len(self.scalings)
        self.register_buffer(f"stacked_a{index}", lora_a.detach().to(self.codes.device))
        self.register_buffer(f"stacked_b{index}", lora_b.detach().to(self.codes.device))
        self.scalings.append(scaling)

    def deltas(self) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
        return [
            (getattr(self, f"stacked_a{i}"), getattr(self, f"stacked_b{i}"), s) for i, s in enumerate(self.scalings)
        ]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        weight = super().dequantize(torch.float32)
        for lora_a, lora_b, scaling in self.deltas():
            weight.addmm_(lora_b.float(), lora_a.float(), alpha=scaling)
        return weight.to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, + {len(self.scalings)} frozen adapter(s)"


def read_stack(directories: Sequence[str | Path]) -> list[adapter_files.Adapter]:
    """The adapters in ``directories`` (adapter or run dirs) read and checked, each preceded by the adapters it
    was itself stacked on (``stacked_base_adapters``), each once: the order ``stack_adapters`` folds them in."""
    read: dict[Path, adapter_files.Adapter] = {}
    for directory in directories:
        adapter = adapter_files.read_adapter(adapter_files.find_adapter_dir(Path(directory)))
        for below in stacked_base_adapters(adapter):
            if below not in read:
                read[below] = adapter_files.read_adapter(below)
        read.setdefault(adapter.directory.resolve(), adapter)
    return list(read.values())


def _check_stackable(adapter: adapter_files.Adapter) -> None:
    """A frozen stack holds plain LoRA deltas (``scaling * B @ A``) and nothing else: refuse what it would drop."""
    config = adapter.config
    variant = getattr(config, "variant", "lora")  # LoRA variants (DoRA, VeRA) are not an additive B @ A
    problem = None
    if config.embeddings:
        problem = "it trains embeddings (trainable tokens / modules_to_save), which a stack does not carry"
    elif variant != "lora" or getattr(config, "use_dora", False):
        problem = f"it is a {variant if variant != 'lora' else 'DoRA'} adapter, not a plain LoRA delta"
    if problem:
        raise QloraKitError(
            f"base adapter {adapter.directory} cannot be stacked under a new adapter: {problem}; "
            "lora.base_adapters takes plain LoRA adapters"
        )


def stack_adapters(model: nn.Module, stack: Sequence[str | Path | adapter_files.Adapter]) -> list[Path]:
    """Fold frozen LoRA adapters (dirs, or what ``read_stack`` read) into the NF4 layers they target, in place,
    in order. Call before ``add_lora``: the new adapter then wraps the stacked layers. Each adapter must fit
    this base (its modules are NF4 decoder linears of its shapes). Returns their dirs, resolved (the record
    a stacked adapter keeps in its qlora_kit.json)."""
    if not all(isinstance(a, adapter_files.Adapter) for a in stack):
        stack = read_stack([a.directory if isinstance(a, adapter_files.Adapter) else a for a in stack])
    for adapter in stack:  # every adapter checked before the model is touched: a refusal changes nothing
        _check_stackable(adapter)
        for path, (lora_a, lora_b) in adapter.pairs().items():
            try:
                layer = model.get_submodule(path)
            except AttributeError:
                layer = None
            shape = (lora_b.shape[0], lora_a.shape[1])
            if not isinstance(layer, NF4Linear) or (layer.out_features, layer.in_features) != shape:
                raise QloraKitError(
                    f"base adapter {adapter.directory} does not fit this model: {path} is not a 4-bit decoder "
                    f"linear of shape {shape} here; lora.base_adapters must be adapters trained on this base model"
                )
    for adapter in stack:
        config = adapter.config
        scaling = lora_scaling(config.lora_alpha, config.r, config.use_rslora)
        for path, (lora_a, lora_b) in adapter.pairs().items():
            layer = model.get_submodule(path)
            if not isinstance(layer, StackedNF4Linear):
                layer = StackedNF4Linear(layer)
                _place(model, path, layer)
            layer.add_delta(lora_a, lora_b, scaling)
    return [adapter.directory.resolve() for adapter in stack]


BASE_ADAPTERS_KEY = "base_adapters"  # in qlora_kit.json: the frozen adapters a stacked adapter was trained on


def stacked_base_adapters(adapter: adapter_files.Adapter) -> list[Path]:
    """The adapter dirs ``adapter`` was trained on top of (``lora.base_adapters``, recorded in its
    qlora_kit.json), theirs first when they were stacked too: the order ``stack_adapters`` folds them in."""
    recorded = adapter.metadata.get(BASE_ADAPTERS_KEY) or []
    if not isinstance(recorded, list) or not all(isinstance(d, str) for d in recorded):
        raise adapter_files.AdapterFileError(
            f"{adapter.directory / adapter_files.METADATA_NAME}: {BASE_ADAPTERS_KEY} should be a list of adapter "
            f"dirs, not {recorded!r}",
            adapter_files.METADATA_NAME,
        )
    order: list[Path] = []
    for directory in map(Path, recorded):
        if not directory.is_dir():
            raise QloraKitError(
                f"adapter {adapter.directory} was trained on top of {directory} ({BASE_ADAPTERS_KEY} in its "
                f"{adapter_files.METADATA_NAME}), which does not exist any more; put that adapter back there"
            )
        below = adapter_files.read_adapter(adapter_files.find_adapter_dir(directory))
        order += [d for d in [*stacked_base_adapters(below), below.directory.resolve()] if d not in order]
    return order


def stack_record(directories: Sequence[str | Path]) -> dict[str, list[str]]:
    """What a stacked adapter's qlora_kit.json records: the frozen adapters under it, resolved, in order ({} for
    none): every reader (generate, export) can then rebuild the base it was trained on."""
    if not directories:
        return {}
    return {BASE_ADAPTERS_KEY: [str(adapter.directory.resolve()) for adapter in read_stack(directories)]}
