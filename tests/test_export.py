"""Merged export and PEFT interop: the exported dir computes what the training-time model computed.

Tiny random checkpoints (fast) for every path; one slow test on the real SmolLM2-135M after a few training
steps. The training-time model is always our 4-bit base + LoRA with a non-zero (random or trained) B.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_kit.adapter import METADATA_NAME, WEIGHTS_NAME, load_adapter, save_adapter
from qlora_kit.cli import export_main
from qlora_kit.cli import main as cli_main
from qlora_kit.errors import QloraKitError
from qlora_kit.export import ORIGINAL_MERGE_WARNING, export_merged
from qlora_kit.facts import parse_size
from qlora_kit.loading import load_model, load_tokenizer
from qlora_kit.lora import add_lora, lora_layers, merge_lora_weight
from qlora_kit.quant import NF4Linear
from qlora_kit.weights import checkpoint_index, read_tensor
from tests.conftest import save_tiny_checkpoint

IDS = torch.tensor([[5, 17, 33, 250, 7, 99, 12, 3, 64, 128, 1, 200], [9, 8, 7, 6, 5, 4, 3, 2, 300, 301, 302, 303]])


def _export(source: Path, out: Path, **kwargs) -> Path:
    # The training-time models in these tests are quantized on the CPU, and export must quantize where
    # training did (NF4 codes come from that device's kernel); on a GPU machine "auto" would pick CUDA.
    return export_merged(source, out, device="cpu", **kwargs)


def _randomize_b(model: nn.Module, seed: int = 1) -> None:
    torch.manual_seed(seed)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_b.weight, std=0.05)  # a trained adapter's B is not zero


def _trained(base: Path, run: Path, targets="all-linear", use_rslora: bool = False) -> nn.Module:
    """The training-time model (4-bit base + LoRA, random B) with its adapter saved in ``run/adapter``."""
    model = load_model(base, device="cpu")
    add_lora(model, targets, r=8, alpha=16, dropout=0.0, use_rslora=use_rslora)
    _randomize_b(model)
    save_adapter(model, run / "adapter", base_model_name_or_path=str(base))
    return model


def _logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _hf(path: Path, **kwargs) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def _bf16_checkpoint(path: Path, **overrides) -> Path:
    """A tiny checkpoint stored in bf16 on disk, like real releases (the loader quantizes from bf16)."""
    save_tiny_checkpoint(path, **overrides)
    _hf(path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(path)
    return path


# --- parity with the training-time model ----------------------------------------------------------------


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("qwen2", {}), ("llama", {"tie_word_embeddings": True})])
def test_fp32_export_computes_the_training_model(tmp_path, family, overrides):
    base = save_tiny_checkpoint(tmp_path / "base", family, **overrides)
    model = _trained(base, tmp_path / "run")
    out = _export(tmp_path / "run", tmp_path / "export", dtype="fp32")

    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "generation_config.json", "model.safetensors", METADATA_NAME]
    marker = json.loads((out / METADATA_NAME).read_text())
    assert marker["kind"] == "export" and marker["dtype"] == "fp32" and "template" not in marker  # none recorded
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "float32" and "quantization_config" not in config
    exported = _hf(out, dtype=torch.float32)
    # Tolerance 1e-4 (measured ~1e-6): the same weights, only the order of fp32 sums differs.
    torch.testing.assert_close(_logits(exported), _logits(model), rtol=0, atol=1e-4)
    if overrides.get("tie_word_embeddings"):
        assert exported.lm_head.weight is exported.model.embed_tokens.weight


def test_bf16_export_is_the_dequantized_merge_bit_for_bit(tmp_path):
    base = _bf16_checkpoint(tmp_path / "base")
    model = _trained(base, tmp_path / "run", targets="attention")
    exported = _hf(_export(tmp_path / "run", tmp_path / "export", dtype="bf16"), dtype=torch.bfloat16)
    # Every decoder linear: dequant(NF4 of the bf16 tensor on disk) [+ s*B@A] in fp32, then bf16 -
    # exactly the weight training computed with. The non-adapted MLP linears are dequantized too.
    for name, module in model.named_modules():
        if isinstance(module, NF4Linear):
            layer = model.get_submodule(name.removesuffix(".base"))
            expected = module.dequantize(torch.float32)
            if layer is not module:
                expected = merge_lora_weight(expected, layer.lora_a.weight, layer.lora_b.weight, layer.scaling)
            assert torch.equal(exported.get_submodule(name.removesuffix(".base")).weight, expected.bfloat16()), name
    assert torch.equal(exported.model.embed_tokens.weight, model.model.embed_tokens.weight.bfloat16())
    # Logits of the bf16 export computed in fp32 vs the fp32 training-time model: the bf16 rounding of the
    # weights (2^-9 relative) is the whole difference. Measured max 3.5e-3 on logits of magnitude ~0.8.
    torch.testing.assert_close(_logits(exported.float()), _logits(model), rtol=0, atol=1e-2)


def _warnings(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


def test_merge_into_original_warns_and_uses_the_16bit_weights(tmp_path, caplog):
    base = save_tiny_checkpoint(tmp_path / "base")
    model = _trained(base, tmp_path / "run")
    dequantized = _logits(_hf(_export(tmp_path / "run", tmp_path / "deq", dtype="fp32"), dtype=torch.float32))
    assert ORIGINAL_MERGE_WARNING not in _warnings(caplog)
    out = _export(tmp_path / "run", tmp_path / "orig", dtype="fp32", merge_into="original")
    assert ORIGINAL_MERGE_WARNING in _warnings(caplog)
    # The same adapter on the dense (never quantized) base.
    dense = load_model(base, device="cpu", quantize=False)
    load_adapter(dense, tmp_path / "run" / "adapter")
    original = _logits(_hf(out, dtype=torch.float32))
    torch.testing.assert_close(original, _logits(dense), rtol=0, atol=1e-4)
    torch.testing.assert_close(dequantized, _logits(model), rtol=0, atol=1e-4)
    assert (original - dequantized).abs().max() > 1e-2  # the quantization error the adapter never saw


def test_small_shards_give_an_index_and_load_the_same(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base", max_shard_size="100KB")  # a sharded base, too
    model = _trained(base, tmp_path / "run")
    single = _hf(_export(tmp_path / "run", tmp_path / "single", dtype="fp32"), dtype=torch.float32)
    out = _export(tmp_path / "run", tmp_path / "sharded", dtype="fp32", max_shard_size="150KB")

    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert set(index["weight_map"]) == set(single.state_dict())
    tensor_bytes = sum(p.numel() * p.element_size() for p in single.state_dict().values())
    assert index["metadata"]["total_size"] == tensor_bytes
    for shard in shards:  # a shard holds at most 150 KiB of tensors, unless one tensor alone is bigger
        names = [k for k, v in index["weight_map"].items() if v == shard.name]
        size = sum(single.state_dict()[k].numel() * 4 for k in names)
        assert size <= 150 * 2**10 or len(names) == 1
    sharded = _hf(out, dtype=torch.float32)
    assert torch.equal(_logits(sharded), _logits(single))
    torch.testing.assert_close(_logits(sharded), _logits(model), rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype, torch_dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_nf4_export_loads_in_transformers_as_bitsandbytes_4bit(tmp_path, dtype, torch_dtype):
    from bitsandbytes.nn import Linear4bit
    from transformers import BitsAndBytesConfig

    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    dense_dir = _export(tmp_path / "run", tmp_path / "dense", dtype=dtype)
    out = _export(tmp_path / "run", tmp_path / "nf4", dtype=dtype, quantize="nf4")

    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"] is True
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"] is True
    assert quant["bnb_4bit_compute_dtype"] == str(torch_dtype).removeprefix("torch.")
    loaded = _hf(out)  # transformers 5.23 + bitsandbytes 0.50 load 4-bit checkpoints on CPU
    assert isinstance(loaded.model.layers[0].mlp.down_proj, Linear4bit)
    assert not isinstance(loaded.lm_head, Linear4bit)
    # The reference: transformers quantizing the dense merged export itself while loading it.
    reference = _hf(
        dense_dir,
        dtype=torch_dtype,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        ),
    )
    assert torch.equal(_logits(loaded), _logits(reference))
    # ... and close to the dense merged model: the difference is one more round of NF4 (measured: mean abs
    # 0.03, max 0.18 on logits with std ~0.3 on this random tiny model).
    dense = _logits(_hf(dense_dir, dtype=torch.float32))
    assert (_logits(loaded) - dense).abs().mean() < 0.25 * dense.std()


# --- atomic output and bad input --------------------------------------------------------------------------


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_existing_out_needs_force_and_an_earlier_export_is_replaced_whole(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    out = _export(tmp_path / "run", tmp_path / "export", max_shard_size="200KB")
    earlier = _snapshot(out)
    assert "model-00001-of-00004.safetensors" in earlier
    with pytest.raises(QloraKitError) as err:
        _export(tmp_path / "run", out)
    assert str(out) in str(err.value) and "--force" in str(err.value)
    assert _snapshot(out) == earlier
    _export(tmp_path / "run", out, force=True)
    assert not (out / "model-00001-of-00004.safetensors").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "export", "run"]  # no temp dirs left
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (_export(tmp_path / "run", empty, force=True) / "model.safetensors").is_file()  # nothing to lose


@pytest.mark.parametrize("n_files", [1, 7])
def test_force_never_replaces_a_dir_that_is_not_an_export(tmp_path, n_files):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    out = tmp_path / "mine"
    out.mkdir()
    for i in range(n_files):
        (out / f"notes-{i}.txt").write_text(f"mine {i}")
    before = _snapshot(out)
    with pytest.raises(QloraKitError) as err:
        _export(tmp_path / "run", out, force=True)
    message = str(err.value)
    assert "not an earlier qlora-kit export" in message and "notes-0.txt" in message and "another --out" in message
    assert ("and 2 more" in message) == (n_files == 7)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "mine", "run"]


def test_out_that_is_a_file_is_refused(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    (tmp_path / "export").write_text("not a dir")
    with pytest.raises(QloraKitError, match="is an existing file"):
        _export(tmp_path / "run", tmp_path / "export", force=True)
    assert (tmp_path / "export").read_text() == "not a dir"


def test_out_over_the_base_model_is_refused_even_with_force(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    before = _snapshot(base)
    with pytest.raises(QloraKitError, match="would replace the base model"):
        _export(tmp_path / "run", base, force=True)
    assert _snapshot(base) == before


def test_disk_full_leaves_no_partial_export_and_the_earlier_one_intact(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    out = _export(tmp_path / "run", tmp_path / "export", max_shard_size="200KB")
    earlier = _snapshot(out)
    written: list[str] = []

    def disk_fills_on_third_shard(tensors, filename, metadata):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        save_file(tensors, filename, metadata)
        written.append(filename)

    with pytest.raises(QloraKitError) as err:
        _export(tmp_path / "run", out, max_shard_size="200KB", force=True, save_shard=disk_fills_on_third_shard)
    message = str(err.value)
    assert "disk is full" in message and str(out) in message and "intact" in message
    assert len(written) == 2  # two shards really were written before the failure
    assert _snapshot(out) == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "export", "run"]


@contextlib.contextmanager
def _read_only(directory: Path):
    """``directory`` made unwritable for this process: mode 0555, or for root (which ignores modes) the
    immutable attribute. Skips where neither works."""
    directory.mkdir(parents=True, exist_ok=True)
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(directory)]).returncode != 0:
            pytest.skip("running as root and chattr +i is not available here: no read-only dir to test with")
    else:
        directory.chmod(0o555)
    try:
        yield directory
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_out_in_a_read_only_dir_is_a_clear_error_and_the_earlier_export_stays(tmp_path, capsys):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    out = _export(tmp_path / "run", tmp_path / "shelf" / "export", dtype="fp32")
    earlier = _snapshot(out)
    with _read_only(tmp_path / "shelf"):
        argv = [str(tmp_path / "run"), "--out", str(out), "--force", "--dtype", "fp32", "--device", "cpu"]
        capsys.readouterr()
        assert cli_main(["export", *argv]) == 2
        message = capsys.readouterr().err
        assert f"cannot write the export to {out}" in message and "is not writable" in message
        assert "earlier export" in message and "intact" in message and "Traceback" not in message
        assert sorted(p.name for p in (tmp_path / "shelf").iterdir()) == ["export"]  # no temp dir
    assert _snapshot(out) == earlier


def test_out_with_missing_parents_under_a_read_only_dir(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    with _read_only(tmp_path / "shelf"):
        message = _error(tmp_path / "run", tmp_path / "shelf" / "a" / "b" / "export")
        assert "cannot write the export to" in message and "is not writable" in message
        assert "Nothing was written" in message and "--out" in message
        assert list((tmp_path / "shelf").iterdir()) == []


def test_parents_an_export_created_are_removed_when_it_fails(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")

    def disk_full(tensors, filename, metadata):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    message = _error(tmp_path / "run", tmp_path / "new" / "deeper" / "export", save_shard=disk_full)
    assert "disk is full" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "run"]


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_exports_and_adapters_get_the_users_umask(tmp_path, umask, dir_mode, file_mode):
    base = save_tiny_checkpoint(tmp_path / "base")
    model = _trained(base, tmp_path / "run")
    previous = os.umask(umask)
    try:
        out = _export(tmp_path / "run", tmp_path / "export", max_shard_size="200KB")
        adapter = save_adapter(model, tmp_path / "adapter", str(base), metadata={"template": "alpaca"})
    finally:
        os.umask(previous)
    for directory in (out, adapter):
        assert stat.S_IMODE(directory.stat().st_mode) == dir_mode, directory
        files = list(directory.iterdir())
        assert len(files) >= 3 and {stat.S_IMODE(f.stat().st_mode) for f in files} == {file_mode}, directory


def _error(*args, **kwargs) -> str:
    with pytest.raises(QloraKitError) as err:
        _export(*args, **kwargs)
    return str(err.value)


def test_adapter_for_another_base_is_refused_before_writing(tmp_path):
    _trained(save_tiny_checkpoint(tmp_path / "base"), tmp_path / "run")
    wider = save_tiny_checkpoint(tmp_path / "wider", intermediate_size=256)
    deeper_run = tmp_path / "deeper-run"
    _trained(save_tiny_checkpoint(tmp_path / "deeper", num_hidden_layers=3), deeper_run)

    message = _error(tmp_path / "run", tmp_path / "out", base_model=wider)
    assert "do not fit" in message and "different base model" in message and "mlp" in message
    message = _error(deeper_run, tmp_path / "out", base_model=tmp_path / "base")
    assert "model.layers.2" in message and "not a decoder linear" in message
    assert not (tmp_path / "out").exists()


def test_incomplete_or_missing_adapter_is_named(tmp_path):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    adapter = tmp_path / "run" / "adapter"

    message = _error(tmp_path / "nowhere", tmp_path / "out")
    assert "nowhere" in message and "does not exist" in message
    message = _error(base, tmp_path / "out")
    assert "neither an adapter dir nor a training run dir" in message

    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "--base-model" in _error(tmp_path / "run", tmp_path / "out")
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    message = _error(tmp_path / "run", tmp_path / "out")
    assert "gone" in message and "--base-model" in message

    config["base_model_name_or_path"], config["r"] = str(base), 4  # the weights have rank 8
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert "r=4" in _error(tmp_path / "run", tmp_path / "out")

    (adapter / WEIGHTS_NAME).unlink()
    message = _error(adapter, tmp_path / "out", base_model=base)
    assert WEIGHTS_NAME in message and str(adapter) in message
    assert not (tmp_path / "out").exists()


def test_cli_and_sizes(tmp_path, capsys):
    base = save_tiny_checkpoint(tmp_path / "base")
    model = _trained(base, tmp_path / "run")
    out = tmp_path / "export"
    argv = [str(tmp_path / "run"), "--out", str(out), "--dtype", "fp32", "--max-shard-size", "300KB", "--device", "cpu"]
    assert export_main(argv) == 0
    assert (out / "model.safetensors.index.json").is_file()
    torch.testing.assert_close(_logits(_hf(out, dtype=torch.float32)), _logits(model), rtol=0, atol=1e-4)
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "run"), "--out", str(out), "--dtype", "int8"])
    # --max-shard-size follows qlora-kit's one size rule: binary units (5GB = 5 GiB), said in --help.
    assert parse_size("5GB", "--max-shard-size") == 5 * 2**30 == parse_size("5GiB", "--max-shard-size")
    assert parse_size("500MB", "--max-shard-size") == 500 * 2**20
    with pytest.raises(QloraKitError, match=r"--max-shard-size 'lots'.*500MB"):
        export_merged(tmp_path / "run", tmp_path / "other", max_shard_size="lots")
    assert not (tmp_path / "other").exists()
    with pytest.raises(SystemExit):
        export_main(["--help"])
    assert "5GB = 5 GiB" in " ".join(capsys.readouterr().out.split())


def test_cli_shows_progress_on_stdout_and_warnings_on_stderr(tmp_path, capsys):
    base = save_tiny_checkpoint(tmp_path / "base")
    _trained(base, tmp_path / "run")
    argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "export"), "--device", "cpu"]
    capsys.readouterr()
    assert cli_main([*argv, "--merge-into", "original", "--max-shard-size", "200KB"]) == 0
    printed = capsys.readouterr()
    assert "wrote model-00001-of-00004.safetensors" in printed.out and f"exported {tmp_path / 'export'}" in printed.out
    assert printed.err == f"warning: {ORIGINAL_MERGE_WARNING}\n"


# --- 4-bit exports read back ---------------------------------------------------------------------------------


def test_nf4_export_loads_into_our_layers_bit_for_bit(tmp_path):
    """Our loader puts the file's codes and double-quantized state into NF4Linear unchanged: the weights are
    exactly bitsandbytes' dequantize_4bit of the state as serialized, and the layers' buffers are the ones
    quantizing the dense merged export gives (the export's quantizer)."""
    import bitsandbytes.functional as bnbf

    base = _bf16_checkpoint(tmp_path / "base", intermediate_size=96)  # in_features 96: not a multiple of 64
    _trained(base, tmp_path / "run")
    dense = load_model(_export(tmp_path / "run", tmp_path / "dense", dtype="bf16"), device="cpu", quantize=False)
    out = _export(tmp_path / "run", tmp_path / "nf4", dtype="bf16", quantize="nf4")
    loaded = load_model(out, device="cpu")
    entries = checkpoint_index(out)
    layers = {name: m for name, m in loaded.named_modules() if isinstance(m, NF4Linear)}
    assert len(layers) == 14
    for name, layer in layers.items():
        key = f"{name}.weight"
        state = {k[len(key) + 1 :]: read_tensor(e) for k, e in entries.items() if k.startswith(f"{key}.")}
        quant_state = bnbf.QuantState.from_dict(state, "cpu")
        for dtype in (torch.bfloat16, torch.float32):  # the recorded compute dtype, and fp32
            quant_state.dtype = dtype
            reference = bnbf.dequantize_4bit(read_tensor(entries[key]), quant_state)
            assert torch.equal(layer.dequantize(dtype), reference), (name, dtype)
        requantized = NF4Linear.from_weight(dense.get_submodule(name).weight)
        for buffer in ("codes", "absmax_codes", "absmax_scales", "absmax_offset"):
            assert torch.equal(getattr(layer, buffer), getattr(requantized, buffer)), (name, buffer)
    torch.testing.assert_close(
        _logits(loaded), _logits(load_model(tmp_path / "dense", device="cpu")), rtol=0, atol=1e-5
    )


def test_nf4_export_warns_where_bitsandbytes_cpu_kernel_cannot_run_it(tmp_path, caplog):
    for name, overrides in (("odd", {"intermediate_size": 96}), ("even", {})):
        base = save_tiny_checkpoint(tmp_path / name / "base", **overrides)
        _trained(base, tmp_path / name / "run")
        caplog.clear()
        _export(tmp_path / name / "run", tmp_path / name / "nf4", quantize="nf4")
        warned = _warnings(caplog)
        assert ("not a multiple of 64" in warned and "mlp.down_proj" in warned) == (name == "odd"), warned
        caplog.clear()
        _export(tmp_path / name / "run", tmp_path / name / "dense")  # no 4-bit, no warning
        assert "multiple of 64" not in _warnings(caplog)


def _bnb_4bit_checkpoint(dense_dir: Path, out: Path, **options) -> Path:
    """A 4-bit checkpoint as transformers + bitsandbytes save it."""
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, **options)
    _hf(dense_dir, dtype=torch.float32, quantization_config=config).save_pretrained(out)
    return out


def test_transformers_nf4_checkpoint_loads_and_other_4bit_formats_are_refused(tmp_path):
    import bitsandbytes.functional as bnbf

    base = save_tiny_checkpoint(tmp_path / "base")
    nf4_dq = _bnb_4bit_checkpoint(base, tmp_path / "nf4dq", bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    theirs = _hf(nf4_dq)
    ours = load_model(nf4_dq, device="cpu")
    # Weights, not logits: bitsandbytes' CPU forward (AVX512-BF16) rounds absmax to bf16 on its own.
    for name, layer in ours.named_modules():
        if isinstance(layer, NF4Linear):
            param = theirs.get_submodule(name).weight
            assert torch.equal(layer.dequantize(torch.float32), bnbf.dequantize_4bit(param.data, param.quant_state))
    for name, options in (
        ("no-double-quant", {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": False}),
        ("fp4", {"bnb_4bit_quant_type": "fp4", "bnb_4bit_use_double_quant": True}),
    ):
        checkpoint = _bnb_4bit_checkpoint(base, tmp_path / name, **options)
        with pytest.raises(QloraKitError) as err:
            load_model(checkpoint, device="cpu")
        message = str(err.value)
        assert str(checkpoint) in message and "NF4 with double quantization" in message, message
        assert f"bnb_4bit_quant_type={options['bnb_4bit_quant_type']}" in message
        assert "transformers" in message


# --- adapters in PEFT's layout, both directions --------------------------------------------------------------


@pytest.mark.parametrize("targets, use_rslora", [("all-linear", False), ("attention", True)])
def test_peft_loads_our_adapter(tmp_path, targets, use_rslora):
    from peft import PeftModel

    base = save_tiny_checkpoint(tmp_path / "base")
    ours = load_model(base, device="cpu", quantize=False)
    add_lora(ours, targets, r=8, alpha=16, dropout=0.0, use_rslora=use_rslora)
    _randomize_b(ours)
    save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base))
    theirs = PeftModel.from_pretrained(_hf(base, dtype=torch.float32), tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), rtol=0, atol=1e-5)


def _peft_adapter(base: Path, directory: Path, use_rslora: bool = False) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        use_rslora=use_rslora,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(_hf(base, dtype=torch.float32), config)
    torch.manual_seed(2)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param, std=0.05)
    model.save_pretrained(directory)
    return model.eval()


@pytest.mark.parametrize("use_rslora", [False, True])
def test_we_load_a_peft_adapter(tmp_path, use_rslora):
    base = save_tiny_checkpoint(tmp_path / "base")
    theirs = _peft_adapter(base, tmp_path / "adapter", use_rslora)
    ours = load_model(base, device="cpu", quantize=False)
    config = load_adapter(ours, tmp_path / "adapter")
    assert config.use_rslora is use_rslora and len(lora_layers(ours)) == 2 * 7
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)


def test_our_4bit_model_with_a_peft_adapter_matches_peft_on_the_dequantized_base(tmp_path):
    from peft import PeftModel

    base = save_tiny_checkpoint(tmp_path / "base")
    _peft_adapter(base, tmp_path / "adapter")
    ours = load_model(base, device="cpu")
    load_adapter(ours, tmp_path / "adapter")
    reference = _hf(base, dtype=torch.float32)
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, NF4Linear):
                reference.get_submodule(name.removesuffix(".base")).weight.copy_(module.dequantize())
    theirs = PeftModel.from_pretrained(reference, tmp_path / "adapter").eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), rtol=0, atol=1e-5)


# --- the real model ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_after_training_steps_exports_the_model_it_trained(smollm2_dir, tmp_path):
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, device="cpu")
    add_lora(model, "all-linear", r=8, alpha=16, dropout=0.0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batches = [
        tokenizer(["Paris is the capital and largest city of France."] * 2, return_tensors="pt"),
        tokenizer(["Water boils at 100 degrees Celsius at sea level."] * 2, return_tensors="pt"),
    ]
    model.train()
    for batch in batches:  # two steps of plain AdamW: B moves away from zero
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    assert all(layer.lora_b.weight.abs().max() > 0 for layer in lora_layers(model).values())
    save_adapter(model, tmp_path / "run" / "adapter", base_model_name_or_path=str(smollm2_dir))
    ids = tokenizer("The Eiffel Tower is a wrought-iron lattice tower in Paris.", return_tensors="pt").input_ids
    trained = _logits(model, ids)
    del model

    out = _export(tmp_path / "run", tmp_path / "export", dtype="fp32")
    assert AutoTokenizer.from_pretrained(out).chat_template == tokenizer.chat_template
    assert (out / "generation_config.json").is_file()
    exported = _hf(out, dtype=torch.float32)
    # fp32 export: logits up to ~30 in magnitude after 30 layers; measured max abs difference 6.5e-5.
    torch.testing.assert_close(_logits(exported, ids), trained, rtol=0, atol=2.5e-4)
    # A bf16 export holds exactly these weights rounded to bf16 (the merge is cast as its last step), so
    # round them here rather than export twice. Measured max abs 0.21; the argmax tokens all agree.
    with torch.no_grad():
        for param in exported.parameters():
            param.copy_(param.bfloat16().float())
    bf16 = _logits(exported, ids)
    torch.testing.assert_close(bf16, trained, rtol=0, atol=0.5)
    assert (bf16.argmax(-1) == trained.argmax(-1)).float().mean() > 0.95
    shutil.rmtree(out)
