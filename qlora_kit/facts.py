"""The facts several modules must agree on, defined once: names users type, the rules that resolve "auto",
the NF4 byte formula, the loss chunk size and how a size such as ``24GB`` is read.

Torch-free on purpose: config validation, the memory planner and the CLI's help read these without
importing torch, and the modules that do use torch (quant, loading, train, export) import them from here,
so a rule cannot drift between the planner's idea of a run and the run itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qlora_kit.errors import QloraKitError

# --- dtypes ------------------------------------------------------------------------------------------------

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
DTYPE_NAMES = tuple(DTYPE_BYTES)
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def auto_compute_dtype(device_type: str, gpu_bf16: bool = True) -> str:
    """``auto`` compute dtype: bf16 on a bf16-capable GPU, fp16 on an older GPU, fp32 on CPU.

    fp32 on CPU because bf16 matmul on CPUs without bf16 instructions is about 60x slower than fp32.
    """
    if device_type == "cuda":
        return "bf16" if gpu_bf16 else "fp16"
    return "fp32"


def resolve_adapter_dtype(adapter_dtype: str, compute_dtype: str) -> str:
    """``auto`` adapter dtype: the compute dtype (so base and adapter run as one fused autograd node), except
    under fp16 compute: fp32 adapters there, whose gradients dynamic loss scaling can unscale (an fp16 gradient
    of a small update underflows; torch's GradScaler refuses to unscale fp16 gradients)."""
    if adapter_dtype != "auto":
        return adapter_dtype
    return "fp32" if compute_dtype == "fp16" else compute_dtype


# --- optimizers and schedules ------------------------------------------------------------------------------

OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit", "adamw")
OPTIMIZER_CHOICES = ("auto", *OPTIMIZERS)
LORA_VARIANTS = ("lora", "dora", "vera")  # lora.variant (the layers: qlora_kit.lora_variants)
LORA_INITS = ("default", "pissa", "loftq")  # lora.init (qlora_kit.lora_init)
LR_SCHEDULERS = ("constant", "cosine", "linear")
PARALLEL_CHOICES = ("auto", "ddp", "fsdp")  # train.parallel: how torchrun's processes share the work


# optim.MasterWeights steps the fp32 master copies of 16-bit adapters this many values at a time: their fp32
# gradients exist one chunk at a time (64 MB), and the planner counts that chunk
MASTER_STEP_NUMEL = 2**24


def auto_optimizer(device_type: str) -> str:
    """``auto`` optimizer: bitsandbytes' paged AdamW on CUDA (states page out under pressure), torch AdamW on CPU."""
    return "paged_adamw_32bit" if device_type == "cuda" else "adamw"


# --- data and prompts --------------------------------------------------------------------------------------

DATA_FORMATS = ("alpaca", "chat")
TEMPLATES = ("alpaca",)  # prompt templates of the alpaca format (data.template)
PROMPT_TEMPLATES = ("alpaca", "chat", "none")  # how a prompt is wrapped for generation
LOSS_CHUNK_TOKENS = 1024  # the loss materializes fp32 logits for this many labelled tokens at a time

# --- LoRA targets ------------------------------------------------------------------------------------------

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama-style layer
# A preset -> the leaf module names it selects (None: every linear in the decoder layers, never lm_head).
TARGET_PRESETS: dict[str, tuple[str, ...] | None] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "all-linear": None,
}


def select_targets(targets: str | Iterable[str], candidates: Sequence[str]) -> list[str]:
    """The names among ``candidates`` (full module names) that ``targets`` selects, in candidate order.

    ``targets`` is a preset or module names: ``q_proj`` matches every layer's q_proj, a dotted name such as
    ``self_attn.q_proj`` or ``layers.0.mlp.up_proj`` matches as a suffix. A name that matches nothing is an
    error listing what exists. The model (``lora.add_lora``) and the planner (a Llama-shaped layer) both
    select through here.
    """
    if isinstance(targets, str) and targets in TARGET_PRESETS:
        wanted = TARGET_PRESETS[targets]
        if wanted is None:
            return list(candidates)
    else:
        wanted = (targets,) if isinstance(targets, str) else tuple(targets)
    selected: set[str] = set()
    for target in wanted:
        pattern = re.compile(rf"(^|\.){re.escape(target)}$")
        hits = {name for name in candidates if pattern.search(name)}
        if not hits:
            leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
            raise QloraKitError(
                f"LoRA target {target!r} matches no linear layer in the decoder layers. The model's linear "
                f"layers are: {', '.join(leaves)} (or use a preset: {', '.join(TARGET_PRESETS)})"
            )
        selected |= hits
    return [name for name in candidates if name in selected]


# --- NF4 bytes ---------------------------------------------------------------------------------------------

NF4_BLOCKSIZE = 64  # values per absmax (bitsandbytes' default for NF4)
ABSMAX_BLOCKSIZE = 256  # absmax values per fp32 scale: double quantization's block, fixed by bitsandbytes
# A serialized bitsandbytes QuantState also carries its own copy of both code tables (NF4: 16 fp32 values,
# the 8-bit dynamic map: 256) and a small JSON blob; in memory NF4Linear shares the tables.
BNB_TABLE_BYTES = 4 * (16 + 256)
BNB_STATE_BLOB_BYTES = 200  # the packed JSON of quant type, shapes and dtypes (about 180 bytes; rounded up)


@dataclass(frozen=True)
class NF4Bytes:
    codes: int  # two 4-bit values per uint8
    absmax: int  # one uint8 (double-quantized) absmax per block of 64
    nested: int  # fp32 scale per 256 absmax + the fp32 offset (+ the serialized tables and blob, if counted)

    @property
    def total(self) -> int:
        return self.codes + self.absmax + self.nested


def nf4_bytes(out_features: int, in_features: int, *, serialized: bool = False) -> NF4Bytes:
    """Bytes of an (out, in) weight in NF4 with double quantization: 4 + 8/64 + 32/(64*256) = 4.127 bits a value.

    ``serialized``: as bitsandbytes writes it into a checkpoint (its code tables and state blob included).
    """
    n = out_features * in_features
    blocks = math.ceil(n / NF4_BLOCKSIZE)
    nested = 4 * math.ceil(blocks / ABSMAX_BLOCKSIZE) + 4
    if serialized:
        nested += BNB_TABLE_BYTES + BNB_STATE_BLOB_BYTES
    return NF4Bytes(codes=math.ceil(n / 2), absmax=blocks, nested=nested)


# --- offload (qlora_kit.offload; the planner's step-time estimate, memory.offload) ------------------------------

PCIE_GBPS = 12.0  # host -> device copy rate (GB/s): PCIe 4.0 x16 sustains ~12-25 with pinned memory
TFLOPS = 60.0  # achieved bf16 matmul rate (TFLOPS) of the estimate: about an RTX 4090's; an H100 sustains ~600

# --- sizes the user types ----------------------------------------------------------------------------------

MB = 10**6  # printed figures are decimal megabytes (MB) unless they say MiB/GiB
MiB = 2**20
GiB = 2**30
_SIZE_UNITS = {"": 1, "B": 1, "K": 2**10, "M": MiB, "G": GiB, "T": 2**40}
SIZE_RULE = "sizes are binary: 24GB = 24GiB = 24 x 2^30 bytes (a '24 GB' card has 24 GiB)"


def parse_size(text: str | int, what: str = "size") -> int:
    """Bytes of a size the user typed: ``24GB``, ``24GiB``, ``24G``, ``500MB``, ``1.5T`` or a byte count.

    One rule everywhere (``--gpu``, ``model.max_memory_gb``, ``--max-shard-size``): K/M/G/T are powers of
    1024, with or without "iB" or "B". Memory is what users size, and GPUs sold as "24 GB" have 24 GiB.
    (transformers reads ``max_shard_size="5GB"`` as 5 x 10^9 bytes; our "5GB" shards are 5 GiB, 7% larger.)
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text).upper())
        value, unit = (float(match.group(1)), match.group(2)) if match else (math.nan, "")
    nbytes = value * _SIZE_UNITS[unit]
    if not (math.isfinite(nbytes) and nbytes >= 1):
        raise QloraKitError(f"{what} {text!r} is not a size above 0; write it like 24GB, 500MB or 2GiB ({SIZE_RULE})")
    return int(nbytes)


EMBEDDING_MODULES = ("embed_tokens", "lm_head")  # what lora.modules_to_save may train in full (PEFT's names)
