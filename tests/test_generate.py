"""Generation: greedy/sampled text, templates, folding the adapter, the CLI on base+adapter and exported dirs.

A tiny random model with the real SmolLM2 tokenizer (vocab 49152) keeps the fast tests fast; the slow test
asks the real SmolLM2-135M-Instruct in 4-bit for the capital of France.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from qlora_kit.adapter import METADATA_NAME, load_adapter, save_adapter
from qlora_kit.cli import generate_main
from qlora_kit.cli import main as cli_main
from qlora_kit.errors import QloraKitError
from qlora_kit.export import export_merged
from qlora_kit.generate import REQUANTIZE_NOTE, encode_prompt, fold_lora, generate_text, load_for_generation
from qlora_kit.hf_dir import TOKENIZER_FILES
from qlora_kit.loading import load_model, load_tokenizer
from qlora_kit.lora import LoRALinear, add_lora, lora_layers
from qlora_kit.quant import NF4Linear
from tests.conftest import save_tiny_checkpoint


def _export(source: Path, out: Path, **kwargs) -> Path:
    # The training-time models in these tests are quantized on the CPU, and export must quantize where
    # training did (NF4 codes come from that device's kernel); on a GPU machine "auto" would pick CUDA.
    return export_merged(source, out, device="cpu", **kwargs)


def with_tokenizer(path: Path, tokenizer_dir: Path) -> Path:
    """``path`` with the tokenizer files of ``tokenizer_dir`` copied in."""
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, path / name)
    return path


@pytest.fixture
def tiny_dir(tmp_path: Path, smollm2_dir: Path) -> Path:
    """A tiny Llama with SmolLM2's vocabulary and tokenizer files (bos 1, eos 2 as in SmolLM2)."""
    path = save_tiny_checkpoint(tmp_path / "tiny", vocab_size=49152, hidden_size=64, intermediate_size=96)
    return with_tokenizer(path, smollm2_dir)


@pytest.fixture
def adapted(tiny_dir: Path) -> nn.Module:
    model = load_model(tiny_dir, device="cpu")
    add_lora(model, "all-linear", r=4, alpha=8, dropout=0.1)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.2)
    return model


def _greedy_by_hand(model: nn.Module, ids: torch.Tensor, steps: int, eos: int) -> list[int]:
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(ids).logits[0, -1].argmax())
            new.append(token)
            if token == eos:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return new


def test_greedy_generate_text_is_the_argmax_continuation(adapted, tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    adapted.train()  # as the trainer calls it mid-run: dropout must be off during generation...
    text = generate_text(adapted, tokenizer, "The weather today is", "none", max_new_tokens=6)
    assert adapted.training  # ... and the mode given back
    adapted.eval()
    ids = encode_prompt(tokenizer, "The weather today is", "none")["input_ids"]
    expected = _greedy_by_hand(adapted, ids, 6, eos=2)
    assert isinstance(text, str) and text == tokenizer.decode(expected, skip_special_tokens=True)


def test_sampling_is_reproducible_with_a_seed(adapted, tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)
    texts = []
    for _ in range(2):
        torch.manual_seed(7)
        texts.append(generate_text(adapted, tokenizer, "Once", "none", 8, temperature=1.0, top_p=0.9))
    assert texts[0] == texts[1] and isinstance(texts[0], str)
    with pytest.raises(QloraKitError):
        generate_text(adapted, tokenizer, "Once", "none", 8, temperature=-1.0)


def test_templates(tiny_dir):
    tokenizer = load_tokenizer(tiny_dir)

    def text(template: str) -> str:
        return tokenizer.decode(encode_prompt(tokenizer, "Name a color.", template)["input_ids"][0])

    from qlora_kit.data import alpaca_prompt

    assert text("alpaca") == alpaca_prompt("Name a color.")
    assert text("alpaca").endswith("### Instruction:\nName a color.\n\n### Response:\n")
    assert text("chat").endswith("<|im_start|>user\nName a color.<|im_end|>\n<|im_start|>assistant\n")
    assert text("auto") == text("chat")  # this tokenizer has a chat template
    assert text("none") == "Name a color."
    tokenizer.chat_template = None
    assert text("auto") == text("alpaca")
    with pytest.raises(QloraKitError, match="chat template"):
        text("chat")


def test_fold_lora_gives_dense_layers_and_the_same_logits(adapted):
    adapted.eval()
    ids = torch.randint(0, 49152, (2, 10))
    with torch.no_grad():
        before = adapted(ids).logits
    assert fold_lora(adapted) == 2 * 7
    assert not any(isinstance(m, LoRALinear) for m in adapted.modules())
    assert isinstance(adapted.model.layers[0].mlp.up_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(adapted(ids).logits, before, rtol=0, atol=1e-5)


def test_cli_with_adapter_folded_or_not_and_on_the_merged_export(adapted, tiny_dir, tmp_path, capsys, caplog):
    save_adapter(adapted, tmp_path / "run" / "adapter", base_model_name_or_path=str(tiny_dir))
    tokenizer = load_tokenizer(tiny_dir)
    expected = generate_text(adapted, tokenizer, "Hello there", "none", max_new_tokens=5)
    common = ["--prompt", "Hello there", "--template", "none", "--max-new-tokens", "5", "--device", "cpu"]

    def answer(model: nn.Module) -> str:
        return generate_text(model, tokenizer, "Hello there", "none", max_new_tokens=5) + "\n"

    capsys.readouterr()
    assert generate_main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "run"), *common]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert (
        generate_main(["--model", str(tiny_dir), "--adapter", str(tmp_path / "run"), "--merge-adapter", *common]) == 0
    )
    assert capsys.readouterr().out.strip() == expected.strip()

    # The merged export loads dense by default (as exported); NF4 only when asked, with a note.
    merged = _export(tmp_path / "run", tmp_path / "merged", dtype="fp32")
    capsys.readouterr()
    assert generate_main(["--model", str(merged), *common]) == 0
    assert capsys.readouterr().out == answer(load_model(merged, device="cpu", quantize=False))
    assert REQUANTIZE_NOTE.format(model=merged) not in caplog.text
    assert generate_main(["--model", str(merged), "--quantize", *common]) == 0
    assert capsys.readouterr().out == answer(load_model(merged, device="cpu"))
    assert REQUANTIZE_NOTE.format(model=merged) in caplog.text

    # The bitsandbytes 4-bit export (in_features 96 here: bitsandbytes' own CPU forward cannot run it) goes
    # through our loader, with its codes as written; an adapter can even go on top of it.
    nf4 = _export(tmp_path / "run", tmp_path / "nf4", dtype="fp32", quantize="nf4")
    capsys.readouterr()
    assert generate_main(["--model", str(nf4), *common]) == 0
    assert capsys.readouterr().out == answer(load_model(nf4, device="cpu"))
    assert generate_main(["--model", str(nf4), "--adapter", str(tmp_path / "run"), *common]) == 0
    on_top = load_model(nf4, device="cpu")
    load_adapter(on_top, tmp_path / "run" / "adapter")
    assert capsys.readouterr().out == answer(on_top)


def test_exports_load_dense_and_base_models_in_nf4(adapted, tiny_dir, tmp_path, capsys):
    save_adapter(adapted, tmp_path / "run" / "adapter", base_model_name_or_path=str(tiny_dir))
    merged = _export(tmp_path / "run", tmp_path / "merged", dtype="fp32")

    def nf4_layers(model: str, quantize: bool | None = None) -> int:
        loaded, _, _ = load_for_generation(model, None, "cpu", "auto", quantize, merge_adapter=False)
        return sum(isinstance(m, NF4Linear) for m in loaded.modules())

    assert nf4_layers(str(merged)) == 0
    assert nf4_layers(str(merged), quantize=True) == 14
    assert nf4_layers(str(tiny_dir)) == 14  # a base model: as training saw it
    assert nf4_layers(str(tiny_dir), quantize=False) == 0
    nf4 = _export(tmp_path / "run", tmp_path / "nf4", dtype="fp32", quantize="nf4")
    assert nf4_layers(str(nf4)) == 14
    with pytest.raises(QloraKitError, match="cannot be loaded dense"):
        nf4_layers(str(nf4), quantize=False)


def test_other_bitsandbytes_checkpoints_go_through_transformers(adapted, tiny_dir, smollm2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # NF4 without double quantization, saved by transformers (input widths of 64 and 128: bitsandbytes' CPU
    # forward runs them).
    base = save_tiny_checkpoint(tmp_path / "base", vocab_size=49152, hidden_size=64, intermediate_size=128)
    options = dict(bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False, bnb_4bit_compute_dtype=torch.float32)
    quantization = BitsAndBytesConfig(load_in_4bit=True, **options)
    AutoModelForCausalLM.from_pretrained(base, quantization_config=quantization).save_pretrained(tmp_path / "4bit")
    checkpoint = with_tokenizer(tmp_path / "4bit", smollm2_dir)
    theirs = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    expected = generate_text(theirs, load_tokenizer(checkpoint), "Hello there", "none", max_new_tokens=4)
    common = ["--prompt", "Hello there", "--template", "none", "--max-new-tokens", "4", "--device", "cpu"]
    capsys.readouterr()
    assert generate_main(["--model", str(checkpoint), *common]) == 0
    assert capsys.readouterr().out == expected + "\n"
    save_adapter(adapted, tmp_path / "run" / "adapter", base_model_name_or_path=str(tiny_dir))
    with pytest.raises(QloraKitError, match="an adapter cannot be added to it here"):
        generate_main(["--model", str(checkpoint), "--adapter", str(tmp_path / "run"), *common])


def test_template_recorded_with_the_adapter_is_used_by_auto(adapted, tiny_dir, tmp_path, capsys):
    run = tmp_path / "run"
    save_adapter(adapted, run / "adapter", base_model_name_or_path=str(tiny_dir), metadata={"template": "alpaca"})
    tokenizer = load_tokenizer(tiny_dir)
    assert tokenizer.chat_template  # without the record, auto would pick chat
    alpaca = generate_text(adapted, tokenizer, "Name a color.", "alpaca", max_new_tokens=6)
    chat = generate_text(adapted, tokenizer, "Name a color.", "chat", max_new_tokens=6)
    assert alpaca != chat
    common = ["--prompt", "Name a color.", "--max-new-tokens", "6", "--device", "cpu"]
    capsys.readouterr()
    assert generate_main(["--model", str(tiny_dir), "--adapter", str(run), *common]) == 0
    assert capsys.readouterr().out == alpaca + "\n"
    assert generate_main(["--model", str(tiny_dir), "--adapter", str(run), "--template", "chat", *common]) == 0
    assert capsys.readouterr().out == chat + "\n"
    # The export carries the record.
    merged = _export(run, tmp_path / "merged", dtype="fp32")
    assert json.loads((merged / METADATA_NAME).read_text())["template"] == "alpaca"
    capsys.readouterr()
    assert generate_main(["--model", str(merged), *common]) == 0
    assert capsys.readouterr().out.strip() == alpaca.strip()

    (run / "adapter" / METADATA_NAME).write_text('{"template": "vicuna"}')
    with pytest.raises(QloraKitError, match="vicuna"):
        generate_main(["--model", str(tiny_dir), "--adapter", str(run), *common])


def test_alpaca_input_field(tiny_dir, capsys):
    from qlora_kit.data import tokenize_alpaca

    tokenizer = load_tokenizer(tiny_dir)
    ids = encode_prompt(tokenizer, "Sort the words.", "alpaca", "pear, apple")["input_ids"][0].tolist()
    assert ids == tokenize_alpaca(tokenizer, "Sort the words.", "pear, apple", "", add_eos=False)["input_ids"]
    assert "### Input:\npear, apple" in tokenizer.decode(ids)
    with pytest.raises(QloraKitError, match="--input"):
        encode_prompt(tokenizer, "Sort the words.", "chat", "pear, apple")
    with pytest.raises(QloraKitError, match="--input"):
        generate_main(["--model", str(tiny_dir), "--prompt", "Sort.", "--input", "b, a", "--template", "none"])


@pytest.mark.parametrize("prompt", ["", "  \n\t"])
@pytest.mark.parametrize("template", ["none", "alpaca", "chat"])
def test_empty_prompt_is_refused(adapted, tiny_dir, prompt, template, capsys):
    tokenizer = load_tokenizer(tiny_dir)
    with pytest.raises(QloraKitError, match="the prompt is empty") as err:
        generate_text(adapted, tokenizer, prompt, template, max_new_tokens=3)
    assert "--prompt TEXT" in str(err.value)
    # The CLI refuses it before loading anything (a missing model would be the error otherwise).
    with pytest.raises(QloraKitError, match="the prompt is empty"):
        generate_main(["--model", str(tiny_dir / "not-loaded"), "--prompt", prompt, "--template", template])
    assert cli_main(["generate", "--model", str(tiny_dir), "--prompt", prompt, "--template", template]) == 2
    assert "the prompt is empty" in capsys.readouterr().err


def test_cli_interactive_and_bad_arguments(tiny_dir, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n\nexit\n"))
    args = ["--model", str(tiny_dir), "--interactive", "--max-new-tokens", "3", "--device", "cpu"]
    assert generate_main(args) == 0
    assert capsys.readouterr().out.count(">>> ") == 3
    with pytest.raises(QloraKitError, match="--merge-adapter needs --adapter"):
        generate_main(["--model", str(tiny_dir), "--prompt", "x", "--merge-adapter"])
    with pytest.raises(SystemExit):
        generate_main(["--model", str(tiny_dir), "--prompt", "x", "--interactive"])
    with pytest.raises(SystemExit):
        generate_main(["--model", str(tiny_dir)])


@pytest.mark.slow
def test_smollm2_in_4bit_knows_the_capital_of_france(smollm2_dir, capsys):
    argv = ["--model", "smollm2-135m-instruct", "--prompt", "What is the capital of France?"]
    assert generate_main([*argv, "--template", "chat", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out
