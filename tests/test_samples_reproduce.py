"""A run's after-training samples are what `qlora-kit generate` prints for the same prompts: with the adapter
on the base model, and from a merged export, using the commands `train` prints at the end.

A tiny random Llama with SmolLM2's tokenizer, a few real training steps on CPU in fp32 (qlora_kit.train.train
with a RunConfig), then the CLI in this process (capsys sees exactly what it prints).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from qlora_kit.adapter import METADATA_NAME
from qlora_kit.cli import main as cli_main
from qlora_kit.config import load_config
from qlora_kit.train import train
from tests.conftest import save_tiny_checkpoint
from tests.test_generate import with_tokenizer

TOOLS = Path(__file__).parent.parent / "recipes" / "data"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama with SmolLM2's tokenizer; initializer_range 0.2 makes its decoder layers matter,
    so NF4 rounding of them changes the greedy text (0.02 would leave it to the embeddings)."""
    path = tmp_path_factory.mktemp("m") / "tiny"
    save_tiny_checkpoint(path, vocab_size=49152, hidden_size=64, eos_token_id=2, initializer_range=0.2)
    return with_tokenizer(path, smollm2_dir)


def _as_chat(source: Path, target: Path) -> Path:
    """The text-tools rows as one user turn and one assistant turn each."""
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    with open(target, "w") as f:
        for row in rows:
            user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return target


def _generated(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli_main(argv) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("data_format", ["alpaca", "chat"])
def test_after_training_samples_are_what_generate_prints(tiny_model_dir, tmp_path, capsys, caplog, data_format):
    train_file, val_file = TOOLS / "text_tools_train.jsonl", TOOLS / "text_tools_val.jsonl"
    if data_format == "chat":
        train_file = _as_chat(train_file, tmp_path / "train.jsonl")
        val_file = _as_chat(val_file, tmp_path / "val.jsonl")
    run = tmp_path / "run"
    overrides = {
        "model.name_or_path": tiny_model_dir,
        "model.device": "cpu",
        "model.compute_dtype": "fp32",
        "data.path": train_file,
        "data.val_path": val_file,
        "data.format": data_format,
        "data.max_samples": 48,
        "lora.r": 8,
        "lora.alpha": 16,
        "train.micro_batch_size": 4,
        "train.gradient_accumulation_steps": 1,
        "train.max_steps": 6,
        "train.learning_rate": 1e-2,
        "output.dir": run,
        "output.sample_max_new_tokens": 8,
    }
    with caplog.at_level("INFO", logger="qlora_kit"):
        train(load_config(None, [f"{k}={v}" for k, v in overrides.items()]))
    printed = "\n".join(record.getMessage() for record in caplog.records)
    before = json.loads((run / "samples_before.json").read_text())
    after = json.loads((run / "samples_after.json").read_text())
    assert len(after) == 3
    assert [s["generated"] for s in before] != [s["generated"] for s in after]  # the fine-tune shows
    # Held-out prompts come back as generate takes them: the run's template, the instruction (and input).
    assert {s["template"] for s in after} == {data_format}
    assert any(s["input"] for s in after) == (data_format == "alpaca")
    assert json.loads((run / "adapter" / METADATA_NAME).read_text())["template"] == data_format

    # The last lines of train's output: generate with the adapter, export, generate on the export.
    commands = [shlex.split(line) for line in printed.splitlines()[-3:]]
    assert [c[:2] for c in commands] == [["qlora-kit", "generate"], ["qlora-kit", "export"], ["qlora-kit", "generate"]]
    assert "--template" not in commands[0]  # generate's auto uses the template recorded with the adapter
    assert _generated(capsys, commands[0][1:]) == after[0]["generated"] + "\n"
    capsys.readouterr()
    assert cli_main(commands[1][1:]) == 0
    export = Path(commands[1][commands[1].index("--out") + 1])
    assert json.loads((export / METADATA_NAME).read_text())["template"] == data_format
    assert _generated(capsys, commands[2][1:]) == after[0]["generated"] + "\n"

    # Every sample, from the adapter and from the export; re-quantizing the export (what generate did by
    # default before) changes the answers: this model is sensitive enough to tell.
    requantized = []
    for sample in after:
        ask = ["--prompt", sample["prompt"], "--input", sample["input"], "--max-new-tokens", "8", "--dtype", "fp32"]
        adapter = _generated(capsys, ["generate", "--model", str(tiny_model_dir), "--adapter", str(run), *ask])
        assert adapter == sample["generated"] + "\n", sample
        assert _generated(capsys, ["generate", "--model", str(export), *ask]) == sample["generated"] + "\n", sample
        requantized.append(_generated(capsys, ["generate", "--model", str(export), "--quantize", *ask]))
    assert requantized != [sample["generated"] + "\n" for sample in after]
