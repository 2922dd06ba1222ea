"""The adapter dir: one reader (``read_adapter``) behind load_adapter, export and checkpoint resume, and an
adapter_config.json written from the run's LoRA config with a base path that means the same from anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_kit.adapter import (
    CONFIG_NAME,
    METADATA_NAME,
    WEIGHTS_NAME,
    AdapterFileError,
    load_adapter,
    read_adapter,
    save_adapter,
)
from qlora_kit.config import LoRAConfig
from qlora_kit.errors import QloraKitError
from qlora_kit.export import export_merged
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora, lora_layers, lora_state_dict
from tests.conftest import save_tiny_checkpoint


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return save_tiny_checkpoint(tmp_path / "base")


def _adapted(base: Path, targets="all-linear", r=4, alpha=8.0, dropout=0.0):
    model = load_model(base, device="cpu")
    add_lora(model, targets, r=r, alpha=alpha, dropout=dropout)
    torch.manual_seed(3)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_b.weight, std=0.05)
    return model


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_read_adapter_holds_config_weights_and_metadata(base, tmp_path):
    model = _adapted(base)
    saved = save_adapter(model, tmp_path / "adapter", str(base), metadata={"template": "chat"})
    adapter = read_adapter(saved)
    assert adapter.directory == saved and adapter.config.r == 4 and adapter.config.lora_alpha == 8.0
    assert adapter.metadata == {"kind": "adapter", "template": "chat"}
    expected = lora_state_dict(model)
    assert adapter.state.keys() == expected.keys()
    assert all(torch.equal(adapter.state[k], v) for k, v in expected.items())
    pairs = adapter.pairs()
    assert len(pairs) == 14 and set(pairs) == set(lora_layers(model))
    a, b = pairs["model.layers.1.mlp.down_proj"]
    layer = lora_layers(model)["model.layers.1.mlp.down_proj"]
    assert torch.equal(a, layer.lora_a.weight) and torch.equal(b, layer.lora_b.weight)


def _drop_one_b(adapter: Path) -> None:
    state = load_file(adapter / WEIGHTS_NAME)
    state.pop(next(k for k in state if k.endswith("lora_B.weight")))
    save_file(state, adapter / WEIGHTS_NAME)


def _add_tensor(adapter: Path) -> None:
    state = load_file(adapter / WEIGHTS_NAME)
    save_file({**state, "base_model.model.lm_head.weight": torch.zeros(2, 2)}, adapter / WEIGHTS_NAME)


def _set_config(adapter: Path, **changes) -> None:
    config = json.loads((adapter / CONFIG_NAME).read_text())
    (adapter / CONFIG_NAME).write_text(json.dumps({**config, **changes}))


BAD_ADAPTERS = [
    pytest.param(lambda d: (d / CONFIG_NAME).write_text("{"), CONFIG_NAME, "not valid JSON", id="config-json"),
    pytest.param(lambda d: _set_config(d, r=2), WEIGHTS_NAME, "says r=2", id="rank"),
    pytest.param(lambda d: (d / WEIGHTS_NAME).unlink(), WEIGHTS_NAME, "the adapter is incomplete", id="no-weights"),
    pytest.param(
        lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:200]),
        WEIGHTS_NAME,
        "damaged or not a safetensors file",
        id="truncated",
    ),
    pytest.param(_drop_one_b, WEIGHTS_NAME, "no complete LoRA A/B pair", id="half-pair"),
    pytest.param(_add_tensor, WEIGHTS_NAME, "unexpected tensor 'base_model.model.lm_head.weight'", id="extra"),
    pytest.param(lambda d: (d / METADATA_NAME).write_text("[1]"), METADATA_NAME, "JSON object", id="metadata"),
]


@pytest.mark.parametrize("damage, file, problem", BAD_ADAPTERS)
def test_every_reader_refuses_a_bad_adapter_with_the_same_message(base, tmp_path, damage, file, problem):
    adapter = save_adapter(_adapted(base), tmp_path / "adapter", str(base), metadata={"template": "alpaca"})
    damage(adapter)
    before = _files(tmp_path / "adapter")
    with pytest.raises(AdapterFileError) as err:
        read_adapter(adapter)
    message = str(err.value)
    assert err.value.file == file and problem in message and str(adapter) in message
    with pytest.raises(QloraKitError) as by_load:  # load_adapter and export read it through read_adapter
        load_adapter(load_model(base, device="cpu"), adapter)
    with pytest.raises(QloraKitError) as by_export:
        export_merged(adapter, tmp_path / "export", device="cpu")
    assert str(by_load.value) == str(by_export.value) == message
    assert _files(tmp_path / "adapter") == before and not (tmp_path / "export").exists()


def test_the_adapter_config_comes_from_the_runs_lora_config(base, tmp_path):
    lora = LoRAConfig(r=4, alpha=8, dropout=0.1, targets="attention")
    model = _adapted(base, lora.targets, lora.r, lora.alpha, lora.dropout)
    config = json.loads((save_adapter(model, tmp_path / "a", str(base), lora=lora) / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]  # leaf names of the preset
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["use_rslora"]) == (4, 8, 0.1, False)

    # Layers of one kind in some layers only: the full names (what peft matches exactly).
    one = LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["layers.0.self_attn.q_proj"])
    model = _adapted(base, one.targets, one.r, one.alpha, one.dropout)
    config = json.loads((save_adapter(model, tmp_path / "b", str(base), lora=one) / CONFIG_NAME).read_text())
    assert config["target_modules"] == ["model.layers.0.self_attn.q_proj"]

    # A config the layers were not added with would describe another adapter: refused, nothing written.
    with pytest.raises(QloraKitError, match=r"r=8.*is not what the model's LoRA layers hold \(r=4"):
        save_adapter(model, tmp_path / "c", str(base), lora=LoRAConfig(r=8, alpha=8, dropout=0.0))
    assert not (tmp_path / "c").exists()


def test_base_path_resolves_from_any_working_directory(base, tmp_path, monkeypatch):
    model = _adapted(base)
    monkeypatch.chdir(tmp_path)
    save_adapter(model, "run/adapter", "base")  # relative, as a recipe run from tmp_path names it
    config = json.loads((tmp_path / "run" / "adapter" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == str(base.resolve())
    save_adapter(model, "hub/adapter", "HuggingFaceTB/SmolLM2-135M")  # hub and short ids stay as they are
    config = json.loads((tmp_path / "hub" / "adapter" / CONFIG_NAME).read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    out = export_merged(tmp_path / "run", tmp_path / "export", dtype="fp32", device="cpu")
    assert (out / "model.safetensors").is_file()
    assert json.loads((out / METADATA_NAME).read_text())["base_model"] == str(base.resolve())
