"""Datasets -> token ids with masked prompts -> micro-batches in an order that resumes exactly.

    prepare_data(cfg: DataConfig, tokenizer, verbose=True) -> PreparedData       (prepare)
        .train, .val (list of examples or None), .stats (DataStats), .pad_token_id
        An example is {"input_ids": list[int], "labels": list[int]}; labels are -100 where no loss is taken.
    BatchPlan, collate, pack, pack_blocks, eval_batches                            (batching)
    encode_prompt_ids(tokenizer, template, instruction, input="") -> list[int]     (templates)
        the prompt ids generation feeds the model: token for token those of a training example
    alpaca_prompt, guanaco_to_messages                                             (templates)
    tokenize_alpaca, tokenize_chat, truncate, trainable_tokens, resolve_pad_id     (tokenize)
    load_table(path, split) -> [Table], read_rows                                  (sources)

Modules, one job each: ``sources`` reads files, directories and hub datasets into rows that know their
line; ``templates`` holds the prompt texts and the one prompt encoding; ``tokenize`` turns a row into an
example with its prompt masked; ``prepare`` runs the pipeline for a DataConfig; ``batching`` pads, packs
and orders micro-batches. Each module's docstring carries its contract.
"""

from qlora_kit.data.batching import GROUPING_MEGABATCH, BatchPlan, collate, eval_batches, pack, pack_blocks
from qlora_kit.data.prepare import DataStats, PreparedData, Prompt, prepare_data, split_validation
from qlora_kit.data.sources import Row, Table, load_table, read_rows
from qlora_kit.data.templates import (
    alpaca_prompt,
    chat_pieces,
    encode_prompt_ids,
    guanaco_to_messages,
    prompt_template,
)
from qlora_kit.data.tokenize import (
    IGNORE_INDEX,
    Example,
    resolve_pad_id,
    tokenize_alpaca,
    tokenize_chat,
    trainable_tokens,
    truncate,
)

__all__ = [
    "GROUPING_MEGABATCH",
    "IGNORE_INDEX",
    "BatchPlan",
    "DataStats",
    "Example",
    "PreparedData",
    "Prompt",
    "Row",
    "Table",
    "alpaca_prompt",
    "chat_pieces",
    "collate",
    "encode_prompt_ids",
    "eval_batches",
    "guanaco_to_messages",
    "load_table",
    "pack",
    "pack_blocks",
    "prepare_data",
    "prompt_template",
    "read_rows",
    "resolve_pad_id",
    "split_validation",
    "tokenize_alpaca",
    "tokenize_chat",
    "trainable_tokens",
    "truncate",
]
