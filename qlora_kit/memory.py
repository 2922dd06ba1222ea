"""Analytic memory planner: will a QLoRA fine-tune fit on this GPU, and which knob to turn if not.

Everything is computed from the model's shape (a preset or an HF ``config.json``) and the run's knobs;
nothing is loaded. Weights are counted exactly (the shapes of the tensors ``NF4Linear`` stores); the
activation model follows our own stack (``quant.NF4Linear`` + ``lora.LoRALinear`` inside transformers'
Llama-style decoder layers with SDPA) and keeps every coefficient in ``ACTIVATION_COEFFS`` so it can be
calibrated against measurement. See docs/memory.md for the formulas and assumptions.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import TARGET_PRESETS

MB = 10**6  # every figure we print is in decimal MB / GB; GPU sizes are in GiB (see parse_size)
GiB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GPU_SIZES_GIB = (24, 40, 48, 80, 141)  # common single-GPU sizes, for the "bigger GPU" suggestion


# --- model shapes ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    tied: bool = False  # lm_head shares the embedding matrix
    qkv_bias: bool = False  # q/k/v projections carry a bias (Qwen2)

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear in one decoder layer."""
        q, kv, h = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden
        shapes = [(q, h), (kv, h), (kv, h), (h, q), (self.ffn, h), (self.ffn, h), (h, self.ffn)]
        return dict(zip(LINEAR_NAMES, shapes, strict=True))

    @property
    def quantized_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linears().values())

    @property
    def non_quantized_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        norms = (2 * self.layers + 1) * self.hidden
        biases = self.layers * (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return embeddings + norms + biases

    @property
    def params(self) -> int:
        return self.quantized_params + self.non_quantized_params


def _preset(name: str, h: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, **kw) -> ModelShape:
    return ModelShape(name, h, layers, heads, kv, h // heads, ffn, vocab, **kw)


# From the public config.json of each model.
PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in [
        _preset("llama-7b", 4096, 32, 32, 32, 11008, 32000),
        _preset("llama-13b", 5120, 40, 40, 40, 13824, 32000),
        _preset("llama-33b", 6656, 60, 52, 52, 17920, 32000),
        _preset("llama-65b", 8192, 80, 64, 64, 22016, 32000),
        _preset("llama-2-70b", 8192, 80, 64, 8, 28672, 32000),
        _preset("llama-3-8b", 4096, 32, 32, 8, 14336, 128256),
        _preset("llama-3-70b", 8192, 80, 64, 8, 28672, 128256),
        _preset("mistral-7b", 4096, 32, 32, 8, 14336, 32000),
        _preset("qwen2.5-7b", 3584, 28, 28, 4, 18944, 152064, qkv_bias=True),
        _preset("qwen2.5-72b", 8192, 80, 64, 8, 29568, 152064, qkv_bias=True),
    ]
}


def shape_from_config(config, name: str) -> ModelShape:
    """A ``ModelShape`` from a transformers config (Llama / Mistral / Qwen2 style decoders)."""
    config = getattr(config, "text_config", None) or config
    try:
        hidden, heads = config.hidden_size, config.num_attention_heads
        layers, ffn, vocab = config.num_hidden_layers, config.intermediate_size, config.vocab_size
    except AttributeError as e:
        raise QloraKitError(f"{name}: config.json lacks a field the planner needs ({e})") from None
    return ModelShape(
        name=name,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or hidden // heads,
        ffn=ffn,
        vocab=vocab,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=bool(getattr(config, "attention_bias", False)) or config.model_type == "qwen2",
    )


def model_shape(spec: str) -> ModelShape:
    """A preset name (case-insensitive), a local HF checkpoint dir, a short id or a hub id."""
    if spec.strip().lower() in PRESETS:
        return PRESETS[spec.strip().lower()]
    from qlora_kit.models import SHORT_IDS

    if not Path(spec).expanduser().exists() and spec.lower() not in SHORT_IDS and spec.count("/") != 1:
        raise QloraKitError(
            f"model {spec!r} is not a preset ({', '.join(PRESETS)}), a checkpoint directory, a short id "
            f"({', '.join(SHORT_IDS)}) or a hub id (owner/name)"
        )
    return checkpoint_shape(spec)


def checkpoint_shape(name_or_path: str) -> ModelShape:
    """The shape in a checkpoint's ``config.json`` (dir, short id or hub id, as the loader resolves it)."""
    from qlora_kit.loading import load_config
    from qlora_kit.models import resolve_model_dir

    model_dir = resolve_model_dir(name_or_path)
    return shape_from_config(load_config(model_dir), name=Path(model_dir).name)


# --- exact NF4 bytes ----------------------------------------------------------------------------------------

NF4_BLOCK = 64  # values per absmax
NESTED_BLOCK = 256  # absmax values per fp32 scale (double quantization)
BNB_TABLE_BYTES = 256 * 4 + 16 * 4  # per-tensor copies of the 8-bit dynamic map and the NF4 table in a
# bitsandbytes QuantState; NF4Linear shares them, so the plan leaves them out (bnb_tables=False).


@dataclass(frozen=True)
class NF4Bytes:
    codes: int  # two 4-bit values per uint8
    absmax: int  # one uint8 (double-quantized) absmax per block of 64
    nested: int  # fp32 scale per 256 absmax + the fp32 offset (+ the tables, if counted)

    @property
    def total(self) -> int:
        return self.codes + self.absmax + self.nested


def nf4_bytes(out_features: int, in_features: int, *, bnb_tables: bool = False) -> NF4Bytes:
    """Bytes of an (out, in) weight as ``quantize_4bit(W, 64, compress_statistics=True, "nf4")`` stores it."""
    n = out_features * in_features
    blocks = math.ceil(n / NF4_BLOCK)
    nested = 4 * math.ceil(blocks / NESTED_BLOCK) + 4 + (BNB_TABLE_BYTES if bnb_tables else 0)
    return NF4Bytes(codes=math.ceil(n / 2), absmax=blocks, nested=nested)


# --- the activation model: every coefficient to calibrate lives here ----------------------------------------

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
    "allocator_slack": 0.10,  # caching-allocator fragmentation, fraction of the dynamic part
    "cuda_context_bytes": 500 * MB,  # CUDA context + cuBLAS workspace (device cuda)
    "cpu_runtime_bytes": 400 * MB,  # Python + torch + transformers + bitsandbytes imported (device cpu)
}


def _targets(targets: str | list[str]) -> tuple[str, ...]:
    if isinstance(targets, str):
        if targets in TARGET_PRESETS:
            return TARGET_PRESETS[targets] or LINEAR_NAMES  # None: every decoder linear of a Llama-shaped model
        targets = [t.strip() for t in targets.split(",")]
    leaves = {t.rsplit(".", 1)[-1] for t in targets}
    if not leaves or not leaves <= set(LINEAR_NAMES):
        raise QloraKitError(
            f"LoRA targets {sorted(leaves - set(LINEAR_NAMES)) or targets} not understood: use attention, "
            f"all-linear or names from {', '.join(LINEAR_NAMES)}"
        )
    return tuple(n for n in LINEAR_NAMES if n in leaves)


def layer_activation_bytes(
    shape: ModelShape, *, c: int, a: int, rank: int, targets: tuple[str, ...], dropout: float, device: str
) -> dict[str, float]:
    """Bytes one decoder layer keeps for backward, per token, nothing checkpointed; c, a: dtype bytes."""
    k = ACTIVATION_COEFFS
    h, f, heads = shape.hidden, shape.ffn, shape.heads
    q, kv = heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # The NF4 base path keeps nothing (frozen weight, dequantized again in backward); RoPE keeps only
    # cos/sin, shared by all layers (counted once, with the logits); residual adds keep nothing.
    terms = {
        "norms": k["norm_fp32_copies"] * 4 * (h + 1),
        "attention": k["sdpa_saved_tensors"] * c * (2 * q + 2 * kv) + k["sdpa_lse_fp32_per_head"] * 4 * heads,
        "mlp": k["mlp_ffn_tensors"] * c * f,
    }
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


LOSS_CHUNK_TOKENS = 1024  # train.LOSS_CHUNK_TOKENS (a test keeps them equal): logits exist this many tokens at a time


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


def step_moments(shape: ModelShape, settings: dict, *, n_lora: int) -> dict[str, Moment]:
    """The candidate peaks of one micro-batch's step; the plan's peak is the largest.

    Backward walks the layers from the last to the first, freeing each layer's activations as it creates its
    LoRA gradients, so all activations and all gradients are never live together: the peak is at the loss
    backward or at the first layer processed (activations dominate), or at the end of backward (gradients
    dominate), or in the optimizer step. With gradient accumulation the previous micro-batches' gradients
    are live throughout.
    """
    k, s, b = ACTIVATION_COEFFS, settings["seq_len"], settings["batch_size"]
    c, a = DTYPE_BYTES[settings["compute_dtype"]], DTYPE_BYTES[settings["adapter_dtype"]]
    L, h, f, v, tokens = shape.layers, shape.hidden, shape.ffn, shape.vocab, b * s
    names, ckpt = _targets(settings["targets"]), settings["checkpointing"]
    labelled = settings.get("label_tokens")
    labelled = b * (s - 1) if labelled is None else labelled
    chunk = min(labelled, LOSS_CHUNK_TOKENS)
    knobs = dict(c=c, a=a, rank=settings["rank"], targets=names, dropout=settings["lora_dropout"])
    one_layer = tokens * sum(layer_activation_bytes(shape, **knobs, device=settings["device"]).values())
    layer_kept = tokens * h * c if ckpt else one_layer
    acts = L * layer_kept - (0 if ckpt else tokens * first_layer_savings(shape, **knobs, device=settings["device"]))
    # the final norm's fp32 input + rsqrt, the loss's grad of the labelled hidden states (n x h) and the bool
    # mask that picked them, rope cos/sin (s x head_dim each, shared by the batch and all layers)
    loss_kept = tokens * 4 * (h + 1) + labelled * h * c + b * (s - 1) + 2 * s * c * shape.head_dim
    grads = a * n_lora
    earlier = grads if settings.get("grad_accumulation", 1) > 1 else 0  # from the previous micro-batches
    dequant = c * max(o * i for o, i in shape.linears().values())

    drop = settings["lora_dropout"] > 0
    # one layer's forward beyond what it keeps (see ACTIVATION_COEFFS)
    fwd_layer = dequant + tokens * c * k["forward_workspace_hidden"] * h
    fwd_layer += tokens * (c * k["forward_workspace_ffn_dropout"] + 1) * f if drop else 0
    fwd_layer += tokens * c * k["forward_workspace_ffn_checkpointed"] * f if ckpt else 0
    fwd = {
        "one chunk's fp32 logits + logsumexp temporary": k["loss_forward_fp32_vocab"] * 4 * chunk * v
        + labelled * h * c,  # + the labelled hidden states, gathered
        "a layer's forward intermediates": fwd_layer,
    }
    fwd_what = max(fwd, key=fwd.__getitem__)
    loss_bwd = k["loss_backward_hidden"] * tokens * h * c  # the scaled grad, the index and slice backwards
    workspace = tokens * c * (k["grad_workspace_hidden"] * h + k["grad_workspace_ffn"] * f) + tokens * f * drop
    layer_bwd = dequant + workspace
    if ckpt:  # the layer is recomputed first (its activations + the forward's own transient), then backward
        layer_bwd = one_layer + max(layer_bwd, fwd_layer - tokens * c * k["forward_workspace_ffn_checkpointed"] * f)
    layer_what = ("recomputed layer + " if ckpt else "") + "dequantized weight + working grads"
    max_tensor = max(max(settings["rank"] * i, o * settings["rank"]) for o, i in shape.linears().values())
    if settings["optimizer"] == "adamw":  # torch: foreach on CUDA (a temporary per state), per tensor on CPU
        opt_tmp = a * n_lora if settings["device"] == "cuda" else 3 * a * max_tensor
    else:  # bitsandbytes: one fused kernel per tensor, in place
        opt_tmp = 0
    return {
        "forward": Moment(earlier, acts, loss_kept, fwd[fwd_what], fwd_what),
        "loss backward": Moment(earlier, acts, loss_kept, loss_bwd, "the loss's grad scattered back"),
        # accumulation adds into the existing .grad tensors: no new ones
        "backward of the last layer": Moment(earlier or grads // L, acts, 0, layer_bwd, layer_what),
        "backward of the first layer": Moment(grads, layer_kept, 0, layer_bwd, layer_what),
        "optimizer step": Moment(grads, 0, 0, opt_tmp, "optimizer temporaries"),
    }


def _live(live: int, full: int) -> str:
    return "" if live == full else f"; at the peak {live / MB:,.1f} of {full / MB:,.1f} MB are still live"


def first_layer_savings(
    shape: ModelShape, *, c: int, a: int, rank: int, targets: tuple[str, ...], dropout: float, device: str
) -> int:
    """Bytes per token the first decoder layer keeps less than the others (``layer_activation_bytes``).

    Its input is the frozen embedding's output, which needs no grad: its first RMSNorm keeps nothing
    (fp32 input, rsqrt), and the dropouts of the adapters reading that norm's output (q, k, v) keep no mask.
    """
    mask = (1 if device == "cuda" else a) if dropout > 0 and a != c else 0  # plain-module adapters only
    return 4 * (shape.hidden + 1) + mask * shape.hidden * len({"q_proj", "k_proj", "v_proj"} & set(targets))


# --- the plan ----------------------------------------------------------------------------------------------

FIXED = ("LoRA parameters", "CUDA context", "process runtime")  # rows outside weights/optimizer that no
# batch, sequence or checkpointing knob changes (MemoryPlan.fixed_bytes)
TRIED = ("checkpointing", "the largest batch and sequence", "rank / 4", "attention-only targets", "8-bit optimizer")
TRIED += ("all of them together", "a common GPU size (up to 141 GiB)")
# how each planner knob is set in a recipe (qlora-kit train overrides), for the suggestions of check_budget
RECIPE_KEYS = {
    "checkpointing": "model.gradient_checkpointing",
    "batch_size": "train.micro_batch_size",
    "seq_len": "data.cutoff_len",
    "rank": "lora.r",
    "targets": "lora.targets",
    "optimizer": "train.optimizer",
}


def _gb(nbytes: float) -> str:
    decimal = f"{nbytes / 1e9:,.1f} GB" if nbytes >= 1e9 else f"{nbytes / MB:,.1f} MB"
    return f"{decimal} ({nbytes / GiB:.2f} GiB)"


def gib_text(nbytes: int) -> str:
    """A budget in GiB as it was written: budgets are int(GiB x value), within a byte of the value."""
    return f"{round(nbytes / GiB, 6):g}"


def recipe_overrides(knob: dict) -> str:
    """A suggestion's change as ``qlora-kit train`` overrides, e.g. ``train.micro_batch_size=2``."""
    out = []
    for key, value in knob.items():
        if key == "gpu_bytes":
            out.append(f"model.max_memory_gb={gib_text(value)}")
        else:
            out.append(f"{RECIPE_KEYS[key]}={str(value).lower() if isinstance(value, bool) else value}")
    return " ".join(out)


@dataclass
class Row:
    category: str
    item: str
    bytes: int
    note: str


@dataclass
class Suggestion:
    change: str
    knob: dict  # what it changes, e.g. {"checkpointing": True}: plan_memory(**settings, **knob) replans it
    total: int  # the plan's total with this one change
    saves: int
    fits: bool


@dataclass
class MemoryPlan:
    model: ModelShape
    settings: dict  # the resolved knobs: plan_memory(model, **settings) gives this plan again
    rows: list[Row]
    gpu_bytes: int | None = None
    pageable_bytes: int = 0  # what a paged optimizer may move to host RAM under pressure
    suggestions: list[Suggestion] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)  # planned peak tensor bytes by phase (see phase_bytes)
    peak_moment: str = ""

    @property
    def total(self) -> int:
        return sum(row.bytes for row in self.rows)

    @property
    def tensor_bytes(self) -> int:
        """The peak of allocated tensors: what ``torch.cuda.max_memory_allocated`` (or, on CPU, the
        profiler's count of live tensor bytes) measures; the total less the runtime rows."""
        return sum(row.bytes for row in self.rows if row.category != "runtime")

    @property
    def fits(self) -> bool | None:
        return None if self.gpu_bytes is None else self.total <= self.gpu_bytes

    @property
    def weight_bytes(self) -> int:
        """The 4-bit linears and the weights kept in the compute dtype (embeddings, lm_head, norms)."""
        return sum(row.bytes for row in self.rows if row.category == "weights")

    @property
    def fixed_bytes(self) -> int:
        """What no batch, sequence or checkpointing setting changes: weights, LoRA parameters, optimizer
        states and the CUDA context / process runtime."""
        return sum(row.bytes for row in self.rows if row.category in ("weights", "optimizer") or row.item in FIXED)

    def to_json(self) -> str:
        extra = {"total": self.total, "fits": self.fits, "fixed_bytes": self.fixed_bytes}
        return json.dumps({**asdict(self), **extra}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> MemoryPlan:
        d = json.loads(text)
        rows, suggestions = [Row(**r) for r in d["rows"]], [Suggestion(**s) for s in d["suggestions"]]
        plan = cls(ModelShape(**d["model"]), d["settings"], rows, d["gpu_bytes"], d["pageable_bytes"], suggestions)
        plan.phases, plan.peak_moment = d["phases"], d["peak_moment"]
        return plan

    def title(self) -> str:
        s = self.settings
        return (
            f"{self.model.name}: seq {s['seq_len']} x batch {s['batch_size']}, LoRA r={s['rank']} on "
            f"{s['targets']}, {s['optimizer']}, checkpointing {'on' if s['checkpointing'] else 'off'}, "
            f"{s['compute_dtype']} on {s['device']}"
        )

    def verdict(self) -> str:
        text = f"total {self.total / MB:,.0f} MB ({self.total / GiB:.2f} GiB)"
        if self.gpu_bytes is None:
            return text
        budget, margin = f"{gib_text(self.gpu_bytes)} GiB", abs(self.gpu_bytes - self.total) / MB
        if self.fits:
            return f"{text}: fits in {budget} with {margin:,.0f} MB to spare"
        text += f": does NOT fit in {budget} (over by {margin:,.0f} MB)"
        if self.pageable_bytes and self.total - self.pageable_bytes <= self.gpu_bytes:
            text += "; it would run, slower, with the paged optimizer's states moved to host RAM"
        return text

    def limits(self) -> str:
        """When the fixed part alone is over budget, why no batch, sequence or checkpointing knob can help."""
        if self.fits is not False or self.fixed_bytes <= self.gpu_bytes:
            return ""
        budget = f"more than the {gib_text(self.gpu_bytes)} GiB budget"
        if self.weight_bytes > self.gpu_bytes:
            return (
                f"the 4-bit weights and embeddings alone are {_gb(self.weight_bytes)}, {budget}: no batch, "
                f"sequence, checkpointing, rank, target or optimizer setting can fit; this run as planned needs "
                f"{self.total / GiB:.2f} GiB"
            )
        return (
            f"the weights, LoRA parameters, optimizer states and runtime alone are {_gb(self.fixed_bytes)}, "
            f"{budget}: no batch, sequence or checkpointing setting can fit; only a smaller rank, fewer "
            "targets, a lighter optimizer or more memory can"
        )

    def advice(self, recipe: bool = False) -> list[str]:
        """The lines under the verdict of a plan that does not fit: the limits, then what fits (``recipe``:
        with each change as a ``qlora-kit train`` override)."""
        if self.fits is not False:
            return []
        lines = [self.limits()] if self.limits() else []
        if not self.suggestions:
            return [*lines, "nothing tried fits (" + ", ".join(TRIED) + ")"]
        lines.append("what fits (each replanned):")
        for s in self.suggestions:
            saves = f": saves {s.saves / MB:,.0f} MB -> {s.total / GiB:.2f} GiB" if s.saves else ""
            lines.append(f"  - {s.change}{saves}" + (f"  [{recipe_overrides(s.knob)}]" if recipe else ""))
        return lines

    def _cells(self) -> list[tuple[str, str, str, str]]:
        rows = [(r.category, r.item, f"{r.bytes / MB:,.1f}", r.note) for r in self.rows]
        return [*rows, ("total", "", f"{self.total / MB:,.1f}", f"{self.total / GiB:.2f} GiB")]

    def table(self, recipe: bool = False) -> str:
        cells = self._cells()
        w = [max(len(row[i]) for row in cells) for i in range(3)]
        out = [self.title(), f"{'category':<{w[0]}}  {'item':<{w[1]}}  {'MB':>{w[2]}}  explanation"]
        out += [f"{c:<{w[0]}}  {i:<{w[1]}}  {b:>{w[2]}}  {n}" for c, i, b, n in cells]
        return "\n".join([*out, self.verdict(), *self.advice(recipe)])

    def to_markdown(self) -> str:
        out = [
            f"**{self.title()}**",
            "",
            "| category | item | MB | explanation |",
            "| --- | --- | ---: | --- |",
        ]
        out += [f"| {c} | {i} | {b} | {n} |" for c, i, b, n in self._cells()]
        advice = [line if line.startswith("  - ") else f"- {line}" for line in self.advice()]
        return "\n".join([*out, "", self.verdict(), *advice])


def lora_param_count(shape: ModelShape, rank: int, targets: str | list[str]) -> int:
    """A: r x in plus B: out x r for every target linear in every layer."""
    names = _targets(targets)
    return shape.layers * sum(rank * (o + i) for name, (o, i) in shape.linears().items() if name in names)


def _optimizer_bytes(shape: ModelShape, rank: int, targets: tuple[str, ...], optimizer: str, a: int) -> int:
    total = 0
    for o, i in (shape.linears()[name] for name in targets):
        for numel in (rank * i, o * rank):  # A, B
            if optimizer == "adamw":  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
                total += 2 * a * numel
            elif optimizer.endswith("8bit") and numel >= 4096:  # bnb keeps tensors < 4096 values in 32 bit
                total += 2 * numel + 2 * 4 * math.ceil(numel / 256)  # 2 uint8 states + fp32 absmax per 256
            else:
                total += 8 * numel  # 2 fp32 states
    return total * shape.layers


def plan_memory(
    shape: ModelShape,
    *,
    seq_len: int = 512,
    batch_size: int = 1,
    rank: int = 64,
    targets: str | list[str] = "all-linear",
    optimizer: str = "auto",
    checkpointing: bool = True,
    compute_dtype: str = "auto",
    adapter_dtype: str = "auto",
    lora_dropout: float = 0.05,
    device: str = "cuda",
    grad_accumulation: int = 1,
    label_tokens: int | None = None,
    gpu_bytes: int | None = None,
    suggest: bool = True,
) -> MemoryPlan:
    """Peak memory of one training step of our stack, by category (formulas: docs/memory.md).

    ``label_tokens``: labelled positions per micro-batch (the loss computes logits for those only); default
    ``batch_size * (seq_len - 1)``, every next-token position. ``grad_accumulation`` > 1 keeps the previous
    micro-batches' gradients live through the next forward and backward.
    """
    device = "cuda" if device.startswith("cuda") else device
    compute_dtype = ("bf16" if device == "cuda" else "fp32") if compute_dtype == "auto" else compute_dtype
    adapter_dtype = compute_dtype if adapter_dtype == "auto" else adapter_dtype
    optimizer = ("paged_adamw_32bit" if device == "cuda" else "adamw") if optimizer == "auto" else optimizer
    for key, value, allowed in [
        ("device", device, ("cuda", "cpu")),
        ("compute_dtype", compute_dtype, DTYPE_BYTES),
        ("adapter_dtype", adapter_dtype, DTYPE_BYTES),
        ("optimizer", optimizer, OPTIMIZERS),
    ]:
        if value not in allowed:
            raise QloraKitError(f"{key} {value!r} is not one of: {', '.join(allowed)}")
    if min(seq_len, batch_size, rank) < 1:
        raise QloraKitError(f"seq_len, batch_size, rank must be >= 1 (got {seq_len}, {batch_size}, {rank})")
    names = _targets(targets)
    targets = targets if isinstance(targets, str) else list(targets)
    settings = dict(seq_len=seq_len, batch_size=batch_size, rank=rank, targets=targets, optimizer=optimizer)
    settings |= dict(checkpointing=checkpointing, compute_dtype=compute_dtype, adapter_dtype=adapter_dtype)
    settings |= dict(lora_dropout=lora_dropout, device=device, grad_accumulation=grad_accumulation)
    settings |= dict(label_tokens=label_tokens)
    c, a, k = DTYPE_BYTES[compute_dtype], DTYPE_BYTES[adapter_dtype], ACTIVATION_COEFFS
    L, h, tokens = shape.layers, shape.hidden, batch_size * seq_len
    rows: list[Row] = []

    def add(category: str, item: str, nbytes: float, note: str) -> None:
        rows.append(Row(category, item, int(nbytes), note))

    # Weights: every decoder linear in NF4 (sizes of the tensors NF4Linear stores), the rest in compute dtype.
    nf4 = [nf4_bytes(o, i) for o, i in shape.linears().values()]
    note = f"{shape.quantized_params / 1e9:.2f}B params in {7 * L} decoder linears, 4 bits each"
    add("weights", "NF4 codes", L * sum(b.codes for b in nf4), note)
    add("weights", "NF4 absmax", L * sum(b.absmax for b in nf4), "one uint8 absmax per block of 64 values")
    add("weights", "NF4 nested stats", L * sum(b.nested for b in nf4), "fp32 scale per 256 absmax + offset")
    embeddings = "embeddings (tied: lm_head is the same tensor)" if shape.tied else "embeddings, lm_head"
    note = f"{embeddings}, norms{', q/k/v biases' if shape.qkv_bias else ''} in {compute_dtype}"
    # + the rotary inv_freq and original_inv_freq buffers: head_dim/2 fp32 values each
    add("weights", "non-quantized weights", c * shape.non_quantized_params + 4 * shape.head_dim, note)

    n_lora = lora_param_count(shape, rank, names)
    opt = _optimizer_bytes(shape, rank, names, optimizer, a)
    moments = step_moments(shape, settings, n_lora=n_lora)
    peak = max(moments, key=lambda m: moments[m].total)
    at = moments[peak]

    note = f"{n_lora / 1e6:.1f}M params: A r x in, B out x r on {len(names)} linears x {L} layers"
    add("adapters", "LoRA parameters", a * n_lora, f"{note}, {adapter_dtype}")
    note = f"{a * n_lora / MB:,.1f} MB in all (one .grad per LoRA parameter, {adapter_dtype}); live at the peak"
    add("adapters", "LoRA gradients", at.gradients, f"{note}: backward creates them as it frees activations")
    note = "2 uint8 states + fp32 absmax per 256: ~2 B/param" if "8bit" in optimizer else "2 fp32 states: 8 B/param"
    note = f"torch AdamW: 2 states in {adapter_dtype}" if optimizer == "adamw" else note
    if optimizer.startswith("paged"):
        note += "; paged: may all move to host RAM under pressure"
    add("optimizer", f"{optimizer} states", opt, note)

    # Activations kept for backward, as many as are still live at the peak.
    knobs = dict(c=c, a=a, rank=rank, targets=names, dropout=lora_dropout, device=device)
    terms = layer_activation_bytes(shape, **knobs)
    if checkpointing:  # non-reentrant per-layer checkpointing keeps each layer's input, recomputes the rest
        note = f"{L} layers x b*s*hidden in {compute_dtype}" + _live(at.activations, L * tokens * h * c)
        add("activations", "checkpointed layer inputs", at.activations, note)
    else:
        detail = ", ".join(f"{name} {b * tokens / MB:,.1f}" for name, b in terms.items())
        note = f"{L} layers x ({detail}) MB, less what layer 0 keeps not (its input needs no grad)"
        note += _live(at.activations, moments["forward"].activations)
        add("activations", "saved activations", at.activations, note)
    note = (
        "chunked loss: the grad of the labelled tokens' hidden states (computed in forward), the final norm's "
        "fp32 input, rope cos/sin (logits exist one chunk at a time: transient)"
    )
    add("activations", "logits + loss", at.loss_kept, note + _live(at.loss_kept, moments["forward"].loss_kept))
    # each moment's gradients + activations + loss + transient (the peak's is the sum of those rows above)
    others = ", ".join(f"{m} {moments[m].total / MB:,.1f}" for m in moments if m != peak)
    note = f"peak in {peak}: {at.transient_what}; beyond weights, adapters and optimizer states it holds "
    note += f"{at.total / MB:,.1f} MB, the other moments less ({others} MB)"
    add("transient", "largest transient", at.transient, note)

    # Fragmentation hits what is allocated and freed every step: gradients, activations, transients.
    dynamic = sum(r.bytes for r in rows if r.category in ("activations", "transient") or "gradients" in r.item)
    note = f"assumed {k['allocator_slack']:.0%} of gradients + activations + transient (fragmentation)"
    add("runtime", "allocator slack", k["allocator_slack"] * dynamic, note)
    if device == "cuda":
        add("runtime", "CUDA context", k["cuda_context_bytes"], "assumed: CUDA context + cuBLAS workspace")
    else:
        add("runtime", "process runtime", k["cpu_runtime_bytes"], "assumed: Python + torch + libraries (RSS)")

    plan = MemoryPlan(shape, settings, rows, gpu_bytes, opt if optimizer.startswith("paged") else 0)
    plan.peak_moment = peak
    plan.phases = phase_bytes(plan, moments)
    if suggest and plan.fits is False:
        plan.suggestions = _suggestions(plan)
    return plan


def phase_bytes(plan: MemoryPlan, moments: dict[str, Moment]) -> dict[str, int]:
    """Planned peak tensor bytes of each phase ``qlora-kit profile`` measures (no runtime rows).

    load: the weights and the adapters. The loader's working set (one source tensor, read into a host
    buffer, and its quantizer's slice temporaries) is not planned: bench/load_memory.py measures it. The
    step's phases: weights + adapters + optimizer states (allocated by the first optimizer step, live from
    then on) + the phase's largest moment.
    """
    by_item = {row.item: row.bytes for row in plan.rows}
    weights = sum(row.bytes for row in plan.rows if row.category == "weights") + by_item["LoRA parameters"]
    fixed = weights + next(row.bytes for row in plan.rows if row.category == "optimizer")
    backward = ("loss backward", "backward of the last layer", "backward of the first layer")
    return {
        "load": weights,
        "forward": fixed + moments["forward"].total,
        "backward": fixed + max(moments[m].total for m in backward),
        "optimizer step": fixed + moments["optimizer step"].total,
    }


def _suggestions(plan: MemoryPlan) -> list[Suggestion]:
    """Changes that make the run fit, each replanned: one knob at a time, the fewest knobs together (when
    it takes more than one), and the smallest memory that holds the run as it is. Only what fits."""
    changes = _knob_changes(plan)
    out = [sugg for text, knob in changes if (sugg := _replanned(plan, text, knob)).fits]
    together = _fewest_together(plan, [(text, knob) for text, knob in changes if not {*knob} & {*VARIED}])
    if together is not None and len(together.knob) > 1:
        out.append(together)
    need = plan.total
    if plan.settings["device"] == "cuda":
        bigger = next((g * GiB for g in GPU_SIZES_GIB if g * GiB >= need), None)
        text = f"a {(bigger or 0) // GiB} GiB GPU"
    else:  # a CPU run's budget is host memory: the plan's total, rounded up to 0.01 GiB
        bigger = math.ceil(math.ceil(100 * need / GiB) * GiB / 100)
        text = f"a budget of {gib_text(bigger)} GiB"
    if bigger:
        out.append(Suggestion(text, {"gpu_bytes": bigger}, need, 0, True))
    return out


VARIED = {"batch_size": "batch", "seq_len": "seq"}  # the knobs max_fitting searches


def _knob_changes(plan: MemoryPlan) -> list[tuple[str, dict]]:
    """Each knob turned on its own, the least invasive first; batch, sequence and checkpointing only when
    the fixed part fits at all."""
    s, changes = plan.settings, []
    if plan.fixed_bytes <= plan.gpu_bytes:
        if not s["checkpointing"]:
            changes.append(("turn on gradient checkpointing", {"checkpointing": True}))
        for key, vary in VARIED.items():
            best = max_fitting(plan.model, plan.gpu_bytes, vary=vary, **s) if s[key] > 1 else 0
            if best:  # the largest value that fits (0: not even 1 does)
                changes.append((f"{vary} {s[key]} -> {best}", {key: best}))
    if not s["optimizer"].endswith("8bit"):  # paged optimizers need CUDA
        eight = "paged_adamw_8bit" if s["device"] == "cuda" else "adamw_8bit"
        changes.append((f"{eight} optimizer", {"optimizer": eight}))
    if s["rank"] > 8:
        changes.append((f"rank {s['rank']} -> {s['rank'] // 4}", {"rank": s["rank"] // 4}))
    if s["targets"] != "attention":
        changes.append(("LoRA on attention only (q,k,v,o)", {"targets": "attention"}))
    return changes


def _replanned(plan: MemoryPlan, text: str, knob: dict) -> Suggestion:
    new = plan_memory(plan.model, **{**plan.settings, **knob}, gpu_bytes=plan.gpu_bytes, suggest=False)
    return Suggestion(text, knob, new.total, plan.total - new.total, bool(new.fits))


def _fewest_together(plan: MemoryPlan, changes: list[tuple[str, dict]]) -> Suggestion | None:
    """The first of ``changes`` (in their order), each time with the largest batch, else sequence, that
    fits with them, until the run fits; None if even all of them do not make it fit."""
    texts, knob = [], {}
    for text, change in changes:
        texts, knob = [*texts, text], {**knob, **change}
        together = _replanned(plan, ", ".join(texts), knob)
        for key, vary in VARIED.items():
            now = {**plan.settings, **knob}[key]
            if together.fits or now == 1:
                continue
            best = max_fitting(plan.model, plan.gpu_bytes, vary, **{**plan.settings, **knob})
            if best:  # then it fits: max_fitting's answer does by definition
                together = _replanned(plan, f"{together.change}, {vary} {now} -> {best}", {**knob, key: best})
        if together.fits:
            return together
    return None


def max_fitting(shape: ModelShape, gpu_bytes: int, vary: str = "batch", **knobs) -> int:
    """The largest batch size (or sequence length) whose plan fits in ``gpu_bytes``; 0 if even 1 does not."""
    key = {"batch": "batch_size", "seq": "seq_len"}[vary]
    knobs = {name: value for name, value in knobs.items() if name not in (key, "gpu_bytes", "suggest")}

    def fits(n: int) -> bool:
        return plan_memory(shape, **knobs, **{key: n}, suggest=False).total <= gpu_bytes

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= 2**24 and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


# --- the QLoRA paper: LLaMA-7B (Dettmers et al. 2023, section 4 and Figure 6) -------------------------------


def paper_comparison() -> list[dict]:
    """The paper's LLaMA-7B figures (MB) next to ours, each with why they differ (docs/memory.md)."""
    llama = PRESETS["llama-7b"]
    rows = {r.item: r.bytes for r in plan_memory(llama, seq_len=512, batch_size=1).rows}
    nf4 = rows["NF4 codes"] + rows["NF4 absmax"] + rows["NF4 nested stats"]
    base = nf4 + rows["non-quantized weights"]
    fp32_extra = 2 * llama.non_quantized_params  # bf16 -> fp32 embeddings, lm_head, norms
    lora_02 = 2 * lora_param_count(llama, 13, "attention")  # 0.2% of the weights: q,k,v,o at r=13, bf16
    # The LoRA inputs one layer keeps at b1 s512: all linears, bf16, no dropout.
    knobs = dict(c=2, a=2, rank=64, targets=LINEAR_NAMES, dropout=0.0, device="cuda")
    inputs = 512 * layer_activation_bytes(llama, **knobs)["lora"]
    why_base = (
        f"ours: NF4 linears {nf4 / MB:,.0f} MB (4.127 bits/param) + bf16 embeddings, lm_head, norms. The "
        f"paper's stack kept those in fp32 (+{fp32_extra / MB:,.0f} MB = {(base + fp32_extra) / MB:,.0f} MB);"
        " "
        "the remaining ~660 MB fits a measured figure that includes the CUDA context. Read as MiB "
        "(5,293 MB) the gap would only grow."
    )
    why_lora = (
        "0.2% of 6.74B params in bf16 is 27.0 MB (25.7 MiB); with an integer rank that is LoRA on q,k,v,o "
        "at r=13 (13.6M params, 26.0 MiB). The paper's runs (r=64, all linears) have 160M params: 320 MB."
    )
    why_inputs = (
        "ours: all linears, bf16, no dropout: per layer 2 hidden-wide inputs (q/k/v share one, gate/up the "
        "other; o reuses SDPA's saved output) + 1 ffn-wide (down) + the r-wide A outputs = 4.8 hidden-wide "
        "tensors. The paper gives no formula; 567 MB is 4.2 hidden-wide tensors per layer."
    )
    why_ckpt = (
        "one recomputed layer's share (paper: 567/32 = 17.7). The checkpoints themselves (32 layer inputs, "
        f"{32 * 512 * 4096 * 2 / MB:,.0f} MB per 512-token sequence) are not in the paper's figure."
    )
    table = [
        ("4-bit base model", 5048, base, why_base),
        ("LoRA parameters (0.2% of weights)", 26, lora_02, why_lora),
        ("LoRA inputs kept, b1 s512, no checkpointing", 567, 32 * inputs, why_inputs),
        ("same with checkpointing (per sequence)", 18, inputs, why_ckpt),
    ]
    return [{"item": i, "paper_mb": p, "ours_mb": round(b / MB), "why": w} for i, p, b, w in table]


# --- the budget of a training run (model.max_memory_gb) ------------------------------------------------------


def largest_micro_batch(cfg, data) -> tuple[int, int, int]:
    """(rows, width, labelled positions) that bound every training micro-batch of the run.

    ``train.micro_batch_size`` rows (fewer when there are fewer examples) as wide as the longest example,
    or as the packing block (``data.cutoff_len``); the labelled positions are those of the examples with
    the most labels, at most ``rows x (width - 1)`` (the loss predicts each token from the one before).
    """
    from qlora_kit.data import trainable_tokens

    rows = min(cfg.train.micro_batch_size, len(data.train))
    width = cfg.data.cutoff_len if cfg.data.packing else data.stats.max_length
    labelled = rows * (width - 1)
    if not cfg.data.packing:  # one example per row
        labelled = min(labelled, sum(sorted((trainable_tokens(e) for e in data.train), reverse=True)[:rows]))
    return rows, width, labelled


def plan_run(cfg, data, gpu_bytes: int | None = None) -> MemoryPlan:
    """The plan of a recipe's largest micro-batch, from the checkpoint's ``config.json`` alone."""
    from qlora_kit.loading import DTYPES
    from qlora_kit.train import resolve_run_dtypes

    device, dtype, adapter_dtype = resolve_run_dtypes(cfg)
    names = {value: name for name, value in DTYPES.items()}
    rows, width, labelled = largest_micro_batch(cfg, data)
    knobs = dict(rank=cfg.lora.r, targets=cfg.lora.targets, optimizer=cfg.train.optimizer, device=device.type)
    knobs |= dict(checkpointing=cfg.model.gradient_checkpointing, lora_dropout=cfg.lora.dropout)
    knobs |= dict(compute_dtype=names[dtype], adapter_dtype=names[adapter_dtype])
    knobs |= dict(grad_accumulation=cfg.train.gradient_accumulation_steps)
    shape = checkpoint_shape(cfg.model.name_or_path)
    return plan_memory(shape, seq_len=width, batch_size=rows, label_tokens=labelled, **knobs, gpu_bytes=gpu_bytes)


def check_budget(cfg, data) -> MemoryPlan | None:
    """Refuse a run whose planned peak exceeds ``model.max_memory_gb`` (GiB), before anything is loaded.

    The error holds the plan's table, its verdict and the changes that fit, as ``qlora-kit train``
    overrides. Nothing is checked (None) without a budget.
    """
    from qlora_kit.train import resolve_run_dtypes

    budget = cfg.model.max_memory_gb
    if budget is None:
        return None
    resolve_run_dtypes(cfg)  # its errors (device=cuda without a GPU) are the recipe's, not the planner's
    try:
        plan = plan_run(cfg, data, gpu_bytes=int(budget * GiB))
    except QloraKitError as e:
        raise QloraKitError(
            f"model.max_memory_gb = {budget:g}: the memory planner cannot plan this run ({e}); "
            "set model.max_memory_gb=null to train without the check"
        ) from None
    s = plan.settings
    batch = f"{s['batch_size']} x {s['seq_len']} tokens, {s['label_tokens']:,} labelled"
    if plan.fits:
        print(f"memory plan: {plan.total / GiB:.2f} GiB of the {budget:g} GiB budget (largest micro-batch {batch})")
        return plan
    raise QloraKitError(
        f"model.max_memory_gb = {budget:g} GiB: this run does not fit; nothing was loaded or written. The plan of "
        f"its largest micro-batch ({batch}):\n{plan.table(recipe=True)}\n"
        "Apply a change with its override [in brackets], or raise model.max_memory_gb (null: no check)."
    )


# --- CLI ---------------------------------------------------------------------------------------------------


EXIT_DOES_NOT_FIT = 3  # `qlora-kit plan` exit status when the run does not fit (2 is the CLI's bad input)
PLAN_EPILOG = f"""exit status:
  0  the run fits in --gpu (or no --gpu was given)
  2  bad input (the message says what to fix)
  {EXIT_DOES_NOT_FIT}  the run does not fit in --gpu (with --max: not even 1 fits); the table says why and what fits
"""


def parse_size(text: str, flag: str = "--gpu") -> int:
    """'24GB', '24GiB', '24G' -> 24 GiB (GPU memory comes in GiB-sized units); '500MB' -> MiB; bytes."""
    t = text.strip().upper().replace("IB", "B")
    units = {"TB": 2**40, "GB": GiB, "MB": 2**20, "T": 2**40, "G": GiB, "M": 2**20}
    unit = next((u for u in units if t.endswith(u)), "")
    try:
        value = float(t.removesuffix(unit) if unit else t)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value * units.get(unit, 1) >= 1):
        raise QloraKitError(
            f"{flag} {text!r}: write a memory size above 0, like 24GB or 80GB (read as GiB) or a number of bytes"
        )
    return int(value * units.get(unit, 1))


def plan_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="qlora-kit plan",
        description="Plan the GPU memory of a QLoRA run.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF checkpoint dir, hub id, short id or preset (see --list-presets)")
    p.add_argument("--seq", type=int, default=512, help="sequence length in tokens (default 512)")
    p.add_argument("--batch", type=int, default=1, help="micro batch size (default 1)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    p.add_argument("--targets", default="all-linear", help="attention | all-linear | q_proj,v_proj,...")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (> 0 keeps a mask per adapter)")
    p.add_argument("--optimizer", default="auto", choices=("auto", *OPTIMIZERS), help="auto: paged 32-bit")
    p.add_argument("--checkpointing", default="on", choices=("on", "off"), help="per-layer, default on")
    p.add_argument("--compute-dtype", default="auto", choices=("auto", *DTYPE_BYTES), help="auto: bf16 on cuda")
    p.add_argument("--adapter-dtype", default="auto", choices=("auto", *DTYPE_BYTES), help="auto: compute")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (> 1 keeps gradients live)")
    p.add_argument("--gpu", help="memory to fit in: 24GB, 48GB, 80GB (as GiB: 24GB = 24 x 2^30) or bytes")
    p.add_argument("--max", choices=("batch", "seq"), help="print the largest batch or seq that fits in --gpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--list-presets", action="store_true", help="list the built-in model shapes")
    args = p.parse_args(argv)
    if args.list_presets:
        for s in PRESETS.values():
            kv = f" ({s.kv_heads} kv)" if s.kv_heads != s.heads else ""
            print(f"{s.name:<12} {s.params / 1e9:5.1f}B  hidden {s.hidden}, {s.layers} layers, ", end="")
            print(f"{s.heads} heads{kv}, ffn {s.ffn}, vocab {s.vocab}")
        return 0
    if not args.model:
        p.error("--model is required (an HF dir, hub id or one of --list-presets)")
    if args.max and args.gpu is None:
        p.error("--max needs --gpu")
    gpu = parse_size(args.gpu) if args.gpu is not None else None
    knobs = dict(seq_len=args.seq, batch_size=args.batch, rank=args.rank, targets=args.targets)
    knobs |= dict(optimizer=args.optimizer, checkpointing=args.checkpointing == "on", device=args.device)
    knobs |= dict(compute_dtype=args.compute_dtype, adapter_dtype=args.adapter_dtype, lora_dropout=args.dropout)
    knobs |= dict(grad_accumulation=args.accum)
    shape = model_shape(args.model)
    if args.max:
        return _print_max(shape, gpu, args.max, args.json, knobs)
    plan = plan_memory(shape, **knobs, gpu_bytes=gpu)
    print(plan.to_json() if args.json else plan.table())
    return EXIT_DOES_NOT_FIT if plan.fits is False else 0


def _print_max(shape: ModelShape, gpu: int, vary: str, as_json: bool, knobs: dict) -> int:
    """``--max batch|seq``: the largest value that fits; when not even 1 does, why, and exit status 3."""
    best = max_fitting(shape, gpu, vary=vary, **knobs)
    if as_json:
        print(json.dumps({vary: best}))
    elif best:
        print(f"largest {vary} that fits in {gib_text(gpu)} GiB: {best}")
    else:
        key = {"batch": "batch_size", "seq": "seq_len"}[vary]
        plan = plan_memory(shape, **{**knobs, key: 1}, gpu_bytes=gpu)
        print(f"no {vary} fits in {gib_text(gpu)} GiB: not even {vary} 1 ({plan.total / GiB:.2f} GiB planned)")
        print("\n".join(plan.advice()))
    return 0 if best else EXIT_DOES_NOT_FIT
