"""Optimizer and learning-rate schedule of a run.

make_optimizer(name, param_groups, train_cfg, device)   torch AdamW or bitsandbytes' (paged) AdamW; over
                                                        16-bit adapters wrapped in MasterWeights
MasterWeights(params, make_inner)                       fp32 master copies of 16-bit parameters
make_scheduler(optimizer, train_cfg, total_steps)       linear warmup, then constant / cosine / linear
total_steps(train_cfg, batches_per_epoch)               optimizer steps the run takes
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from qlora_kit.config import TrainConfig
from qlora_kit.distributed import local_tensor
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import MASTER_STEP_NUMEL, auto_optimizer

logger = logging.getLogger(__name__)
HALF_DTYPES = (torch.bfloat16, torch.float16)  # the parameter dtypes that get an fp32 master copy
MASTER_KEY = "fp32_master_weights"  # MasterWeights.state_dict(): parameter index -> its fp32 master copy


def make_optimizer(
    name: str, params: Iterable[nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """``name`` (``auto`` resolved by ``facts.auto_optimizer``) over ``params`` with the run's lr, betas, decay.

    With ``train.fp32_master_weights`` (the default) and any 16-bit parameter, the optimizer steps fp32
    master copies (``MasterWeights``); over fp32 parameters it is the plain optimizer, nothing added.
    """
    params = list(params)  # parameters, or parameter groups (dicts, e.g. loraplus_groups)
    flat = [p for item in params for p in (item["params"] if isinstance(item, dict) else [item])]
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    build = functools.partial(_optimizer_class(name, device), **kwargs)
    if cfg.fp32_master_weights and any(p.dtype in HALF_DTYPES for p in flat):
        logger.info(
            f"{build.func.__name__} steps fp32 master copies of the 16-bit adapters (train.fp32_master_weights)"
        )
        return MasterWeights(params, build)
    return build(params)


LORAPLUS_EMBEDDING_LR = 1e-6  # LoRA+ (and PEFT's create_loraplus_optimizer): a trained embedding's lr


def loraplus_groups(model: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """LoRA+'s parameter groups over ``model``'s trainable parameters, as PEFT's ``create_loraplus_optimizer``
    sorts them: B matrices and 1-D adapter parameters (DoRA's magnitude, VeRA's vectors) at
    ``learning_rate * loraplus_lr_ratio``, a trained embedding at ``LORAPLUS_EMBEDDING_LR``, the rest (A) at
    ``learning_rate``. Each group carries ``name`` (a, b, embedding), kept in checkpoints; empty groups are left out.
    The schedule scales every group's lr by the same factor, so the ratio holds all run long."""
    ratio, lr = cfg.loraplus_lr_ratio or 1.0, cfg.learning_rate
    groups: dict[str, dict[str, Any]] = {
        "a": {"name": "a", "params": [], "lr": lr},
        "b": {"name": "b", "params": [], "lr": lr * ratio},
        "embedding": {"name": "embedding", "params": [], "lr": LORAPLUS_EMBEDDING_LR},
    }
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in embeddings:
            groups["embedding"]["params"].append(param)
        elif ".lora_b." in f".{name}" or param.ndim == 1:
            groups["b"]["params"].append(param)
        else:
            groups["a"]["params"].append(param)
    return [group for group in groups.values() if group["params"]]


def _optimizer_class(name: str, device: torch.device) -> Callable[..., torch.optim.Optimizer]:
    """The class ``train.optimizer`` names (``auto`` resolved for ``device``); paged ones need CUDA."""
    if name == "auto":
        name = auto_optimizer(device.type)
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    if name.startswith("paged") and device.type != "cuda":
        raise QloraKitError(
            f"train.optimizer={name} pages optimizer state between GPU and CPU memory and needs a CUDA GPU; "
            "on CPU use train.optimizer=adamw (or adamw_8bit)"
        )
    classes = {
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    return classes[name]


class MasterWeights(torch.optim.Optimizer):
    """An optimizer over 16-bit parameters whose updates all count: it steps fp32 master copies.

    An optimizer that updates a bf16 weight in place rounds each update to the nearest bf16 value, so an
    update below half a unit in the last place vanishes (bf16 keeps 8 significant bits: at |w| = 0.016
    the last place is 1.2e-4, and an AdamW step moves a weight by about the lr), and training stalls as
    the lr decays. Here the inner optimizer (``make_inner(param_groups)``: torch AdamW, bitsandbytes'
    AdamW8bit or a paged one) holds an fp32 copy of each 16-bit parameter; ``step`` hands it the
    gradients upcast to fp32, steps it and writes the result back rounded to the parameter's dtype, so
    forward and backward still run in 16 bits and the low bits accumulate in the copy. fp32 parameters
    are stepped as they are (no copy). The copies are stepped ``chunk_numel`` values at a time, so the
    fp32 gradients add 64 MB to the step, not 4 B per parameter (``memory.plan`` counts both the copies
    and the chunk).

    To the rest of the code it is an optimizer over the model's parameters: ``param_groups`` (the lr
    schedule drives them; their hyperparameters reach the inner optimizer at each step), gradient clipping
    on the parameters' ``.grad`` before ``step``, ``zero_grad``. ``state_dict`` is the inner optimizer's
    plus the master copies under ``MASTER_KEY``: they carry the bits the 16-bit parameters cannot, so a
    resumed run continues exactly.
    """

    def __init__(
        self,
        params: Iterable[Any],
        make_inner: Callable[[list[dict[str, Any]]], torch.optim.Optimizer],
        chunk_numel: int = MASTER_STEP_NUMEL,
    ) -> None:
        self.chunk_numel = chunk_numel
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [{**group, "params": list(group["params"])} for group in groups]
        masters = [{**group, "params": [_master_copy(p) for p in group["params"]]} for group in groups]
        self.inner = make_inner(masters)
        self._made = False
        super().__init__(groups, self.inner.defaults)
        self._pull_hyperparameters()
        self._made = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._made:  # a group added later would have no master copies in the inner optimizer
            raise NotImplementedError("MasterWeights takes its parameter groups when it is made, not later")
        super().add_param_group(param_group)

    def pairs(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(parameter, the tensor the inner optimizer steps for it) in state-dict order: its master copy, or
        the parameter itself when it is fp32."""
        for mine, theirs in zip(self.param_groups, self.inner.param_groups, strict=True):
            yield from zip(mine["params"], theirs["params"], strict=True)

    def _push_hyperparameters(self) -> None:
        """lr (set by the schedule), betas, ...: ours are the truth, the inner optimizer follows."""
        for mine, theirs in zip(self.param_groups, self.inner.param_groups, strict=True):
            theirs.update({k: v for k, v in mine.items() if k != "params"})

    def _pull_hyperparameters(self) -> None:
        for mine, theirs in zip(self.param_groups, self.inner.param_groups, strict=True):
            mine.update({k: v for k, v in theirs.items() if k != "params"})

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._push_hyperparameters()
        pairs = list(self.pairs())
        own = [(p, p.grad) for p, m in pairs if m is p]  # fp32 parameters: stepped as they are, last
        for p, _ in own:
            p.grad = None  # hidden while the master copies are stepped
        try:
            for chunk in _chunks([(p, m) for p, m in pairs if m is not p], self.chunk_numel):
                self._step_copies(chunk)
        finally:
            for p, grad in own:
                p.grad = grad
        if any(grad is not None for _, grad in own):
            self.inner.step()
        self._mark_stateful()
        return loss

    def _mark_stateful(self) -> None:
        """Make ``self.state`` non-empty once the inner optimizer holds states (they are all its own).

        torch.distributed.checkpoint's ``get_optimizer_state_dict`` "initializes" an optimizer whose ``state``
        is empty with a zero-gradient step at lr 0, which still decays Adam's moments and counts a step: it
        must see this optimizer as initialized once the inner one is.
        """
        if self.inner.state and not self.state:
            self.state[self.param_groups[0]["params"][0]] = {}

    def _step_copies(self, chunk: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Step these master copies and write them back rounded to their parameters' dtype.

        Only they hold a ``.grad`` during the inner step, and torch's and bitsandbytes' optimizers skip a
        tensor without one (its state and step count stay as they are), so stepping the copies chunk by
        chunk is one optimizer step whose fp32 gradients never all exist at once.
        """
        # one sync; under FSDP2 each process compares its own shards (DTensors cannot be stacked to a list)
        written = torch.stack([torch.ne(local_tensor(p), local_tensor(m).to(p.dtype)).any() for p, m in chunk])
        written = written.tolist()
        for (p, m), changed in zip(chunk, written, strict=True):
            if changed:  # the parameter was written outside the optimizer (weights loaded): follow it
                m.copy_(p)
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
        self.inner.step()
        for p, m in chunk:
            m.grad = None
            p.copy_(m)  # round to nearest; the bits below the 16-bit parameter's last place stay in m

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.inner.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        self._push_hyperparameters()
        state = self.inner.state_dict()
        state[MASTER_KEY] = {i: m for i, (p, m) in enumerate(self.pairs()) if m is not p}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inner optimizer's state and the master copies; a state saved without master copies (a plain
        optimizer's, ``train.fp32_master_weights=false``) takes them from the parameters as they are now,
        as does a parameter that had none (it was fp32 then)."""
        state = dict(state_dict)
        masters = state.pop(MASTER_KEY, None)
        self.inner.load_state_dict(state)
        self._pull_hyperparameters()
        self._mark_stateful()
        if masters is None:
            logger.warning(
                "the optimizer state holds no fp32 master weights (saved with train.fp32_master_weights=false "
                "or by an older version): they start from the 16-bit adapter weights"
            )
        with torch.no_grad():
            for i, (p, m) in enumerate(self.pairs()):
                if m is not p:
                    m.copy_(p if masters is None else masters.get(i, p))


def _chunks(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], numel: int
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Consecutive runs of ``pairs`` of at most ``numel`` values each (a larger tensor on its own)."""
    chunk: list[tuple[torch.Tensor, torch.Tensor]] = []
    size = 0
    for pair in pairs:
        if chunk and size + pair[0].numel() > numel:
            yield chunk
            chunk, size = [], 0
        chunk.append(pair)
        size += pair[0].numel()
    if chunk:
        yield chunk


def _master_copy(p: torch.Tensor) -> torch.Tensor:
    """What the inner optimizer steps for ``p``: an fp32 copy of a 16-bit parameter, else ``p`` itself."""
    return p.detach().to(torch.float32, copy=True) if p.dtype in HALF_DTYPES else p


def total_steps(cfg: TrainConfig, batches_per_epoch: int, processes: int = 1) -> int:
    """``max_steps`` when set, else ``num_epochs`` worth of optimizer steps (at least one); each step takes
    ``processes x gradient_accumulation_steps`` micro-batches."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.num_epochs * batches_per_epoch / (cfg.gradient_accumulation_steps * processes)))


def lr_lambda(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at a step: linear warmup, then constant / cosine / linear decay to 0."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(total - warmup, 1)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return multiplier


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The run's schedule over ``steps`` optimizer steps; warmup_steps > 0 overrides warmup_ratio."""
    warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_scheduler, warmup, steps))


def repage_states(optimizer: torch.optim.Optimizer) -> int:
    """Put a paged bitsandbytes optimizer's states back into paged memory after ``load_state_dict``.

    bitsandbytes makes paged (CUDA managed) state buffers only when it first initializes a state; its
    ``load_state_dict`` moves ``state1``/``state2`` to ordinary device memory. A run that fit because its
    states could page out to host RAM could then run out of GPU memory after ``train.resume=auto``. Each
    state is copied into a fresh buffer from the optimizer's own ``get_state_buffer`` (paged for tensors of
    >= 1e5 values, as at init). Returns how many states were re-paged (0 for any other optimizer).
    """
    inner = getattr(optimizer, "inner", optimizer)  # MasterWeights steps an inner optimizer
    if not getattr(inner, "is_paged", False):
        return 0
    repaged = 0
    for group in inner.param_groups:
        for param in group["params"]:
            state = inner.state.get(param, {})
            for key in ("state1", "state2"):
                old = state.get(key)
                if old is None or getattr(old, "is_paged", False):
                    continue
                new = inner.get_state_buffer(param, dtype=old.dtype)
                if getattr(new, "is_paged", False):
                    new.copy_(old)
                    state[key] = new
                    repaged += 1
    return repaged
