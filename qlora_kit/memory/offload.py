"""The planner's figures for offload (``qlora_kit.offload``): what stays on the device, what sits in host RAM,
the bytes copied each step and the step time those copies imply.

    weights      resident layers + two streaming buffers (one layer in use, the next being copied) on the
                 device; the streamed layers' NF4 tensors in pinned host RAM
    activations  three checkpointed layer inputs on the device (layer 0's, which needs no grad and is kept as
                 it is, the one in use, the next one on its way); the others in pinned host RAM
    optimizer    paged states (CUDA managed memory) in host RAM, paged in for the optimizer step
    moved        forward copies every streamed layer once, backward all but the last (still on the device)
    time         per layer, the copy overlaps the compute: a layer costs max(compute, copy); the copies hide
                 from the tokens per micro-batch where a layer's forward outlasts its copy

Bytes come from ``facts.nf4_bytes`` (the one NF4 byte formula); the time is an estimate from two numbers
the user gives (``--pcie-gbps``, ``--tflops``), the linear and attention FLOPs of the shape, and nothing
measured: the dequantization and the copies' own cost on the GPU are not in it.
"""

from __future__ import annotations

import math

from qlora_kit.facts import DTYPE_BYTES, nf4_bytes
from qlora_kit.memory.activations import checkpointed_mask_bytes, is_padded
from qlora_kit.memory.shapes import ModelShape

STREAM_BUFFERS = 2  # streamed layers on the device at once: the one computing and the next one arriving
KEPT_INPUTS = 3  # checkpointed inputs on the device with activation offload (see the module docstring)


def layer_nf4_bytes(shape: ModelShape) -> int:
    """The NF4 bytes of one decoder layer's seven linears: what streaming moves per layer."""
    return sum(nf4_bytes(o, i).total for o, i in shape.linears().values())


def streamed_layers(shape: ModelShape, s: dict) -> int:
    return shape.layers - s["resident_layers"] if s["offload_weights"] else 0


def weight_layers_on_device(shape: ModelShape, s: dict) -> int:
    """Decoder layers whose NF4 tensors occupy device memory at the peak."""
    return s["resident_layers"] + min(STREAM_BUFFERS, streamed_layers(shape, s))


def layer_input_bytes(shape: ModelShape, s: dict) -> int:
    """One checkpointed layer input: batch x seq x hidden in the compute dtype."""
    return s["batch_size"] * s["seq_len"] * shape.hidden * DTYPE_BYTES[s["compute_dtype"]]


def activations_on_device(shape: ModelShape, s: dict, planned: int) -> int:
    """With activation offload, the checkpointed inputs that stay (and the 4-D mask, which is not offloaded)."""
    if not (s["offload_activations"] and s["checkpointing"]):
        return planned
    mask = checkpointed_mask_bytes(s["batch_size"], s["seq_len"], is_padded(s))
    return min(planned, KEPT_INPUTS * layer_input_bytes(shape, s) + mask)


def offload_summary(shape: ModelShape, s: dict, paged_host: int) -> dict:
    """Host RAM, bytes moved and the estimated step time of a plan with offload ({} without)."""
    if not (s["offload_weights"] or s["offload_activations"]):
        return {}
    streamed, per_layer = streamed_layers(shape, s), layer_nf4_bytes(shape)
    offloaded_inputs = (shape.layers - 1) * layer_input_bytes(shape, s) if s["offload_activations"] else 0
    moved_layers = 2 * streamed - 1 if streamed else 0  # forward: all streamed; backward: all but the last
    accum = s["grad_accumulation"]
    timing = step_time(shape, s, per_layer, streamed)
    return {
        "layers": shape.layers,
        "resident_layers": shape.layers - streamed,
        "streamed_layers": streamed,
        "layer_nf4_bytes": per_layer,
        "pinned_weight_bytes": streamed * per_layer,
        "pinned_activation_bytes": offloaded_inputs,
        "pinned_host_bytes": streamed * per_layer + offloaded_inputs,
        "paged_host_bytes": paged_host,
        "moved_layers_per_micro_batch": moved_layers,
        "bytes_moved_per_step": accum * moved_layers * per_layer,
        "pcie_gbps": s["pcie_gbps"],
        "tflops": s["tflops"],
        **{key: accum * value if key.endswith("_s") else value for key, value in timing.items()},
    }


def step_time(shape: ModelShape, s: dict, per_layer: int, streamed: int) -> dict:
    """Seconds of one micro-batch's step with the copies overlapped per layer, and where they hide."""
    tokens, rate = s["batch_size"] * s["seq_len"], s["tflops"] * 1e12
    linear = sum(o * i for o, i in shape.linears().values())
    per_token = 2 * linear + 2 * s["seq_len"] * shape.hidden  # the layer's matmuls + causal attention
    forward = tokens * per_token / rate
    # backward of a frozen base: the input's grad only (as much as forward), + the recompute if checkpointed
    backward = forward * (2 if s["checkpointing"] else 1)
    labelled = s.get("label_tokens") or s["batch_size"] * (s["seq_len"] - 1)
    head = 3 * 2 * labelled * shape.hidden * shape.vocab / rate  # lm_head forward, its input grad, the loss chunk
    copy = per_layer / (s["pcie_gbps"] * 1e9)
    resident = shape.layers - streamed
    compute = shape.layers * (forward + backward) + head
    step = resident * (forward + backward) + head
    if streamed:
        step += streamed * max(forward, copy) + (streamed - 1) * max(backward, copy) + backward
    return {
        "compute_s": compute,
        "transfer_s": (2 * streamed - 1) * copy if streamed else 0.0,
        "step_s": step,
        "layer_copy_ms": 1000 * copy,
        "layer_forward_ms": 1000 * forward,
        "hide_from_tokens": math.ceil(copy * rate / per_token) if streamed else 0,
        "transfer_bound": bool(streamed) and copy > forward,
        "tokens_per_micro_batch": tokens,
    }


def fitting_resident_layers(plan_total, layers: int, gpu_bytes: int | None) -> int:
    """``resident_layers: auto``: the most layers whose plan (``plan_total(n)``) fits in ``gpu_bytes``;
    0 when even none fits or without a budget (then every layer streams)."""
    if gpu_bytes is None or plan_total(0) > gpu_bytes:
        return 0
    lo, hi = 0, layers + 1  # plan_total(lo) fits; hi is past the end or does not fit
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if plan_total(mid) <= gpu_bytes else (lo, mid)
    return lo
