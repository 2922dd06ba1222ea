"""``qlora-kit plan --gpus N --parallel ddp|fsdp [--fsdp-cpu-offload]``: the plan of one of N processes."""

from __future__ import annotations

import json
import math

import pytest

from qlora_kit.cli import EXIT_DOES_NOT_FIT, plan_main
from qlora_kit.facts import GiB
from qlora_kit.memory import model_shape, plan_memory, plan_parallel

NF4_ROWS = ("NF4 codes", "NF4 absmax", "NF4 nested stats")


def _rows(plan) -> dict[str, int]:
    return {row.item: row.bytes for row in plan.rows}


def test_fsdp_shards_the_base_adapters_and_states_and_adds_what_it_gathers():
    shape = model_shape("llama-2-70b")
    one = plan_memory(shape, rank=16, optimizer="adamw", gpu_bytes=24 * GiB)
    two = plan_parallel(one, 2, "fsdp")
    before, after = _rows(one), _rows(two)
    for item in (*NF4_ROWS, "LoRA parameters", "LoRA gradients", "adamw states", "fp32 master weights"):
        assert after[item] == math.ceil(before[item] / 2), item
    root = before["non-quantized weights"]
    assert after["non-quantized weights"] == root + math.ceil(root / 2)  # gathered for the step, beside its shard
    per_layer = (sum(before[item] for item in NF4_ROWS) + before["LoRA parameters"]) / shape.layers
    assert after["all-gathered layers"] == int(2 * per_layer)
    for item in ("checkpointed layer inputs", "largest transient", "CUDA context"):  # each process's own
        assert after[item] == before[item]
    assert one.fits is False and two.fits is True  # 70B: 38 GiB on one 24 GiB card, 22 GiB per card on two
    assert "per process of 2 (fsdp)" in two.title()
    delta = two.tensor_bytes - one.tensor_bytes
    assert delta < 0 and two.phases["forward"] == one.phases["forward"] + delta  # profile's planned column
    assert two.phases["load"] == one.phases["load"]


def test_fsdp_cpu_offload_keeps_only_what_is_gathered_on_the_device():
    one = plan_memory(model_shape("llama-2-70b"), rank=64, optimizer="adamw", gpu_bytes=24 * GiB)
    sharded, offloaded = plan_parallel(one, 2, "fsdp"), plan_parallel(one, 2, "fsdp", cpu_offload=True)
    assert sharded.fits is False and offloaded.fits is True  # r=64 needs the offload on 2 x 24 GiB
    rows = _rows(offloaded)
    for item in (*NF4_ROWS, "LoRA parameters", "LoRA gradients", "adamw states", "fp32 master weights"):
        assert rows[item] == 0, item
    assert rows["all-gathered layers"] == _rows(sharded)["all-gathered layers"] > 0
    assert rows["non-quantized weights"] == _rows(one)["non-quantized weights"]  # its shard is in host memory
    assert "host memory" in next(row.note for row in offloaded.rows if row.item == "NF4 codes")


def test_ddp_holds_everything_plus_its_gradient_buckets():
    one = plan_memory(model_shape("llama-7b"), rank=16)
    ddp = plan_parallel(one, 4, "ddp")
    rows = _rows(ddp)
    assert rows.pop("DDP gradient buckets") == _rows(one)["LoRA parameters"]
    assert rows == _rows(one)
    assert ddp.total == one.total + _rows(one)["LoRA parameters"]
    assert plan_parallel(one, 1, "fsdp") is one


def test_plan_cli_per_process_verdicts(capsys):
    args = ["--model", "llama-2-70b", "--rank", "16", "--gpu", "24GB"]
    assert plan_main(args) == EXIT_DOES_NOT_FIT
    assert plan_main([*args, "--gpus", "2", "--parallel", "ddp"]) == EXIT_DOES_NOT_FIT
    capsys.readouterr()
    assert plan_main([*args, "--gpus", "2", "--parallel", "fsdp"]) == 0
    out = capsys.readouterr().out
    assert "per process of 2 (fsdp)" in out and "adamw states" in out  # fsdp: torch AdamW steps the shards
    assert plan_main([*args, "--rank", "64", "--gpus", "2", "--parallel", "fsdp", "--fsdp-cpu-offload"]) == 0
    capsys.readouterr()
    assert plan_main([*args, "--gpus", "2", "--parallel", "fsdp", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["settings"]["gpus"] == 2 and plan["settings"]["parallel"] == "fsdp" and plan["fits"] is True


@pytest.mark.parametrize(
    "extra",
    [
        ["--fsdp-cpu-offload"],
        ["--gpus", "2", "--fsdp-cpu-offload"],
        ["--gpus", "0"],
        ["--gpus", "2", "--max", "batch"],
        ["--gpus", "2", "--offload", "weights"],
    ],
)
def test_plan_cli_refuses_parallel_options_that_do_not_go_together(capsys, extra):
    with pytest.raises(SystemExit) as exit_info:
        plan_main(["--model", "llama-7b", "--gpu", "24GB", *extra])
    assert exit_info.value.code == 2
    assert "--gpus" in capsys.readouterr().err
