"""Datasets -> token ids with masked prompts -> micro-batches in an order that resumes exactly.

    prepare_data(cfg: DataConfig, tokenizer, verbose=True) -> PreparedData
        .train, .val (list of examples or None), .stats (DataStats), .pad_token_id
        An example is {"input_ids": list[int], "labels": list[int]}; labels are -100 where no loss is taken.
    BatchPlan(examples, micro_batch_size, pad_token_id=..., seed=..., group_by_length=..., packing=...,
              cutoff_len=..., pad_to_multiple_of=None)
        len(plan) micro-batches per epoch; plan.next_batch() -> dict of tensors, advancing (epoch, position);
        plan.batches_for_epoch(epoch) -> the epoch's order; plan.state_dict() / plan.load_state_dict(state)
    collate(examples, pad_token_id, pad_to_multiple_of=None) -> {"input_ids", "attention_mask", "labels"}
        (packed rows: {"input_ids", "position_ids", "labels"}, see below)
    eval_batches(examples, batch_size, pad_token_id, pad_to_multiple_of=None) -> iterator of collated batches
    alpaca_prompt(instruction, input="") -> str        (generation uses it too)
    tokenize_alpaca(...), tokenize_chat(...), guanaco_to_messages(text), truncate(...)
    load_table(path, split) -> [Table]: a file's (or hub split's) rows; table.where(i) -> "line 7" for messages

Sources: a local .json/.jsonl/.csv/.parquet file, a directory of them, or a hub dataset name (anything
that does not look like a path). Formats: ``alpaca`` (instruction, optional input, output; Alpaca-LoRA
templates) and ``chat`` (a ``messages`` list rendered by the tokenizer's chat template with loss on the
assistant turns only, or a Guanaco/OASST ``text`` column of "### Human: ... ### Assistant: ..." turns).
ShareGPT messages ({"from": "human"|"gpt", "value": ...}) are read as role/content. ``data.split`` picks
the split of a hub dataset; local files are read whole. ``data.max_samples`` caps val_path rows too.

Packed batches: each row holds several examples back to back, ``position_ids`` restart at 0 for each one
and there is no ``attention_mask``. Call ``model(**batch, use_cache=False)``: transformers then derives a
per-example block-diagonal causal mask from ``position_ids``, which it only does when no 2-D attention
mask and no cache are passed. Right padding never needs masking under a causal mask: real tokens come
before the padding and so never attend to it, and padded positions carry no loss.
"""

from __future__ import annotations

import bisect
import csv
import functools
import json
import math
import random
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qlora_kit.errors import QloraKitError

if TYPE_CHECKING:
    from qlora_kit.config import DataConfig

IGNORE_INDEX = -100  # labels with this value take no loss (torch cross_entropy's ignore_index)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

FORMATS = ("alpaca", "chat")
TEMPLATES = ("alpaca",)
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
GROUPING_MEGABATCH = 50  # length grouping sorts within windows of 50 micro-batches, like HF's sampler

Example = dict[str, list[int]]
Row = tuple[str, str, dict[str, Any]]  # (source, where in it: "line 7" / "item 3" / "row 3", {field: raw value})


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca-LoRA prompt, verbatim; the response follows it directly."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


# ---------------------------------------------------------------------------------------------- loading


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


def _text_field(value: Any, source: str, where: str, field: str, required: bool) -> str:
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


def _messages_field(value: Any, source: str, where: str, field: str) -> list[dict[str, str]]:
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


def guanaco_to_messages(text: str) -> list[dict[str, str]]:
    """Split Guanaco/OASST text ("### Human: ... ### Assistant: ...") into chat messages."""
    parts = re.split(r"###\s*(Human|Assistant)\s*:", text)
    if len(parts) < 3:
        raise ValueError("no '### Human:' / '### Assistant:' markers")
    messages = []
    if parts[0].strip():  # text before the first marker acts as a system prompt
        messages.append({"role": "system", "content": parts[0].strip()})
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    return messages


# ------------------------------------------------------------------------------------------ tokenizing


@functools.lru_cache(maxsize=8)
def _special_prefix(tokenizer: Any) -> tuple[int, ...]:
    """Ids the tokenizer puts before text by itself (a BOS for Llama tokenizers, nothing for SmolLM2)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    special = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(special) - len(plain) + 1):
        if special[start : start + len(plain)] == plain:
            return tuple(special[:start])
    return ()


def tokenize_alpaca(
    tokenizer: Any,
    instruction: str,
    input: str,
    output: str,
    *,
    train_on_inputs: bool = False,
    add_eos: bool = True,
) -> Example:
    """Prompt ids (with BOS if the tokenizer adds one) + response ids (+ EOS); prompt labels are -100
    unless train_on_inputs.

    Prompt and response are tokenized separately, so the masked boundary is exact and the prompt ids are
    the very ids generation feeds the model before it writes the response.
    """
    prompt = [
        *_special_prefix(tokenizer),
        *tokenizer(alpaca_prompt(instruction, input), add_special_tokens=False)["input_ids"],
    ]
    response = tokenizer(output, add_special_tokens=False)["input_ids"]
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise QloraKitError("the tokenizer has no EOS token; set data.add_eos=false")
        response = [*response, tokenizer.eos_token_id]
    labels = list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)
    return {"input_ids": prompt + response, "labels": labels + response}


def tokenize_chat(tokenizer: Any, messages: list[dict[str, str]], *, train_on_inputs: bool = False) -> Example:
    """Render through the chat template; only the tokens each assistant message adds take loss.

    Prefixes are rendered one message at a time: the text an assistant message adds after the generation
    prompt (its content and end-of-turn token) is trainable, every other piece is not. The template's own
    special tokens are in the text, so pieces are tokenized without adding any; data.add_eos does not
    apply, the template ends each turn itself.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise QloraKitError(
            "data.format=chat needs a tokenizer with a chat template; this one has none. "
            "Use data.format=alpaca or a chat model's tokenizer"
        )

    def render(prefix: list[dict[str, str]], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(prefix, tokenize=False, add_generation_prompt=generation_prompt)

    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def extend(text: str, trainable: bool) -> None:
        nonlocal rendered
        if not text.startswith(rendered):
            raise ValueError(
                "the chat template renders a conversation differently once later messages "
                "are added, so the assistant turns cannot be located"
            )
        ids = tokenizer(text[len(rendered) :], add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if trainable or train_on_inputs else [IGNORE_INDEX] * len(ids))
        rendered = text

    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            extend(render(messages[:i], generation_prompt=True), trainable=False)
            extend(render(messages[: i + 1]), trainable=True)
        else:
            extend(render(messages[: i + 1]), trainable=False)
    return {"input_ids": input_ids, "labels": labels}


def truncate(example: Example, cutoff_len: int) -> Example:
    """Keep the first cutoff_len tokens (the prompt, and as much of the response as fits)."""
    return {key: ids[:cutoff_len] for key, ids in example.items()}


def trainable_tokens(example: Example) -> int:
    return sum(label != IGNORE_INDEX for label in example["labels"])


def resolve_pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise QloraKitError("the tokenizer has neither a pad token nor an EOS token to pad with")
    return pad


# ------------------------------------------------------------------------------------------- preparing


@dataclass
class DataStats:
    rows: int  # training rows read (after max_samples, before the validation split)
    examples: int  # training examples kept
    tokens: int
    trainable_tokens: int
    truncated: int  # examples cut to cutoff_len
    dropped: int  # examples with no trainable token left after truncation
    max_length: int
    val_examples: int


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example] | None
    stats: DataStats
    pad_token_id: int


def prepare_data(cfg: DataConfig, tokenizer: Any, verbose: bool = True) -> PreparedData:
    """Load, validate, split and tokenize the data that ``cfg`` (a DataConfig) describes."""
    if cfg.format not in FORMATS:
        raise QloraKitError(f"data.format={cfg.format!r} is not supported; use one of: {', '.join(FORMATS)}")
    if cfg.format == "alpaca" and cfg.template not in TEMPLATES:
        raise QloraKitError(f"data.template={cfg.template!r} is not supported; use one of: {', '.join(TEMPLATES)}")
    if cfg.cutoff_len < 2:
        raise QloraKitError(f"data.cutoff_len={cfg.cutoff_len} is too small; use at least 2 (e.g. 256)")
    column_map = dict(cfg.column_map or {})

    rows = _read_rows(cfg.path, cfg.split, cfg.format, column_map, cfg.max_samples)
    val_rows: list[Row] | None = None
    if cfg.val_path:
        val_rows = _read_rows(cfg.val_path, cfg.split, cfg.format, column_map, cfg.max_samples)
    elif cfg.val_set_size:
        rows, val_rows = split_validation(rows, cfg.val_set_size, cfg.shuffle_seed)

    train, counts = _tokenize_rows(rows, cfg, tokenizer)
    val = _tokenize_rows(val_rows, cfg, tokenizer)[0] if val_rows is not None else None
    if not train:
        raise QloraKitError(
            f"{cfg.path}: no training example has a response token left within "
            f"data.cutoff_len={cfg.cutoff_len}; raise data.cutoff_len"
        )
    lengths = [len(example["input_ids"]) for example in train]
    stats = DataStats(
        rows=len(rows),
        examples=len(train),
        tokens=sum(lengths),
        trainable_tokens=sum(trainable_tokens(example) for example in train),
        truncated=counts["truncated"],
        dropped=counts["dropped"],
        max_length=max(lengths),
        val_examples=len(val) if val is not None else 0,
    )
    if verbose:
        print(
            f"data: {stats.rows} rows from {cfg.path} -> {stats.examples} training examples, "
            f"{stats.tokens:,} tokens ({stats.trainable_tokens:,} with loss), longest {stats.max_length}; "
            f"{stats.truncated} truncated to {cfg.cutoff_len} tokens; "
            f"{stats.val_examples} validation examples"
        )
        if stats.dropped:
            print(
                f"warning: dropped {stats.dropped} examples whose prompt alone fills data.cutoff_len="
                f"{cfg.cutoff_len}, leaving nothing to train on; raise data.cutoff_len to keep them"
            )
    return PreparedData(train=train, val=val, stats=stats, pad_token_id=resolve_pad_id(tokenizer))


def _read_rows(path: str, split: str, fmt: str, column_map: Mapping[str, str], max_samples: int | None) -> list[Row]:
    """Every row as ``(source, where in it, {field: raw value})``, columns resolved."""
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


def split_validation(rows: list, val_set_size: float, seed: int) -> tuple[list, list]:
    """Hold out a count (>= 1) or a fraction (< 1) of rows, chosen by ``seed``; both keep file order."""
    if val_set_size >= 1:
        if val_set_size != int(val_set_size):
            raise QloraKitError(
                f"data.val_set_size={val_set_size} is neither a whole count (>= 1) nor a fraction (< 1)"
            )
        count = int(val_set_size)
    else:
        count = math.ceil(val_set_size * len(rows))
    if not 0 < count < len(rows):
        raise QloraKitError(
            f"data.val_set_size={val_set_size} holds out {count} of {len(rows)} rows, which "
            "leaves no training rows; lower it"
        )
    held_out = set(random.Random(seed).sample(range(len(rows)), count))
    train = [row for i, row in enumerate(rows) if i not in held_out]
    val = [row for i, row in enumerate(rows) if i in held_out]
    return train, val


def _tokenize_rows(rows: list[Row], cfg: DataConfig, tokenizer: Any) -> tuple[list[Example], dict]:
    examples: list[Example] = []
    counts = {"truncated": 0, "dropped": 0}
    for source, where, fields in rows:
        if cfg.format == "alpaca":
            example = tokenize_alpaca(
                tokenizer,
                _text_field(fields["instruction"], source, where, "instruction", required=True),
                _text_field(fields["input"], source, where, "input", required=False),
                _text_field(fields["output"], source, where, "output", required=True),
                train_on_inputs=cfg.train_on_inputs,
                add_eos=cfg.add_eos,
            )
        else:
            if "messages" in fields:
                messages = _messages_field(fields["messages"], source, where, "messages")
            else:
                text = _text_field(fields["text"], source, where, "text", required=True)
                try:
                    messages = guanaco_to_messages(text)
                except ValueError as e:
                    raise QloraKitError(
                        f"{source}: {where}: field 'text': {e}; chat text must look "
                        "like '### Human: ... ### Assistant: ...'"
                    ) from None
            try:
                example = tokenize_chat(tokenizer, messages, train_on_inputs=cfg.train_on_inputs)
            except ValueError as e:
                raise QloraKitError(f"{source}: {where}: {e}") from None
        if len(example["input_ids"]) > cfg.cutoff_len:
            counts["truncated"] += 1
            example = truncate(example, cfg.cutoff_len)
        # An example with no trainable label would only add padding and a zero-loss micro-batch.
        if trainable_tokens(example) == 0:
            counts["dropped"] += 1
            continue
        examples.append(example)
    return examples, counts


# -------------------------------------------------------------------------------------------- batching


def collate(
    examples: Sequence[Mapping[str, Sequence[int]]], pad_token_id: int, pad_to_multiple_of: int | None = None
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row (rounded up to pad_to_multiple_of); labels pad with -100.

    Rows with ``position_ids`` (packed) get position_ids instead of an attention_mask; see the module notes.
    """
    width = max(len(example["input_ids"]) for example in examples)
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    packed = all("position_ids" in example for example in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    # Padding counts up from 0 as one more "example", so packed-sequence detection sees it as separate.
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(examples), 1)
    for row, example in enumerate(examples):
        length = len(example["input_ids"])
        input_ids[row, :length] = torch.tensor(example["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(example["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(example["position_ids"], dtype=torch.long)
            position_ids[row, length:] = torch.arange(width - length)
    if packed:
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack(examples: Sequence[Example]) -> dict[str, list[int]]:
    """Concatenate examples into one row; position_ids restart per example.

    Each example's first label is masked: it would be predicted from the previous example's last token.
    """
    row: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for example in examples:
        row["input_ids"].extend(example["input_ids"])
        row["labels"].extend([IGNORE_INDEX, *example["labels"][1:]])
        row["position_ids"].extend(range(len(example["input_ids"])))
    return row


def pack_blocks(lengths: Sequence[int], block_len: int) -> list[list[int]]:
    """Group example indices into blocks of at most block_len tokens (best-fit decreasing; never splits one).

    A pure function of the lengths, so the number of micro-batches per epoch is fixed; the epoch order
    shuffles the blocks, not their contents.
    """
    blocks: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (space left, block index)
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > block_len:
            raise QloraKitError(
                f"example {index} has {length} tokens, more than the packing block of "
                f"{block_len}; truncate examples to data.cutoff_len first"
            )
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            blocks.append([index])
            bisect.insort(free, (block_len - length, len(blocks) - 1))
        else:
            space, block = free.pop(slot)
            blocks[block].append(index)
            bisect.insort(free, (space - length, block))
    return blocks


class BatchPlan:
    """Micro-batches of an epoch in an order that is a pure function of (seed, epoch).

    The state is just (epoch, position), so a resumed run continues at exactly the next micro-batch.
    Length grouping shuffles, then sorts by length within windows of 50 micro-batches (like HF's
    LengthGroupedSampler): batches hold similar lengths, so little padding, while the order stays random.
    The epoch's longest example is moved into its first batch, so a batch that does not fit in memory
    fails at the first step rather than hours in.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        micro_batch_size: int,
        *,
        pad_token_id: int,
        seed: int = 42,
        group_by_length: bool = True,
        packing: bool = False,
        cutoff_len: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        if not examples:
            raise QloraKitError("there are no training examples to batch")
        if micro_batch_size < 1:
            raise QloraKitError(f"train.micro_batch_size={micro_batch_size} must be at least 1")
        if packing and not cutoff_len:
            raise QloraKitError("packing needs cutoff_len (the block length)")
        self.examples = examples
        self.micro_batch_size = micro_batch_size
        self.pad_token_id = pad_token_id
        self.seed = seed
        self.group_by_length = group_by_length and not packing  # packed blocks are all about cutoff_len long
        self.packing = packing
        self.pad_to_multiple_of = pad_to_multiple_of
        lengths = [len(example["input_ids"]) for example in examples]
        self.blocks = pack_blocks(lengths, cutoff_len) if packing else [[i] for i in range(len(examples))]
        self.block_lengths = [sum(lengths[i] for i in block) for block in self.blocks]
        self.num_tokens = sum(lengths)
        self.epoch = 0
        self.position = 0  # index of the next micro-batch within the epoch
        self._order: tuple[int, list[list[list[int]]]] | None = None  # cached (epoch, batches)

    def __len__(self) -> int:
        """Micro-batches per epoch (the last one may be smaller)."""
        return math.ceil(len(self.blocks) / self.micro_batch_size)

    def batches_for_epoch(self, epoch: int) -> list[list[list[int]]]:
        """The epoch's micro-batches; each is a list of rows, each row a list of example indices."""
        # A string seed goes through SHA-512, so the order is the same in every process and Python version.
        rng = random.Random(f"qlora-kit:{self.seed}:{epoch}")
        order = list(range(len(self.blocks)))
        rng.shuffle(order)
        size = self.micro_batch_size
        if self.group_by_length:
            window = size * GROUPING_MEGABATCH
            windows = [
                sorted(order[i : i + window], key=lambda b: -self.block_lengths[b])
                for i in range(0, len(order), window)
            ]
            longest = max(range(len(windows)), key=lambda w: self.block_lengths[windows[w][0]])
            windows[0][0], windows[longest][0] = windows[longest][0], windows[0][0]
            order = [block for w in windows for block in w]
        return [[self.blocks[b] for b in order[i : i + size]] for i in range(0, len(order), size)]

    def next_batch(self) -> dict[str, torch.Tensor]:
        """Collate the micro-batch at (epoch, position), then advance (rolling over into the next epoch)."""
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, self.batches_for_epoch(self.epoch))
        rows = self._order[1][self.position]
        self.position += 1
        if self.position == len(self):
            self.epoch, self.position = self.epoch + 1, 0
        if self.packing:
            examples = [pack([self.examples[i] for i in row]) for row in rows]
        else:
            examples = [self.examples[row[0]] for row in rows]
        return collate(examples, self.pad_token_id, self.pad_to_multiple_of)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.position / len(self)

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "micro_batch_size": self.micro_batch_size,
            "group_by_length": self.group_by_length,
            "packing": self.packing,
            "num_examples": len(self.examples),
            "num_tokens": self.num_tokens,
            "batches_per_epoch": len(self),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, **self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        changed = [
            f"{key} {state.get(key)!r} -> {value!r}"
            for key, value in self._fingerprint().items()
            if state.get(key) != value
        ]
        if changed:
            raise QloraKitError(
                "cannot resume the data order exactly: the data or batching settings changed "
                f"since the checkpoint ({'; '.join(changed)}); resume with the same data and "
                "settings, or start a new run"
            )
        if not 0 <= state["position"] < len(self):
            raise QloraKitError(
                f"checkpoint data position {state['position']} is outside the epoch's {len(self)} micro-batches"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def eval_batches(
    examples: Sequence[Example], batch_size: int, pad_token_id: int, pad_to_multiple_of: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Validation batches, longest first: little padding, and the peak-memory batch comes first."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]["input_ids"]), i))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_token_id, pad_to_multiple_of)
