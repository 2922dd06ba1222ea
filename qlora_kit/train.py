"""The training loop: ``setup -> fit -> save``, in one file you can step through.

    setup   load the 4-bit model, add LoRA, tokenize the data, build optimizer + schedule, maybe resume
    fit     micro-batches -> token-weighted loss -> backward; every `gradient_accumulation_steps`:
            clip, optimizer step, schedule step; eval, metrics, checkpoints on their cadence
    save    final adapter (PEFT layout) in OUTPUT_DIR/adapter, a last checkpoint, before/after samples

Nothing else in the package holds training logic.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import random
import re
import shlex
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from qlora_kit.adapter import save_adapter
from qlora_kit.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from qlora_kit.config import RunConfig, to_dict, to_yaml
from qlora_kit.data import IGNORE_INDEX, BatchPlan, PreparedData, alpaca_prompt, eval_batches, prepare_data
from qlora_kit.errors import QloraKitError
from qlora_kit.generate import encode_prompt, generate_text
from qlora_kit.loading import load_model, load_tokenizer, resolve_device, resolve_dtype
from qlora_kit.lora import LoRAReport, add_lora
from qlora_kit.memory import check_budget

LOSS_CHUNK_TOKENS = 1024  # logits are materialized for this many tokens at a time (see causal_lm_loss)
SMOOTHING_STEPS = 10  # the progress bar's loss is the mean over this many steps


# --- loss ----------------------------------------------------------------------------------------------


def causal_lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token cross entropy over the positions that carry a label, and their count.

    Only labelled positions reach ``lm_head`` (masked prompt tokens need no logits), in chunks of
    ``LOSS_CHUNK_TOKENS``: the full ``tokens x vocab`` fp32 logits tensor, the largest single activation of a
    small model, never exists. See ``_LinearCrossEntropy`` for how backward avoids recomputing them.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs, use_cache=False).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    hidden = hidden[:, :-1][keep]
    targets = labels[keep]
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:  # no such head in supported models
        logits = head(hidden).float()
        return F.cross_entropy(logits, targets, reduction="sum"), int(targets.numel())
    weight = head.weight
    if not torch.is_grad_enabled():  # eval: needs_input_grad ignores no_grad, so detach to skip the gradients
        hidden, weight = hidden.detach(), weight.detach()
    return _LinearCrossEntropy.apply(hidden, weight, targets), int(targets.numel())


class _LinearCrossEntropy(torch.autograd.Function):
    """``sum(cross_entropy(hidden @ W^T, targets))`` with the gradients computed chunk by chunk in forward.

    The loss is a scalar, so d loss / d hidden is known as soon as a chunk's logits are: ``(softmax - onehot)
    @ W``. Forward keeps that (tokens x hidden, like one activation) and drops the chunk's logits at once;
    backward only scales it by the incoming gradient. Compared with checkpointing each chunk, the
    ``lm_head`` matmul runs once instead of twice; compared with plain autograd, no ``tokens x vocab`` fp32
    logits, log-softmax or gradient tensor is ever kept. Logits and softmax are in fp32 whatever the
    compute dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):  # type: ignore[override]
        want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.weight_dtype = weight.dtype
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, targets.numel(), LOSS_CHUNK_TOKENS):
            chunk = slice(start, start + LOSS_CHUNK_TOKENS)
            logits = (hidden[chunk] @ weight.t()).float()
            rows = torch.arange(logits.shape[0], device=logits.device)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits[rows, targets[chunk]]).sum()
            if not (want_hidden or want_weight):
                continue
            probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
            probs[rows, targets[chunk]] -= 1  # d loss / d logits
            probs = probs.to(hidden.dtype)
            if want_hidden:
                torch.mm(probs, weight, out=grad_hidden[chunk])
            if want_weight:
                grad_weight.addmm_(probs.t().float(), hidden[chunk].float())
            del logits, probs
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return (
            None if grad_hidden is None else grad_hidden * grad_total.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * grad_total).to(ctx.weight_dtype),
            None,
        )


@torch.no_grad()
def evaluate(model: nn.Module, data: PreparedData, batch_size: int) -> float:
    """Mean loss per labelled token over the validation set."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model.get_input_embeddings().weight.device
    for batch in eval_batches(data.val, batch_size, data.pad_token_id):
        loss, n = causal_lm_loss(model, {k: v.to(device) for k, v in batch.items()})
        total, count = total + loss.item(), count + n
    model.train(was_training)
    return total / max(count, 1)


# --- optimizer and schedule ----------------------------------------------------------------------------


def make_optimizer(name: str, params: list[nn.Parameter], cfg, device: torch.device) -> torch.optim.Optimizer:
    if name == "auto":
        name = "paged_adamw_32bit" if device.type == "cuda" else "adamw"
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
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
    return classes[name](params, **kwargs)


def resolve_run_dtypes(cfg: RunConfig) -> tuple[torch.device, torch.dtype, torch.dtype]:
    """The compute device, compute dtype and adapter dtype the recipe resolves to on this machine."""
    device = resolve_device(cfg.model.device)
    dtype = resolve_dtype(cfg.model.compute_dtype, device)
    adapter_dtype = dtype if cfg.lora.adapter_dtype == "auto" else resolve_dtype(cfg.lora.adapter_dtype, device)
    return device, dtype, adapter_dtype


def load_lora_model(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype, adapter_dtype: torch.dtype
) -> tuple[nn.Module, LoRAReport]:
    """The recipe's 4-bit model with its LoRA adapters (and gradient checkpointing if asked): what fit trains."""
    model = load_model(cfg.model.name_or_path, device=device, dtype=dtype)
    lc = cfg.lora
    report = add_lora(model, lc.targets, lc.r, lc.alpha, lc.dropout, lc.use_rslora, adapter_dtype)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, report


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


def lr_lambda(kind: str, warmup: int, total: int):
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


# --- the run -------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    status: str  # "completed" | "interrupted"
    eval_loss_start: float | None = None
    eval_loss_end: float | None = None
    train_losses: list[float] = field(default_factory=list)
    tokens_per_s: float = 0.0
    wall_s: float = 0.0


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
        print(f"\n{signal.Signals(signum).name}: saving a checkpoint after this step, then stopping")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (Linux reports KiB)


def train(cfg: RunConfig) -> TrainResult:
    started = time.perf_counter()
    out = Path(cfg.output.dir)  # created only once setup has succeeded: a failed start leaves no empty dir
    tc = cfg.train

    # setup ------------------------------------------------------------------------------------------
    device, dtype, adapter_dtype = resolve_run_dtypes(cfg)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    resume_from = find_resume_checkpoint(tc.resume, out)

    tokenizer = load_tokenizer(cfg.model.name_or_path)
    data = prepare_data(cfg.data, tokenizer)
    plan = make_batch_plan(cfg, data)
    accum = tc.gradient_accumulation_steps
    total_steps = tc.max_steps if tc.max_steps > 0 else max(1, math.ceil(tc.num_epochs * len(plan) / accum))
    if resume_from is not None and resume_from.step >= total_steps and (out / "adapter").is_dir():
        print(
            f"{out} is a complete run ({resume_from.step} of {total_steps} steps; adapter in {out / 'adapter'}); "
            f"nothing was changed. To train it again from the start, add train.resume=none (this replaces the run) "
            f"or choose another output.dir; to train on, raise train.max_steps"
        )
        return TrainResult(out, resume_from.step, "completed")
    check_budget(cfg, data)  # model.max_memory_gb: refuse a run that cannot fit before loading the model
    model, report = load_lora_model(cfg, device, dtype, adapter_dtype)
    base_name = cfg.model.name_or_path
    print(report)

    warmup = tc.warmup_steps or math.ceil(tc.warmup_ratio * total_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(tc.optimizer, params, tc, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc.lr_scheduler, warmup, total_steps))

    step = 0
    result = TrainResult(out, 0, "completed")
    metrics_file = out / "metrics.jsonl"
    if resume_from is not None:
        state = load_checkpoint(resume_from.path, model)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        plan.load_state_dict(state["data"])
        step = state["step"]
        result.eval_loss_start = state.get("eval_loss_start")
        _truncate_metrics(metrics_file, step)
        print(f"resumed from {resume_from.path} at step {step}/{total_steps}")
    else:
        metrics_file.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    writer = _tensorboard(out) if cfg.output.tensorboard else None

    def log(record: dict[str, Any]) -> None:
        with open(metrics_file, "a") as f:
            f.write(json.dumps(record) + "\n")
        if writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    def checkpoint() -> Path:
        training_state = {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "data": plan.state_dict(),
            "eval_loss_start": result.eval_loss_start,
            "config": to_dict(cfg),
        }
        return save_checkpoint(out, step, model, training_state, base_name, tc.save_total_limit)

    samples = _sample_prompts(cfg, data, tokenizer)
    if step == 0:
        if samples:
            _write_samples(out / "samples_before.json", "before training", model, tokenizer, samples, cfg)
        if data.val:
            result.eval_loss_start = evaluate(model, data, tc.micro_batch_size)
            log({"step": 0, "eval_loss": result.eval_loss_start})
            print(f"eval loss at step 0: {result.eval_loss_start:.4f}")

    # fit --------------------------------------------------------------------------------------------
    model.train()
    tokens_seen, fit_started = 0, time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc="train", dynamic_ncols=True)
    # One step's loss swings with the lengths its (length-grouped) batch holds, so the bar shows a running
    # mean; metrics.jsonl keeps every step's own loss, and the eval loss is the measure of progress.
    recent_losses: collections.deque[float] = collections.deque(maxlen=SMOOTHING_STEPS)
    print(f"progress bar: loss = mean train loss per labelled token over the last {SMOOTHING_STEPS} steps")
    with _StopFlag() as stop:
        while step < total_steps:
            micro_batches = [{k: v.to(device) for k, v in plan.next_batch().items()} for _ in range(accum)]
            # Token-weighted: every labelled token of the step counts the same, however it was batched.
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
            step_loss = 0.0
            for batch in micro_batches:
                loss_sum, _ = causal_lm_loss(model, batch)
                (loss_sum / max(n_labels, 1)).backward()
                step_loss += loss_sum.item()
                tokens_seen += int(batch["input_ids"].numel())
            step_loss /= max(n_labels, 1)
            if not math.isfinite(step_loss):
                raise QloraKitError(
                    f"the training loss became {step_loss} at step {step + 1}; stopped without saving that step "
                    f"(the last checkpoint is intact). Lower train.learning_rate, keep train.max_grad_norm > 0, "
                    "or use model.compute_dtype=fp32/bf16 instead of fp16; then resume with train.resume=auto"
                )
            grad_norm = (
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm).item() if tc.max_grad_norm > 0 else None
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            result.train_losses.append(step_loss)

            elapsed = time.perf_counter() - fit_started
            record = {
                "step": step,
                "loss": round(step_loss, 6),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "epoch": round(plan.epochs_done, 4),
                "tokens_per_s": round(tokens_seen / elapsed, 1),
                "mem_gb": round(memory_gb(device), 3),
            }
            if step % tc.logging_steps == 0 or step == total_steps:
                log(record)
            recent_losses.append(step_loss)
            bar.set_postfix(
                loss=f"{sum(recent_losses) / len(recent_losses):.4f}",
                lr=f"{record['lr']:.2e}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                mem=f"{record['mem_gb']:.2f}GB",
            )
            bar.update(1)
            if tc.eval_steps and step % tc.eval_steps == 0 and step < total_steps and data.val:
                log({"step": step, "eval_loss": evaluate(model, data, tc.micro_batch_size)})
            if stop.requested:
                bar.close()
                path = checkpoint()
                print(f"stopped at step {step}; checkpoint {path}. Resume with: train.resume=auto")
                result.steps, result.status = step, "interrupted"
                return result
            if tc.save_steps and step % tc.save_steps == 0 and step < total_steps:
                checkpoint()
    bar.close()
    result.tokens_per_s = tokens_seen / max(time.perf_counter() - fit_started, 1e-9)

    # save -------------------------------------------------------------------------------------------
    if data.val:
        result.eval_loss_end = evaluate(model, data, tc.micro_batch_size)
        log({"step": step, "eval_loss": result.eval_loss_end})
    checkpoint()
    adapter_dir = save_adapter(model, out / "adapter", base_name, {"template": run_template(cfg)})
    if samples:
        _write_samples(out / "samples_after.json", "after training", model, tokenizer, samples, cfg)
    result.steps = step
    result.wall_s = time.perf_counter() - started
    summary = {
        "steps": step,
        "eval_loss_start": result.eval_loss_start,
        "eval_loss_end": result.eval_loss_end,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "wall_s": round(result.wall_s, 1),
        "trainable_params": report.trainable_params,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if result.eval_loss_start is not None and result.eval_loss_end is not None:
        drop = 100 * (1 - result.eval_loss_end / result.eval_loss_start)
        print(f"eval loss {result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f} ({drop:.1f}% lower)")
    print(
        f"done in {result.wall_s:.0f}s ({result.tokens_per_s:.0f} tokens/s).\n"
        f"  adapter:     {adapter_dir}\n  checkpoints: {out / 'checkpoints'}\n"
        f"  metrics:     {metrics_file}\n  config:      {out / 'config.yaml'}"
    )
    print(_reproduce_commands(cfg, out, samples, dtype))
    return result


def _truncate_metrics(metrics_file: Path, step: int) -> None:
    """Drop records after the checkpoint's step: the resumed run writes them again."""
    if metrics_file.is_file():
        lines = metrics_file.read_text().splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept))


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise QloraKitError("output.tensorboard=true needs TensorBoard: pip install 'qlora-kit[tensorboard]'") from None
    return SummaryWriter(out / "tensorboard")


# --- before/after samples ------------------------------------------------------------------------------


@dataclass
class _Sample:
    """A prompt as ``qlora-kit generate`` takes it, so the samples can be reproduced with it."""

    prompt: str  # --prompt
    template: str  # --template: alpaca | chat | none
    input: str = ""  # --input (the Alpaca input field)
    reference: str | None = None  # the held-out answer


def run_template(cfg: RunConfig) -> str:
    """The prompt template the run's data is formatted with; recorded with the adapter for ``generate``."""
    return "chat" if cfg.data.format == "chat" else cfg.data.template


def _sample_prompts(cfg: RunConfig, data: PreparedData, tokenizer, n_from_val: int = 3) -> list[_Sample]:
    """The configured prompts (in the run's template), else the first held-out examples' prompts."""
    template = run_template(cfg)
    samples = [_Sample(prompt, template) for prompt in cfg.output.sample_prompts]
    if not samples and data.val:
        for example in data.val[:n_from_val]:
            labels = example["labels"]
            first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
            if first == 0:
                continue  # train_on_inputs: the labels do not tell where the prompt ends
            reference = tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=True)
            samples.append(_held_out_sample(example["input_ids"][:first], template, tokenizer, reference))
    return samples


def _held_out_sample(prompt_ids: list[int], template: str, tokenizer, reference: str) -> _Sample:
    """A held-out prompt as generate takes it: the instruction (and Alpaca input) or the user message, when
    generate encodes those to exactly these ids; else the prompt's text as it is (template none)."""
    marks = ("\x00qlora-kit-field-0\x00", "\x00qlora-kit-field-1\x00")
    if template == "chat":
        text = tokenizer.decode(prompt_ids)  # keeps the template's special tokens
        user = [{"role": "user", "content": marks[0]}]
        forms = [tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)]
    else:
        text = tokenizer.decode(prompt_ids, skip_special_tokens=True)  # drops a BOS the tokenizer adds again
        forms = [alpaca_prompt(marks[0]), alpaca_prompt(*marks)]
    for form in forms:
        pattern = re.escape(form)
        for mark in marks:
            pattern = pattern.replace(re.escape(mark), "(.*)")
        match = re.fullmatch(pattern, text, flags=re.DOTALL)
        if match is None or not match.group(1).strip():
            continue
        prompt, input_text = match.group(1), match.group(2) if match.re.groups > 1 else ""
        if encode_prompt(tokenizer, prompt, template, input_text)["input_ids"][0].tolist() == list(prompt_ids):
            return _Sample(prompt, template, input_text, reference)
    return _Sample(tokenizer.decode(prompt_ids), "none", "", reference)


def _write_samples(path: Path, title: str, model, tokenizer, samples: list[_Sample], cfg: RunConfig) -> None:
    """Greedy answers through ``generate_text``: the very encoding and decoding ``qlora-kit generate`` uses."""
    records = []
    print(f"--- samples {title} ---")
    for sample in samples:
        answer = generate_text(
            model, tokenizer, sample.prompt, sample.template, cfg.output.sample_max_new_tokens, input_text=sample.input
        )
        records.append(
            {
                "prompt": sample.prompt,
                "input": sample.input,
                "template": sample.template,
                "generated": answer,
                "reference": sample.reference,
            }
        )
        shown = " | ".join(line for line in f"{sample.prompt}\n{sample.input}".splitlines() if line.strip())
        print(f"> {shown}")
        print(f"  {answer.strip()!r}" + (f"   (reference: {sample.reference!r})" if sample.reference else ""))
    path.write_text(json.dumps(records, indent=2) + "\n")


def _reproduce_commands(cfg: RunConfig, out: Path, samples: list[_Sample], dtype: torch.dtype) -> str:
    """The commands that give the first after-training sample again: generate on the base + adapter, export
    (in the compute dtype), generate on the export. ``--template`` is left out where the recorded one applies."""
    from qlora_kit.loading import DTYPES

    device = [] if cfg.model.device == "auto" else ["--device", cfg.model.device]
    compute = [] if cfg.model.compute_dtype == "auto" else ["--dtype", cfg.model.compute_dtype]
    if samples:
        first = samples[0]
        ask = ["--prompt", first.prompt, *(["--input", first.input] if first.input else [])]
        ask += [] if first.template == run_template(cfg) else ["--template", first.template]
        ask += ["--max-new-tokens", str(cfg.output.sample_max_new_tokens)]
        heading = "the first after-training sample (samples_after.json) again, from the adapter and from an export:"
    else:
        ask, heading = ["--interactive"], "talk to the trained model, with the adapter or as an export:"
    merged = str(out) + "-merged"
    export_dtype = next(name for name, value in DTYPES.items() if value == dtype)
    commands = [
        ["qlora-kit", "generate", "--model", cfg.model.name_or_path, "--adapter", str(out), *ask, *device, *compute],
        ["qlora-kit", "export", str(out), "--out", merged, "--dtype", export_dtype, *device],
        ["qlora-kit", "generate", "--model", merged, *ask, *device, *compute],
    ]
    return heading + "".join(f"\n  {shlex.join(command)}" for command in commands)
