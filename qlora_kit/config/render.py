"""The config as text: the full YAML a run writes (each key under its docstring) and the CLI's key help."""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from dataclasses import fields
from typing import Any

import yaml

from qlora_kit.config.schema import SECTIONS, RunConfig, field_types


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
            lines.append(f"  {section}.{f.name}  ({_type_name(field_types(cls)[f.name])}, default: {default})")
            lines += textwrap.wrap(
                docs.get(f.name, ""),
                width=104,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
                break_on_hyphens=False,
            )
    return "\n".join(lines) + "\n"
