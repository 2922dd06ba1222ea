"""Several processes, launched by torchrun, on PyTorch's own engine: DDP or FSDP2 (``fully_shard``).

    torchrun --nproc-per-node N -m qlora_kit train RECIPE [key=value ...]

    World.from_env(parallel)    rank, world size, local rank from torchrun's environment (no collective yet)
    world.start(device)         init_process_group: nccl on CUDA, gloo on CPU, with a timeout
    world.wrap(model, cfg)      ddp: DistributedDataParallel over the adapters; fsdp: fully_shard each decoder
                                layer, then the root (the 4-bit base, adapters, gradients, optimizer states)
    world.loss(model, batch)    the step's forward through the wrapper (its hooks all-gather / all-reduce)
    world.sum(values)           all-reduced sums (label counts, losses) in float64
    world.take_batches(plan, a) this process's disjoint slice of the step's ``world x a`` micro-batches
    world.stop()                destroy the process group

One process is ``World()`` (size 1): every method is then the identity, so ``train.py`` has one code path.

Why the numbers equal one process with the same global batch: every process walks the same ``BatchPlan``
(the order is a pure function of seed and epoch) and takes its own contiguous slice of each step's
micro-batches; the step's label count is all-reduced before the divide, so each process's loss is its
share of the global mean, and the gradient wrappers' mean over processes is undone by scaling the loss by
the world size (exact for powers of two). FSDP2 shards parameters only: ``NF4Linear`` keeps its codes as
buffers, so ``shardable_nf4`` re-registers them as frozen parameters first (integer dtypes, which
``model.to(dtype)`` never casts), the 0-dim offset as shape (1,) (``fully_shard`` refuses scalars).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from qlora_kit.architecture import decoder_layers
from qlora_kit.config import LoRAConfig
from qlora_kit.data import BatchPlan
from qlora_kit.errors import QloraKitError
from qlora_kit.lora import LoRAReport, lora_report, resolve_targets, wrap_linears
from qlora_kit.loss import causal_lm_loss
from qlora_kit.quant import NF4Linear

TIMEOUT_ENV = "QLORA_KIT_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600  # a collective that waits longer than this ends the job (a rank died or hangs)
NF4_TENSORS = ("codes", "absmax_codes", "absmax_scales", "absmax_offset")


class LossModule(nn.Module):
    """``causal_lm_loss`` as a module's forward: what DDP and FSDP2 wrap, so their hooks see the whole step.

    ``causal_lm_loss`` calls the decoder (``model.model``) and reads ``lm_head.weight`` directly; wrapped
    this way, FSDP2's root hooks gather the embeddings, final norm and head before it runs.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        return causal_lm_loss(self.model, batch)


@dataclass
class World:
    """This process's place among torchrun's processes; ``World()`` is a single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # none (one process) | ddp | fsdp
    engine: nn.Module | None = None  # the wrapped LossModule the training forward goes through
    started: bool = False

    @classmethod
    def from_env(cls, parallel: str = "auto") -> World:
        """The world torchrun describes in the environment (WORLD_SIZE, RANK, LOCAL_RANK); one process if none."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return cls()
        return cls(
            rank=int(os.environ["RANK"]),
            size=size,
            local_rank=int(os.environ.get("LOCAL_RANK", "0")),
            parallel="ddp" if parallel == "auto" else parallel,
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that prints, logs and writes the run's files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    def device(self, device: torch.device) -> torch.device:
        """One GPU per process: ``cuda`` becomes ``cuda:LOCAL_RANK``."""
        if self.distributed and device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise QloraKitError(
                    f"process {self.rank} has LOCAL_RANK {self.local_rank} but this node has only "
                    f"{torch.cuda.device_count()} visible GPUs: start at most that many per node "
                    "(torchrun --nproc-per-node)"
                )
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # --- process group ---------------------------------------------------------------------------------

    def start(self, device: torch.device) -> None:
        """Join the process group (nccl on CUDA, gloo on CPU); a collective waiting past the timeout fails."""
        if not self.distributed or self.started:
            return
        import torch.distributed as dist

        timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, device_id=device if cuda else None)
        self.started = True
        self._comm_device = device if cuda else torch.device("cpu")

    def stop(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.started = False

    def barrier(self) -> None:
        if self.started:
            import torch.distributed as dist

            dist.barrier()

    # --- collectives -----------------------------------------------------------------------------------

    def sum(self, values: list[float]) -> list[float]:
        """Each value summed over the processes (float64: label counts stay exact)."""
        if not self.distributed:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any_set(self, flag: bool) -> bool:
        """Whether ``flag`` is set on any process (a stop request reaches them at slightly different times)."""
        return flag if not self.distributed else self.sum([float(flag)])[0] > 0

    def gather(self, value: object) -> list[object]:
        """Every process's ``value``, in rank order, on every process (small Python objects)."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values: list[object] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` on every process (a small Python object)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # --- the training step's hooks ---------------------------------------------------------------------

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """The summed loss of ``batch`` and its label count, through the DDP/FSDP wrapper when there is one."""
        return causal_lm_loss(model, batch) if self.engine is None else self.engine(batch)

    @property
    def grad_scale(self) -> int:
        """DDP and FSDP average the gradients over the processes; the step's loss is a sum of their shares."""
        return self.size

    def grad_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Under DDP, the gradients are all-reduced once per step: at the last micro-batch's backward."""
        if self.parallel == "ddp" and not last and self.engine is not None:
            return self.engine.no_sync()
        return contextlib.nullcontext()

    def take_batches(self, plan: BatchPlan, accumulation: int) -> list[dict[str, torch.Tensor]]:
        """This process's ``accumulation`` micro-batches of the step: slice ``rank`` of the step's
        ``size x accumulation`` in the single-process order (the others are skipped, not collated)."""
        mine = range(self.rank * accumulation, (self.rank + 1) * accumulation)
        batches = []
        for index in range(self.size * accumulation):
            if index in mine:
                batches.append(plan.next_batch())
            else:
                plan.skip()
        return batches

    # --- wrapping --------------------------------------------------------------------------------------

    def layer_loader(self, lora: LoRAConfig, adapter_dtype: torch.dtype, cpu_offload: bool) -> ShardOnLoad | None:
        """What ``load_model`` calls per loaded layer: under FSDP, add its adapters and shard it."""
        return ShardOnLoad(lora, adapter_dtype, cpu_offload) if self.sharded else None

    def wrap(self, model: nn.Module, cpu_offload: bool = False) -> None:
        """Put the DDP or FSDP2 wrapper around ``model`` (in place for FSDP2); before the optimizer is built."""
        if not self.distributed:
            return
        if self.parallel == "ddp":
            self.engine = _ddp(LossModule(model), self.local_rank if self._comm_device.type == "cuda" else None)
        else:
            self.engine = _fsdp(LossModule(model), cpu_offload)


class ShardOnLoad:
    """``load_model``'s ``on_layer`` under FSDP: each decoder layer gets its adapters and is sharded as soon as
    it is read, so a process holds its shards plus one layer, never the whole 4-bit model.

    The layers come in order and each wraps its linears in ``add_lora``'s order, so the adapters draw the
    same initial values from torch's RNG as ``add_lora`` on the whole model (one process's numbers).
    """

    def __init__(self, lora: LoRAConfig, adapter_dtype: torch.dtype, cpu_offload: bool) -> None:
        self.lora, self.adapter_dtype, self.cpu_offload = lora, adapter_dtype, cpu_offload
        self.names: list[str] | None = None  # the target linears, resolved before any layer is wrapped

    def __call__(self, model: nn.Module, name: str, layer: nn.Module) -> None:
        lc = self.lora
        if self.names is None:
            if lc.r <= 0:
                raise QloraKitError(f"LoRA rank r must be > 0, got {lc.r}")
            self.names = resolve_targets(model, lc.targets)
        layer.requires_grad_(False)
        mine = [target for target in self.names if target.startswith(f"{name}.")]
        wrap_linears(model, mine, lc.r, lc.alpha, lc.dropout, lc.use_rslora, self.adapter_dtype)
        shard_layer(layer, self.cpu_offload)

    def report(self, model: nn.Module) -> LoRAReport:
        return lora_report(model, self.names or [])


def _ddp(module: LossModule, device_id: int | None) -> nn.Module:
    """DDP over the adapters: the frozen base is neither broadcast at start nor synced (it is read, identical,
    from the same files on every process), so only the LoRA parameters are broadcast and all-reduced."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    frozen += [name for name, _ in module.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
    return DistributedDataParallel(
        module, device_ids=None if device_id is None else [device_id], forward_sync_buffers=False
    )


def shardable_nf4(layer: NF4Linear) -> None:
    """Re-register ``layer``'s NF4 tensors as frozen parameters, which ``fully_shard`` shards (buffers it
    would replicate). Integer dtypes: ``model.to(dtype)`` still never casts them; the 0-dim offset becomes
    shape (1,), which ``view(torch.float32)`` reads the same."""
    for name in NF4_TENSORS:
        tensor = layer._buffers.pop(name)
        if tensor.dim() == 0:
            tensor = tensor.reshape(1)
        layer.register_parameter(name, nn.Parameter(tensor, requires_grad=False))


def shard_layer(layer: nn.Module, cpu_offload: bool = False) -> None:
    """``fully_shard`` one decoder layer (its NF4 tensors made shardable first)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    for module in layer.modules():
        if isinstance(module, NF4Linear) and "codes" in module._buffers:
            shardable_nf4(module)
    fully_shard(layer, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())


def _fsdp(module: LossModule, cpu_offload: bool) -> nn.Module:
    """``fully_shard`` each decoder layer, then the root (embeddings, final norm, head)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    for layer in decoder_layers(module.model):
        if not _is_sharded(layer):
            shard_layer(layer, cpu_offload)
    fully_shard(module, offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    return module


def _is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


# --- tensors -----------------------------------------------------------------------------------------------


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every process calls it), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """What this process holds of ``tensor``: its shard under FSDP2, else the tensor."""
    from torch.distributed.tensor import DTensor

    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def nf4_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes of NF4 storage this process holds: its shards under FSDP2, bytes of the whole model's)."""
    resident = whole = 0
    for module in model.modules():
        if isinstance(module, NF4Linear):
            for name in NF4_TENSORS:
                tensor = getattr(module, name)
                resident += local_tensor(tensor).numel() * tensor.element_size()
                whole += tensor.numel() * tensor.element_size()  # a DTensor's numel is the whole tensor's
    return resident, whole


@contextlib.contextmanager
def started(world: World, device: torch.device) -> Iterator[World]:
    """The process group for the block's duration (nothing for one process)."""
    world.start(device)
    try:
        yield world
    finally:
        world.stop()
