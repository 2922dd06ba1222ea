"""fp32 master weights for 16-bit adapters (``optim.MasterWeights``, issue 13 item 7).

An optimizer that updates bf16 weights in place loses every update below half a bf16 unit in the last place:
at a small learning rate the adapters stall. The tests train bf16 adapters on a tiny model at lr 1e-5 and
compare them with the same run in fp32: with master copies they follow it, without they measurably stall
(both are shown, so the comparison cannot pass vacuously). Then: one step equals the inner optimizer on fp32
copies bit for bit, chunked stepping changes nothing, a resume is exact (and would not be without the saved
copies), fp32 adapters get no wrapper, and the planner's rows match measured memory.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qlora_kit.checkpoint import STATE_NAME
from qlora_kit.config import TrainConfig, load_config
from qlora_kit.errors import QloraKitError
from qlora_kit.facts import MB
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora
from qlora_kit.memory import PhaseRecorder, lora_param_count, plan_memory, shape_from_config
from qlora_kit.optim import MASTER_KEY, MasterWeights, make_optimizer, make_scheduler
from qlora_kit.train import TrainState, train, train_step
from tests.conftest import gpu, save_tiny_checkpoint
from tests.test_memory_measured import one_thread  # noqa: F401 (autouse: memory and speed need one thread)
from tests.test_train import _losses, _overrides, tiny_model_dir  # noqa: F401 (the fixture)

CPU = torch.device("cpu")
LR, STEPS = 1e-5, 100  # Adam moves a weight by ~lr a step: far below half a bf16 ulp of most A entries


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(tmp_path_factory.mktemp("optim") / "tiny")


def _adapted(path: Path, adapter_dtype: torch.dtype, rank: int = 8, device: str = "cpu", compute: str = "fp32"):
    """The tiny model with LoRA whose initial weights are bf16 values in every dtype, so runs start alike."""
    torch.manual_seed(0)
    model = load_model(path, device=device, dtype=compute)
    add_lora(model, "all-linear", r=rank, alpha=16, dropout=0.0, dtype=torch.float32)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.to(torch.bfloat16).to(adapter_dtype)
    return model, params


def _batch(device: str = "cpu") -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def _state(model, params, cfg: TrainConfig, steps: int, optimizer: str, device: str = "cpu") -> TrainState:
    opt = make_optimizer(optimizer, params, cfg, torch.device(device))
    return TrainState(
        model=model, params=params, optimizer=opt, scheduler=make_scheduler(opt, cfg, steps), max_grad_norm=0.3
    )


def _cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"learning_rate": LR, "lr_scheduler": "cosine", "warmup_steps": 2, **overrides})


def _train(path: Path, dtype: torch.dtype, master: bool, optimizer: str, rank: int, device: str = "cpu", **kw):
    """``STEPS`` steps of the training loop's own step on one batch; the updates and the state."""
    model, params = _adapted(path, dtype, rank, device, **kw)
    start = [p.detach().float().clone() for p in params]
    state = _state(model, params, _cfg(fp32_master_weights=master), STEPS, optimizer, device)
    batch = _batch(device)
    for _ in range(STEPS):
        train_step(state, [batch])
    return [p.detach().float() - s for p, s in zip(params, start, strict=True)], start, state


def _rel(updates: list[torch.Tensor], reference: list[torch.Tensor], rank: int | None = None) -> float:
    """|update - reference| / |reference| over all adapters (or only the A matrices: ``rank`` rows)."""
    pairs = [(u, r) for u, r in zip(updates, reference, strict=True) if rank is None or u.shape[0] == rank]
    return float(sum((u - r).pow(2).sum() for u, r in pairs).sqrt() / sum(r.pow(2).sum() for _, r in pairs).sqrt())


@pytest.mark.parametrize(("optimizer", "rank"), [("adamw", 8), ("adamw_8bit", 32)])
def test_bf16_adapters_follow_the_fp32_run_with_master_copies_and_stall_without(tiny_dir, optimizer, rank):
    reference, _, _ = _train(tiny_dir, torch.float32, True, optimizer, rank)
    kept, start, state = _train(tiny_dir, torch.bfloat16, True, optimizer, rank)
    lost, _, plain = _train(tiny_dir, torch.bfloat16, False, optimizer, rank)
    opt = state.optimizer
    assert isinstance(opt, MasterWeights) and type(plain.optimizer) is type(opt.inner)
    if optimizer == "adamw_8bit":  # r=32 makes tensors of >= 4096 values: bitsandbytes' 8-bit states are used
        assert any(s["state1"].dtype == torch.uint8 for s in opt.inner.state.values())
    masters = [m.detach() - s for (_, m), s in zip(opt.pairs(), start, strict=True)]
    figures = {
        "master copies": _rel(masters, reference),
        "bf16 weights with master copies": _rel(kept, reference),
        "bf16 weights without": _rel(lost, reference),
        "A without": _rel(lost, reference, rank),
    }
    detail = ", ".join(f"{name} {value:.3f}" for name, value in figures.items())
    # Measured (adamw / adamw_8bit): master copies 0.027 / 0.047 off the fp32 run's update (bf16 forward and
    # gradients), the bf16 weights 0.107 / 0.109 (each rounded once, at the end, never accumulated); without
    # master copies 0.749 / 0.748, the A matrices 0.977: they hardly moved at all.
    assert figures["master copies"] < 0.1, detail
    assert figures["bf16 weights with master copies"] < 0.25, detail
    assert figures["bf16 weights without"] > 0.5 and figures["A without"] > 0.9, detail
    assert all(torch.equal(p, m.to(p.dtype)) for p, m in opt.pairs())  # the weights are the copies, rounded


def test_a_step_is_the_inner_optimizer_on_fp32_copies_with_clipped_grads():
    """Clipping acts on the bf16 gradients; the inner AdamW steps fp32 copies with them; weights = copies rounded."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32, dtype=torch.bfloat16) * 0.02) for _ in range(3)]
    copies = [p.detach().float().clone() for p in params]
    opt = MasterWeights(params, lambda groups: torch.optim.AdamW(groups, lr=3e-4, weight_decay=0.1))
    reference = torch.optim.AdamW(copies, lr=3e-4, weight_decay=0.1)
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        for p, c in zip(params, copies, strict=True):
            c.grad = p.grad.float()
        opt.step()
        reference.step()
        opt.zero_grad(set_to_none=True)
    for p, c, (_, m) in zip(params, copies, opt.pairs(), strict=True):
        assert torch.equal(m, c) and torch.equal(p, c.to(torch.bfloat16)) and p.grad is None


def test_chunked_steps_equal_one_step_and_fp32_parameters_step_once():
    """The copies stepped one tensor at a time equal one step over all of them; an fp32 parameter among them
    is stepped as it is, once per step, as a plain AdamW steps it."""
    torch.manual_seed(0)
    shapes = [(64, 32), (16, 8), (32, 64)]
    values = [torch.randn(s) * 0.02 for s in shapes]

    def make(chunk_numel: int) -> tuple[MasterWeights, list[torch.nn.Parameter]]:
        params = [torch.nn.Parameter(v.to(torch.bfloat16)) for v in values[:2]] + [
            torch.nn.Parameter(values[2].clone())
        ]
        return MasterWeights(params, lambda g: torch.optim.AdamW(g, lr=1e-3), chunk_numel=chunk_numel), params

    (whole, a), (chunked, b) = make(2**24), make(1)
    alone = torch.nn.Parameter(values[2].clone())
    plain = torch.optim.AdamW([alone], lr=1e-3)
    for step in range(4):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(step * 10 + i)) for i, s in enumerate(shapes)]
        for params in (a, b):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.to(p.dtype)
        alone.grad = grads[2].clone()
        for opt in (whole, chunked, plain):
            opt.step()
        assert all(torch.equal(p.grad, g.to(p.dtype)) for p, g in zip(b, grads, strict=True))  # grads kept
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    assert all(torch.equal(m, n) for (_, m), (_, n) in zip(whole.pairs(), chunked.pairs(), strict=True))
    assert torch.equal(b[2], alone) and chunked.inner.state[b[2]]["step"] == 4  # one step per step
    assert all(m.grad is None for _, m in chunked.pairs() if m is not b[2])  # fp32 gradients only in the step


def test_the_lr_schedule_drives_the_inner_optimizer():
    p = torch.nn.Parameter(torch.full((4, 4), 0.5, dtype=torch.bfloat16))
    opt = MasterWeights([p], lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.0))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: {0: 1.0, 1: 0.0}.get(step, 0.5))
    moved = []
    for _ in range(3):
        before = opt.inner.param_groups[0]["params"][0].clone()
        p.grad = torch.ones_like(p)
        opt.step()
        moved.append(float((before - opt.inner.param_groups[0]["params"][0]).abs().max()))
        schedule.step()
    # a constant gradient makes each Adam step move by the lr it was given: 1e-2, then 0, then 0.5e-2
    assert moved == pytest.approx([1e-2, 0.0, 0.5e-2], rel=1e-3)
    assert opt.state_dict()["param_groups"][0]["initial_lr"] == 1e-2


def _resume_run(path: Path, cut: int | None, keep_masters: bool = True, total: int = 8):
    """``total`` steps of bf16 adapters at lr 1e-5; with ``cut``, saved after that step (adapter, optimizer,
    schedule through torch.save) and continued in a new model and optimizer."""
    model, params = _adapted(path, torch.bfloat16)
    cfg = _cfg(max_grad_norm=0.3)
    state, batch = _state(model, params, cfg, total, "adamw"), _batch()
    for _ in range(cut or total):
        train_step(state, [batch])
    if cut is None:
        return state
    buffer = io.BytesIO()
    torch.save({"params": params, "opt": state.optimizer.state_dict(), "sched": state.scheduler.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    if not keep_masters:
        del saved["opt"][MASTER_KEY]
    model, params = _adapted(path, torch.bfloat16)
    with torch.no_grad():
        for p, q in zip(params, saved["params"], strict=True):
            p.copy_(q)
    state = _state(model, params, cfg, total, "adamw")
    state.optimizer.load_state_dict(saved["opt"])
    state.scheduler.load_state_dict(saved["sched"])
    state.step = cut
    for _ in range(total - cut):
        train_step(state, [batch])
    return state


def test_resume_continues_exactly_and_needs_the_saved_master_copies(tiny_dir, caplog):
    whole = _resume_run(tiny_dir, None)
    resumed = _resume_run(tiny_dir, 4)
    for (p, m), (q, n) in zip(whole.optimizer.pairs(), resumed.optimizer.pairs(), strict=True):
        assert torch.equal(p, q) and torch.equal(m, n)
    with caplog.at_level(logging.WARNING, logger="qlora_kit.optim"):
        rederived = _resume_run(tiny_dir, 4, keep_masters=False)
    assert "holds no fp32 master weights" in caplog.text
    # from the bf16 weights the copies lose their low bits: the run no longer follows (so saving them matters)
    pairs = zip(whole.optimizer.pairs(), rederived.optimizer.pairs(), strict=True)
    assert not all(torch.equal(m, n) for (_, m), (_, n) in pairs)


def test_a_bf16_run_resumes_exactly_from_its_checkpoint(request, tmp_path):
    """The training loop with bf16 adapters: its checkpoint holds the master copies, and a run resumed from
    it takes every later step as the uninterrupted run did, and ends with the same adapter file."""
    model_dir = request.getfixturevalue("tiny_model_dir")  # test_train's: a tiny Llama with SmolLM2's tokenizer
    extra = {"lora.adapter_dtype": "bf16", "train.learning_rate": 1e-5, "train.save_total_limit": 10}
    reference = tmp_path / "reference"
    train(load_config(None, _overrides(model_dir, reference, **extra)))
    middle = reference / "checkpoints" / "step-000004"
    masters = torch.load(middle / STATE_NAME, weights_only=False)["optimizer"][MASTER_KEY]
    assert masters and any((m != m.bfloat16().float()).any() for m in masters.values())  # bits bf16 has not

    resumed = tmp_path / "resumed"
    train(load_config(None, _overrides(model_dir, resumed, **extra, **{"train.resume": middle})))
    later = {step: loss for step, loss in _losses(reference).items() if step > 4}
    assert _losses(resumed) == later and len(later) == 4  # bit for bit
    adapter = Path("adapter") / "adapter_model.safetensors"
    assert (resumed / adapter).read_bytes() == (reference / adapter).read_bytes()


def test_fp32_adapters_and_the_switch_off_get_the_plain_optimizer():
    fp32 = [torch.nn.Parameter(torch.zeros(8, 8))]
    bf16 = [torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.bfloat16))]
    assert type(make_optimizer("adamw", fp32, TrainConfig(), CPU)) is torch.optim.AdamW
    assert type(make_optimizer("auto", fp32, TrainConfig(), CPU)) is torch.optim.AdamW
    assert type(make_optimizer("adamw_8bit", fp32, TrainConfig(), CPU)) is bnb.optim.AdamW8bit
    assert type(make_optimizer("adamw", bf16, TrainConfig(fp32_master_weights=False), CPU)) is torch.optim.AdamW
    wrapped = make_optimizer("adamw_8bit", bf16, TrainConfig(), CPU)
    assert isinstance(wrapped, MasterWeights) and type(wrapped.inner) is bnb.optim.AdamW8bit
    with pytest.raises(QloraKitError, match="needs a CUDA GPU"):  # the paged check holds with master copies too
        make_optimizer("paged_adamw_32bit", bf16, TrainConfig(), CPU)
    with pytest.raises(NotImplementedError, match="when it is made"):
        wrapped.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]})


def test_config_key_defaults_on_and_refuses_a_non_bool():
    assert TrainConfig().fp32_master_weights is True
    assert load_config(None, ["train.fp32_master_weights=false"]).train.fp32_master_weights is False
    with pytest.raises(QloraKitError, match=r"'train\.fp32_master_weights'.*expected true or false, got 'maybe'"):
        load_config(None, ["train.fp32_master_weights=maybe"])


# --- the planner's rows, against measured memory ----------------------------------------------------------


def test_plan_row_for_the_master_copies():
    from qlora_kit.memory import PRESETS

    llama = PRESETS["llama-7b"]
    n = lora_param_count(llama, 64, "all-linear")
    on, off = plan_memory(llama), plan_memory(llama, master_weights=False)  # bf16 adapters on CUDA
    row = next(r for r in on.rows if r.item == "fp32 master weights")
    assert row.category == "optimizer" and row.bytes == 4 * n and on.pageable_bytes == off.pageable_bytes
    assert on.fixed_bytes - off.fixed_bytes == 4 * n
    assert on.phases["optimizer step"] - off.phases["optimizer step"] == 4 * n + 4 * 2**24  # + one fp32 chunk
    assert not any(r.item == "fp32 master weights" for r in off.rows)
    assert not any(r.item == "fp32 master weights" for r in plan_memory(llama, device="cpu").rows)  # fp32
    with_adamw = plan_memory(llama, optimizer="adamw")
    assert next(r.bytes for r in with_adamw.rows if r.item == "adamw states") == 8 * n  # fp32 states


@pytest.mark.parametrize(("optimizer", "master"), [("adamw", True), ("adamw", False), ("adamw_8bit", True)])
def test_plan_phases_match_measured_with_bf16_adapters(tmp_path, optimizer, master):
    """bf16 adapters on an fp32 model (CPU): each phase of a step's live tensor bytes, planned vs measured."""
    path = save_tiny_checkpoint(tmp_path / "tiny3", num_hidden_layers=3)
    model = load_model(path, device="cpu", dtype="fp32")
    add_lora(model, "all-linear", r=16, dropout=0.0, dtype=torch.bfloat16)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    state = _state(model, params, TrainConfig(fp32_master_weights=master), 2, optimizer)
    generator = torch.Generator().manual_seed(0)
    for _ in range(2):  # measured: the second step (the optimizer's states exist)
        ids = torch.randint(3, 320, (2, 64), generator=generator)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        with PhaseRecorder("cpu") as recorder:
            train_step(state, [batch], phase=recorder.phase)
    knobs = dict(rank=16, optimizer=optimizer, checkpointing=False, lora_dropout=0.0, device="cpu")
    plan = plan_memory(
        shape_from_config(model.config, "tiny3"), seq_len=64, batch_size=2, compute_dtype="fp32",
        adapter_dtype="bf16", master_weights=master, padded=False, **knobs,
    )  # fmt: skip
    assert any(r.item == "fp32 master weights" for r in plan.rows) == master
    for phase in ("forward", "backward", "optimizer step"):
        measured = recorder.measurement[phase].peak
        assert plan.phases[phase] == pytest.approx(measured, rel=0.02), f"{phase}: {measured / MB:.3f} MB measured"


def test_a_chunk_bounds_the_fp32_gradients_of_the_step():
    """Stepped one tensor at a time, the step's fp32 gradients are one tensor's, not all eight."""
    from qlora_kit.memory import measure_phases

    torch.manual_seed(0)
    tensor = 4 * 256 * 256  # one fp32 gradient
    peaks = {}
    for chunk in (2**24, 256 * 256):
        params = [torch.nn.Parameter(torch.randn(256, 256, dtype=torch.bfloat16)) for _ in range(8)]
        opt = MasterWeights(params, lambda g: torch.optim.AdamW(g, lr=1e-3), chunk_numel=chunk)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()  # the states exist from here on
        measured = measure_phases([("step", opt.step)])["step"]
        peaks[chunk] = (measured.peak - measured.start) / tensor
    # measured: 11 tensors (8 fp32 gradients + AdamW's per-tensor temporaries) vs 3 (one gradient + those)
    assert peaks[2**24] - peaks[256 * 256] >= 7 and peaks[256 * 256] <= 4, peaks


# --- on a GPU ---------------------------------------------------------------------------------------------


@gpu
@pytest.mark.gpu
def test_paged_adamw_with_master_copies_on_cuda(tiny_dir, tmp_path):
    """bf16 compute and adapters on CUDA with PagedAdamW32bit against the same run with fp32 adapters.

    Tolerances (not yet measured on a GPU; on CPU with fp32 compute the figures are 0.03 / 0.11 / 0.98): the
    master copies' update within 0.15 of the fp32 run's (relative, all adapters; bf16 compute adds noise),
    the bf16 weights' within 0.3; without master copies the A matrices' update is > 0.9 off (stalled). A
    save/load round trip of the optimizer restores the copies exactly."""
    reference, _, _ = _train(tiny_dir, torch.float32, True, "paged_adamw_32bit", 8, "cuda", compute="bf16")
    kept, start, state = _train(tiny_dir, torch.bfloat16, True, "paged_adamw_32bit", 8, "cuda", compute="bf16")
    lost, _, _ = _train(tiny_dir, torch.bfloat16, False, "paged_adamw_32bit", 8, "cuda", compute="bf16")
    opt = state.optimizer
    assert isinstance(opt, MasterWeights) and type(opt.inner) is bnb.optim.PagedAdamW32bit
    masters = [m.detach() - s for (_, m), s in zip(opt.pairs(), start, strict=True)]
    assert _rel(masters, reference) < 0.15 and _rel(kept, reference) < 0.3 and _rel(lost, reference, 8) > 0.9
    saved = tmp_path / "opt.pt"
    torch.save(opt.state_dict(), saved)
    again = make_optimizer("paged_adamw_32bit", state.params, _cfg(), torch.device("cuda"))
    again.load_state_dict(torch.load(saved, weights_only=False))
    assert all(torch.equal(m, n) for (_, m), (_, n) in zip(opt.pairs(), again.pairs(), strict=True))


def test_dcp_optimizer_state_dict_leaves_master_weights_states_alone(tiny_dir):
    """torch.distributed.checkpoint "initializes" an optimizer whose ``state`` is empty with a zero-gradient step
    (lr 0: Adam's moments still decay, its step count grows). MasterWeights' states are its inner optimizer's,
    so it must not look empty once stepped or loaded: a torchrun checkpoint would change the run it saves."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model, params = _adapted(tiny_dir, torch.bfloat16)
    state = _state(model, params, _cfg(learning_rate=1e-3), 4, "adamw")
    train_step(state, [_batch()])
    inner = state.optimizer.inner
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in inner.state.items()}
    get_optimizer_state_dict(model, state.optimizer)
    after = {id(p): s for p, s in inner.state.items()}
    assert after.keys() == before.keys()
    for key, saved in before.items():
        for name, value in saved.items():
            assert torch.equal(after[key][name], value), name  # step count and moments as they were
    fresh = make_optimizer("adamw", params, _cfg(), CPU)
    fresh.load_state_dict(state.optimizer.state_dict())
    assert fresh.state  # a loaded one counts as initialized too
