"""Data sources: local files, directories of them and hub datasets, read into rows that know where they came from.

    load_table(path, split) -> [Table]: a file's (or hub split's) rows; table.where(i) -> "line 7" for messages
    read_rows(path, split, format, column_map, max_samples) -> [(source, where, {field: raw value})]

A source is a local .json/.jsonl/.csv/.parquet file, a directory of them (read in name order), or a hub
dataset name (anything that does not look like a path); ``data.split`` picks the split of a hub dataset,
local files are read whole. Files are checked before ``datasets`` sees them (UTF-8, JSON syntax), because
its own errors name a pyarrow block rather than the line a user can fix. Every row keeps its location
("line 7", "item 3", "row 3") so a bad field is reported where the user finds it; ``text_field`` and
``messages_field`` do those field checks. ShareGPT messages ({"from": "human"|"gpt", "value": ...}) are read
as role/content.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlora_kit.errors import QloraKitError

FIELDS = {"alpaca": ("instruction", "input", "output"), "chat": ("messages", "text")}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# ShareGPT-style conversations ({"from": "human", "value": ...}) are common; accept them as messages.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}

Row = tuple[str, str, dict[str, Any]]  # (source, where in it: "line 7" / "item 3" / "row 3", {field: raw value})


@dataclass
class Table:
    """The rows of one local file or hub split, and where each row is, for messages."""

    source: str  # the file or "hub dataset NAME (split S)"
    rows: Any  # a datasets.Dataset
    lines: list[int] | None = None  # the file line each row starts on (.jsonl, .csv), when known
    unit: str = "row"  # otherwise rows are "row N" (parquet, hub) or "item N" (a JSON array), from 1

    def where(self, index: int) -> str:
        """``line 7`` / ``item 3`` / ``row 3``: how a user finds row ``index`` (0-based) in the source."""
        return f"line {self.lines[index]}" if self.lines is not None else f"{self.unit} {index + 1}"


def load_table(path: str, split: str = "train") -> list[Table]:
    """One ``Table`` per local file (a directory's files in name order), or the hub split's.

    Files of a directory are loaded one by one so an error can name the file and its own line.
    """
    import datasets

    local = Path(path).expanduser()
    if local.is_dir():
        files = sorted(f for f in local.iterdir() if f.suffix.lower() in FILE_BUILDERS)
        if not files:
            raise QloraKitError(
                f"data directory {local} has no {'/'.join(FILE_BUILDERS)} files; put the dataset files "
                "there or point data.path at a file"
            )
        return [_load_file(f) for f in files]
    if local.is_file():
        return [_load_file(local)]
    if _looks_like_path(path):
        raise QloraKitError(
            f"data file {path} not found; check data.path (relative paths start from the "
            f"current directory, {Path.cwd()})"
        )
    try:
        return [Table(f"hub dataset {path} (split {split})", datasets.load_dataset(path, split=split))]
    except Exception as e:  # network, auth, unknown name or split: the same advice applies
        raise QloraKitError(
            f"could not load dataset {path!r} split {split!r} from the Hugging Face hub "
            f"({type(e).__name__}: {e}). Check the name, the split (data.split), your network and "
            "`huggingface-cli login` for gated datasets, or point data.path at a local "
            ".json/.jsonl/.csv/.parquet file"
        ) from None


def _looks_like_path(name: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else that does not exist is a missing local file.
    return (
        name.startswith((".", "/", "~"))
        or name.count("/") > 1
        or "\\" in name
        or Path(name).suffix.lower() in FILE_BUILDERS
    )


def _load_file(file: Path) -> Table:
    import datasets

    suffix = file.suffix.lower()
    if suffix not in FILE_BUILDERS:
        raise QloraKitError(f"data file {file} has an unsupported type; use .json, .jsonl, .csv or .parquet")
    empty = QloraKitError(f"{file}: the dataset is empty; it needs at least one row")
    if file.stat().st_size < 64 and not file.read_bytes().strip():
        raise empty
    builder = FILE_BUILDERS[suffix]
    kwargs: dict[str, Any] = {}
    table = Table(str(file), None)
    if builder != "parquet":
        # datasets hands undecodable bytes on as strings and fails on first use, deep in pyarrow.
        table.lines = _utf8_nonblank_lines(file)
    if builder == "csv":
        header, table.lines = _csv_layout(file)
        # Read every column as text: otherwise a column of numbers (answers like "42") arrives as int64.
        kwargs["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    elif builder == "json" and _is_json_array(file):
        table.lines, table.unit = None, "item"
    try:
        table.rows = datasets.load_dataset(builder, data_files=str(file), split="train", **kwargs)
    except Exception as e:
        if "corresponds to no data" in str(e):  # datasets' words for a header-only csv or a "[]" json
            raise empty from None
        problem = _json_problem(file) if builder == "json" else None
        if problem:
            raise QloraKitError(f"{file}: {problem}") from None
        raise QloraKitError(
            f"could not read {file} as {builder} ({type(e).__name__}: {e}); "
            "check that it is valid and that each column holds one type"
        ) from None
    if table.lines is not None and len(table.lines) != len(table.rows):
        table.lines = None  # the reader split records differently than we did (e.g. a pretty-printed object)
    return table


def _utf8_nonblank_lines(file: Path) -> list[int]:
    """The numbers (from 1) of the lines that are not blank; a clear error at the first non-UTF-8 byte."""
    lines = []
    offset = 0
    with file.open("rb") as f:
        for number, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise QloraKitError(
                    f"{file}: line {number} is not UTF-8 text (byte 0x{line[e.start]:02x} at byte offset "
                    f"{offset + e.start} of the file). Re-save the file as UTF-8 (in a spreadsheet: "
                    f"'CSV UTF-8'; or `iconv -f cp1252 -t utf-8 {file.name} > fixed{file.suffix}` "
                    "if it was written on Windows)"
                ) from None
            if line.strip():  # the json and csv readers skip blank lines
                lines.append(number)
            offset += len(line)
    return lines


def _csv_layout(file: Path) -> tuple[list[str], list[int] | None]:
    """The header and the line (header = line 1) each data record starts on; None if csv cannot tell."""
    with file.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        lines = []
        try:
            start = reader.line_num + 1
            for record in reader:  # a quoted field may span lines: line_num counts physical lines
                if len(record) > 1 or (record and record[0].strip()):  # pandas skips blank lines
                    lines.append(start)
                start = reader.line_num + 1
        except csv.Error:  # e.g. a field over csv.field_size_limit(); datasets reads it with pandas anyway
            return header, None
    return header, lines


def _is_json_array(file: Path) -> bool:
    with file.open("rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _json_problem(file: Path) -> str | None:
    """Where a .json/.jsonl file breaks ("line 3, column 19: Expecting ','"), or None if we see no fault.

    datasets only says "Trailing data at position 70" or names a row of pyarrow's own block.
    """
    text = file.read_text(encoding="utf-8-sig")
    try:
        json.loads(text)
        return None  # one valid JSON document: not a syntax problem
    except json.JSONDecodeError as e:
        if _is_json_array(file):
            return f"line {e.lineno}, column {e.colno}: {e.msg}; fix the JSON there"
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            return (
                f"line {number}, column {e.colno}: {e.msg}; fix that line (in JSON Lines each line "
                "is one complete {...} object)"
            )
        if not isinstance(value, dict):
            return f"line {number} is {line.strip()[:40]!r}, not a {{...}} object; each line must be one object"
    return None


def _resolve_columns(source: str, columns: list[str], fmt: str, column_map: Mapping[str, str]) -> dict:
    """Map each of our fields to the dataset column that holds it (None for an absent optional field)."""
    have = ", ".join(columns) or "(none)"
    for field in column_map:
        if field not in FIELDS[fmt]:
            raise QloraKitError(
                f"data.column_map key {field!r} is not a {fmt} field; the fields are: {', '.join(FIELDS[fmt])}"
            )
    for field, column in column_map.items():
        if column not in columns:
            raise QloraKitError(
                f"{source}: column {column!r} (from data.column_map.{field}) does not exist; the columns are: {have}"
            )
    if fmt == "alpaca":
        resolved = {}
        for field in FIELDS["alpaca"]:
            column = column_map.get(field, field)
            if column not in columns and field != "input":
                raise QloraKitError(
                    f"{source}: no {field!r} column; the columns are: {have}. Map yours with "
                    f"data.column_map.{field}=<column>"
                )
            resolved[field] = column if column in columns else None
        return resolved
    for field in ("messages", "text"):  # chat: an explicit mapping wins, then a messages column, then text
        if field in column_map:
            return {field: column_map[field]}
    for field in ("messages", "text"):
        if field in columns:
            return {field: field}
    raise QloraKitError(
        f"{source}: the chat format needs a 'messages' column (list of role/content) or a "
        f"'text' column (### Human: / ### Assistant:); the columns are: {have}. Map yours "
        "with data.column_map.messages=<column>"
    )


def text_field(value: Any, source: str, where: str, field: str, required: bool) -> str:
    """A row's text field ("" for an absent optional one); an error naming source, row and field otherwise."""
    if isinstance(value, float) and math.isnan(value):
        value = None  # pandas writes a missing text cell as NaN
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # a numeric answer is still an answer
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        shown = "missing" if value is None else ("empty" if isinstance(value, str) else f"a {type(value).__name__}")
        raise QloraKitError(
            f"{source}: {where}: field {field!r} is {shown}; every row needs a non-empty "
            f"text {field!r} (fix or remove the row)"
        )
    return value


def messages_field(value: Any, source: str, where: str, field: str) -> list[dict[str, str]]:
    """A row's chat messages as role/content dicts (ShareGPT from/value read as such); an error otherwise."""
    if not isinstance(value, list) or not value:
        shown = "missing" if value is None else f"a {type(value).__name__}, not a non-empty list"
        raise QloraKitError(
            f"{source}: {where}: field {field!r} is {shown}; it must be a list of "
            "{'role': ..., 'content': ...} messages"
        )
    messages = []
    for turn, message in enumerate(value):
        if isinstance(message, Mapping) and message.get("role") is None and message.get("from") is not None:
            message = {
                "role": SHAREGPT_ROLES.get(message["from"], message["from"]),
                "content": message.get("value"),
            }
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise QloraKitError(
                f"{source}: {where}: field {field!r} message {turn} needs a text 'role' and "
                f"a text 'content', got {message!r}"
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def read_rows(path: str, split: str, fmt: str, column_map: Mapping[str, str], max_samples: int | None) -> list[Row]:
    """Every row as ``(source, where in it, {field: raw value})``, columns resolved; at most ``max_samples``."""
    rows: list[Row] = []
    for table in load_table(path, split):
        if len(table.rows) == 0:
            raise QloraKitError(f"{table.source}: the dataset is empty; it needs at least one row")
        columns = _resolve_columns(table.source, list(table.rows.column_names), fmt, column_map)
        selected = table.rows.select_columns([c for c in columns.values() if c is not None])
        for index, record in enumerate(selected):
            fields = {field: record[c] if c else None for field, c in columns.items()}
            rows.append((table.source, table.where(index), fields))
            if max_samples is not None and len(rows) >= max_samples:
                return rows
    return rows
