"""model.max_memory_gb: train plans its largest micro-batch before loading the model and refuses a run
that does not fit, with the plan's table and what to change; a budget that fits trains as before."""

from __future__ import annotations

import logging
import re

import pytest

import qlora_kit.train as train_module
from qlora_kit.cli import main
from qlora_kit.config import load_config
from qlora_kit.data import IGNORE_INDEX, prepare_data
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import GiB
from qlora_kit.loading import load_tokenizer
from qlora_kit.memory import check_budget, largest_micro_batch, plan_run
from qlora_kit.train import make_batch_plan, train
from tests.test_train import TOOLS, _overrides, tiny_model_dir  # noqa: F401 (a fixture)


def _prepared(tiny_model_dir, tmp_path, **extra):  # noqa: F811
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path / "run", **extra))
    return cfg, prepare_data(cfg.data, load_tokenizer(cfg.model.name_or_path), verbose=False)


def test_a_budget_too_small_refuses_before_loading_and_writes_nothing(tiny_model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded although the plan does not fit")

    monkeypatch.setattr(train_module, "load_lora_model", must_not_load)
    out = tmp_path / "run"
    recipe = str(TOOLS.parent / "smollm2_alpaca.yaml")
    args = ["train", recipe, *_overrides(tiny_model_dir, out, **{"model.max_memory_gb": 0.001})]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "model.max_memory_gb = 0.001 GiB: this run does not fit; nothing was loaded or written" in err
    assert "The plan of its largest micro-batch (4 x " in err
    for part in ("NF4 codes", "LoRA parameters", "adamw states", "process runtime", "total"):
        assert part in err  # the table, with the run's own knobs: torch AdamW and the CPU runtime
    assert "fp32 on cpu" in err and "does NOT fit in 0.001 GiB" in err
    assert "what fits (each replanned):" in err and "[model.max_memory_gb=0." in err
    assert not out.exists() or not any(out.iterdir())  # no config.yaml, metrics, checkpoints


def test_a_budget_that_fits_trains(tiny_model_dir, tmp_path, caplog):  # noqa: F811
    out = tmp_path / "run"
    cfg = load_config(None, _overrides(tiny_model_dir, out, **{"model.max_memory_gb": 64, "train.max_steps": 2}))
    with caplog.at_level(logging.INFO, logger="qlora_kit.memory"):
        result = train(cfg)
    assert result.status == "completed" and result.steps == 2 and (out / "adapter").is_dir()
    assert "GiB of the 64 GiB budget (largest micro-batch 4 x " in caplog.text


def test_the_budget_is_in_gib_and_the_threshold_is_the_plans_total(tiny_model_dir, tmp_path):  # noqa: F811
    cfg, data = _prepared(tiny_model_dir, tmp_path)
    assert check_budget(cfg, data) is None  # no budget: no plan, nothing checked
    total = plan_run(cfg, data).total
    cfg.model.max_memory_gb = total / GiB * 1.0001
    plan = check_budget(cfg, data)
    assert plan.fits and plan.gpu_bytes == int(cfg.model.max_memory_gb * 2**30) and plan.settings["device"] == "cpu"
    cfg.model.max_memory_gb = total / GiB * 0.9999
    with pytest.raises(QloraKitError, match="does NOT fit in") as e:
        check_budget(cfg, data)
    # the budget it suggests is enough
    cfg.model.max_memory_gb = float(re.search(r"\[model\.max_memory_gb=([\d.]+)\]", str(e.value)).group(1))
    assert check_budget(cfg, data).fits


@pytest.mark.parametrize("packing", [False, True])
def test_largest_micro_batch_bounds_every_real_micro_batch(tiny_model_dir, tmp_path, packing):  # noqa: F811
    cfg, data = _prepared(tiny_model_dir, tmp_path, **{"data.packing": packing, "data.max_samples": 200})
    rows, width, labelled = largest_micro_batch(cfg, data)
    batches = make_batch_plan(cfg, data)
    seen = []
    for _ in range(len(batches)):
        batch = batches.next_batch()
        seen.append((*batch["input_ids"].shape, int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())))
    assert all(r <= rows and w <= width and n <= labelled for r, w, n in seen)
    assert max(r for r, _, _ in seen) == rows == cfg.train.micro_batch_size
    if not packing:  # the longest example is in a batch: the width is reached exactly
        assert max(w for _, w, _ in seen) == width == data.stats.max_length
    else:
        assert width == cfg.data.cutoff_len


def test_a_run_the_planner_cannot_shape_is_named_with_the_way_out(tiny_model_dir, tmp_path):  # noqa: F811
    cfg, data = _prepared(tiny_model_dir, tmp_path, **{"lora.targets": "[c_attn]", "model.max_memory_gb": 8})
    with pytest.raises(QloraKitError) as e:
        check_budget(cfg, data)
    message = str(e.value)
    assert message.startswith("model.max_memory_gb = 8: the memory planner cannot plan this run")
    assert "c_attn" in message and "set model.max_memory_gb=null" in message
