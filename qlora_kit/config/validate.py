"""Range and allowed-value checks of a ``RunConfig``: the one place config values are validated.

Every problem is collected, then raised as one ``QloraKitError`` listing them all, each as
``section.field = value: rule``, so a recipe with three mistakes is fixed in one round.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from qlora_kit.config.schema import RunConfig
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import (
    DATA_FORMATS,
    DTYPE_CHOICES,
    EMBEDDING_MODULES,
    LORA_INITS,
    LORA_VARIANTS,
    LR_SCHEDULERS,
    OPTIMIZER_CHOICES,
    PARALLEL_CHOICES,
    TARGET_PRESETS,
    TEMPLATES,
)


class _Problems:
    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.found: list[str] = []

    def check(self, ok: bool, key: str, rule: str) -> None:
        if not ok:
            section, name = key.split(".")
            self.found.append(f"{key} = {getattr(getattr(self.cfg, section), name)!r}: {rule}")

    def choice(self, key: str, allowed: Sequence[str]) -> None:
        section, name = key.split(".")
        value = getattr(getattr(self.cfg, section), name)
        self.check(value in allowed, key, f"allowed values: {', '.join(allowed)}")


def validate(cfg: RunConfig) -> None:
    """Raise one QloraKitError listing every out-of-range or unknown value in ``cfg``."""
    p = _Problems(cfg)
    for check_section in (_model, _lora, _data, _train, _output):
        check_section(p, cfg)
    if p.found:
        raise QloraKitError(
            "invalid config: " + "; ".join(p.found)
            if len(p.found) == 1
            else "invalid config:\n  " + "\n  ".join(p.found)
        )


def _model(p: _Problems, cfg: RunConfig) -> None:
    m = cfg.model
    p.check(bool(m.name_or_path.strip()), "model.name_or_path", "must not be empty")
    p.choice("model.compute_dtype", DTYPE_CHOICES)
    p.check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device) is not None,
        "model.device",
        "allowed values: auto, cpu, cuda, cuda:N",
    )
    budget = m.max_memory_gb
    p.check(budget is None or 0 < budget < math.inf, "model.max_memory_gb", "must be a number of GiB > 0, or null")
    resident = m.resident_layers
    p.check(
        resident == "auto" or (isinstance(resident, int) and resident >= 0),
        "model.resident_layers",
        "must be auto or a number of decoder layers >= 0",
    )


def _lora(p: _Problems, cfg: RunConfig) -> None:
    lo = cfg.lora
    p.check(lo.r > 0, "lora.r", "must be > 0")
    p.check(lo.alpha > 0 and math.isfinite(lo.alpha), "lora.alpha", "must be > 0")
    p.check(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
    if isinstance(lo.targets, str):
        p.check(
            lo.targets in TARGET_PRESETS,
            "lora.targets",
            f"a string must be a preset ({', '.join(TARGET_PRESETS)}); for module names use a list, "
            "e.g. lora.targets=[q_proj,v_proj]",
        )
    else:
        p.check(
            bool(lo.targets) and all(name.strip() for name in lo.targets),
            "lora.targets",
            "a list must hold at least one non-empty module name, e.g. [q_proj, v_proj]",
        )
    p.choice("lora.adapter_dtype", DTYPE_CHOICES)
    p.choice("lora.variant", LORA_VARIANTS)
    p.choice("lora.init", LORA_INITS)
    p.check(lo.init_iters >= 1, "lora.init_iters", "must be >= 1")
    p.check(
        not (lo.variant == "vera" and lo.use_rslora),
        "lora.use_rslora",
        "does not apply to lora.variant=vera (VeRA has no alpha/r scaling); set it to false",
    )
    p.check(
        lo.init == "default" or lo.variant == "lora",
        "lora.init",
        f"{lo.init} initializes plain LoRA's A and B; use lora.variant=lora with it, or lora.init=default",
    )
    p.check(
        lo.init == "default" or not lo.base_adapters,
        "lora.init",
        f"{lo.init} starts from the SVD of each 16-bit weight, and lora.base_adapters change those weights; "
        "use lora.init=default with a stack",
    )
    p.check(
        lo.variant != "vera" or not (lo.trainable_tokens or lo.modules_to_save),
        "lora.variant",
        "vera is not supported with lora.trainable_tokens / lora.modules_to_save yet; use lora or dora with them",
    )
    p.check(
        isinstance(lo.trainable_tokens, list)
        and all(isinstance(t, str) and t for t in lo.trainable_tokens)
        and len(set(lo.trainable_tokens)) == len(lo.trainable_tokens),
        "lora.trainable_tokens",
        'must be a list of distinct non-empty tokens, e.g. ["<|tool|>"]',
    )
    p.check(
        isinstance(lo.modules_to_save, list) and set(lo.modules_to_save) <= set(EMBEDDING_MODULES),
        "lora.modules_to_save",
        f"allowed entries: {', '.join(EMBEDDING_MODULES)}",
    )
    p.check(
        isinstance(lo.base_adapters, list) and all(isinstance(d, str) and d.strip() for d in lo.base_adapters),
        "lora.base_adapters",
        "must be a list of adapter dirs, e.g. [runs/first/adapter]",
    )


def _data(p: _Problems, cfg: RunConfig) -> None:
    d = cfg.data
    p.check(bool(d.path.strip()), "data.path", "must not be empty")
    p.choice("data.format", DATA_FORMATS)
    p.choice("data.template", TEMPLATES)
    p.check(
        d.val_set_size >= 0 and (d.val_set_size < 1 or float(d.val_set_size).is_integer()),
        "data.val_set_size",
        "must be 0 (none), a fraction in (0, 1) or a whole number of rows",
    )
    p.check(
        d.val_path is None or d.val_set_size == 0,
        "data.val_set_size",
        "must be 0 when data.val_path is set (validation rows come from that file)",
    )
    p.check(d.cutoff_len >= 8, "data.cutoff_len", "must be >= 8")
    p.check(d.max_samples is None or d.max_samples >= 1, "data.max_samples", "must be >= 1 or null")


def _train(p: _Problems, cfg: RunConfig) -> None:
    t = cfg.train
    p.check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    p.check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    p.check(t.num_epochs > 0 or t.max_steps > 0, "train.num_epochs", "must be > 0 unless train.max_steps > 0")
    p.check(t.learning_rate > 0 and math.isfinite(t.learning_rate), "train.learning_rate", "must be > 0")
    p.choice("train.lr_scheduler", LR_SCHEDULERS)
    p.check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    p.check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    p.check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    p.check(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
    p.check(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    ratio = t.loraplus_lr_ratio
    p.check(ratio is None or (ratio >= 1 and math.isfinite(ratio)), "train.loraplus_lr_ratio", "must be >= 1 or null")
    p.check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    p.choice("train.optimizer", OPTIMIZER_CHOICES)
    p.check(t.eval_steps >= 0, "train.eval_steps", "must be >= 0")
    p.check(t.save_steps >= 0, "train.save_steps", "must be >= 0")
    p.check(t.save_total_limit >= 1, "train.save_total_limit", "must be >= 1")
    p.check(t.logging_steps >= 1, "train.logging_steps", "must be >= 1")
    p.check(bool(t.resume.strip()), "train.resume", "must be none, auto or a checkpoint dir")
    p.choice("train.parallel", PARALLEL_CHOICES)
    p.check(
        not t.fsdp_cpu_offload or t.parallel == "fsdp",
        "train.fsdp_cpu_offload",
        "needs train.parallel=fsdp (it keeps FSDP's shards in host memory); one process offloads with "
        "model.offload_weights",
    )
    p.check(
        not t.offload_activations or cfg.model.gradient_checkpointing,
        "train.offload_activations",
        "needs model.gradient_checkpointing=true (the offloaded tensors are the checkpointed layer inputs)",
    )


def _output(p: _Problems, cfg: RunConfig) -> None:
    o = cfg.output
    p.check(bool(o.dir.strip()), "output.dir", "must not be empty")
    p.check(o.sample_max_new_tokens >= 1, "output.sample_max_new_tokens", "must be >= 1")
