"""The planner with offload (memory.offload): 65B on a 24 GB card, the bytes moved, resident layers, the
step-time estimate and where the copies hide, the CLI flags; and the streamer moves what the plan says."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_kit.cli import EXIT_DOES_NOT_FIT, plan_main
from qlora_kit.config import load_config
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import GiB, nf4_bytes
from qlora_kit.memory import PRESETS, MemoryPlan, max_fitting, plan_memory, shape_from_config
from qlora_kit.offload import enable_offload
from tests.conftest import save_tiny_checkpoint, tiny_config
from tests.test_offload import _model, _steps, tiny4_dir  # noqa: F401 (a fixture)

LLAMA_65B = PRESETS["llama-65b"]
PAPER_65B = dict(seq_len=2048, batch_size=1, rank=64)  # the run: seq 2048, batch 1, r 64, bf16 on cuda
BOTH = dict(offload_weights=True, offload_activations=True)


def _layer_bytes(shape) -> int:
    return sum(nf4_bytes(o, i).total for o, i in shape.linears().values())


def test_65b_fits_24_gib_with_offload_and_not_without():
    without = plan_memory(LLAMA_65B, **PAPER_65B, gpu_bytes=24 * GiB)
    plan = plan_memory(LLAMA_65B, **PAPER_65B, **BOTH, gpu_bytes=24 * GiB)
    assert without.fits is False and plan.fits is True
    o = plan.offload
    assert 0 < o["resident_layers"] < 80 and o["resident_layers"] + o["streamed_layers"] == 80
    # resident layers fill the budget: one more does not fit
    one_more = plan_memory(LLAMA_65B, **PAPER_65B, **BOTH, resident_layers=o["resident_layers"] + 1)
    assert one_more.total > 24 * GiB >= plan.total
    # the device holds the resident layers and two streaming buffers of NF4, no more
    nf4_rows = sum(r.bytes for r in plan.rows if r.item.startswith("NF4"))
    assert nf4_rows == (o["resident_layers"] + 2) * _layer_bytes(LLAMA_65B)
    # host RAM: the streamed layers and 79 layers' checkpointed inputs (layer 0's stays), paged states apart
    assert o["pinned_host_bytes"] == o["streamed_layers"] * _layer_bytes(LLAMA_65B) + 79 * 2048 * 8192 * 2
    assert o["paged_host_bytes"] == without.pageable_bytes > 0 and plan.pageable_bytes == 0


def test_bytes_moved_is_the_streamed_layers_nf4_bytes_times_the_passes():
    plan = plan_memory(LLAMA_65B, **PAPER_65B, offload_weights=True, resident_layers=30, grad_accumulation=4)
    streamed = 50
    # forward copies the 50 streamed layers, backward 49 (the last one is still there), per micro-batch
    assert plan.offload["bytes_moved_per_step"] == 4 * (streamed + streamed - 1) * _layer_bytes(LLAMA_65B)
    assert _layer_bytes(LLAMA_65B) == pytest.approx(417.6e6, rel=1e-3)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_the_streamer_moves_what_the_plan_says(tiny4_dir, checkpointing):  # noqa: F811
    model = _model(tiny4_dir, checkpointing)
    offload = enable_offload(model, torch.device("cpu"), weights=True, resident_layers=1)
    _steps(model, 2, 320)
    shape = shape_from_config(tiny_config(num_hidden_layers=4), "tiny4")
    plan = plan_memory(shape, device="cpu", offload_weights=True, resident_layers=1, checkpointing=checkpointing)
    assert offload.layer_bytes == {i: _layer_bytes(shape) for i in (1, 2, 3)}
    assert offload.stats.bytes_moved == 2 * plan.offload["bytes_moved_per_step"]


def test_copies_hide_from_the_tokens_the_plan_names():
    knobs = dict(rank=64, offload_weights=True, resident_layers=0, pcie_gbps=11, tflops=150)
    at_2k = plan_memory(LLAMA_65B, seq_len=2048, **knobs).offload
    hide = at_2k["hide_from_tokens"]
    below = plan_memory(LLAMA_65B, seq_len=hide - 64, **knobs)
    above = plan_memory(LLAMA_65B, seq_len=hide + 64, **knobs)
    assert below.offload["transfer_bound"] and not above.offload["transfer_bound"]
    assert "TRANSFER-BOUND" in below.table() and "compute-bound" in above.table()
    # transfer-bound: the step takes longer than its compute; compute-bound: the copies cost nothing
    assert below.offload["step_s"] > below.offload["compute_s"]
    assert above.offload["step_s"] == pytest.approx(above.offload["compute_s"])
    # a faster link hides the copies from fewer tokens
    assert plan_memory(LLAMA_65B, seq_len=2048, **{**knobs, "pcie_gbps": 25}).offload["hide_from_tokens"] < hide


def test_max_seq_and_batch_with_offload():
    knobs = dict(rank=64, **BOTH)
    best = max_fitting(LLAMA_65B, 24 * GiB, vary="seq", **knobs)
    assert best > 2048
    assert plan_memory(LLAMA_65B, seq_len=best, **knobs, gpu_bytes=24 * GiB).fits
    assert not plan_memory(LLAMA_65B, seq_len=best + 1, **knobs, gpu_bytes=24 * GiB).fits
    assert max_fitting(LLAMA_65B, 24 * GiB, vary="seq", rank=64) == 0  # without offload nothing fits
    assert max_fitting(LLAMA_65B, 24 * GiB, vary="batch", seq_len=2048, **knobs) >= 1


def test_plan_cli_with_offload(capsys):
    args = ["--model", "llama-65b", "--gpu", "24GB", "--seq", "2048", "--rank", "64"]
    assert plan_main([*args, "--offload", "weights,activations"]) == 0
    out = capsys.readouterr().out
    assert "offload weights+activations" in out and "fits in 24 GiB" in out
    for words in ("decoder layers stay on the GPU", "host RAM:", "moved per step:", "estimated step time:"):
        assert words in out
    assert plan_main([*args, "--offload", "weights", "--pcie-gbps", "4", "--tflops", "400"]) == 0
    assert "TRANSFER-BOUND" in capsys.readouterr().out
    assert plan_main([*args, "--offload", "weights", "--resident-layers", "80"]) == EXIT_DOES_NOT_FIT
    capsys.readouterr()
    assert plan_main([*args, "--offload", "weights", "--max", "seq", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] > 2048


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--offload", "weight"], "--offload takes weights, activations or both"),
        (["--offload", "weights", "--resident-layers", "half"], "--resident-layers takes auto or a number"),
    ],
)
def test_plan_cli_bad_offload_flags(capsys, flags, message):
    with pytest.raises(SystemExit) as info:
        plan_main(["--model", "llama-7b", *flags])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_planner_refuses_bad_offload_knobs():
    with pytest.raises(QloraKitError, match="needs checkpointing on"):
        plan_memory(LLAMA_65B, checkpointing=False, offload_activations=True)
    with pytest.raises(QloraKitError, match="pcie_gbps must be a number > 0"):
        plan_memory(LLAMA_65B, offload_weights=True, pcie_gbps=0)
    with pytest.raises(QloraKitError, match="resident_layers must be"):
        plan_memory(LLAMA_65B, offload_weights=True, resident_layers=-1)


def test_offload_plan_round_trips_through_json():
    plan = plan_memory(LLAMA_65B, **PAPER_65B, **BOTH, gpu_bytes=24 * GiB)
    again = MemoryPlan.from_json(plan.to_json())
    assert again.offload == plan.offload and again.table() == plan.table()


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.resident_layers=-2"], "model.resident_layers = -2: must be auto or a number of decoder layers >= 0"),
        (["model.resident_layers=some"], "model.resident_layers = 'some': must be auto or a number"),
        (
            ["train.offload_activations=true", "model.gradient_checkpointing=false"],
            "train.offload_activations = True: needs model.gradient_checkpointing=true",
        ),
    ],
)
def test_offload_config_errors(overrides, expected):
    with pytest.raises(QloraKitError) as info:
        load_config(None, overrides)
    assert expected in str(info.value)


def test_offload_config_values():
    cfg = load_config(
        None, ["model.offload_weights=true", "model.resident_layers=12", "train.offload_activations=true"]
    )
    assert cfg.model.offload_weights and cfg.model.resident_layers == 12 and cfg.train.offload_activations
    assert load_config(None, []).model.resident_layers == "auto"


def test_the_24gb_recipe_fits_24_gib_as_planned():
    from pathlib import Path

    cfg = load_config(Path(__file__).parent.parent / "recipes" / "llama65b_24gb.yaml")
    assert cfg.model.offload_weights and cfg.train.offload_activations and cfg.model.resident_layers == "auto"
    knobs = dict(seq_len=cfg.data.cutoff_len, batch_size=cfg.train.micro_batch_size, rank=cfg.lora.r)
    knobs |= dict(
        grad_accumulation=cfg.train.gradient_accumulation_steps, offload_weights=True, offload_activations=True
    )
    plan = plan_memory(LLAMA_65B, **knobs, gpu_bytes=int(cfg.model.max_memory_gb * GiB))
    assert plan.fits and not plan.offload["transfer_bound"]
    assert not plan_memory(LLAMA_65B, **{**knobs, "offload_weights": False}, gpu_bytes=24 * GiB).fits


def test_resident_layers_auto_fills_the_budget(smollm2_dir, tmp_path):
    import shutil

    from qlora_kit.data import prepare_data
    from qlora_kit.loading import load_tokenizer
    from qlora_kit.memory import plan_run
    from qlora_kit.offload import resident_layer_count
    from tests.test_train import _overrides

    model_dir = save_tiny_checkpoint(tmp_path / "tiny4", num_hidden_layers=4, vocab_size=49152, hidden_size=64)
    shutil.copy(smollm2_dir / "tokenizer.json", model_dir)
    shutil.copy(smollm2_dir / "tokenizer_config.json", model_dir)
    offload = {"model.offload_weights": True, "model.resident_layers": 1}
    cfg = load_config(None, _overrides(model_dir, tmp_path / "run", **offload))
    data = prepare_data(cfg.data, load_tokenizer(cfg.model.name_or_path), verbose=False)
    cpu = torch.device("cpu")
    assert resident_layer_count(cfg, data, cpu) == 1  # as the recipe says
    one = plan_run(cfg, data)
    assert one.offload["resident_layers"] == 1 and one.offload["streamed_layers"] == 3
    cfg.model.resident_layers = "auto"
    assert resident_layer_count(cfg, data, cpu) == 4  # on CPU without a budget: all of them
    # exactly the plan with one resident layer (+ 2 streaming buffers): two resident (+ 2) do not fit
    cfg.model.max_memory_gb = (one.total + 8) / GiB
    assert resident_layer_count(cfg, data, cpu) == 1
    cfg.model.resident_layers = 7
    assert resident_layer_count(cfg, data, cpu) == 4  # no more than the model has


def test_offload_suggestion_as_recipe_overrides():
    plan = plan_memory(LLAMA_65B, **PAPER_65B, gpu_bytes=24 * GiB)
    assert "[model.offload_weights=true train.offload_activations=true]" in plan.table(recipe=True)
