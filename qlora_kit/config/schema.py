"""The run config's schema: one typed dataclass per section, each field followed by its docstring.

The attribute docstrings are the CLI help text and the comments ``to_yaml`` writes above each key
(``render.field_docs`` reads them from this source), so the documentation cannot drift from the code.
"""

from __future__ import annotations

import functools
import typing
from dataclasses import dataclass, field, fields
from typing import Any


@dataclass
class ModelConfig:
    """The base model and where it runs."""

    name_or_path: str = "smollm2-135m-instruct"
    """HF checkpoint dir, hub id (owner/name) or a short id from qlora_kit.models.SHORT_IDS."""
    compute_dtype: str = "auto"
    """auto|bf16|fp16|fp32. auto = bf16 on a bf16-capable GPU, fp32 on CPU (bf16 matmul is slow on CPUs)."""
    device: str = "auto"
    """auto|cpu|cuda|cuda:N. auto = cuda when available, else cpu."""
    gradient_checkpointing: bool = True
    """Recompute each decoder layer's activations in backward (non-reentrant): less memory, more compute."""
    max_memory_gb: float | None = None
    """Optional memory budget in GiB (2^30 bytes, as `qlora-kit plan --gpu`: a "24 GB" card has 24 GiB).
    Before loading the model, train plans its largest micro-batch and refuses to start, with the plan and
    what to change, when it does not fit; on CPU the plan's device is cpu. null = no check."""
    offload_weights: bool = False
    """Stream the 4-bit decoder layers from pinned host memory, each copied to the device one layer ahead of
    its compute (forward, and again for backward) instead of all staying there: a model larger than the GPU
    trains, slower when the copies do not hide behind the compute (`qlora-kit plan --offload weights`)."""
    resident_layers: int | str = "auto"
    """With offload_weights: the first N decoder layers stay on the device, only the others stream.
    auto = as many as the planner fits in model.max_memory_gb, else in the GPU's free memory; on CPU
    without a budget, all of them."""


@dataclass
class LoRAConfig:
    """The low-rank adapters added to the frozen 4-bit base."""

    r: int = 16
    """Rank of the adapter matrices A (r x in) and B (out x r)."""
    alpha: float = 32.0
    """Scale numerator: the adapter output is multiplied by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter input during training, in [0, 1)."""
    targets: list[str] | str = "all-linear"
    """Which linears get adapters: attention | all-linear | a list of module names, e.g. [q_proj, v_proj]."""
    use_rslora: bool = False
    """Rank-stabilized LoRA: scale by alpha/sqrt(r) instead of alpha/r."""
    adapter_dtype: str = "auto"
    """auto|bf16|fp16|fp32 for the adapter weights. auto = bf16 on a bf16-capable GPU, fp32 on CPU."""
    variant: str = "lora"
    """lora | dora (a trainable magnitude per output row, LoRA on the direction: closer to full fine-tuning) |
    vera (frozen random A/B shared by all layers, only two small vectors trained per layer: ~10x fewer
    trainable parameters; wants a larger r, 256 is typical; alpha and use_rslora do not apply)."""
    vera_projection_seed: int = 0
    """vera: the seed its shared random matrices are drawn from (PEFT's projection_prng_key); saved with them."""
    init: str = "default"
    """default (A random, B zero) | pissa (A, B = the top-r singular directions of each 16-bit weight; the
    residual is quantized) | loftq (alternate quantize / SVD of the quantization error, lora.init_iters
    times). Each layer starts closer to its 16-bit weight than with plain NF4 (not always the whole model:
    bench/results/variants.md); computed while loading (variant lora only). With pissa the adapter holds the
    weight's principal part, so lora.dropout drops part of it in training: PiSSA's paper uses dropout 0.
    The saved adapter is the rank-2r LoRA over the ORIGINAL base that PEFT's own conversion writes."""
    init_iters: int = 1
    """loftq: quantize/SVD alternations (LoftQ's T; 1 = quantize W, then fit the error)."""
    trainable_tokens: list[str] = field(default_factory=list)
    """Tokens whose embedding rows train (only those rows: the rest of the embedding stays frozen), e.g.
    ["<|tool|>"]. Tokens the tokenizer lacks are added to it (the vocabulary grows; new rows start at the
    mean of the others) and the tokenizer is saved beside the adapter. Untied models train the tokens' lm_head
    rows too; tied ones (SmolLM2) share one set of rows. Saved in PEFT's trainable_token_indices layout."""
    modules_to_save: list[str] = field(default_factory=list)
    """embed_tokens and/or lm_head: trained in full (a trainable copy in the compute dtype), saved beside the
    adapter in PEFT's modules_to_save layout. On a tied model (SmolLM2) either name means the one shared
    matrix, which stays tied. [] = none."""
    base_adapters: list[str] = field(default_factory=list)
    """Trained LoRA adapter dirs (or run dirs) to keep frozen under the new adapter, in order: each is added
    to the 4-bit base (dequant(W) + its delta) and the new adapter trains on top. The saved adapter records
    them (qlora_kit.json), and export and generate apply them all. [] = train on the bare base."""


@dataclass
class DataConfig:
    """The training data and how it becomes token ids."""

    path: str = "recipes/data/text_tools_train.jsonl"
    """Local json/jsonl/csv/parquet file (or dir) or a hub dataset name."""
    format: str = "alpaca"
    """alpaca (instruction/input/output rows) | chat (rows holding a list of role/content messages)."""
    split: str = "train"
    """Split of a hub or local dataset to train on."""
    val_path: str | None = None
    """Optional separate validation file (same format as path)."""
    val_set_size: float = 0.0
    """Rows of path held out for validation when val_path is null:
    a row count if >= 1, a fraction of the rows if < 1, 0 = none."""
    column_map: dict[str, str] = field(default_factory=dict)
    """Our field name -> dataset column name, e.g. {output: response}; for chat: {messages: conversations}."""
    template: str = "alpaca"
    """Prompt template for the alpaca format (the Alpaca-LoRA templates)."""
    cutoff_len: int = 256
    """Max tokens per example; longer examples are truncated."""
    train_on_inputs: bool = False
    """Also train on prompt tokens; false masks them to -100 so only the response is learned."""
    add_eos: bool = True
    """Append the tokenizer's eos token to each example so the model learns to stop."""
    group_by_length: bool = True
    """Batch examples of similar length together to waste less compute on padding."""
    packing: bool = False
    """Concatenate examples into sequences of cutoff_len tokens instead of padding each one."""
    max_samples: int | None = None
    """Use only the first N rows (for debugging); null = all rows."""
    shuffle_seed: int = 42
    """Seed for shuffling the rows and for the validation split."""


@dataclass
class TrainConfig:
    """The optimization loop."""

    micro_batch_size: int = 1
    """Examples per forward/backward pass."""
    gradient_accumulation_steps: int = 16
    """Micro-batches per optimizer step; effective batch = micro_batch_size * this."""
    num_epochs: float = 1.0
    """Passes over the training data (fractions allowed); ignored when max_steps > 0."""
    max_steps: int = -1
    """Number of optimizer steps; > 0 overrides num_epochs."""
    learning_rate: float = 2e-4
    """Peak learning rate."""
    lr_scheduler: str = "constant"
    """constant|cosine|linear decay after warmup."""
    warmup_ratio: float = 0.03
    """Fraction of the optimizer steps spent warming up linearly from 0, in [0, 1)."""
    warmup_steps: int = 0
    """Warmup length in optimizer steps; > 0 overrides warmup_ratio."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay on the adapter weights.
    0 is the QLoRA paper's setting; LoRA's low rank already limits the update."""
    adam_beta1: float = 0.9
    """AdamW beta1, in [0, 1)."""
    adam_beta2: float = 0.999
    """AdamW beta2, in [0, 1)."""
    max_grad_norm: float = 0.3
    """Clip the global gradient norm to this; 0 disables clipping."""
    optimizer: str = "auto"
    """auto|paged_adamw_32bit|paged_adamw_8bit|adamw_8bit|adamw.
    auto = paged_adamw_32bit on CUDA, adamw on CPU."""
    eval_steps: int = 0
    """Evaluate every N optimizer steps; 0 = only at the start and the end."""
    save_steps: int = 0
    """Save a checkpoint every N optimizer steps; 0 = only at the end."""
    save_total_limit: int = 2
    """Keep at most this many checkpoints; older ones are deleted.
    A damaged checkpoint is never counted, nor deleted: it is left for you to look at."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    seed: int = 42
    """Seed for adapter init, dropout and data order."""
    resume: str = "auto"
    """auto (continue from the latest checkpoint in output.dir, if any) | none (start over) | PATH to a
    checkpoint dir. With auto, running the same command again after a stop continues where it stopped."""
    loraplus_lr_ratio: float | None = None
    """LoRA+: B's learning rate = this times A's (learning_rate); 16 is the paper's value. Following PEFT's
    create_loraplus_optimizer, 1-D adapter parameters (DoRA's magnitude, VeRA's vectors) take B's rate and a
    trained embedding 1e-6. null = one learning rate for all."""
    fp32_master_weights: bool = True
    """Keep an fp32 copy of 16-bit (bf16/fp16) adapter weights in the optimizer and step that copy, so
    updates below half the 16-bit weights' last place still count (small lrs, the end of a decaying
    schedule) instead of rounding away. Costs 4 bytes per adapter parameter (torch AdamW's states are then
    fp32 too). No effect on fp32 adapters (CPU). false = update the 16-bit weights in place (QLoRA's code)."""
    parallel: str = "auto"
    """auto|ddp|fsdp, for runs launched by torchrun (several processes; one process ignores it).
    ddp: every process holds the whole 4-bit base, the adapters' gradients are all-reduced.
    fsdp: the base, adapters, gradients and optimizer states are sharded across the processes (each
    holds ~1/N of the base). auto = ddp. The global batch is processes x micro_batch_size x accumulation."""
    fsdp_cpu_offload: bool = False
    """With parallel=fsdp: keep each process's shards in host memory (FSDP2's offload policy) and copy
    each layer to the GPU for its forward/backward; slower, for bases that do not fit even sharded."""
    offload_activations: bool = False
    """Keep each decoder layer's checkpointed input in pinned host memory from forward until backward, which
    brings it back one layer ahead (needs model.gradient_checkpointing)."""


@dataclass
class OutputConfig:
    """Where results go and what is shown."""

    dir: str = "runs/default"
    """Output dir: adapter, checkpoints, metrics, config.yaml."""
    tensorboard: bool = False
    """Also write TensorBoard event files (needs the tensorboard package)."""
    sample_prompts: list[str] = field(default_factory=list)
    """Prompts generated before and after training, to see what the adapter changed."""
    sample_max_new_tokens: int = 64
    """Max new tokens generated per sample prompt."""


@dataclass
class RunConfig:
    """One training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS: dict[str, type] = {f.name: typing.get_type_hints(RunConfig)[f.name] for f in fields(RunConfig)}


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved type hint of a config dataclass (the hints are strings under __future__)."""
    return typing.get_type_hints(cls)
