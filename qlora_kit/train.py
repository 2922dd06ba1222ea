"""Training as plain functions you can step through: ``train = setup -> fit -> finish``.

    prepare(cfg) -> RunInputs     device and dtypes, tokenizer, tokenized data, batch order, step count, the
                                  checkpoint to resume from: everything before the weights (cheap)
    setup(cfg) -> Run             + the 4-bit model with LoRA, optimizer, schedule, restored checkpoint
    train_step(run, batches)      one optimizer step: forward, token-weighted loss, backward, clip, step
    evaluate(model, data, b)      mean loss per labelled token over the validation set
    fit(run) -> TrainResult       the loop: steps, metrics, eval / checkpoint cadence, Ctrl-C / SIGTERM
    finish(run, result)           final eval, checkpoint, adapter, samples, summary, the commands to go on

``train_step`` is the one training step of the package: ``qlora-kit profile`` and ``bench/train_step.py``
time this function (its ``phase`` hook marks forward, backward and optimizer step for them).
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qlora_kit import dist_checkpoint
from qlora_kit.adapter import save_adapter
from qlora_kit.adapters import read_stack, stack_adapters, stack_record
from qlora_kit.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from qlora_kit.config import LoRAConfig, RunConfig, load_config, to_yaml
from qlora_kit.data import BatchPlan, PreparedData, eval_batches, prepare_data, prompt_template
from qlora_kit.distributed import World, full_tensor, nf4_bytes
from qlora_kit.embeddings import add_run_embeddings, add_tokens
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import MB, auto_optimizer, resolve_adapter_dtype
from qlora_kit.loading import DTYPES, dtype_name, load_model, load_tokenizer, resolve_device, resolve_dtype
from qlora_kit.lora import LoRAReport, add_lora
from qlora_kit.lora_init import finish_svd_init, make_svd_init
from qlora_kit.loss import label_count
from qlora_kit.memory import check_budget
from qlora_kit.offload import enable_offload, host_placement, offload_description, resident_layer_count
from qlora_kit.optim import loraplus_groups, make_optimizer, make_scheduler, repage_states, total_steps
from qlora_kit.run import Run, RunInputs, StepStats, TrainResult, TrainState
from qlora_kit.runlog import QuietLog, RunLog, memory_gb
from qlora_kit.samples import reproduce_commands, sample_prompts, write_samples

logger = logging.getLogger(__name__)
SMOOTHING_STEPS = 10  # the progress bar's loss is the mean over this many steps
Phase = Callable[[str], contextlib.AbstractContextManager]  # marks a phase of a step (profile, bench)


# --- setup -----------------------------------------------------------------------------------------------


def resolve_run_dtypes(cfg: RunConfig) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """The compute device, compute dtype and adapter dtype the recipe resolves to on this machine."""
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    adapter_dtype = DTYPES[resolve_adapter_dtype(cfg.lora.adapter_dtype, dtype_name(dtype))]
    return device, dtype, adapter_dtype


def make_batch_plan(cfg: RunConfig, data: PreparedData) -> BatchPlan:
    """The order of training micro-batches the recipe asks for (resumable: ``BatchPlan.state_dict``)."""
    return BatchPlan(
        data.train,
        cfg.train.micro_batch_size,
        pad_token_id=data.pad_token_id,
        seed=cfg.train.seed,
        group_by_length=cfg.data.group_by_length,
        packing=cfg.data.packing,
        cutoff_len=cfg.data.cutoff_len,
    )


def prepare(cfg: RunConfig) -> RunInputs:
    """Everything up to the weights; seeds the RNGs, so the adapter init and dropout follow ``train.seed``."""
    started = time.perf_counter()
    world = World.from_env(cfg.train.parallel)  # torchrun's processes; every one reads and checks all below
    if world.distributed and (cfg.model.offload_weights or cfg.train.offload_activations):
        raise QloraKitError(
            f"model.offload_weights / train.offload_activations are for one process, and this run has {world.size} "
            "(torchrun): past one GPU use train.parallel=fsdp (add train.fsdp_cpu_offload=true when the shards "
            "do not fit), or run one process"
        )
    if world.sharded:
        check_fsdp_lora(cfg.lora)
    device, dtype, adapter_dtype = resolve_run_dtypes(cfg)
    device = world.device(device)
    if world.sharded and cfg.train.fsdp_cpu_offload and device.type != "cuda":
        raise QloraKitError(
            f"train.fsdp_cpu_offload keeps FSDP's shards in host memory between a GPU's uses, and this run computes "
            f"on {device.type}, where they already are: set train.fsdp_cpu_offload=false"
        )
    random.seed(cfg.train.seed)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.output.dir)  # created only once setup has succeeded: a failed start leaves no empty dir
    resume_from = find_resume_checkpoint(cfg.train.resume, out)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    add_tokens(tokenizer, cfg.lora.trainable_tokens)  # lora.trainable_tokens: new ones before the data is tokenized
    data = prepare_data(cfg.data, tokenizer)
    batches = make_batch_plan(cfg, data)
    steps = total_steps(cfg.train, len(batches), world.size)
    return RunInputs(
        cfg=cfg,
        out=out,
        device=device,
        dtype=dtype,
        adapter_dtype=adapter_dtype,
        tokenizer=tokenizer,
        data=data,
        batches=batches,
        total_steps=steps,
        resume_from=resume_from,
        started=started,
        world=world,
    )


def check_fsdp_lora(lc: LoRAConfig) -> None:
    """FSDP wraps each decoder layer in plain LoRA layers as it loads (``distributed.ShardOnLoad``) and shards
    the root's embeddings: what needs more is refused, naming the way out."""
    unsupported = [f"lora.variant={lc.variant}"] if lc.variant != "lora" else []
    unsupported += [f"lora.init={lc.init}"] if lc.init != "default" else []
    extras = ("trainable_tokens", "modules_to_save", "base_adapters")
    unsupported += [f"lora.{key}" for key in extras if getattr(lc, key)]
    if unsupported:
        raise QloraKitError(
            f"{', '.join(unsupported)} {'is' if len(unsupported) == 1 else 'are'} not supported under "
            "train.parallel=fsdp yet (FSDP shards each layer as it loads, with plain LoRA adapters): use "
            "train.parallel=ddp, or plain LoRA (lora.variant=lora, lora.init=default) without them"
        )


def load_lora_model(
    cfg: RunConfig,
    device: torch.device,
    dtype: torch.dtype,
    adapter_dtype: torch.dtype,
    world: World | None = None,
    resident_layers: int | None = None,
    tokenizer: Any = None,
) -> tuple[nn.Module, LoRAReport]:
    """The recipe's 4-bit model with its LoRA adapters (and gradient checkpointing if asked): what fit trains.

    Under FSDP each decoder layer gets its adapters and is sharded as it is loaded (``distributed.ShardOnLoad``).
    With ``model.offload_weights`` the layers from ``resident_layers`` on (default: the recipe's count, 0 for
    auto) go to host memory as they are loaded and stream from there; with ``train.offload_activations`` the
    checkpointed layer inputs wait in host memory (``qlora_kit.offload``; the hooks' state is ``model.qlora_offload``).
    ``tokenizer``: the run's, holding ``lora.trainable_tokens`` (default: the model's, with them added).
    """
    lc = cfg.lora
    stack = read_stack(lc.base_adapters)  # checked before minutes of loading
    offload_weights = cfg.model.offload_weights
    if offload_weights and resident_layers is None:
        resident_layers = cfg.model.resident_layers if isinstance(cfg.model.resident_layers, int) else 0
    place = host_placement(resident_layers, device) if offload_weights else None
    shard = (world or World()).layer_loader(lc, adapter_dtype, cfg.train.fsdp_cpu_offload)
    svd_init = make_svd_init(lc, cfg.model.name_or_path, dtype)  # None for lora.init=default
    model = load_model(
        cfg.model.name_or_path, device=device, dtype=dtype, on_layer=shard, place=place, weight_hook=svd_init
    )
    stack_adapters(model, stack)  # lora.base_adapters: frozen, folded into the 4-bit layers under the new adapter
    # Before add_lora: the adapters are made on the device of their base's buffers, which for a streamed layer
    # are then the device placeholders, not the host copies.
    activations = cfg.train.offload_activations
    model.qlora_offload = enable_offload(
        model, device, weights=offload_weights, resident_layers=resident_layers or 0, activations=activations
    )
    if model.qlora_offload is not None:
        logger.info(offload_description(model.qlora_offload))
    if shard is not None:
        report = shard.report(model)  # plain LoRA only: prepare refuses the variants and SVD inits under fsdp
    else:
        variant = (lc.variant, lc.vera_projection_seed)
        # DoRA's magnitude starts as each base weight's row norms: a streamed layer is on the device for that
        around = model.qlora_offload.weights_ready if model.qlora_offload and lc.variant == "dora" else None
        report = add_lora(
            model, lc.targets, lc.r, lc.alpha, lc.dropout, lc.use_rslora, adapter_dtype, *variant, around=around
        )
    if svd_init is not None:
        finish_svd_init(model, svd_init, cfg.model.name_or_path)
    if lc.trainable_tokens or lc.modules_to_save:
        tokenizer = tokenizer or load_tokenizer(cfg.model.name_or_path)
        report.trainable_params += add_run_embeddings(model, tokenizer, lc.trainable_tokens, lc.modules_to_save)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, report


def setup(inputs: RunInputs) -> Run:
    """Load the model (after the memory-budget check), build optimizer and schedule, restore a checkpoint."""
    cfg = inputs.cfg
    world, held = inputs.world, None
    if inputs.resume_from is not None:  # say what a checkpoint of another number of processes changes
        dist_checkpoint.check_compatible(inputs.resume_from, world.size, world.parallel)
    check_budget(cfg, inputs.data)  # model.max_memory_gb: refuse a run that cannot fit before loading the model
    world.start(inputs.device)  # the first collective: every process has read the recipe, tokenizer and data
    streamed = cfg.model.offload_weights
    resident_layers = resident_layer_count(cfg, inputs.data, inputs.device) if streamed else None
    dtypes = (inputs.dtype, inputs.adapter_dtype)
    model, report = load_lora_model(cfg, inputs.device, *dtypes, world, resident_layers, inputs.tokenizer)
    logger.info(str(report))
    world.wrap(model, cfg.train.fsdp_cpu_offload)  # DDP / FSDP2 (shards the parameters): before the optimizer
    if world.sharded:
        resident, whole = nf4_bytes(model)
        held = world.gather(resident)
        shown = " + ".join(f"{b / MB:,.2f}" for b in held)
        logger.info(f"fsdp: the processes hold {shown} MB of the 4-bit base's {whole / MB:,.2f} MB")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer_name = auto_optimizer(inputs.device.type) if cfg.train.optimizer == "auto" else cfg.train.optimizer
    if world.sharded and cfg.train.optimizer == "auto":
        optimizer_name = "adamw"  # torch AdamW steps FSDP2 DTensor shards; bitsandbytes kernels take plain tensors
    groups = loraplus_groups(model, cfg.train) if cfg.train.loraplus_lr_ratio else params
    optimizer = make_optimizer(optimizer_name, groups, cfg.train, inputs.device)
    scheduler = make_scheduler(optimizer, cfg.train, inputs.total_steps)
    run = Run(
        **vars(inputs),
        nf4_held=held if world.sharded else None,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        max_grad_norm=cfg.train.max_grad_norm,
        grad_scaler=torch.amp.GradScaler(inputs.device.type) if inputs.dtype == torch.float16 else None,
        lora_report=report,
        log=RunLog(inputs.out, cfg.output.tensorboard) if world.is_main else QuietLog(),
        optimizer_name=optimizer_name,
    )
    if inputs.resume_from is not None:
        if world.distributed or dist_checkpoint.is_sharded(inputs.resume_from):
            state = dist_checkpoint.load(run, inputs.resume_from)
        else:
            state = load_checkpoint(inputs.resume_from.path, model)
            _restore_optimizer(run, state)
        scheduler.load_state_dict(state["scheduler"])
        if run.grad_scaler is not None and "grad_scaler" in state:
            run.grad_scaler.load_state_dict(state["grad_scaler"])
        run.batches.load_state_dict(state["data"])
        run.step, run.eval_loss_start = state["step"], state.get("eval_loss_start")
        logger.info(f"resumed from {inputs.resume_from.path} at step {run.step}/{run.total_steps}")
    return run


def _restore_optimizer(run: Run, state: dict[str, Any]) -> None:
    """The checkpoint's optimizer states, if they are this optimizer's; else a fresh start, said plainly.

    Another optimizer's states do not fit (torch AdamW keeps exp_avg/exp_avg_sq, bitsandbytes state1/state2:
    loading them "works" and the first step fails), which happens when a run started on a CPU (auto: adamw)
    resumes on a GPU (auto: paged_adamw_32bit), or when train.optimizer was changed between runs.
    """
    saved = state.get("optimizer_name")  # None: a checkpoint from before the name was saved
    if saved in (None, run.optimizer_name):
        try:
            run.optimizer.load_state_dict(state["optimizer"])
            repage_states(run.optimizer)  # bitsandbytes' load_state_dict un-pages them
            return
        except (KeyError, ValueError) as e:
            saved = f"another optimizer ({type(e).__name__}: {e})"
    logger.warning(
        f"the checkpoint's optimizer states are {saved}'s, and this run uses {run.optimizer_name}: the optimizer "
        "starts with fresh states (moments at zero); the adapter, schedule and data position continue from the "
        "checkpoint. To keep the states, resume with the same train.optimizer (and on the same kind of device)"
    )


# --- one step --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _no_phase(name: str) -> Iterator[None]:
    yield


def train_step(run: TrainState, micro_batches: list[dict[str, torch.Tensor]], phase: Phase = _no_phase) -> StepStats:
    """One optimizer step over ``micro_batches`` (on the model's device): the token-weighted loss of all of them.

    Every labelled token of the step counts the same however it was batched: each micro-batch's summed
    loss is divided by the step's total label count before backward, so the accumulated gradient is the
    gradient of the step's mean loss per token.
    """
    world = run.world  # several processes: the step's label count is all processes' (see distributed.py)
    (n_labels,) = world.sum([sum(label_count(batch) for batch in micro_batches)])
    n_labels = max(int(n_labels), 1)
    loss_total, tokens = 0.0, 0
    for index, batch in enumerate(micro_batches):
        with world.grad_sync(last=index == len(micro_batches) - 1):
            with phase("forward"):
                loss_sum, _ = world.loss(run.model, batch)
            loss_total += loss_sum.item()
            with phase("backward"):
                loss = loss_sum / n_labels if world.size == 1 else loss_sum * world.grad_scale / n_labels
                (loss if run.grad_scaler is None else run.grad_scaler.scale(loss)).backward()
                del loss
            # The loss holds the graph, and through it what checkpointing saved: let it go before the next
            # micro-batch and the optimizer step (measured: 1.06 MB of 6.4 MB in a tiny model's optimizer step
            # with checkpointing).
            del loss_sum
        tokens += int(batch["input_ids"].numel())
    if world.distributed:
        loss_total, tokens = world.sum([loss_total, tokens])
    loss = loss_total / n_labels
    if not math.isfinite(loss):
        raise QloraKitError(
            f"the training loss became {loss} at step {run.step + 1}; stopped without saving that step "
            f"(the last checkpoint is intact). Lower train.learning_rate, keep train.max_grad_norm > 0, "
            "or use model.compute_dtype=fp32/bf16 instead of fp16; then resume with train.resume=auto"
        )
    lr = run.optimizer.param_groups[0]["lr"]
    with phase("optimizer step"):
        if run.grad_scaler is not None:
            run.grad_scaler.unscale_(run.optimizer)  # clip the true gradients
        max_norm = run.max_grad_norm
        grad_norm = full_tensor(torch.nn.utils.clip_grad_norm_(run.params, max_norm)).item() if max_norm > 0 else None
        if run.grad_scaler is None:
            run.optimizer.step()
        else:  # skips the step when the scaled gradients overflowed, then adapts the scale
            run.grad_scaler.step(run.optimizer)
            run.grad_scaler.update()
        if run.scheduler is not None:
            run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    return StepStats(loss, n_labels, int(tokens), grad_norm, lr)


@torch.no_grad()
def evaluate(model: nn.Module, data: PreparedData, batch_size: int, world: World | None = None) -> float:
    """Mean loss per labelled token over the validation set (several processes: each takes every
    ``world.size``-th batch, and the sums are all-reduced)."""
    world = world or World()
    was_training = model.training
    model.eval()
    total, count, ran, spare = 0.0, 0, 0, None
    device = model.get_input_embeddings().weight.device
    for index, batch in enumerate(eval_batches(data.val, batch_size, data.pad_token_id)):
        spare = spare or batch
        if index % world.size == world.rank:
            loss, n = world.loss(model, {k: v.to(device) for k, v in batch.items()})
            total, count, ran = total + loss.item(), count + n, ran + 1
    if world.sharded and spare is not None:  # FSDP: every process runs as many forwards (each all-gathers)
        n_batches = math.ceil(len(data.val) / batch_size)
        for _ in range(math.ceil(n_batches / world.size) - ran):  # the extra one's loss is dropped
            world.loss(model, {k: v.to(device) for k, v in spare.items()})
    model.train(was_training)
    total, count = world.sum([total, count])
    return total / max(count, 1)


# --- the loop ----------------------------------------------------------------------------------------------


class _StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the end of the current step; a second SIGINT stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: no signal handling
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.info(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def checkpoint(run: Run) -> Path:
    """Save the run's adapter and training state (optimizer, schedule, data position, RNG) at its step."""
    state = {
        "optimizer": run.optimizer.state_dict(),
        "optimizer_name": run.optimizer_name,
        "scheduler": run.scheduler.state_dict(),
        **({"grad_scaler": run.grad_scaler.state_dict()} if run.grad_scaler is not None else {}),
        "data": run.batches.state_dict(),
        "eval_loss_start": run.eval_loss_start,
    }
    if run.world.distributed:  # every process writes its shards
        return dist_checkpoint.save(run, state)
    base, limit = run.cfg.model.name_or_path, run.cfg.train.save_total_limit
    stacked = stack_record(run.cfg.lora.base_adapters) or None  # a checkpoint's adapter names its stack too
    return save_checkpoint(run.out, run.step, run.model, state, base, limit, lora=run.cfg.lora, metadata=stacked)


def _start(run: Run) -> None:
    """At step 0: the before-training samples and the starting eval loss."""
    if run.step > 0:
        return
    prompts = _sample_prompts(run)
    if prompts:
        write_samples(run.out / "samples_before.json", "before training", run.model, run.tokenizer, prompts, run.cfg)
    if run.data.val:
        run.eval_loss_start = evaluate(run.model, run.data, run.cfg.train.micro_batch_size, run.world)
        run.log.write({"step": 0, "eval_loss": run.eval_loss_start})
        logger.info(f"eval loss at step 0: {run.eval_loss_start:.4f}")


def _sample_prompts(run: Run) -> list:
    """The prompts to write samples for: rank 0's (under FSDP none: generating needs every process)."""
    if not run.world.is_main or run.world.sharded:
        if run.world.is_main and sample_prompts(run.cfg, run.data):
            logger.info("samples are not generated under train.parallel=fsdp; generate from the adapter after")
        return []
    return sample_prompts(run.cfg, run.data)


def fit(run: Run) -> TrainResult:
    """Train from ``run.step`` to the last step: metrics, eval and checkpoints on their cadence.

    Ctrl-C or SIGTERM saves a checkpoint at the end of the current step and returns ``interrupted``.
    """
    tc, result = run.cfg.train, TrainResult(run.out, run.step, "completed", run.eval_loss_start)
    if run.world.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / "config.yaml").write_text(to_yaml(run.cfg))
    run.log.start(run.step)
    _start(run)
    result.eval_loss_start = run.eval_loss_start
    run.model.train()
    tokens, training_s = 0, 0.0  # tokens/s is training's own: evals and checkpoints are not in its time
    # One step's loss swings with the lengths its (length-grouped) batch holds, so the bar shows a running
    # mean; metrics.jsonl keeps every step's own loss, and the eval loss is the measure of progress.
    recent: collections.deque[float] = collections.deque(maxlen=SMOOTHING_STEPS)
    logger.info(f"progress bar: loss = mean train loss per labelled token over the last {SMOOTHING_STEPS} steps")
    bar = tqdm(total=run.total_steps, initial=run.step, desc="train", dynamic_ncols=True, disable=not run.world.is_main)
    with _StopFlag() as stop:
        while run.step < run.total_steps:
            started = time.perf_counter()
            batches = run.world.take_batches(run.batches, tc.gradient_accumulation_steps)
            stats = train_step(run, [{k: v.to(run.device) for k, v in b.items()} for b in batches])
            tokens, training_s = tokens + stats.tokens, training_s + time.perf_counter() - started
            result.train_losses.append(stats.loss)
            recent.append(stats.loss)
            _record(run, bar, stats, tokens / training_s, sum(recent) / len(recent))
            if run.world.any_set(stop.requested):  # every process stops at the same step
                bar.close()
                path = checkpoint(run)
                logger.info(f"stopped at step {run.step}; checkpoint {path}. Resume with: train.resume=auto")
                result.steps, result.status = run.step, "interrupted"
                return result
            if tc.save_steps and run.step % tc.save_steps == 0 and run.step < run.total_steps:
                checkpoint(run)
    bar.close()
    result.steps = run.step
    result.tokens_per_s = tokens / max(training_s, 1e-9)
    return result


def _record(run: Run, bar: tqdm, stats: StepStats, tokens_per_s: float, smoothed: float) -> None:
    """The step's metrics record, the progress bar, and the eval on its cadence."""
    tc = run.cfg.train
    record = {
        "step": run.step,
        "loss": round(stats.loss, 6),
        "lr": run.scheduler.get_last_lr()[0],
        "grad_norm": stats.grad_norm,
        "epoch": round(run.batches.epochs_done, 4),
        "tokens_per_s": round(tokens_per_s, 1),
        "mem_gb": round(memory_gb(run.device), 3),
    }
    if run.step % tc.logging_steps == 0 or run.step == run.total_steps:
        run.log.write(record)
    shown = {"loss": f"{smoothed:.4f}", "lr": f"{record['lr']:.2e}", "tok_s": f"{tokens_per_s:.0f}"}
    bar.set_postfix(**shown, mem=f"{record['mem_gb']:.2f}GB")
    bar.update(1)
    if tc.eval_steps and run.step % tc.eval_steps == 0 and run.step < run.total_steps and run.data.val:
        run.log.write({"step": run.step, "eval_loss": evaluate(run.model, run.data, tc.micro_batch_size, run.world)})


def finish(run: Run, result: TrainResult) -> None:
    """The end of a completed run: final eval, last checkpoint, the adapter, after-samples, summary."""
    if run.data.val:
        result.eval_loss_end = evaluate(run.model, run.data, run.cfg.train.micro_batch_size, run.world)
        run.log.write({"step": run.step, "eval_loss": result.eval_loss_end})
    checkpoint(run)
    template = prompt_template(run.cfg.data.format, run.cfg.data.template)
    adapter = dist_checkpoint.full_lora_state(run.model) if run.world.sharded else None  # a collective
    if not run.world.is_main:
        return  # rank 0 writes the adapter, samples and summary
    metadata = {"template": template, **stack_record(run.cfg.lora.base_adapters)}
    tokenizer = run.tokenizer if run.cfg.lora.trainable_tokens else None  # it holds the tokens it added
    adapter_dir = save_adapter(
        run.model,
        run.out / "adapter",
        run.cfg.model.name_or_path,
        metadata,
        lora=run.cfg.lora,
        state=adapter,
        tokenizer=tokenizer,
    )
    prompts = _sample_prompts(run)
    if prompts:
        write_samples(run.out / "samples_after.json", "after training", run.model, run.tokenizer, prompts, run.cfg)
    result.wall_s = time.perf_counter() - run.started
    summary = {
        "steps": run.step,
        "eval_loss_start": result.eval_loss_start,
        "eval_loss_end": result.eval_loss_end,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "wall_s": round(result.wall_s, 1),
        "trainable_params": run.lora_report.trainable_params,
    }
    if run.world.sharded:  # what each process holds of the base (its shards), and the whole base
        summary["nf4_bytes"], summary["nf4_bytes_per_process"] = nf4_bytes(run.model)[1], run.nf4_held
    (run.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.eval_loss_start is not None and result.eval_loss_end is not None:
        drop = 100 * (1 - result.eval_loss_end / result.eval_loss_start)
        logger.info(f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f} ({drop:.1f}% lower)")
    logger.info(
        f"done in {result.wall_s:.0f}s ({result.tokens_per_s:.0f} tokens/s).\n"
        f"  adapter:     {adapter_dir}\n  checkpoints: {run.out / 'checkpoints'}\n"
        f"  metrics:     {run.out / 'metrics.jsonl'}\n  config:      {run.out / 'config.yaml'}"
    )
    logger.info(reproduce_commands(run.cfg, run.out, prompts, dtype_name(run.dtype)))


def train(recipe: RunConfig | str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainResult:
    """Fine-tune as ``recipe`` (a RunConfig, or a YAML recipe path with ``section.field=value`` overrides) says.

    A run that is already complete is left as it is; an interrupted one continues (``train.resume=auto``).
    """
    cfg = recipe if isinstance(recipe, RunConfig) else load_config(recipe, overrides)
    inputs = prepare(cfg)
    if inputs.complete:
        logger.info(
            f"{inputs.out} is a complete run ({inputs.resume_from.step} of {inputs.total_steps} steps; adapter in "
            f"{inputs.out / 'adapter'}); nothing was changed. To train it again from the start, add "
            "train.resume=none (this replaces the run) or choose another output.dir; to train on, raise train.max_steps"
        )
        return TrainResult(inputs.out, inputs.resume_from.step, "completed")
    try:
        run = setup(inputs)
        try:
            result = fit(run)
            if result.status == "completed":
                finish(run, result)
        finally:
            run.log.close()
    finally:
        inputs.world.stop()  # a single process: nothing
    return result
