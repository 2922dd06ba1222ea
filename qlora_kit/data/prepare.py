"""The data a run trains on: rows read, split into train/validation, tokenized, truncated, counted.

    prepare_data(cfg: DataConfig, tokenizer, verbose=True) -> PreparedData
        .train, .val (list of examples or None), .stats (DataStats), .pad_token_id
    split_validation(rows, val_set_size, seed) -> (train rows, validation rows)

Formats: ``alpaca`` (instruction, optional input, output; Alpaca-LoRA templates) and ``chat`` (a
``messages`` list rendered by the tokenizer's chat template with loss on the assistant turns only, or a
Guanaco/OASST ``text`` column of "### Human: ... ### Assistant: ..." turns). ``data.max_samples`` caps
val_path rows too. The config's values are checked by ``config.validate``, not again here.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qlora_kit.data.sources import Row, messages_field, read_rows, text_field
from qlora_kit.data.templates import guanaco_to_messages
from qlora_kit.data.tokenize import Example, resolve_pad_id, tokenize_alpaca, tokenize_chat, trainable_tokens, truncate
from qlora_kit.errors import QloraKitError

if TYPE_CHECKING:
    from qlora_kit.config import DataConfig

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class Prompt:
    """A held-out row as a prompt, in the words ``generate`` takes it (``encode_prompt_ids`` makes its ids)."""

    instruction: str  # alpaca: the instruction; chat: the first user message
    input: str  # alpaca's input field ("" for chat)
    template: str  # alpaca | chat
    reference: str | None = None  # the row's answer (chat: the first assistant message)


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example] | None
    stats: DataStats
    pad_token_id: int
    val_prompts: list[Prompt] | None = None  # the prompt of each val example, for before/after samples


def prepare_data(cfg: DataConfig, tokenizer: Any, verbose: bool = True) -> PreparedData:
    """Load, split and tokenize the data that ``cfg`` (a DataConfig, validated) describes."""
    column_map = dict(cfg.column_map or {})
    rows = read_rows(cfg.path, cfg.split, cfg.format, column_map, cfg.max_samples)
    val_rows: list[Row] | None = None
    if cfg.val_path:
        val_rows = read_rows(cfg.val_path, cfg.split, cfg.format, column_map, cfg.max_samples)
    elif cfg.val_set_size:
        rows, val_rows = split_validation(rows, cfg.val_set_size, cfg.shuffle_seed)

    train, _, counts = _tokenize_rows(rows, cfg, tokenizer)
    val, val_prompts, _ = _tokenize_rows(val_rows, cfg, tokenizer) if val_rows is not None else (None, None, {})
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
        _report(stats, cfg)
    return PreparedData(train, val, stats, resolve_pad_id(tokenizer), val_prompts)


def _report(stats: DataStats, cfg: DataConfig) -> None:
    logger.info(
        f"data: {stats.rows} rows from {cfg.path} -> {stats.examples} training examples, "
        f"{stats.tokens:,} tokens ({stats.trainable_tokens:,} with loss), longest {stats.max_length}; "
        f"{stats.truncated} truncated to {cfg.cutoff_len} tokens; "
        f"{stats.val_examples} validation examples"
    )
    if stats.dropped:
        logger.warning(
            f"dropped {stats.dropped} examples whose prompt alone fills data.cutoff_len="
            f"{cfg.cutoff_len}, leaving nothing to train on; raise data.cutoff_len to keep them"
        )


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


def _tokenize_rows(
    rows: list[Row], cfg: DataConfig, tokenizer: Any
) -> tuple[list[Example], list[Prompt], dict[str, int]]:
    """The rows' examples (truncated to cutoff_len, without those left with no trainable token), the prompt of
    each kept example, and counts."""
    examples: list[Example] = []
    prompts: list[Prompt] = []
    counts = {"truncated": 0, "dropped": 0}
    for row in rows:
        messages = None if cfg.format == "alpaca" else _row_messages(row)
        example = _tokenize_row(row, messages, cfg, tokenizer)
        if len(example["input_ids"]) > cfg.cutoff_len:
            counts["truncated"] += 1
            example = truncate(example, cfg.cutoff_len)
        # An example with no trainable label would only add padding and a zero-loss micro-batch.
        if trainable_tokens(example) == 0:
            counts["dropped"] += 1
            continue
        examples.append(example)
        prompts.append(_row_prompt(row, messages))
    return examples, prompts, counts


def _row_messages(row: Row) -> list[dict[str, str]]:
    """A chat row's conversation: its messages list, or its Guanaco text split into turns."""
    source, where, fields = row
    if "messages" in fields:
        return messages_field(fields["messages"], source, where, "messages")
    text = text_field(fields["text"], source, where, "text", required=True)
    try:
        return guanaco_to_messages(text)
    except ValueError as e:
        raise QloraKitError(
            f"{source}: {where}: field 'text': {e}; chat text must look like '### Human: ... ### Assistant: ...'"
        ) from None


def _tokenize_row(row: Row, messages: list[dict[str, str]] | None, cfg: DataConfig, tokenizer: Any) -> Example:
    """One row's example; a bad field or conversation is an error naming the source, row and field."""
    source, where, fields = row
    if messages is None:
        return tokenize_alpaca(
            tokenizer,
            text_field(fields["instruction"], source, where, "instruction", required=True),
            text_field(fields["input"], source, where, "input", required=False),
            text_field(fields["output"], source, where, "output", required=True),
            train_on_inputs=cfg.train_on_inputs,
            add_eos=cfg.add_eos,
        )
    try:
        return tokenize_chat(tokenizer, messages, train_on_inputs=cfg.train_on_inputs)
    except ValueError as e:
        raise QloraKitError(f"{source}: {where}: {e}") from None


def _row_prompt(row: Row, messages: list[dict[str, str]] | None) -> Prompt:
    """The row as a prompt: the Alpaca fields, or a conversation's first user message and first answer."""
    source, where, fields = row
    if messages is None:
        instruction, input, output = (
            text_field(fields[name], source, where, name, required=name != "input")
            for name in ("instruction", "input", "output")
        )
        return Prompt(instruction, input, "alpaca", output)
    user = next((m["content"] for m in messages if m["role"] == "user"), "")
    answer = next((m["content"] for m in messages if m["role"] == "assistant"), "")
    return Prompt(user, "", "chat", answer)
