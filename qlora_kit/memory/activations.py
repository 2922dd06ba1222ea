"""The activation model: what one training step of our stack keeps for backward and holds in passing.

It follows our own stack (``quant.NF4Linear`` + ``lora.LoRALinear`` inside transformers' Llama-style decoder
layers with SDPA, the chunked loss of ``train.causal_lm_loss``) and keeps every coefficient in
``ACTIVATION_COEFFS`` so it can be calibrated against measurement (docs/memory.md, "Activations" and
"Transients"). ``step_moments`` gives the candidate peaks of a step; the plan's peak is the largest.

Padded batches (``is_padded``) take another attention path: transformers 5.24 builds a 4-D mask for them
(``masking_utils.sdpa_mask``; also for packed rows holding several examples), and with a mask
``integrations/sdpa_attention.use_gqa_in_sdpa`` is False on CUDA and CPU, so ``repeat_kv`` copies k and v to
the query's width and SDPA saves them at that width, together with the additive mask it makes from the
boolean one in the compute dtype (torch's ``convert_boolean_attn_mask``), one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_kit.facts import DTYPE_BYTES, LOSS_CHUNK_TOKENS, MB
from qlora_kit.memory.shapes import ModelShape, target_linears

ACTIVATION_COEFFS: dict[str, float] = {
    # Per decoder layer and token (see layer_activation_bytes); checked against the tensors autograd saves
    # for a tiny model on CPU (tests/test_memory_plan.py). Calibrate on a GPU with the measured profiler.
    "norm_fp32_copies": 2,  # 2 RMSNorms each keep their input upcast to fp32 (+ a fp32 rsqrt per token)
    "sdpa_saved_tensors": 1,  # SDPA keeps q, k, v (GQA: k, v at kv width) and its output; no s x s matrix
    "sdpa_lse_fp32_per_head": 1,  # + one fp32 logsumexp per head
    "mlp_ffn_tensors": 3,  # SiLU keeps gate's output; act * up keeps act and up: 3 x ffn
    # Transients of one layer, measured on CPU with the profiler (tests/test_memory_measured.py; docs/memory.md,
    # "Transients"). Both peak in the down projection (lora._LoRAFunction): forward holds its dequantized
    # weight, its output (hidden) and, with dropout, the dropped copy of its input (ffn) + a bool mask;
    # backward holds the dequantized weight, the incoming grad (hidden), the grad of its input (ffn) and,
    # with dropout, the mask drawn again. Under checkpointing the forward also holds the MLP's intermediates
    # that a normal forward would keep.
    "forward_workspace_hidden": 1,
    "forward_workspace_ffn_dropout": 1,
    "forward_workspace_ffn_checkpointed": 2,
    "grad_workspace_hidden": 1,
    "grad_workspace_ffn": 1,
    # The chunked loss (train.causal_lm_loss): forward computes each chunk's fp32 logits and logsumexp (which
    # makes a temporary of the logits' size), turns the logits into their grad in place and keeps only the
    # grad of the hidden states; backward scales that grad and scatters it back (hidden-wide tensors).
    "loss_forward_fp32_vocab": 2,
    "loss_backward_hidden": 3,
    # Assumed, not measured on a GPU yet (every CUDA plan says so: render.plan_assumptions):
    "allocator_slack": 0.10,  # caching-allocator fragmentation, fraction of the dynamic part
    "cuda_context_bytes": 500 * MB,  # driver context, kernels, library handles: outside torch's allocator
    # torch keeps one cuBLAS workspace per (cuBLAS handle, stream), from its caching allocator, so
    # max_memory_allocated counts them; handles are per thread, and a step runs matmuls on two threads: the
    # caller's (forward) and autograd's device thread (backward, checkpoint recomputation). Size: plan's
    # cublas_workspace_size.
    "cublas_workspaces": 2,
    "cpu_runtime_bytes": 400 * MB,  # Python + torch + transformers + bitsandbytes imported (device cpu)
}


def is_padded(settings: dict) -> bool:
    """Whether the plan's batches carry a 4-D attention mask: ``settings["padded"]``, or when that is None
    (the default), whenever a batch has more than one row (rows padded to the longest one)."""
    padded = settings.get("padded")
    return settings["batch_size"] > 1 if padded is None else bool(padded)


def mask_width(seq: int, device: str) -> int:
    """Columns of the additive mask SDPA keeps per query row: on CUDA the memory-efficient kernel (the one
    that takes a mask) pads the last dimension to a multiple of 8 (torch's ``preprocess_mask``)."""
    return -(-seq // 8) * 8 if device == "cuda" else seq


def layer_activation_bytes(
    shape: ModelShape,
    *,
    c: int,
    a: int,
    rank: int,
    targets: tuple[str, ...],
    dropout: float,
    device: str,
    padded: bool = False,
    seq: int = 0,
) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, per token, nothing checkpointed; c, a: dtype bytes.

    ``padded``: the batch has a 4-D mask (module notes): k and v are kept at the query's width, and one
    row of the ``b x 1 x seq x seq`` additive mask per token (``seq`` columns) is kept too.
    """
    k = ACTIVATION_COEFFS
    h, f, heads = shape.hidden, shape.ffn, shape.heads
    q, kv = heads * shape.head_dim, shape.kv_heads * shape.head_dim
    kv_kept = q if padded else kv  # repeat_kv's copies (a no-op without GQA, where kv == q)
    # The NF4 base path keeps nothing (frozen weight, dequantized again in backward); RoPE keeps only
    # cos/sin, shared by all layers (counted once, with the logits); residual adds keep nothing.
    terms = {
        "norms": k["norm_fp32_copies"] * 4 * (h + 1),
        "attention": k["sdpa_saved_tensors"] * c * (2 * q + 2 * kv_kept) + k["sdpa_lse_fp32_per_head"] * 4 * heads,
        "mlp": k["mlp_ffn_tensors"] * c * f,
    }
    if padded:
        terms["attention mask"] = c * mask_width(seq, device)
    # LoRA path x -> dropout -> A -> B. With adapters in the compute dtype, LoRALinear runs base + adapter as
    # one autograd node (lora._LoRAFunction) that keeps x itself, shared by the adapters that read the same
    # tensor (q/k/v the first norm's output, gate/up the second's; o reads SDPA's output, already kept), and
    # A's r-wide output; the dropout mask is drawn again from a seed in backward, so dropout keeps nothing.
    # Adapters in another dtype run as plain modules: each keeps its own dropout output (a bytes) and mask
    # (a bool on CUDA, a tensor of x's dtype on CPU).
    if a != c:
        mask = (1 if device == "cuda" else a) if dropout > 0 else 0
        widths = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q, "gate_proj": h, "up_proj": h}
        lora = sum((a + mask) * widths.get(t, f) for t in targets)
    else:
        shared = {"q_proj": "n1", "k_proj": "n1", "v_proj": "n1", "gate_proj": "n2", "up_proj": "n2"}
        kept = {shared.get(t, t) for t in targets} - {"o_proj"}
        lora = c * sum(h if name in ("n1", "n2") else f for name in kept)
    terms["lora"] = lora + len(targets) * a * rank
    return terms


def first_layer_savings(
    shape: ModelShape, *, c: int, a: int, rank: int, targets: tuple[str, ...], dropout: float, device: str, **_: object
) -> int:
    """Bytes per token the first decoder layer keeps less than the others (``layer_activation_bytes``; takes
    its keyword arguments, padded and seq included, which change nothing here).

    Its input is the frozen embedding's output, which needs no grad: its first RMSNorm keeps nothing
    (fp32 input, rsqrt), and the dropouts of the adapters reading that norm's output (q, k, v) keep no mask.
    """
    mask = (1 if device == "cuda" else a) if dropout > 0 and a != c else 0  # plain-module adapters only
    return 4 * (shape.hidden + 1) + mask * shape.hidden * len({"q_proj", "k_proj", "v_proj"} & set(targets))


@dataclass
class Moment:
    """What lives, beyond weights, adapters and optimizer states, at one moment of a training step."""

    gradients: int
    activations: int  # the layers' saved activations (or checkpoints) still live
    loss_kept: int  # what the loss path keeps for backward
    transient: int
    transient_what: str

    @property
    def total(self) -> int:
        return self.gradients + self.activations + self.loss_kept + self.transient


@dataclass(frozen=True)
class _Step:
    """The sizes of one micro-batch's step that every moment reads (from the shape and the settings)."""

    c: int  # compute dtype bytes
    a: int  # adapter dtype bytes
    batch: int
    seq: int
    tokens: int  # batch x seq
    labelled: int  # positions that reach the loss
    checkpointing: bool
    dropout: bool
    padded: bool  # a 4-D attention mask (is_padded)
    layer_knobs: dict  # the keyword arguments of layer_activation_bytes / first_layer_savings

    @classmethod
    def of(cls, settings: dict) -> _Step:
        knobs = activation_knobs(settings)
        b, s = settings["batch_size"], settings["seq_len"]
        labelled = settings.get("label_tokens")
        labelled = b * (s - 1) if labelled is None else labelled
        drop = settings["lora_dropout"] > 0
        return cls(
            knobs["c"], knobs["a"], b, s, b * s, labelled, settings["checkpointing"], drop, knobs["padded"], knobs
        )


def activation_knobs(settings: dict) -> dict:
    """The keyword arguments of ``layer_activation_bytes`` / ``first_layer_savings`` for a plan's settings."""
    knobs = dict(c=DTYPE_BYTES[settings["compute_dtype"]], a=DTYPE_BYTES[settings["adapter_dtype"]])
    knobs |= dict(rank=settings["rank"], targets=target_linears(settings["targets"]))
    knobs |= dict(dropout=settings["lora_dropout"], device=settings["device"])
    return knobs | dict(padded=is_padded(settings), seq=settings["seq_len"])


def checkpointed_mask_bytes(batch: int, seq: int, padded: bool) -> int:
    """A padded batch under checkpointing: transformers' boolean 4-D mask (b x 1 x s x s), which the
    layers' checkpoints hold until the last recomputation (without checkpointing it dies with the forward)."""
    return batch * seq * seq if padded else 0


def _activations(shape: ModelShape, step: _Step) -> tuple[float, float, float]:
    """(one layer's saved activations, what each layer keeps, all layers' together), nothing freed yet."""
    one_layer = step.tokens * sum(layer_activation_bytes(shape, **step.layer_knobs).values())
    if step.checkpointing:  # each layer keeps its input; the rest is recomputed in backward
        layer_kept = step.tokens * shape.hidden * step.c
        mask = checkpointed_mask_bytes(step.batch, step.seq, step.padded)
        return one_layer, layer_kept + mask, shape.layers * layer_kept + mask
    first_less = step.tokens * first_layer_savings(shape, **step.layer_knobs)
    return one_layer, one_layer, shape.layers * one_layer - first_less


def _loss_kept(shape: ModelShape, step: _Step) -> int:
    """The final norm's fp32 input + rsqrt, the loss's grad of the labelled hidden states (n x h) and the
    bool mask that picked them, rope cos/sin (s x head_dim each, shared by the batch and all layers)."""
    h, c, s = shape.hidden, step.c, step.seq
    return step.tokens * 4 * (h + 1) + step.labelled * h * c + step.batch * (s - 1) + 2 * s * c * shape.head_dim


def _layer_forward(shape: ModelShape, step: _Step) -> float:
    """One layer's forward beyond what it keeps (see ACTIVATION_COEFFS)."""
    k, t, c = ACTIVATION_COEFFS, step.tokens, step.c
    fwd = _dequantized_weight(shape, c) + t * c * k["forward_workspace_hidden"] * shape.hidden
    fwd += t * (c * k["forward_workspace_ffn_dropout"] + 1) * shape.ffn if step.dropout else 0
    fwd += t * c * k["forward_workspace_ffn_checkpointed"] * shape.ffn if step.checkpointing else 0
    return fwd


def _forward_transient(shape: ModelShape, step: _Step) -> tuple[float, str]:
    """The larger of the loss's chunk of fp32 logits and a layer's forward intermediates, and which it is."""
    chunk = min(step.labelled, LOSS_CHUNK_TOKENS)
    logits = ACTIVATION_COEFFS["loss_forward_fp32_vocab"] * 4 * chunk * shape.vocab
    gathered = step.labelled * shape.hidden * step.c  # the labelled hidden states, gathered
    fwd = {
        "one chunk's fp32 logits + logsumexp temporary": logits + gathered,
        "a layer's forward intermediates": _layer_forward(shape, step),
    }
    what = max(fwd, key=fwd.__getitem__)
    return fwd[what], what


def _layer_backward(shape: ModelShape, step: _Step, one_layer: float) -> tuple[float, str]:
    """One layer's backward transient: the dequantized weight and the working grads (under checkpointing,
    after the layer is recomputed: its activations + the larger of that and its forward's own transient)."""
    k, t, c, f = ACTIVATION_COEFFS, step.tokens, step.c, shape.ffn
    workspace = t * c * (k["grad_workspace_hidden"] * shape.hidden + k["grad_workspace_ffn"] * f) + t * f * step.dropout
    layer_bwd = _dequantized_weight(shape, c) + workspace
    if step.checkpointing:
        recompute = _layer_forward(shape, step) - t * c * k["forward_workspace_ffn_checkpointed"] * f
        layer_bwd = one_layer + max(layer_bwd, recompute)
    return layer_bwd, ("recomputed layer + " if step.checkpointing else "") + "dequantized weight + working grads"


def _dequantized_weight(shape: ModelShape, c: int) -> int:
    """The largest linear's weight, dequantized to the compute dtype for its matmul."""
    return c * max(o * i for o, i in shape.linears().values())


def _optimizer_temporaries(shape: ModelShape, settings: dict, a: int, n_lora: int) -> int:
    if settings["optimizer"] != "adamw":  # bitsandbytes: one fused kernel per tensor, in place
        return 0
    if settings["device"] == "cuda":  # torch AdamW: foreach on CUDA (a temporary per state)
        return a * n_lora
    rank = settings["rank"]  # per tensor on CPU: temporaries of the largest LoRA tensor
    return 3 * a * max(max(rank * i, o * rank) for o, i in shape.linears().values())


def step_moments(shape: ModelShape, settings: dict, *, n_lora: int) -> dict[str, Moment]:
    """The candidate peaks of one micro-batch's step; the plan's peak is the largest.

    Backward walks the layers from the last to the first, freeing each layer's activations as it creates its
    LoRA gradients, so all activations and all gradients are never live together: the peak is at the loss
    backward or at the first layer processed (activations dominate), or at the end of backward (gradients
    dominate), or in the optimizer step. With gradient accumulation the previous micro-batches' gradients
    are live throughout.
    """
    step = _Step.of(settings)
    one_layer, layer_kept, acts = _activations(shape, step)
    loss_kept = _loss_kept(shape, step)
    grads = step.a * n_lora
    earlier = grads if settings.get("grad_accumulation", 1) > 1 else 0  # from the previous micro-batches
    fwd, fwd_what = _forward_transient(shape, step)
    # the loss's backward: the scaled grad, the index and slice backwards (hidden-wide)
    loss_bwd = ACTIVATION_COEFFS["loss_backward_hidden"] * step.tokens * shape.hidden * step.c
    layer_bwd, layer_what = _layer_backward(shape, step, one_layer)
    opt_tmp = _optimizer_temporaries(shape, settings, step.a, n_lora)
    return {
        "forward": Moment(earlier, acts, loss_kept, fwd, fwd_what),
        "loss backward": Moment(earlier, acts, loss_kept, loss_bwd, "the loss's grad scattered back"),
        # accumulation adds into the existing .grad tensors: no new ones
        "backward of the last layer": Moment(earlier or grads // shape.layers, acts, 0, layer_bwd, layer_what),
        "backward of the first layer": Moment(grads, layer_kept, 0, layer_bwd, layer_what),
        "optimizer step": Moment(grads, 0, 0, opt_tmp, "optimizer temporaries"),
    }
