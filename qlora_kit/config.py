"""The run config: typed dataclasses, YAML recipes, ``section.field=value`` overrides and validation.

A run is ``RunConfig(model, lora, data, train, output)``. A recipe is a YAML file with those five sections;
overrides from the command line are applied on top (``lora.r=8``, ``lora.targets=[q_proj,v_proj]``).
Every field carries an attribute docstring (the string literal right after it): it is the CLI help text and
the comment written above the key by ``to_yaml``, so the documentation cannot drift from the code.

Every value is checked against its field's type hint where it enters (recipe file or override), so an
error names the key and where it came from; ``validate`` then checks ranges and allowed values.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import math
import re
import textwrap
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import (
    DATA_FORMATS,
    DTYPE_CHOICES,
    LR_SCHEDULERS,
    OPTIMIZER_CHOICES,
    TARGET_PRESETS,
    TEMPLATES,
)


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
    """Decoupled (AdamW) weight decay on the adapter weights."""
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
    """Keep at most this many checkpoints; older ones are deleted."""
    logging_steps: int = 1
    """Log metrics every N optimizer steps."""
    seed: int = 42
    """Seed for adapter init, dropout and data order."""
    resume: str = "auto"
    """auto (continue from the latest checkpoint in output.dir, if any) | none (start over) | PATH to a
    checkpoint dir. With auto, running the same command again after a stop continues where it stopped."""


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

# Names users bring from peft / transformers' TrainingArguments, for "did you mean".
_ALIASES = {
    "rank": "lora.r",
    "lora_r": "lora.r",
    "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets",
    "lr": "train.learning_rate",
    "epochs": "train.num_epochs",
    "batch_size": "train.micro_batch_size",
    "per_device_train_batch_size": "train.micro_batch_size",
    "max_seq_length": "data.cutoff_len",
    "output_dir": "output.dir",
}


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Field name -> attribute docstring of a config dataclass, parsed from its source."""
    class_node = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0]
    assert isinstance(class_node, ast.ClassDef)
    docs: dict[str, str] = {}
    for node, after in zip(class_node.body, class_node.body[1:], strict=False):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(hint: Any) -> str:
    """What a type hint accepts, in words for error messages."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if typing.get_origin(hint) is list:
        return "a list of strings such as [a, b]"
    if typing.get_origin(hint) is dict:
        return "a mapping such as {key: value}"
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}
    return words[hint]


def _convert(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint``, or ValueError. Lossless only: no bool from 1, no int from 1.5."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _convert(value, arg)
                except ValueError:
                    pass
        raise ValueError
    if value is None:
        raise ValueError
    if hint is bool or isinstance(value, bool):  # a bool is only a bool: 1 is not true, true is not 1
        if hint is bool and isinstance(value, bool):
            return value
        raise ValueError
    if hint is int:
        if isinstance(value, str):  # "1e3" from a YAML file; float() raises ValueError for non-numbers
            value = int(value) if re.fullmatch(r"\s*[+-]?\d+\s*", value) else float(value)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            return value
        raise ValueError
    if hint is float:
        # YAML 1.1 reads an exponent without a dot ("2e-4") as a string, so accept numeric strings.
        if isinstance(value, (int, float, str)):
            return float(value)
        raise ValueError
    if hint is str:
        if isinstance(value, (str, int)):  # YAML turns an all-digit name into an int
            return str(value)
        raise ValueError
    if origin is list and isinstance(value, list):
        return [_convert(item, typing.get_args(hint)[0]) for item in value]
    if origin is dict and isinstance(value, dict):
        key_type, value_type = typing.get_args(hint)
        return {_convert(k, key_type): _convert(v, value_type) for k, v in value.items()}
    raise ValueError


def _coerce(section: str, name: str, value: Any, source: str) -> Any:
    hint = _hints(SECTIONS[section])[name]
    try:
        return _convert(value, hint)
    except ValueError:
        raise QloraKitError(
            f"bad value for '{section}.{name}' in {source}: expected {_describe(hint)}, got {value!r}"
        ) from None


def _closest_key(section: str, name: str) -> str | None:
    """The valid ``section.field`` the user most likely meant by ``section.name``; None if none is close."""
    if name in _ALIASES:
        return _ALIASES[name]
    if section not in SECTIONS:
        section = next(iter(difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.6)), section)
    if section in SECTIONS and name in _hints(SECTIONS[section]):
        return f"{section}.{name}"  # only the section was misspelled
    all_keys = [f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in fields(cls)]
    elsewhere = [key for key in all_keys if key.split(".")[1] == name]
    if elsewhere:
        return elsewhere[0]  # right field, wrong section
    same_section = [key for key in all_keys if key.startswith(f"{section}.")]
    close = difflib.get_close_matches(f"{section}.{name}", same_section, n=1, cutoff=0.7)
    if close:
        return close[0]
    close = difflib.get_close_matches(name, [key.split(".")[1] for key in all_keys], n=1, cutoff=0.8)
    return next((key for key in all_keys if close and key.endswith(f".{close[0]}")), None)


def _check_key(section: str, name: str, source: str) -> None:
    if section in SECTIONS and name in _hints(SECTIONS[section]):
        return
    message = f"unknown key '{section}.{name}' in {source}"
    suggestion = _closest_key(section, name)
    if suggestion:
        raise QloraKitError(f"{message}; did you mean '{suggestion}'?")
    if section in SECTIONS:
        raise QloraKitError(f"{message}; valid keys in '{section}': {', '.join(_hints(SECTIONS[section]))}")
    raise QloraKitError(f"{message}; valid sections: {', '.join(SECTIONS)}")


def _check_section(section: str, source: str) -> None:
    if section in SECTIONS:
        return
    message = f"unknown section '{section}' in {source}"
    close = difflib.get_close_matches(section, SECTIONS, n=1, cutoff=0.6)
    suggestion = _ALIASES.get(section) or (close[0] if close else _closest_key("", section))
    hint = f"did you mean '{suggestion}'?" if suggestion else f"valid sections: {', '.join(SECTIONS)}"
    raise QloraKitError(f"{message}; {hint}")


def _parse_override_value(text: str, hint: Any) -> Any:
    """Parse an override's value with YAML, except that a string field keeps the text as typed."""
    optional = type(None) in typing.get_args(hint)
    if optional and text.strip().lower() in ("none", "null", "~", ""):  # the Python spelling too, on the CLI
        return None
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as error:
        if hint in (str, str | None):
            return text
        raise QloraKitError(f"could not parse value {text!r}: {error}") from None
    # A path or name such as 0123, yes or "a: b" must stay the text the user typed.
    if hint in (str, str | None) and not isinstance(parsed, str):
        return text
    return parsed


def _apply(values: dict[str, dict[str, Any]], data: dict[Any, Any], source: str) -> None:
    """Check the keys and types of nested ``data`` and write its values into ``values``."""
    for section, entries in data.items():
        _check_section(str(section), source)
        if entries is None:  # "lora:" with nothing under it
            continue
        if not isinstance(entries, dict):
            raise QloraKitError(f"section '{section}' in {source} must be a mapping of keys to values, got {entries!r}")
        for name, value in entries.items():
            _check_key(section, str(name), source)
            values[section][name] = _coerce(section, name, value, source)


def _build(values: dict[str, dict[str, Any]]) -> RunConfig:
    return RunConfig(**{section: SECTIONS[section](**entries) for section, entries in values.items()})


def from_dict(data: dict[str, Any], source: str = "config dict") -> RunConfig:
    """A RunConfig from a nested plain dict; missing keys take defaults. Checks keys and types, not ranges."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    _apply(values, data, source)
    return _build(values)


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as a nested plain dict (deep copy), e.g. to store in a checkpoint."""
    return dataclasses.asdict(cfg)


def load_config(recipe: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> RunConfig:
    """Defaults, then the YAML recipe (if any), then ``section.field=value`` overrides; validated."""
    values: dict[str, dict[str, Any]] = {section: {} for section in SECTIONS}
    if recipe is not None:
        path = Path(recipe)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as error:
            raise QloraKitError(f"cannot read recipe {path}: {error.strerror or error}") from None
        except yaml.YAMLError as error:
            raise QloraKitError(f"recipe {path} is not valid YAML: {error}") from None
        if data is not None and not isinstance(data, dict):
            raise QloraKitError(f"recipe {path} must be a mapping with sections {', '.join(SECTIONS)}; got {data!r}")
        _apply(values, data or {}, str(path))
    for item in overrides:
        key, equals, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not equals or not dot or "." in name:
            raise QloraKitError(
                f"override {item!r} must have the form section.field=value, "
                "e.g. lora.r=8, train.learning_rate=1e-4 or lora.targets=[q_proj,v_proj]"
            )
        source = f"override {item!r}"
        _check_key(section, name, source)
        value = _parse_override_value(text, _hints(SECTIONS[section])[name])
        values[section][name] = _coerce(section, name, value, source)
    cfg = _build(values)
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    """Range and allowed-value checks; raises one QloraKitError listing every problem found."""
    problems: list[str] = []

    def check(ok: bool, key: str, rule: str) -> None:
        if not ok:
            section, name = key.split(".")
            problems.append(f"{key} = {getattr(getattr(cfg, section), name)!r}: {rule}")

    def choice(key: str, allowed: tuple[str, ...]) -> None:
        section, name = key.split(".")
        check(getattr(getattr(cfg, section), name) in allowed, key, f"allowed values: {', '.join(allowed)}")

    m, lo, d, t, o = cfg.model, cfg.lora, cfg.data, cfg.train, cfg.output
    check(bool(m.name_or_path.strip()), "model.name_or_path", "must not be empty")
    choice("model.compute_dtype", DTYPE_CHOICES)
    check(
        re.fullmatch(r"auto|cpu|cuda(:\d+)?", m.device) is not None,
        "model.device",
        "allowed values: auto, cpu, cuda, cuda:N",
    )
    budget = m.max_memory_gb
    check(budget is None or 0 < budget < math.inf, "model.max_memory_gb", "must be a number of GiB > 0, or null")

    check(lo.r > 0, "lora.r", "must be > 0")
    check(lo.alpha > 0 and math.isfinite(lo.alpha), "lora.alpha", "must be > 0")
    check(0 <= lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
    if isinstance(lo.targets, str):
        check(
            lo.targets in TARGET_PRESETS,
            "lora.targets",
            f"a string must be a preset ({', '.join(TARGET_PRESETS)}); for module names use a list, "
            "e.g. lora.targets=[q_proj,v_proj]",
        )
    else:
        check(
            bool(lo.targets) and all(name.strip() for name in lo.targets),
            "lora.targets",
            "a list must hold at least one non-empty module name, e.g. [q_proj, v_proj]",
        )
    choice("lora.adapter_dtype", DTYPE_CHOICES)

    check(bool(d.path.strip()), "data.path", "must not be empty")
    choice("data.format", DATA_FORMATS)
    choice("data.template", TEMPLATES)
    check(
        d.val_set_size >= 0 and (d.val_set_size < 1 or float(d.val_set_size).is_integer()),
        "data.val_set_size",
        "must be 0 (none), a fraction in (0, 1) or a whole number of rows",
    )
    check(
        d.val_path is None or d.val_set_size == 0,
        "data.val_set_size",
        "must be 0 when data.val_path is set (validation rows come from that file)",
    )
    check(d.cutoff_len >= 8, "data.cutoff_len", "must be >= 8")
    check(d.max_samples is None or d.max_samples >= 1, "data.max_samples", "must be >= 1 or null")

    check(t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    check(t.gradient_accumulation_steps >= 1, "train.gradient_accumulation_steps", "must be >= 1")
    check(t.num_epochs > 0 or t.max_steps > 0, "train.num_epochs", "must be > 0 unless train.max_steps > 0")
    check(t.learning_rate > 0 and math.isfinite(t.learning_rate), "train.learning_rate", "must be > 0")
    choice("train.lr_scheduler", LR_SCHEDULERS)
    check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "must be in [0, 1)")
    check(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
    check(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    check(0 <= t.adam_beta1 < 1, "train.adam_beta1", "must be in [0, 1)")
    check(0 <= t.adam_beta2 < 1, "train.adam_beta2", "must be in [0, 1)")
    check(t.max_grad_norm >= 0, "train.max_grad_norm", "must be >= 0 (0 disables clipping)")
    choice("train.optimizer", OPTIMIZER_CHOICES)
    check(t.eval_steps >= 0, "train.eval_steps", "must be >= 0")
    check(t.save_steps >= 0, "train.save_steps", "must be >= 0")
    check(t.save_total_limit >= 1, "train.save_total_limit", "must be >= 1")
    check(t.logging_steps >= 1, "train.logging_steps", "must be >= 1")
    check(bool(t.resume.strip()), "train.resume", "must be none, auto or a checkpoint dir")

    check(bool(o.dir.strip()), "output.dir", "must not be empty")
    check(o.sample_max_new_tokens >= 1, "output.sample_max_new_tokens", "must be >= 1")
    if problems:
        raise QloraKitError(
            "invalid config: " + "; ".join(problems)
            if len(problems) == 1
            else "invalid config:\n  " + "\n  ".join(problems)
        )


def _yaml_value(value: Any) -> str:
    """One value as a single line of YAML that reads back as the same value."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, sort_keys=False, width=2**31)
    if "\n" in text.removesuffix("\n...\n").rstrip("\n"):  # a multi-line string: escape it on one line
        text = yaml.safe_dump(
            value,
            default_flow_style=True,
            allow_unicode=True,
            sort_keys=False,
            width=2**31,
            default_style='"',
        )
    return text.removesuffix("\n...\n").rstrip("\n")


def to_yaml(cfg: RunConfig) -> str:
    """The full config as YAML, each key under its docstring as a comment; load_config reads it back."""
    lines = [
        "# qlora-kit run config: every key with its value. Any key can be overridden on the command line",
        "# as section.field=value, e.g. lora.r=8 train.learning_rate=1e-4 lora.targets=[q_proj,v_proj]",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"# === {section}: {inspect.getdoc(cls)} ===", f"{section}:"]
        docs = field_docs(cls)
        for f in fields(cls):
            lines += [f"  # {line}".rstrip() for line in docs.get(f.name, "").splitlines()]
            lines.append(f"  {f.name}: {_yaml_value(getattr(getattr(cfg, section), f.name))}")
    return "\n".join(lines) + "\n"


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def config_help() -> str:
    """Every config key with its type, default and docstring; plain text for an argparse epilog."""
    lines = [
        "config keys: section.field (type, default) and meaning. Set them in a YAML recipe or override them as",
        "section.field=value (e.g. lora.r=8). The defaults shown are the code's; a recipe sets its own values,",
        "and `qlora-kit train RECIPE --print-config` shows exactly what a run will use.",
    ]
    for section, cls in SECTIONS.items():
        lines += ["", f"{section}: {inspect.getdoc(cls)}"]
        defaults, docs = cls(), field_docs(cls)
        for f in fields(cls):
            default = _yaml_value(getattr(defaults, f.name))
            lines.append(f"  {section}.{f.name}  ({_type_name(_hints(cls)[f.name])}, default: {default})")
            lines += textwrap.wrap(
                docs.get(f.name, ""),
                width=104,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
    return "\n".join(lines) + "\n"
