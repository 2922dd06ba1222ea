"""Recipes and overrides -> a checked ``RunConfig``: every value is converted against its field's type hint
where it enters (recipe file or ``section.field=value`` override), so an error names the key and its source;
unknown keys get a "did you mean". Ranges and allowed values are ``validate``'s job.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from qlora_kit.config.schema import SECTIONS, RunConfig, field_types
from qlora_kit.config.validate import validate
from qlora_kit.errors import QloraKitError

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
    hint = field_types(SECTIONS[section])[name]
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
    if section in SECTIONS and name in field_types(SECTIONS[section]):
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
    if section in SECTIONS and name in field_types(SECTIONS[section]):
        return
    message = f"unknown key '{section}.{name}' in {source}"
    suggestion = _closest_key(section, name)
    if suggestion:
        raise QloraKitError(f"{message}; did you mean '{suggestion}'?")
    if section in SECTIONS:
        raise QloraKitError(f"{message}; valid keys in '{section}': {', '.join(field_types(SECTIONS[section]))}")
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
        value = _parse_override_value(text, field_types(SECTIONS[section])[name])
        values[section][name] = _coerce(section, name, value, source)
    cfg = _build(values)
    validate(cfg)
    return cfg
