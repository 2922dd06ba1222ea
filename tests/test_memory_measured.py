"""The planner against measurement: real training steps, measured peak of live tensor bytes by phase.

CPU: ``memory.profile.measure_phases`` (exact live storages at the start + torch.profiler's allocator events); it is
checked first against known allocations. CUDA (marked ``gpu``): ``torch.cuda.max_memory_allocated``. The bar
(issue 5): the planned peak of a training step within 10% of the measured one, for SmolLM2-135M and two tiny
configs at two sequence lengths, with checkpointing off and on.
"""

from __future__ import annotations

import pytest
import torch

from qlora_kit.config import TrainConfig
from qlora_kit.facts import MB
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora
from qlora_kit.memory import (
    PhaseRecorder,
    live_tensor_bytes,
    measure_phases,
    plan_memory,
    shape_from_config,
)
from qlora_kit.optim import make_optimizer, make_scheduler
from qlora_kit.run import TrainState
from qlora_kit.train import train_step
from tests.conftest import gpu, save_tiny_checkpoint

RANK, DROPOUT = 16, 0.05
TINY = {  # two shapes whose activations dominate the weights at these sequence lengths
    "wide-ffn": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=3, num_attention_heads=8),
    "small": dict(num_hidden_layers=3),  # conftest's tiny llama: hidden 128, ffn 192, 4 heads (2 kv)
}


@pytest.fixture(autouse=True)
def one_thread():
    """Memory does not depend on the thread count; on a busy 2-core machine one thread is far faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- the measuring method, against allocations whose size is known --------------------------------------------


def test_cpu_measurement_counts_known_allocations_exactly(capfd):
    kept = []

    def allocate() -> None:
        a = torch.empty(10_000_000, dtype=torch.uint8)
        b = torch.empty(5_000_000, dtype=torch.uint8)
        del a
        c = torch.empty(3_000_000, dtype=torch.float32)  # 12 MB on top of b's 5: the peak is 17 MB
        del b, c
        kept.append(torch.empty(1_000_000, dtype=torch.uint8))

    def free() -> None:
        kept.clear()

    m = measure_phases([("allocate", allocate), ("free", free)])
    assert m["allocate"].peak - m["allocate"].start == 17_000_000
    assert m["allocate"].end - m["allocate"].start == 1_000_000
    assert m["free"].end == m["allocate"].start and m["free"].peak == m["free"].start
    assert m.drift == 0
    noise = capfd.readouterr().err
    assert "USDT" not in noise and "STAGE" not in noise, noise  # kineto's start/stop lines are kept off stderr


def test_live_tensor_bytes_sees_existing_tensors_and_views_once():
    before = live_tensor_bytes()
    t = torch.empty(2_000_000, dtype=torch.uint8)
    views = [t[:10], t.view(1000, 2000)]  # same storage: counted once
    assert live_tensor_bytes() - before == 2_000_000
    del t, views
    assert live_tensor_bytes() == before


# --- the planner against real steps ------------------------------------------------------------------------


def _step_peak(model, *, batch: int, seq: int, checkpointing: bool, device: str = "cpu"):
    """Measured peak of a training step (the second: the optimizer states exist) and the plan's."""
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer("adamw", params, TrainConfig(), torch.device(device))
    state = TrainState(
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, TrainConfig(), 2),
        max_grad_norm=0.3,
    )
    generator = torch.Generator().manual_seed(0)
    for step in range(2):
        ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator).to(device)
        data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        if step == 0:  # unmeasured: it creates the optimizer states
            train_step(state, [data])
        else:  # the training loop's own step, its phases marked
            with PhaseRecorder(device) as recorder:
                train_step(state, [data], phase=recorder.phase)
            measured = recorder.measurement
        del ids, data
    del optimizer, state
    dtype = {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.dtype]
    plan = plan_memory(
        shape_from_config(model.config, "measured"),
        seq_len=seq,
        batch_size=batch,
        rank=RANK,
        targets="all-linear",
        optimizer="adamw",
        checkpointing=checkpointing,
        lora_dropout=DROPOUT,
        compute_dtype=dtype,
        device=device,
    )
    return measured, plan


def _check(measured, plan, *, tolerance: float = 0.10) -> float:
    weights = sum(r.bytes for r in plan.rows if r.category == "weights")
    assert measured.drift == 0  # everything allocated during the step was seen being allocated or freed
    assert measured["forward"].end > measured["forward"].start > weights  # real tensors were counted
    ratio = plan.tensor_bytes / measured.peak
    detail = f"planned {plan.tensor_bytes / MB:.2f} MB vs measured {measured.peak / MB:.2f} MB ({plan.peak_moment})"
    assert abs(ratio - 1) <= tolerance, detail
    return ratio


def _loaded(path, device: str = "cpu", dtype: str = "fp32"):
    model = load_model(path, device=device, dtype=dtype)
    add_lora(model, "all-linear", r=RANK, dropout=DROPOUT, dtype=model.dtype)
    return model


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("measured")
    return {name: save_tiny_checkpoint(root / name, **config) for name, config in TINY.items()}


# each config at two sequence lengths, each with checkpointing off at one and on at the other
TINY_CASES = [("wide-ffn", 64, False), ("wide-ffn", 256, True), ("small", 64, True), ("small", 256, False)]


@pytest.mark.parametrize(("config", "seq", "checkpointing"), TINY_CASES, ids=[f"{c}-{s}-{k}" for c, s, k in TINY_CASES])
def test_plan_within_10_percent_of_measured_tiny(tiny_models, config, seq, checkpointing):
    model = _loaded(tiny_models[config])
    measured, plan = _step_peak(model, batch=2, seq=seq, checkpointing=checkpointing)
    _check(measured, plan)
    # Each phase, too: the optimizer step is weights + adapters + grads + states, exactly known.
    assert plan.phases["optimizer step"] == pytest.approx(measured["optimizer step"].peak, rel=0.02)


@pytest.fixture(scope="module")
def smollm2_model(smollm2_dir):
    return _loaded(smollm2_dir)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("batch", "seq", "checkpointing"), [(2, 64, False), (1, 128, True)], ids=["b2s64-no-ckpt", "b1s128-ckpt"]
)
def test_plan_within_10_percent_of_measured_smollm2(smollm2_model, batch, seq, checkpointing):
    measured, plan = _step_peak(smollm2_model, batch=batch, seq=seq, checkpointing=checkpointing)
    _check(measured, plan)


@gpu
@pytest.mark.parametrize("checkpointing", [False, True], ids=["no-ckpt", "ckpt"])
@pytest.mark.parametrize("seq", [256, 1024])
@pytest.mark.parametrize("config", list(TINY))
def test_plan_within_10_percent_of_measured_cuda(tiny_models, config, seq, checkpointing):
    model = _loaded(tiny_models[config], device="cuda", dtype="bf16")
    measured, plan = _step_peak(model, batch=2, seq=seq, checkpointing=checkpointing, device="cuda")
    assert measured.device == "cuda"
    weights = sum(r.bytes for r in plan.rows if r.category == "weights")
    assert measured.peak > weights
    ratio = plan.tensor_bytes / measured.peak
    assert abs(ratio - 1) <= 0.10, f"planned {plan.tensor_bytes / MB:.2f} MB vs measured {measured.peak / MB:.2f} MB"
