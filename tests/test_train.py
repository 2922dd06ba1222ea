"""The training loop end to end on a tiny random Llama with the real SmolLM2 tokenizer: it learns,
it checkpoints atomically, it stops cleanly on SIGTERM, and a SIGKILLed run resumes exactly."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qlora_kit.checkpoint import list_checkpoints
from qlora_kit.config import load_config
from qlora_kit.errors import QloraKitError
from qlora_kit.train import train
from tests.conftest import gpu, save_tiny_smollm2_checkpoint

TOOLS = Path(__file__).parent.parent / "recipes" / "data"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A tiny random Llama that uses SmolLM2's real tokenizer (vocab 49152)."""
    return save_tiny_smollm2_checkpoint(tmp_path_factory.mktemp("m") / "tiny", smollm2_dir)


def _overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    values = {
        "model.name_or_path": model_dir,
        "model.device": "cpu",  # CPU tests stay on the CPU on a GPU machine too (auto would pick the GPU)
        "data.path": TOOLS / "text_tools_train.jsonl",
        "data.val_path": TOOLS / "text_tools_val.jsonl",
        "data.max_samples": 48,
        "lora.r": 8,
        "lora.alpha": 16,
        "lora.dropout": 0.1,  # dropout draws random numbers: resume must restore the RNG to match
        "train.micro_batch_size": 4,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 8,
        "train.learning_rate": 3e-3,
        "train.warmup_steps": 2,
        "train.lr_scheduler": "cosine",
        "train.save_steps": 2,
        "train.save_total_limit": 2,
        "train.resume": "auto",
        "output.dir": out,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _train_cmd(model_dir: Path, out: Path, **extra) -> list[str]:
    """`qlora-kit train` in a child process (so it can be killed), with the same overrides as `_overrides`."""
    recipe = str(TOOLS.parent / "smollm2_alpaca.yaml")
    return [sys.executable, "-m", "qlora_kit.cli", "train", recipe, *_overrides(model_dir, out, **extra)]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_train_learns_and_writes_run_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    result = train(load_config(None, _overrides(tiny_model_dir, out, **{"train.max_steps": 12})))
    assert result.status == "completed" and result.steps == 12
    assert result.eval_loss_end < result.eval_loss_start
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "summary.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "samples_before.json",
        "samples_after.json",
    ):
        assert (out / name).is_file(), name
    assert [c.step for c in list_checkpoints(out)] == [10, 12]  # save_total_limit=2 keeps the newest two
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert load_config(out / "config.yaml").train.max_steps == 12


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[gpu, pytest.mark.gpu])], ids=["cpu", "cuda-bf16"]
)
def test_sigkill_then_resume_reproduces_the_uninterrupted_losses(tiny_model_dir, tmp_path, device):
    """CPU (fp32): every loss bit for bit. CUDA (bf16): SDPA's backward kernels use atomics, so two runs differ
    in the last bits; stated tolerance rtol 2e-2 per step."""
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    on = {"model.device": device}
    train(load_config(None, _overrides(tiny_model_dir, reference_dir, **on)))
    reference = _losses(reference_dir)

    proc = subprocess.Popen(
        _train_cmd(tiny_model_dir, killed_dir, **on), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not any(c.step >= 4 for c in list_checkpoints(killed_dir)):
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(killed_dir))
    assert killed_at < 8, "the run finished before SIGKILL; nothing was resumed"

    result = train(load_config(None, _overrides(tiny_model_dir, killed_dir, **on)))
    assert result.status == "completed"
    if device == "cpu":
        assert _losses(killed_dir) == reference  # every step's loss, bit for bit
    else:
        assert _losses(killed_dir) == pytest.approx(reference, rel=2e-2)


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(tiny_model_dir, out, **{"train.max_steps": 400, "train.save_steps": 0})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.jsonl").is_file() or len(_losses(out)) < 2:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    saved = list_checkpoints(out)
    assert saved and saved[-1].step == max(_losses(out))
    assert "train.resume=auto" in output


def test_nan_loss_stops_without_a_poisoned_checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(
        None,
        _overrides(
            tiny_model_dir, out, **{"train.learning_rate": 1e30, "train.max_grad_norm": 0, "train.save_steps": 1}
        ),
    )
    with pytest.raises(QloraKitError, match="loss became"):
        train(cfg)
    losses = _losses(out)
    assert all(c.step in losses for c in list_checkpoints(out))  # only finite steps were checkpointed


def test_paged_optimizer_on_cpu_is_a_clear_error(tiny_model_dir, tmp_path):
    cfg = load_config(None, _overrides(tiny_model_dir, tmp_path, **{"train.optimizer": "paged_adamw_32bit"}))
    with pytest.raises(QloraKitError, match="needs a CUDA GPU"):
        train(cfg)


@pytest.mark.skipif(os.cpu_count() is None, reason="")
def test_lr_schedules():
    from qlora_kit.optim import lr_lambda

    for kind in ("constant", "cosine", "linear"):
        f = lr_lambda(kind, warmup=3, total=10)
        assert f(0) < f(1) < f(2) < f(3) == 1.0
    assert lr_lambda("constant", 3, 10)(9) == 1.0
    assert lr_lambda("cosine", 3, 10)(10) == pytest.approx(0.0)
    assert lr_lambda("linear", 3, 10)(10) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_cross_entropy(monkeypatch, dtype):
    """causal_lm_loss's lm_head + loss node: F.cross_entropy's value and gradients, over several chunks."""
    import torch.nn.functional as F

    from qlora_kit import loss as loss_module

    monkeypatch.setattr(loss_module, "LOSS_CHUNK_TOKENS", 7)
    torch.manual_seed(0)
    hidden = torch.randn(30, 16).to(dtype).requires_grad_(True)
    weight = (torch.randn(50, 16) * 0.5).to(dtype).requires_grad_(True)
    targets = torch.randint(0, 50, (30,))
    loss = loss_module._LinearCrossEntropy.apply(hidden, weight, targets)
    (0.5 * loss).backward()
    ours = (loss.detach(), hidden.grad, weight.grad)
    hidden.grad = weight.grad = None
    reference = F.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    (0.5 * reference).backward()
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(ours, (reference.detach(), hidden.grad, weight.grad), strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_a_run_that_fails_to_start_leaves_no_output_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "never"
    with pytest.raises(QloraKitError, match=r"data file .* not found"):
        train(load_config(None, _overrides(tiny_model_dir, out, **{"data.path": tmp_path / "missing.jsonl"})))
    assert not out.exists()


def test_rerunning_a_complete_run_says_so_and_changes_nothing(tiny_model_dir, tmp_path, caplog):
    out = tmp_path / "run"
    overrides = _overrides(tiny_model_dir, out, **{"train.max_steps": 2, "data.max_samples": 16})
    train(load_config(None, overrides))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    caplog.clear()
    with caplog.at_level("INFO", logger="qlora_kit"):
        result = train(load_config(None, overrides))
    said = caplog.text
    assert result.status == "completed" and result.steps == 2
    assert "is a complete run (2 of 2 steps" in said and "train.resume=none" in said and "eval loss" not in said
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_resume_with_another_optimizer_starts_its_states_fresh_and_says_so(tiny_model_dir, tmp_path, caplog):
    """A checkpoint of torch AdamW (exp_avg) resumed with bitsandbytes AdamW8bit (state1/state2): loading the
    foreign states would pass and the first step would fail with a KeyError; instead the run goes on."""
    out = tmp_path / "run"
    common = {"data.max_samples": 16, "train.save_steps": 2}
    train(load_config(None, _overrides(tiny_model_dir, out, **common, **{"train.max_steps": 2})))
    state = torch.load(out / "checkpoints" / "step-000002" / "training_state.pt", weights_only=False)
    assert state["optimizer_name"] == "adamw"
    caplog.clear()
    with caplog.at_level("WARNING", logger="qlora_kit"):
        more = {"train.max_steps": 4, "train.optimizer": "adamw_8bit"}
        result = train(load_config(None, _overrides(tiny_model_dir, out, **common, **more)))
    assert result.status == "completed" and result.steps == 4
    assert all(math.isfinite(loss) for loss in result.train_losses)
    assert "optimizer states are adamw's, and this run uses adamw_8bit" in caplog.text
