"""Data pipeline: loading, templates, masking, truncation, errors, validation split, batching, packing.

Uses the real SmolLM2 tokenizer (fast to load; no model weights) and small files written to tmp_path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import datasets
import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit.config import DataConfig
from qlora_kit.data import (
    IGNORE_INDEX,
    BatchPlan,
    alpaca_prompt,
    chat_pieces,
    collate,
    encode_prompt_ids,
    eval_batches,
    guanaco_to_messages,
    pack,
    prepare_data,
    split_validation,
    tokenize_alpaca,
    tokenize_chat,
)
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_tokenizer
from tests.conftest import tiny_config

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    {"instruction": "Reverse the word order.", "input": "the red fox runs", "output": "runs fox red the"},
    {"instruction": "Write 42 in words.", "input": "", "output": "forty-two"},
    {"instruction": "Sum the numbers.", "input": "3 apples and 4 pears", "output": "7"},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Again"},
    {"role": "assistant", "content": "Yes, again."},
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------ templates, masks


def test_alpaca_prompt_is_the_alpaca_lora_template():
    assert alpaca_prompt("Do X.", "some input") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nDo X.\n\n"
        "### Input:\nsome input\n\n### Response:\n"
    )
    assert alpaca_prompt("Do X.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nDo X.\n\n### Response:\n"
    )


def test_prompt_tokens_masked_exactly_and_response_plus_eos_trained(tokenizer):
    example = tokenize_alpaca(tokenizer, "Reverse the word order.", "the red fox", "fox red the")
    prompt_ids = ids(tokenizer, alpaca_prompt("Reverse the word order.", "the red fox"))
    response_ids = [*ids(tokenizer, "fox red the"), tokenizer.eos_token_id]
    assert example["input_ids"] == prompt_ids + response_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert tokenizer.decode(example["labels"][len(prompt_ids) :]) == "fox red the<|im_end|>"


def test_train_on_inputs_trains_every_token_and_add_eos_false_drops_eos(tokenizer):
    example = tokenize_alpaca(tokenizer, "Say hi.", "", "hi", train_on_inputs=True, add_eos=False)
    assert example["labels"] == example["input_ids"]
    assert example["input_ids"][-1] != tokenizer.eos_token_id


def bos_adding_tokenizer(smollm2_dir):
    """A copy of the SmolLM2 tokenizer that puts a BOS (id 1) before every text, like Llama's."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)  # own copy: the post-processor is changed
    tokenizer._tokenizer.post_processor = TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]
    )
    assert tokenizer("hi")["input_ids"][0] == 1
    return tokenizer


def test_bos_is_added_once_when_the_tokenizer_adds_one(smollm2_dir):
    tokenizer = bos_adding_tokenizer(smollm2_dir)
    example = tokenize_alpaca(tokenizer, "Say hi.", "", "hi")
    assert example["input_ids"][0] == 1 and example["input_ids"][1] != 1
    assert example["labels"][0] == IGNORE_INDEX
    assert_prompt_then_response(example, encode_prompt_ids(tokenizer, "alpaca", "Say hi."))


def test_chat_trains_on_assistant_turns_only(tokenizer):
    messages = CONVERSATION
    example = tokenize_chat(tokenizer, messages)
    # The pieces concatenate to exactly what the whole conversation tokenizes to.
    assert example["input_ids"] == ids(tokenizer, tokenizer.apply_chat_template(messages, tokenize=False))
    trained_spans, span = [], []
    for token, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            span.append(token)
        elif span:
            trained_spans.append(tokenizer.decode(span))
            span = []
    trained_spans += [tokenizer.decode(span)] if span else []
    assert trained_spans == ["Hello!<|im_end|>\n", "Yes, again.<|im_end|>\n"]
    assert tokenize_chat(tokenizer, messages, train_on_inputs=True)["labels"] == example["input_ids"]


# ------------------------------------------------------------- one prompt encoding: training == generation


@pytest.fixture(scope="module")
def loaded_tokenizer(smollm2_dir):
    return load_tokenizer(smollm2_dir)  # the tokenizer train and generate use


def assert_prompt_then_response(example: dict, prompt: list[int]) -> None:
    """``example`` starts with exactly ``prompt``, untrained, and its very next token is trained."""
    n = len(prompt)
    assert example["input_ids"][:n] == prompt
    assert example["labels"][:n] == [IGNORE_INDEX] * n
    assert example["labels"][n] == example["input_ids"][n] != IGNORE_INDEX


@pytest.mark.parametrize("input", ["", "the red fox"])
def test_alpaca_generation_prompt_is_the_training_prompt_token_for_token(loaded_tokenizer, input):
    tokenizer = loaded_tokenizer
    prompt = encode_prompt_ids(tokenizer, "alpaca", "Reverse the word order.", input)
    example = tokenize_alpaca(tokenizer, "Reverse the word order.", input, "fox red the")
    assert_prompt_then_response(example, prompt)
    assert tokenizer.decode(prompt) == alpaca_prompt("Reverse the word order.", input)
    assert example["input_ids"][len(prompt) :] == [*ids(tokenizer, "fox red the"), tokenizer.eos_token_id]


def test_chat_generation_prompt_is_the_training_prompt_token_for_token(loaded_tokenizer):
    tokenizer = loaded_tokenizer
    prompt = encode_prompt_ids(tokenizer, "chat", "What is 2+2?")
    conversation = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4."}]
    example = tokenize_chat(tokenizer, conversation)
    assert_prompt_then_response(example, prompt)
    assert tokenizer.decode(prompt).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(example["input_ids"][len(prompt) :]) == "4.<|im_end|>\n"
    # For SmolLM2 the pieces are also what the whole rendered prompt tokenizes to.
    whole = tokenizer.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == ids(tokenizer, whole)


def test_every_assistant_turn_follows_its_generation_prompt(loaded_tokenizer):
    tokenizer = loaded_tokenizer
    messages = CONVERSATION
    example = tokenize_chat(tokenizer, messages)
    for turn in (2, 4):
        pieces = chat_pieces(tokenizer, messages[:turn], add_generation_prompt=True)
        prompt = [token for piece, _ in pieces for token in piece]
        assert example["input_ids"][: len(prompt)] == prompt
        assert example["labels"][len(prompt)] != IGNORE_INDEX and example["labels"][len(prompt) - 1] == IGNORE_INDEX


def test_none_template_is_the_raw_text_after_the_special_prefix(loaded_tokenizer, smollm2_dir):
    assert encode_prompt_ids(loaded_tokenizer, "none", "Hello there") == loaded_tokenizer("Hello there")["input_ids"]
    bos_tokenizer = bos_adding_tokenizer(smollm2_dir)
    assert encode_prompt_ids(bos_tokenizer, "none", "Hello there") == [1, *ids(bos_tokenizer, "Hello there")]


def test_unknown_prompt_template_is_named_with_the_choices(loaded_tokenizer):
    with pytest.raises(QloraKitError, match=r"unknown prompt template 'auto'; use one of: alpaca, chat, none"):
        encode_prompt_ids(loaded_tokenizer, "auto", "Hi")


@pytest.mark.parametrize("template", ["chat", "none"])
def test_input_outside_the_alpaca_template_is_refused(loaded_tokenizer, template):
    with pytest.raises(QloraKitError, match=rf"the '{template}' template has no separate input.*instruction"):
        encode_prompt_ids(loaded_tokenizer, template, "Sum these.", "3 and 4")


def test_chat_prompt_needs_a_chat_template(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)  # own copy: the template is removed
    tokenizer.chat_template = None
    with pytest.raises(QloraKitError, match=r"needs a tokenizer with a chat template.*alpaca or none"):
        encode_prompt_ids(tokenizer, "chat", "Hi")
    with pytest.raises(QloraKitError, match=r"data\.format=chat needs a tokenizer with a chat template"):
        tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])


def test_guanaco_text_becomes_messages():
    text = "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?### Assistant: 6."
    assert guanaco_to_messages(text) == [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "6."},
    ]
    with pytest.raises(ValueError):
        guanaco_to_messages("no markers here")


def test_chat_format_reads_guanaco_text_and_sharegpt_columns(tokenizer, tmp_path):
    guanaco = write_jsonl(tmp_path / "guanaco.jsonl", [{"text": "### Human: Hi### Assistant: Hello!"}])
    prepared = prepare_data(DataConfig(path=str(guanaco), format="chat"), tokenizer)
    expected = tokenize_chat(tokenizer, [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}])
    assert prepared.train == [expected]

    sharegpt = write_jsonl(
        tmp_path / "sharegpt.jsonl",
        [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}],
    )
    cfg = DataConfig(path=str(sharegpt), format="chat", column_map={"messages": "conversations"})
    assert prepare_data(cfg, tokenizer).train == [expected]


# ------------------------------------------------------------------------------ truncation, dropping


def test_cutoff_truncates_keeping_the_beginning(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Repeat.", "output": "word " * 100}])
    full = prepare_data(DataConfig(path=str(path)), tokenizer).train[0]
    cut = prepare_data(DataConfig(path=str(path), cutoff_len=60), tokenizer)
    assert len(full["input_ids"]) > 60
    assert cut.train[0] == {key: value[:60] for key, value in full.items()}
    assert cut.stats.truncated == 1 and cut.stats.dropped == 0
    assert cut.stats.trainable_tokens == sum(label != IGNORE_INDEX for label in cut.train[0]["labels"]) > 0


def test_examples_whose_prompt_fills_the_cutoff_are_dropped_with_a_warning(tokenizer, tmp_path, caplog):
    rows = [ROWS[1], {"instruction": "Summarize. " + "long text " * 80, "output": "ok"}, ROWS[2]]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    prepared = prepare_data(DataConfig(path=str(path), cutoff_len=64), tokenizer)
    assert prepared.stats.dropped == 1 and prepared.stats.examples == 2
    assert all(any(label != IGNORE_INDEX for label in ex["labels"]) for ex in prepared.train)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("qlora_kit.data")]
    assert len(warnings) == 1 and "dropped 1 examples" in warnings[0].getMessage()


# ----------------------------------------------------------------------------------------- loading


def test_json_jsonl_csv_parquet_and_directory_give_the_same_examples(tokenizer, tmp_path):
    rows = [*ROWS, {"instruction": "What is 6*7?", "input": "", "output": "42"}]  # a csv column of numbers
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    with (tmp_path / "d.csv").open("w", newline="") as f:
        import csv

        writer = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(rows)
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    expected = [tokenize_alpaca(tokenizer, r["instruction"], r["input"], r["output"]) for r in rows]
    for name in ["d.jsonl", "d.json", "d.csv", "d.parquet"]:
        assert prepare_data(DataConfig(path=str(tmp_path / name)), tokenizer).train == expected, name
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:2])
    write_jsonl(folder / "b.jsonl", rows[2:])
    assert prepare_data(DataConfig(path=str(folder)), tokenizer).train == expected


def test_missing_input_column_and_column_map(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Say hi.", "answer": "hi"}])
    cfg = DataConfig(path=str(path), column_map={"instruction": "question", "output": "answer"})
    assert prepare_data(cfg, tokenizer).train == [tokenize_alpaca(tokenizer, "Say hi.", "", "hi")]


def test_max_samples_uses_the_first_rows(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    prepared = prepare_data(DataConfig(path=str(path), max_samples=2), tokenizer)
    assert prepared.train == [tokenize_alpaca(tokenizer, **row) for row in ROWS[:2]]


def test_the_sample_recipe_data_prepares_cleanly(tokenizer, caplog):
    caplog.set_level(logging.INFO, logger="qlora_kit.data")
    cfg = DataConfig(
        path=str(REPO / "recipes/data/text_tools_train.jsonl"),
        val_path=str(REPO / "recipes/data/text_tools_val.jsonl"),
    )
    prepared = prepare_data(cfg, tokenizer)
    assert prepared.stats.rows == prepared.stats.examples == 406
    assert prepared.stats.truncated == prepared.stats.dropped == 0
    assert prepared.stats.max_length <= 128 and len(prepared.val) == 63
    assert "406 rows" in caplog.text
    caplog.clear()
    prepare_data(cfg, tokenizer, verbose=False)
    assert not caplog.records


def test_sample_data_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_text_tools", REPO / "recipes/data/make_text_tools.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    train, val = generator.make_rows(random.Random(generator.SEED))
    for name, rows in [("text_tools_train.jsonl", train), ("text_tools_val.jsonl", val)]:
        on_disk = [json.loads(line) for line in (REPO / "recipes/data" / name).read_text().splitlines()]
        assert on_disk == rows, f"{name} is stale: run python recipes/data/make_text_tools.py"
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in val}


# ------------------------------------------------------------------------------------------ errors


def expect_error(tokenizer, *fragments: str, **cfg) -> str:
    with pytest.raises(QloraKitError) as raised:
        prepare_data(DataConfig(**cfg), tokenizer)
    for fragment in fragments:
        assert fragment in str(raised.value), (fragment, str(raised.value))
    return str(raised.value)


def test_missing_file_is_named(tokenizer, tmp_path):
    expect_error(tokenizer, str(tmp_path / "nope.jsonl"), "not found", path=str(tmp_path / "nope.jsonl"))


def test_missing_column_names_file_column_and_existing_columns(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi.", "response": "hi"}])
    expect_error(tokenizer, str(path), "'output'", "instruction, response", "column_map", path=str(path))
    expect_error(
        tokenizer,
        str(path),
        "'answer'",
        "instruction, response",
        path=str(path),
        column_map={"output": "answer"},
    )
    expect_error(tokenizer, "'messages'", "instruction, response", path=str(path), format="chat")


@pytest.mark.parametrize(
    ("bad_row", "field"),
    [
        ({"instruction": "Say hi.", "output": None}, "output"),
        ({"instruction": "", "output": "hi"}, "instruction"),
        ({"instruction": "Say hi."}, "output"),  # key absent from this row only
    ],
)
def test_row_missing_a_field_names_file_row_and_field(tokenizer, tmp_path, bad_row, field):
    path = write_jsonl(tmp_path / "d.jsonl", [ROWS[0], ROWS[1], bad_row])
    expect_error(tokenizer, str(path), ": line 3: ", f"'{field}'", path=str(path))


@pytest.mark.parametrize(
    "bad_messages",
    [
        "not a list",
        [{"role": "user", "content": "Hi"}, {"role": "assistant"}],
    ],
)
def test_bad_chat_rows_name_file_row_and_field(tokenizer, tmp_path, bad_messages):
    good = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": good}) + "\n" + json.dumps({"messages": bad_messages}) + "\n")
    expect_error(tokenizer, str(path), ": line 2: ", "'messages'", path=str(path), format="chat")


@pytest.mark.parametrize("content", ["", "[]", "instruction,input,output\n"])
def test_empty_dataset_is_named(tokenizer, tmp_path, content):
    path = tmp_path / ("d.csv" if content.startswith("instruction") else "d.json")
    path.write_text(content)
    expect_error(tokenizer, str(path), "empty", path=str(path))


def test_unreachable_hub_dataset_is_a_clear_error(tokenizer, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once instead of retrying the network
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    expect_error(tokenizer, "'someone/no-such-dataset'", "hub", path="someone/no-such-dataset")


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def expect_file_error(tokenizer, path: Path, *fragments: str, **cfg) -> str:
    """The error names the file and each fragment, and the data file is left exactly as it was."""
    before = path.read_bytes()
    message = expect_error(tokenizer, str(path), *fragments, path=str(path), **cfg)
    assert path.read_bytes() == before
    return message


@pytest.mark.parametrize(
    ("name", "data", "offset"),
    [
        ("d.jsonl", b'{"instruction": "a", "output": "b"}\n\n{"instruction": "caf\xe9", "output": "b"}\n', 57),
        ("d.csv", b"instruction,input,output\na,,b\ncaf\xe9,,b\n", 33),  # was a UnicodeDecodeError in the header read
    ],
)
def test_non_utf8_data_names_the_line_and_byte_and_says_save_as_utf8(tokenizer, tmp_path, name, data, offset):
    path = _written(tmp_path / name, data)
    expect_file_error(
        tokenizer, path, "line 3 is not UTF-8", "0xe9", f"byte offset {offset} ", "Re-save the file as UTF-8"
    )


@pytest.mark.parametrize(
    ("bad_line", "where"),
    [
        ('{"instruction": "x", "output": "y",}', "line 4, column 36: Expecting property name"),
        ('{"instruction": "x", "output"', "line 4, column 30: Expecting ':' delimiter"),  # cut short
        ('["x", "y"]', 'line 4 is \'["x", "y"]\', not a {...} object'),
    ],
)
def test_malformed_jsonl_line_is_named_by_its_line_number(tokenizer, tmp_path, bad_line, where):
    text = json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n" + bad_line + "\n" + json.dumps(ROWS[2]) + "\n"
    path = _written(tmp_path / "d.jsonl", text.encode())
    message = expect_file_error(tokenizer, path, where)
    assert "position" not in message  # datasets' own words were "Trailing data at position 70"


def test_json_array_syntax_error_gives_line_and_column(tokenizer, tmp_path):
    text = '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": "d"}\n]\n'
    path = _written(tmp_path / "d.json", text.encode())
    expect_file_error(tokenizer, path, "line 3, column 23: Expecting ',' delimiter")


BAD_ROW = {"instruction": "Say hi.", "input": "", "output": ""}


def _file_with_bad_third_row(folder: Path, kind: str) -> Path:
    """ROWS[0], ROWS[1], BAD_ROW, laid out so the file's lines and the row indices differ."""
    if kind == "jsonl":  # blank lines are skipped by the reader but still count as lines
        text = "\n".join(["", json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), json.dumps(BAD_ROW)]) + "\n"
        return _written(folder / "d.jsonl", text.encode())
    if kind == "csv":  # a quoted field spanning two lines, then a blank line
        text = (
            'instruction,input,output\n"Reverse the\nword order.",the red fox runs,runs fox red the\n\n'
            "Write 42 in words.,,forty-two\nSay hi.,,\n"
        )
        return _written(folder / "d.csv", text.encode())
    if kind == "json":
        return _written(folder / "d.json", json.dumps([ROWS[0], ROWS[1], BAD_ROW], indent=2).encode())
    datasets.Dataset.from_list([ROWS[0], ROWS[1], BAD_ROW]).to_parquet(str(folder / "d.parquet"))
    return folder / "d.parquet"


@pytest.mark.parametrize(
    ("kind", "where"),
    [("jsonl", "line 5"), ("csv", "line 6"), ("json", "item 3"), ("parquet", "row 3")],
)
def test_a_bad_row_is_named_where_the_user_finds_it(tokenizer, tmp_path, kind, where):
    path = _file_with_bad_third_row(tmp_path, kind)
    expect_file_error(tokenizer, path, f"{path}: {where}: field 'output' is ")


# -------------------------------------------------------------------------------------- validation


def test_val_split_count_and_fraction_deterministic(tokenizer, tmp_path):
    rows = list(range(50))
    train, val = split_validation(rows, 7, seed=1)
    assert len(val) == 7 and sorted(train + val) == rows
    assert split_validation(rows, 7, seed=1) == (train, val)
    assert split_validation(rows, 7, seed=2)[1] != val
    assert len(split_validation(rows, 0.1, seed=1)[1]) == 5
    with pytest.raises(QloraKitError, match="val_set_size"):
        split_validation(rows, 50, seed=1)

    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"Echo {i}.", "output": str(i)} for i in range(20)])
    first = prepare_data(DataConfig(path=str(path), val_set_size=0.25, shuffle_seed=3), tokenizer)
    again = prepare_data(DataConfig(path=str(path), val_set_size=0.25, shuffle_seed=3), tokenizer)
    assert (len(first.train), len(first.val)) == (15, 5)
    assert (first.train, first.val) == (again.train, again.val)
    assert not {tuple(e["input_ids"]) for e in first.train} & {tuple(e["input_ids"]) for e in first.val}


# ---------------------------------------------------------------------------------------- batching


def fake_examples(lengths: list[int]) -> list[dict[str, list[int]]]:
    return [{"input_ids": [10 + i] * n, "labels": [IGNORE_INDEX] + [10 + i] * (n - 1)} for i, n in enumerate(lengths)]


def random_lengths(count: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(4, 120) for _ in range(count)]


def test_batch_order_is_a_function_of_seed_and_epoch():
    examples = fake_examples(random_lengths(230))
    plan = BatchPlan(examples, 4, pad_token_id=0, seed=7)
    again = BatchPlan(examples, 4, pad_token_id=0, seed=7)
    assert plan.batches_for_epoch(0) == again.batches_for_epoch(0)
    assert plan.batches_for_epoch(0) != plan.batches_for_epoch(1)
    assert plan.batches_for_epoch(0) != BatchPlan(examples, 4, pad_token_id=0, seed=8).batches_for_epoch(0)
    for epoch in range(2):
        seen = sorted(i for batch in plan.batches_for_epoch(epoch) for row in batch for i in row)
        assert seen == list(range(230))  # every example exactly once per epoch
    assert len(plan) == 58 and len(plan.batches_for_epoch(0)) == 58


def test_resume_from_state_dict_continues_at_the_exact_next_batch():
    examples = fake_examples(random_lengths(30))
    plan = BatchPlan(examples, 4, pad_token_id=0, seed=3)  # 8 micro-batches per epoch
    for _ in range(13):  # into the second epoch
        plan.next_batch()
    state = plan.state_dict()
    assert (state["epoch"], state["position"]) == (1, 5)
    expected = [plan.next_batch() for _ in range(6)]  # crosses into the third epoch
    resumed = BatchPlan(examples, 4, pad_token_id=0, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # checkpoints store it as JSON
    for want in expected:
        got = resumed.next_batch()
        assert all(torch.equal(got[key], want[key]) for key in want)
    with pytest.raises(QloraKitError, match="micro_batch_size"):
        BatchPlan(examples, 2, pad_token_id=0, seed=3).load_state_dict(state)


def test_length_grouping_cuts_padding():
    lengths = random.Random(0).sample(range(4, 600), 400)  # distinct, so exactly one example is the longest
    examples = fake_examples(lengths)

    def padding(plan: BatchPlan) -> int:
        total = 0
        for batch in plan.batches_for_epoch(0):
            widths = [len(examples[row[0]]["input_ids"]) for row in batch]
            total += max(widths) * len(widths) - sum(widths)
        return total

    grouped = padding(BatchPlan(examples, 8, pad_token_id=0, seed=1, group_by_length=True))
    shuffled = padding(BatchPlan(examples, 8, pad_token_id=0, seed=1, group_by_length=False))
    assert grouped < shuffled / 5
    # The longest example leads the epoch (so running out of memory happens at step 1), in every epoch.
    small_batches = BatchPlan(examples, 2, pad_token_id=0, seed=1)  # 4 windows of 100 examples
    for epoch in range(3):
        first = small_batches.batches_for_epoch(epoch)[0]
        assert max(len(examples[row[0]]["input_ids"]) for row in first) == max(lengths)


def test_packing_fills_blocks_and_restarts_positions():
    lengths = random_lengths(60)
    examples = fake_examples(lengths)
    plan = BatchPlan(examples, 2, pad_token_id=0, seed=5, packing=True, cutoff_len=128)
    blocks = [row for batch in plan.batches_for_epoch(0) for row in batch]
    assert sorted(i for block in blocks for i in block) == list(range(60))
    assert all(sum(lengths[i] for i in block) <= 128 for block in blocks)
    assert len(blocks) <= sum(lengths) / 128 * 1.15 + 1  # packed tight
    assert len(plan.batches_for_epoch(1)) == len(plan)  # the same number of batches every epoch

    trained_everywhere = [{"input_ids": [7] * n, "labels": [7] * n} for n in (3, 2, 4)]
    row = pack(trained_everywhere)
    assert row["position_ids"] == [0, 1, 2, 0, 1, 0, 1, 2, 3]
    # Each example's first token would be predicted from the previous example's last one: no loss there.
    assert row["labels"] == [IGNORE_INDEX, 7, 7, IGNORE_INDEX, 7, IGNORE_INDEX, 7, 7, 7]
    batch = plan.next_batch()
    assert set(batch) == {"input_ids", "position_ids", "labels"}


def test_collate_pads_right_and_masks_labels():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate(examples, pad_token_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(t.dtype == torch.long for t in batch.values())
    assert collate(examples, pad_token_id=2, pad_to_multiple_of=8)["input_ids"].shape == (2, 8)
    val = list(eval_batches(fake_examples([3, 9, 5]), 2, pad_token_id=0))
    assert [b["input_ids"].shape for b in val] == [(2, 9), (1, 3)]


def test_packed_rows_give_each_example_the_logits_it_has_alone():
    # transformers builds a block-diagonal mask from position_ids, so packed examples cannot see each other.
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(), dtype=torch.float32).eval()
    examples = [{"input_ids": list(range(3 + 7 * i, 10 + 9 * i)), "labels": [1] * (7 + 2 * i)} for i in range(3)]
    batch = collate([pack(examples)], pad_token_id=0, pad_to_multiple_of=32)
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
        start = 0
        for example in examples:
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(packed[start : start + len(alone)], alone, atol=1e-5, rtol=1e-5)
            start += len(alone)
