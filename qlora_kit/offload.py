"""Offload, beside the model: stream the 4-bit decoder layers from host memory, and keep the checkpointed
layer inputs in host memory, scheduled by hooks on the decoder layers (``enable_offload``).

    forward     layer i:  its NF4 copy made ready (copied on a side stream one layer ahead, ordered with an
                          event), layer i+1's copy started, layer i's released after it ran (the last
                          streamed layer is kept: backward starts with it)
    backward    layer i:  when the gradient of layer i's output is complete (a tensor hook: layer i+1's
                          backward is done), layer i+1's copy is released, layer i's made ready for its
                          recompute and backward, layer i-1's started; the end of backward (an autograd
                          engine callback) releases the last one

So at most two streamed layers hold device copies at any moment of forward, recompute and backward (plus
the ``resident_layers`` first layers, which never move), and none is held after the step. Why hooks and
not a loop of our own: ``_NF4Matmul`` and ``_LoRAFunction`` keep the layer module on ctx and dequantize it
again in backward, so a layer's copy must be back on the device when its backward runs, wherever autograd
runs it; the hooks are where autograd says so. transformers (5.23 and later) checkpoints a layer's
``forward``, not its ``__call__``, so module hooks stay outside the checkpoint and do not fire again for the
recompute; if they do (another version), the recompute finds its layer ready and the hooks do nothing else.

The swap goes through ``.data`` (``module.codes.data = copy``): the tensor objects stay the module's own,
so a buffer that another wrapper turned into a (frozen) ``nn.Parameter`` works the same. A released layer's
tensors hold an empty placeholder: using one by mistake fails loudly instead of computing with stale data.

Activation offload (``train.offload_activations``, needs gradient checkpointing): non-reentrant checkpointing
saves each layer's positional inputs (the hidden states) with ``save_for_backward`` before it enters its own
saved-tensor hooks; a ``torch.autograd.graph.saved_tensors_hooks`` around the layer's call catches exactly
those and keeps them in (pinned) host memory; backward brings layer i-1's back while layer i recomputes.
That needs the checkpoint outside the hooks (transformers 5.23+): inside them, our hooks would catch every
tensor the layer saves and undo the checkpointing, so each forward checks that they caught only inputs
(the first one fails if not).

One code path on every device: on CPU the "device copy" is a staging copy (a clone into a separate buffer)
and there are no streams or events, so the CPU tests run the real scheduling.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from qlora_kit.architecture import decoder_layers
from qlora_kit.quant import NF4Linear

NF4_TENSORS = ("codes", "absmax_codes", "absmax_scales", "absmax_offset")  # what a streamed layer moves


def _host_copy(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in host memory: pinned when the device is a GPU (so copies to it run asynchronously);
    on a CPU run the tensor itself (its own buffer is the host copy; the device copies are clones)."""
    host = tensor.detach()
    if device.type != "cuda":
        return host
    host = host.to("cpu")
    return host if host.is_pinned() else host.pin_memory()


def host_placement(resident_layers: int, device: torch.device) -> Callable[[str, nn.Module], None]:
    """For ``loading.load_model(place=...)``: each freshly quantized NF4Linear of a streamed layer (index >=
    ``resident_layers``) goes to host memory at once, so a model larger than the device loads at all."""

    def place(name: str, module: nn.Module) -> None:
        match = re.search(r"\.(\d+)\.", name)
        if isinstance(module, NF4Linear) and match and int(match.group(1)) >= resident_layers:
            for attr in NF4_TENSORS:
                tensor = getattr(module, attr)
                tensor.data = _host_copy(tensor, device)

    return place


@dataclass
class _Saved:
    """One offloaded saved tensor: its host copy and, once fetched, its device copy (ready after ``event``)."""

    host: torch.Tensor
    device_copy: torch.Tensor | None = None
    event: torch.cuda.Event | None = None


@dataclass
class OffloadStats:
    """What the scheduling did, counted where it happens: the tests' residency proof and the bench's figures."""

    peak_streamed: int = 0  # most streamed layers holding device copies at once
    fetches: list[int] = field(default_factory=list)  # streamed layer indices in the order they were copied
    bytes_moved: int = 0  # host -> device bytes of the streamed layers' NF4 tensors
    activations_offloaded: int = 0  # saved tensors kept in host memory
    activation_bytes_offloaded: int = 0
    peak_activations_on_device: int = 0  # offloaded saved tensors holding device copies at once


class Offload:
    """The hooks and the state of weight streaming and activation offload on one model (``enable_offload``)."""

    def __init__(self, model: nn.Module, device: torch.device, resident_layers: int | None, activations: bool):
        self.device = device
        self.layers = decoder_layers(model)
        n = len(self.layers)
        self.streamed = [] if resident_layers is None else list(range(min(resident_layers, n), n))
        self.weights = resident_layers is not None
        self.activations = activations
        self.stats = OffloadStats()
        self.in_backward = False
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and self.streamed else None
        self._next = dict(zip(self.streamed, self.streamed[1:], strict=False))
        self._prev = {j: i for i, j in self._next.items()}
        self._host: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {i: self._to_host(i) for i in self.streamed}
        self.layer_bytes = {i: sum(h.numel() * h.element_size() for *_, h in e) for i, e in self._host.items()}
        self._copies: dict[int, list[torch.Tensor]] = {}
        self._events: dict[int, torch.cuda.Event] = {}
        self._saved: dict[int, list[_Saved]] = {}  # offloaded inputs by layer
        self._saved_on_device = 0
        self._contexts: dict[int, torch.autograd.graph.saved_tensors_hooks] = {}
        self._handles = []
        first = self.streamed[0] if self.streamed else None
        for i, layer in enumerate(self.layers):
            if activations or i in self._host or i + 1 == first:  # the last resident layer starts the first copy
                self._handles.append(layer.register_forward_pre_hook(functools.partial(self._before_forward, i)))
                hook = functools.partial(self._after_forward, i)
                self._handles.append(layer.register_forward_hook(hook, always_call=True))

    # --- weights ------------------------------------------------------------------------------------------

    def _to_host(self, i: int) -> list[tuple[nn.Module, str, torch.Tensor]]:
        entries = []
        for module in self.layers[i].modules():
            if isinstance(module, NF4Linear):
                for name in NF4_TENSORS:
                    tensor = getattr(module, name)
                    entries.append((module, name, _host_copy(tensor, self.device)))
                    tensor.data = self._placeholder(tensor.dtype)
        return entries

    def _placeholder(self, dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=self.device)

    @property
    def resident_copies(self) -> list[int]:
        """The streamed layers holding device copies now."""
        return sorted(self._copies)

    def fetch(self, i: int | None) -> None:
        """Start copying streamed layer ``i`` to the device (on the side stream), unless it is there."""
        if i is None or i in self._copies or i not in self._host:
            return
        if self.stream is None:  # CPU: a staging copy into a separate buffer
            self._copies[i] = [host.clone() for *_, host in self._host[i]]
        else:
            with torch.cuda.stream(self.stream):
                self._copies[i] = [host.to(self.device, non_blocking=True) for *_, host in self._host[i]]
                self._events[i] = torch.cuda.Event()
                self._events[i].record(self.stream)
        self.stats.fetches.append(i)
        self.stats.bytes_moved += self.layer_bytes[i]
        self.stats.peak_streamed = max(self.stats.peak_streamed, len(self._copies))

    def ready(self, i: int) -> None:
        """Layer ``i``'s copy usable by the compute stream, and swapped into its modules."""
        if i not in self._host:
            return
        self.fetch(i)
        event = self._events.pop(i, None)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for copy in self._copies[i]:
                copy.record_stream(stream)  # made on the side stream, used on this one: freed after its use
        for (module, name, _), copy in zip(self._host[i], self._copies[i], strict=True):
            getattr(module, name).data = copy

    def release(self, i: int) -> None:
        """Drop layer ``i``'s device copy; its tensors hold the empty placeholder until the next ``ready``."""
        if self._copies.pop(i, None) is None:
            return
        self._events.pop(i, None)
        for module, name, host in self._host[i]:
            getattr(module, name).data = self._placeholder(host.dtype)

    @contextlib.contextmanager
    def weights_ready(self, module: nn.Module) -> Iterator[None]:
        """The weights of ``module``'s decoder layer on the device for a one-off read outside a step (DoRA's
        initial norms, ``add_lora(around=)``); a streamed layer's copy is released after, unless it was held."""
        i = next((i for i, layer in enumerate(self.layers) if any(m is module for m in layer.modules())), None)
        held = i is None or i not in self._host or i in self._copies
        if not held:
            self.ready(i)
        try:
            yield
        finally:
            if not held:
                self.release(i)

    def _release_all_but(self, *keep: int | None) -> None:
        for j in list(self._copies):
            if j not in keep:
                self.release(j)

    # --- activations --------------------------------------------------------------------------------------

    def _pack(self, i: int, tensor: torch.Tensor):
        """A checkpointed input of layer ``i`` to host memory (parameters and host tensors stay as they are)."""
        if tensor.device != self.device or (tensor.is_leaf and tensor.requires_grad):
            return tensor
        if self.device.type == "cuda":
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            host.copy_(tensor, non_blocking=True)  # on the compute stream: ordered before the tensor's reuse
        else:
            host = tensor.detach().clone()  # a staging copy: the original's buffer is freed
        saved = _Saved(host)
        self._saved.setdefault(i, []).append(saved)
        self.stats.activations_offloaded += 1
        self.stats.activation_bytes_offloaded += host.numel() * host.element_size()
        return saved

    def _fetch_saved(self, i: int | None) -> None:
        """Start copying layer ``i``'s offloaded inputs back to the device."""
        for saved in self._saved.get(i, []) if i is not None else []:
            if saved.device_copy is None:
                self._fetch_one(saved)

    def _fetch_one(self, saved: _Saved) -> None:
        if self.device.type == "cuda":
            self.stream = self.stream or torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the copy to the host is complete
            with torch.cuda.stream(self.stream):
                saved.device_copy = saved.host.to(self.device, non_blocking=True)
                saved.event = torch.cuda.Event()
                saved.event.record(self.stream)
        else:
            saved.device_copy = saved.host.clone()
        self._saved_on_device += 1
        self.stats.peak_activations_on_device = max(self.stats.peak_activations_on_device, self._saved_on_device)

    def _unpack(self, packed):
        if not isinstance(packed, _Saved):
            return packed
        if packed.device_copy is None:  # not prefetched (the last layer): copied now
            self._fetch_one(packed)
        tensor, packed.device_copy = packed.device_copy, None
        self._saved_on_device -= 1
        if packed.event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(packed.event)
            tensor.record_stream(stream)
            packed.event = None
        return tensor

    # --- the hooks ----------------------------------------------------------------------------------------

    def _before_forward(self, i: int, module: nn.Module, args) -> None:
        if self.in_backward:  # a recompute whose hooks run inside the checkpoint: its layer is ready
            self.ready(i)
            return
        if i not in self._host:  # a resident layer: the last one starts the first streamed one's copy
            self.fetch(i + 1)
        else:
            self._release_all_but(i, self._next.get(i))
            self.ready(i)
            self.fetch(self._next.get(i))
        if self.activations and torch.is_grad_enabled():
            self._saved.pop(i, None)  # a new forward: the last one's saved inputs are its graph's, not ours
            context = torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, i), self._unpack)
            context.__enter__()
            self._contexts[i] = context

    def _after_forward(self, i: int, module: nn.Module, args, output) -> None:
        context = self._contexts.pop(i, None)
        if context is not None:
            context.__exit__(None, None, None)
            self._check_only_inputs_offloaded(i, args)
        if self.in_backward:
            return
        hidden = output[0] if isinstance(output, tuple) else output
        backward_follows = torch.is_grad_enabled() and isinstance(hidden, torch.Tensor) and hidden.requires_grad
        if backward_follows:
            hidden.register_hook(functools.partial(self._backward_begins, i))
        if i in self._host and not (backward_follows and i == self.streamed[-1]):
            self.release(i)

    def _check_only_inputs_offloaded(self, i: int, args: tuple) -> None:
        """Our saved-tensor hooks must see a layer's inputs only, not the tensors its forward saves: those are
        the checkpoint's to drop and recompute. If ours caught more, the checkpoint runs inside the layer's hooks
        (transformers < 5.23 checkpoints ``__call__``) or is off, and every activation would go to the host."""
        caught, inputs = len(self._saved.get(i, [])), sum(isinstance(a, torch.Tensor) for a in args)
        if caught > inputs:
            raise RuntimeError(
                f"activation offload caught {caught} saved tensors in decoder layer {i}, not just its {inputs} "
                f"input(s): gradient checkpointing is off, or it runs inside the layer's hooks (transformers "
                f"{transformers.__version__}; 5.23 and later checkpoint the layer's forward). Turn on "
                "model.gradient_checkpointing and upgrade transformers, or set train.offload_activations=false."
            )

    def _backward_begins(self, i: int, grad: torch.Tensor) -> None:
        """The gradient of layer ``i``'s output is complete: layer i+1's backward is done, layer i's begins."""
        if not self.in_backward:
            self.in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ends)
        self._release_all_but(i, self._prev.get(i))
        self.ready(i)
        self.fetch(self._prev.get(i))
        if self.activations:
            self._fetch_saved(i)
            self._fetch_saved(i - 1 if i > 0 else None)

    def _backward_ends(self) -> None:
        self._release_all_but()
        self.in_backward = False

    def remove(self) -> None:
        """Remove the hooks and put every streamed layer back on the device for good."""
        for handle in self._handles:
            handle.remove()
        self._release_all_but()
        for entries in self._host.values():
            for module, name, host in entries:
                getattr(module, name).data = host.to(self.device, copy=self.device.type == "cpu")
        self._host.clear()


def resident_layer_count(cfg, data, device: torch.device) -> int:
    """``model.resident_layers`` as a number: the recipe's, or for auto as many as the planner fits in
    ``model.max_memory_gb``, else in the GPU's free memory; on CPU without a budget, every layer."""
    from qlora_kit.facts import GiB
    from qlora_kit.memory import checkpoint_shape, plan_run

    layers = checkpoint_shape(cfg.model.name_or_path).layers
    if isinstance(cfg.model.resident_layers, int):
        return min(cfg.model.resident_layers, layers)
    if cfg.model.max_memory_gb is not None:
        budget = int(cfg.model.max_memory_gb * GiB)
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0]
    else:
        return layers
    return plan_run(cfg, data, gpu_bytes=budget).settings["resident_layers"]


def offload_description(offload: Offload) -> str:
    """One line for the run's log: what stays, what streams, what waits on the host."""
    n, streamed = len(offload.layers), len(offload.streamed)
    parts = []
    if offload.weights:
        per_layer = max(offload.layer_bytes.values(), default=0)
        parts.append(
            f"{n - streamed} of {n} decoder layers resident on {offload.device}, {streamed} streamed from host "
            f"memory ({per_layer / 1e6:,.1f} MB of NF4 each, copied one layer ahead)"
        )
    if offload.activations:
        parts.append("the checkpointed layer inputs wait in host memory between forward and backward")
    return "offload: " + "; ".join(parts)


def enable_offload(
    model: nn.Module, device: torch.device, *, weights: bool, resident_layers: int = 0, activations: bool = False
) -> Offload | None:
    """Stream the decoder layers from ``resident_layers`` on from host memory (``weights``) and keep the
    checkpointed layer inputs in host memory (``activations``); None when neither is asked for.

    Call it before ``add_lora`` when the streamed layers were loaded to host memory (``host_placement``): the
    adapters are made on the device of their base's buffers, the device placeholders once this has run."""
    if not weights and not activations:
        return None
    return Offload(model, device, resident_layers if weights else None, activations)
