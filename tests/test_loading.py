"""Streaming 4-bit loader: families, shards, tied weights, bad input, and the real SmolLM2-135M."""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_kit.adapter import save_adapter
from qlora_kit.errors import QloraKitError
from qlora_kit.export import export_merged
from qlora_kit.loading import load_model, load_tokenizer
from qlora_kit.lora import add_lora
from qlora_kit.quant import NF4Linear
from qlora_kit.weights import checkpoint_index
from tests.conftest import save_tiny_checkpoint

IDS = torch.tensor([[5, 17, 33, 250, 7, 99, 12, 3]])


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_dense_load_matches_transformers(tmp_path, family):
    path = save_tiny_checkpoint(tmp_path / family, family)
    ours = load_model(path, device="cpu", quantize=False)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_quantized_load_is_transformers_with_dequantized_weights(tmp_path, family):
    path = save_tiny_checkpoint(tmp_path / family, family)
    ours = load_model(path, device="cpu")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    quantized = {n: m for n, m in ours.named_modules() if isinstance(m, NF4Linear)}
    assert len(quantized) == 2 * 7  # every decoder linear, nothing else
    with torch.no_grad():
        for name, layer in quantized.items():
            reference.get_submodule(name).weight.copy_(layer.dequantize())
        torch.testing.assert_close(ours(IDS).logits, reference(IDS).logits, rtol=0, atol=1e-5)
    if family == "qwen2":  # q/k/v biases survive, unquantized
        assert ours.model.layers[0].self_attn.q_proj.bias is not None


def test_sharded_checkpoint_with_index(tmp_path):
    single = save_tiny_checkpoint(tmp_path / "single")
    sharded = save_tiny_checkpoint(tmp_path / "sharded", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    with torch.no_grad():
        a = load_model(single, device="cpu")(IDS).logits
        b = load_model(sharded, device="cpu")(IDS).logits
    assert torch.equal(a, b)


def test_tied_embeddings_stay_tied(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "tied", tie_word_embeddings=True)
    model = load_model(path, device="cpu")
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_compute_dtype(tiny_llama_dir):
    model = load_model(tiny_llama_dir, device="cpu", dtype="bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.codes.dtype == torch.uint8
    assert load_model(tiny_llama_dir, device="cpu").model.norm.weight.dtype == torch.float32  # auto on CPU


# --- bad input: one clear message each -----------------------------------------------------------------


def _error(path) -> str:
    with pytest.raises(QloraKitError) as err:
        load_model(path, device="cpu")
    return str(err.value)


def test_missing_path(tmp_path):
    message = _error(tmp_path / "nope")
    assert "not found" in message and "nope" in message


def test_dir_without_safetensors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(save_tiny_config_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    message = _error(tmp_path)
    assert "no *.safetensors" in message and "pytorch_model.bin" in message and "safe_serialization" in message


def test_truncated_safetensors(tiny_llama_dir):
    file = tiny_llama_dir / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    message = _error(tiny_llama_dir)
    assert "model.safetensors" in message and "truncated" in message and "re-download" in message


def test_corrupt_safetensors_header(tiny_llama_dir):
    file = tiny_llama_dir / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:40] = b"\x00\xff" * 16
    file.write_bytes(bytes(data))
    message = _error(tiny_llama_dir)
    assert "model.safetensors" in message and "not a valid safetensors" in message


def test_unknown_architecture(tiny_llama_dir):
    config = json.loads((tiny_llama_dir / "config.json").read_text())
    config["model_type"] = "frobnicator"
    (tiny_llama_dir / "config.json").write_text(json.dumps(config))
    message = _error(tiny_llama_dir)
    assert "frobnicator" in message and "config.json" in message and "Upgrade transformers" in message


def test_checkpoint_missing_tensors(tmp_path):
    big = save_tiny_checkpoint(tmp_path / "big", num_hidden_layers=3)
    small = save_tiny_checkpoint(tmp_path / "small", num_hidden_layers=2)
    shutil.copy(big / "config.json", small / "config.json")  # config wants a third layer
    message = _error(small)
    assert "missing" in message and "model.layers.2" in message and str(small) in message


def _adapter_for(base: Path, directory: Path) -> Path:
    model = load_model(base, device="cpu")
    add_lora(model, "attention", r=2, alpha=4, dropout=0.0)
    return save_adapter(model, directory, str(base))


@pytest.mark.parametrize("case", ["missing", "shape"])
def test_loading_and_export_check_a_base_checkpoint_with_one_check(tmp_path, case):
    """weights.check_checkpoint, before any weight is read: the same message from load_model and export."""
    good = save_tiny_checkpoint(tmp_path / "good")
    adapter = _adapter_for(good, tmp_path / "adapter")
    if case == "missing":  # config.json wants a third layer the weights do not have
        bad = save_tiny_checkpoint(tmp_path / "bad")
        shutil.copy(save_tiny_checkpoint(tmp_path / "deeper", num_hidden_layers=3) / "config.json", bad)
    else:  # weights of a wider MLP under the config of the good one
        bad = save_tiny_checkpoint(tmp_path / "bad", intermediate_size=256)
        shutil.copy(good / "config.json", bad)
    message = _error(bad)
    with pytest.raises(QloraKitError) as err:
        export_merged(adapter, tmp_path / "export", base_model=bad, device="cpu")
    assert str(err.value) == message and not (tmp_path / "export").exists()
    if case == "missing":
        assert f"the checkpoint in {bad} is missing 9 tensors that config.json needs" in message
        assert "model.layers.2.input_layernorm.weight" in message and "download may be incomplete" in message
    else:
        wrong = r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \((256, 128|128, 256)\) but config"
        assert re.search(rf"{wrong}\.json implies \((192, 128|128, 192)\); .* do not belong together", message)


def test_unused_tensors_are_named_by_loading_and_export(tmp_path, caplog):
    base = save_tiny_checkpoint(tmp_path / "base")
    adapter = _adapter_for(base, tmp_path / "adapter")
    state = load_file(base / "model.safetensors")
    save_file({**state, "vision_tower.proj.weight": torch.zeros(4, 4)}, base / "model.safetensors")
    with caplog.at_level(logging.INFO, logger="qlora_kit"):
        load_model(base, device="cpu")
        export_merged(adapter, tmp_path / "export", device="cpu")
    (loaded, note) = [r for r in caplog.records if "vision_tower.proj.weight" in r.getMessage()]
    assert loaded.levelno == logging.WARNING and "1 tensors in" in loaded.getMessage()
    assert note.levelno == logging.INFO and "are left out" in note.getMessage()
    assert "vision_tower.proj.weight" not in checkpoint_index(tmp_path / "export")


def test_missing_config(tiny_llama_dir):
    (tiny_llama_dir / "config.json").unlink()
    assert "no config.json" in _error(tiny_llama_dir)


REPO = Path(__file__).resolve().parents[1]


def _train_error(model_dir: Path, out: Path) -> str:
    """What `qlora-kit train` of the default recipe says for ``model_dir``; ``out`` holds an earlier run."""
    from qlora_kit.config import load_config
    from qlora_kit.train import train

    (out / "checkpoints").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    cfg = load_config(
        REPO / "recipes" / "smollm2_alpaca.yaml",
        [
            f"model.name_or_path={model_dir}",
            "model.device=cpu",
            f"output.dir={out}",
            f"data.path={REPO / 'recipes/data/text_tools_train.jsonl'}",
            f"data.val_path={REPO / 'recipes/data/text_tools_val.jsonl'}",
        ],
    )
    with pytest.raises(QloraKitError) as err:
        train(cfg)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the earlier run is intact
    return str(err.value)


def _model_dir_with(path: Path, source: Path, *names: str) -> Path:
    path.mkdir()
    for name in names:
        (path / name).symlink_to(source / name)  # a cheap copy: the test only reads them
    return path


def test_train_on_a_dir_with_only_config_says_tokenizer_and_weights_are_missing(tmp_path, smollm2_dir):
    model_dir = _model_dir_with(tmp_path / "m", smollm2_dir, "config.json")
    message = _train_error(model_dir, tmp_path / "run")
    assert f"{model_dir} has no tokenizer files (tokenizer.json, " in message
    assert "and no weights (*.safetensors)" in message
    assert "A model dir holds config.json, the weights (model.safetensors" in message
    assert "sentencepiece" not in message  # transformers' guess, which sent users to install a package


def test_train_on_a_dir_without_tokenizer_names_only_the_tokenizer(tmp_path, smollm2_dir):
    model_dir = _model_dir_with(tmp_path / "m", smollm2_dir, "config.json", "model.safetensors")
    message = _train_error(model_dir, tmp_path / "run")
    assert f"{model_dir} has no tokenizer files (tokenizer.json, " in message and "and no weights" not in message


def test_train_on_a_dir_without_weights_names_the_weights(tmp_path, smollm2_dir):
    names = ("config.json", "tokenizer.json", "tokenizer_config.json")
    model_dir = _model_dir_with(tmp_path / "m", smollm2_dir, *names)
    message = _train_error(model_dir, tmp_path / "run")
    assert f"no *.safetensors weights in {model_dir}. A model dir holds config.json, the weights" in message


def save_tiny_config_dict() -> dict:
    from tests.conftest import tiny_config

    return tiny_config().to_dict()


# --- the real model -------------------------------------------------------------------------------------

# A fixed 281-token passage (three plain encyclopedic paragraphs). Per-paragraph NF4/fp32 perplexity ratios
# on this model range from 1.07 to 1.38, so one short paragraph would make a noisy test.
PASSAGE = " ".join(
    [
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named after "
        "the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889. Locally "
        "nicknamed the Iron Lady, it was constructed as the centrepiece of the 1889 World's Fair, and to crown the "
        "centennial anniversary of the French Revolution.",
        "Photosynthesis is the process by which green plants, algae and some bacteria convert light energy into "
        "chemical energy. During photosynthesis, light energy is captured by chlorophyll and used to convert water "
        "and carbon dioxide into glucose and oxygen. The oxygen is released into the atmosphere, while the glucose "
        "is used by the plant as a source of energy and as a building block for growth. Almost all life on Earth "
        "depends on this process, either directly or indirectly, because it is the primary source of the organic "
        "matter and oxygen that animals need to survive.",
        "Water boils at 100 degrees Celsius at sea level. When you heat a pot of water on the stove, small bubbles "
        "begin to form at the bottom of the pot. As the temperature rises, the bubbles grow larger and rise to the "
        "surface. At higher altitudes, where the air pressure is lower, water boils at a lower temperature, which "
        "is why cooking pasta in the mountains takes longer than it does at the beach.",
    ]
)


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


@pytest.mark.slow
def test_smollm2_in_nf4_knows_paris_and_keeps_perplexity(smollm2_dir):
    from transformers import BitsAndBytesConfig

    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, device="cpu")
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 30 * 7
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    ids = tokenizer(PASSAGE, return_tensors="pt").input_ids
    ppl_4bit = _perplexity(model, ids)
    del model
    ppl_fp32 = _perplexity(load_model(smollm2_dir, device="cpu", quantize=False), ids)
    # The standard stack's NF4 + double quant on the same checkpoint: the error is the format's, not ours.
    reference = AutoModelForCausalLM.from_pretrained(
        smollm2_dir,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
    )
    ppl_reference = _perplexity(reference, ids)
    print(
        f"perplexity fp32 {ppl_fp32:.3f}, ours nf4 {ppl_4bit:.3f} (x{ppl_4bit / ppl_fp32:.3f}), "
        f"transformers+bnb nf4 {ppl_reference:.3f}"
    )
    assert ppl_4bit == pytest.approx(ppl_reference, rel=1e-3)
    # Measured x1.262 (fp32 6.209, nf4 7.835). NF4's relative weight error here is 9.4%, as on Gaussian
    # weights (9.2%): a 135M model is just more sensitive to it than 7B-class models; the 15% goal is met in
    # loss (x1.13), not in perplexity.
    assert ppl_4bit / ppl_fp32 < 1.30
