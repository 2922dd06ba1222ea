"""torchrun on CPU (gloo), 2 real processes: DDP and FSDP2 give one process's numbers, FSDP shards the 4-bit
base, a killed job resumes exactly, and failures end the job within seconds with a clear message."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from qlora_kit.checkpoint import list_checkpoints
from qlora_kit.loading import load_model
from qlora_kit.quant import quantized_bytes
from tests.conftest import save_tiny_smollm2_checkpoint

REPO = Path(__file__).parent.parent
RECIPE = str(REPO / "recipes" / "smollm2_alpaca.yaml")
TOOLS = REPO / "recipes" / "data"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "QLORA_KIT_DIST_TIMEOUT_S": "60"}
TIMEOUT_S = 240  # a whole 2-process run on the tiny model takes ~20 s on a shared 2-core machine


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    return save_tiny_smollm2_checkpoint(tmp_path_factory.mktemp("m") / "tiny", smollm2_dir)


def _overrides(model_dir: Path, out: Path, **extra) -> list[str]:
    """5 steps, 4 micro-batches of 2 per step in all (one process: accumulation 4; two: 2 each)."""
    values = {
        "model.name_or_path": model_dir,
        "model.device": "cpu",
        "data.path": TOOLS / "text_tools_train.jsonl",
        "data.val_path": TOOLS / "text_tools_val.jsonl",
        "data.max_samples": 48,
        "lora.r": 8,
        "lora.alpha": 16,
        "lora.dropout": 0.0,  # dropout draws from each process's RNG: the order differs from one process's
        "train.micro_batch_size": 2,
        "train.gradient_accumulation_steps": 2,
        "train.max_steps": 5,
        "train.learning_rate": 3e-3,
        "train.warmup_steps": 1,
        "train.lr_scheduler": "cosine",
        "train.save_steps": 2,
        "train.resume": "auto",
        "output.dir": out,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _run(cmd: list[str], timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _torchrun_train(model_dir: Path, out: Path, **extra) -> list[str]:
    return [*TORCHRUN, "-m", "qlora_kit", "train", RECIPE, *_overrides(model_dir, out, **extra)]


def _losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _eval_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_loss"] for r in records if "eval_loss" in r]


def _assert_same_run(out: Path, reference: Path, rtol: float = 1e-5, adapter_atol: float = 1e-5) -> None:
    """Losses, eval losses and the adapter of ``out`` equal ``reference``'s up to float reduction order.

    Adam divides each gradient entry by its own running scale, so in the first steps a reduction-order
    difference in a near-zero entry moves that weight by a small fraction of the learning rate: the adapter
    is compared to ``adapter_atol`` (SmolLM2 at lr 3e-3: up to 4e-5 on 2 in 10^5 entries, measured).
    """
    losses, expected = _losses(out), _losses(reference)
    assert sorted(losses) == sorted(expected)
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=rtol), step
    assert _eval_losses(out) == pytest.approx(_eval_losses(reference), rel=rtol)
    ours = load_file(out / "adapter" / "adapter_model.safetensors")
    theirs = load_file(reference / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == theirs.keys()
    for key, tensor in theirs.items():
        torch.testing.assert_close(ours[key], tensor, rtol=1e-4, atol=adapter_atol, msg=key)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """The same 5 steps as one process (accumulation 4) and as 2 processes (2 each) under ddp and fsdp."""
    root = tmp_path_factory.mktemp("runs")
    one = root / "one"
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(tiny_model_dir, one, **{"train.gradient_accumulation_steps": 4})])
    assert result.returncode == 0, result.stderr[-3000:]
    outs = {"one": one}
    for parallel in ("ddp", "fsdp"):
        outs[parallel] = root / parallel
        result = _run(_torchrun_train(tiny_model_dir, outs[parallel], **{"train.parallel": parallel}))
        assert result.returncode == 0, result.stderr[-3000:]
        outs[f"{parallel}_stdout"] = result.stdout
    return outs


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_the_same_global_batch(runs, parallel):
    _assert_same_run(runs[parallel], runs["one"])
    # only rank 0 talks: one summary line, one LoRA report
    assert runs[f"{parallel}_stdout"].count("LoRA on 14 linears") == 1
    assert runs[f"{parallel}_stdout"].count("done in") == 1
    marker = json.loads((list_checkpoints(runs[parallel])[-1].path / "checkpoint.json").read_text())
    assert marker == {"step": 5, "world_size": 2, "parallel": parallel}


def test_ddp_trains_a_dora_adapter_with_trainable_tokens_as_one_process(tiny_model_dir, tmp_path):
    """DDP wraps whatever the adapters are: DoRA's magnitudes and a trainable token row are all-reduced like
    A and B (the frozen base and VeRA-style buffers are never synced), so 2 processes give one's numbers."""
    extra = {"lora.variant": "dora", "lora.trainable_tokens": "[<|tool|>]", "train.max_steps": 3}
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(tiny_model_dir, one, **extra, **{"train.gradient_accumulation_steps": 4})])
    assert result.returncode == 0, result.stderr[-3000:]
    result = _run(_torchrun_train(tiny_model_dir, two, **extra, **{"train.parallel": "ddp"}))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(two, one)


def test_fsdp_adapter_is_whole_and_loads_in_peft(runs, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = runs["fsdp"] / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter)
    ours = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    loaded = model.get_submodule("base_model.model.model.layers.1.mlp.down_proj").lora_B["default"].weight
    assert tuple(ours[key].shape) == (64, 8)  # the whole tensor, not one process's shard
    torch.testing.assert_close(loaded, ours[key])
    assert ours[key].abs().sum() > 0  # it trained (B starts at zero)


def test_fsdp_each_process_holds_half_of_the_4bit_base(runs, tiny_model_dir):
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    whole, held = summary["nf4_bytes"], summary["nf4_bytes_per_process"]
    assert whole == quantized_bytes(load_model(tiny_model_dir, device="cpu")).quantized_total  # one process's
    assert len(held) == 2
    for resident in held:
        assert 0.45 * whole < resident < 0.55 * whole
    assert sum(held) >= whole  # every byte is held somewhere (shards are padded)
    assert "fsdp: the processes hold" in runs["fsdp_stdout"]


def _kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and its workers (they run in sessions of their own), by their ids."""
    parent = psutil.Process(process.pid)
    for child in parent.children(recursive=True):
        child.kill()
    parent.kill()
    process.wait(timeout=30)


def test_killed_torchrun_job_resumes_with_the_same_losses(runs, tiny_model_dir, tmp_path):
    """SIGKILL the fsdp job after step 3 (checkpoint at step 2), run the same command again: the losses
    and adapter equal the uninterrupted run's."""
    out = tmp_path / "killed"
    cmd = _torchrun_train(tiny_model_dir, out, **{"train.parallel": "fsdp"})
    process = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ((out / "metrics.jsonl").is_file() and max(_losses(out), default=0) >= 3):
            assert process.poll() is None, "the job ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        _kill_tree(process)
    assert max(_losses(out)) < 5
    assert [c.step for c in list_checkpoints(out)][-1] in (2, 4)
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    _assert_same_run(out, runs["fsdp"], rtol=1e-6)


def test_sigterm_to_torchrun_saves_a_checkpoint_on_every_process_and_resumes(tiny_model_dir, tmp_path):
    """A scheduler's SIGTERM to torchrun (it passes it to the workers, then waits 30 s before SIGKILL): every
    process stops at the same step and writes its shards, and the same command resumes to an uninterrupted run's
    losses and adapter. 20 steps with no checkpoint cadence, so the only checkpoint is the one SIGTERM made."""
    knobs = {"train.parallel": "ddp", "train.max_steps": 20, "train.save_steps": 0}
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    result = _run(_torchrun_train(tiny_model_dir, reference, **knobs))
    assert result.returncode == 0, result.stderr[-3000:]
    cmd = _torchrun_train(tiny_model_dir, out, **knobs)
    process = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not ((out / "metrics.jsonl").is_file() and _losses(out)):
            assert process.poll() is None and time.monotonic() < deadline, "the job ended before step 1"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)  # well inside torchrun's 30 s grace: no SIGKILL needed
    finally:
        if process.poll() is None:
            _kill_tree(process)
    stopped = max(_losses(out))
    assert stopped < 20, "SIGTERM came after the last step: the test did not interrupt anything"
    assert f"stopped at step {stopped}; checkpoint" in output
    assert [c.step for c in list_checkpoints(out)] == [stopped]
    marker = json.loads((list_checkpoints(out)[-1].path / "checkpoint.json").read_text())
    assert marker == {"step": stopped, "world_size": 2, "parallel": "ddp"}
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    _assert_same_run(out, reference, rtol=1e-6)


def test_a_torchrun_checkpoint_resumes_in_one_process_through_dcp(runs, tiny_model_dir, tmp_path):
    """The fsdp run's step-4 checkpoint, resumed by one process with the same global batch (accumulation 4):
    DCP gathers the sharded optimizer states, and step 5 and the adapter are those of the 2-process run."""
    import shutil

    parallel = "fsdp"

    out = tmp_path / "copy"
    shutil.copytree(runs[parallel], out)
    shutil.rmtree(out / "adapter")
    shutil.rmtree(list_checkpoints(out)[-1].path)  # step 5: resume from step 4
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(tiny_model_dir, out, **{"train.gradient_accumulation_steps": 4})])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"was written by 2 processes ({parallel}) and this run is one process" in result.stderr
    assert "resumed from" in result.stdout and "at step 4/5" in result.stdout
    _assert_same_run(out, runs[parallel])


def test_profile_under_torchrun_measures_each_process(tiny_model_dir, tmp_path):
    overrides = _overrides(tiny_model_dir, tmp_path / "run", **{"train.parallel": "fsdp"})
    cmd = [*TORCHRUN, "-m", "qlora_kit", "profile", RECIPE, *overrides, "--steps", "1"]
    result = _run(cmd)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        profile = json.loads((tmp_path / "run" / f"profile-rank{rank}" / "profile.json").read_text())
        settings = profile["plan"]["settings"]
        assert (settings["gpus"], settings["parallel"]) == (2, "fsdp")  # its share of the plan
        assert profile["step_peak"]["measured"] > 0
        assert f"process {rank} of 2" in result.stdout
    assert result.stdout.count("training step (peak)") == 2


def test_a_damaged_torchrun_checkpoint_is_named_and_nothing_is_lost(runs, tiny_model_dir, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(runs["fsdp"], out)
    shutil.rmtree(out / "adapter")
    last = list_checkpoints(out)[-1].path
    shard = next((last / "training_state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])  # a torn copy
    before = sorted(p.name for p in out.rglob("*"))
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(tiny_model_dir, out, **{"train.max_steps": 7})])
    assert result.returncode == 2
    assert f"checkpoint {last} is damaged (training_state:" in result.stderr
    assert "train.resume=" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written, nothing deleted


def test_a_single_process_checkpoint_is_not_resumed_under_torchrun(runs):
    from qlora_kit.dist_checkpoint import check_compatible
    from qlora_kit.errors import QloraKitError

    checkpoint = list_checkpoints(runs["one"])[-1]
    check_compatible(checkpoint, 1, "none")  # one process: fine
    with pytest.raises(QloraKitError, match="written by a single process") as error:
        check_compatible(checkpoint, 2, "ddp")
    assert "without torchrun" in str(error.value) and "train.resume=none" in str(error.value)


def test_missing_data_file_fails_every_process_at_once(tiny_model_dir, tmp_path):
    started = time.monotonic()
    result = _run(_torchrun_train(tiny_model_dir, tmp_path / "run", **{"data.path": tmp_path / "nope.jsonl"}), 120)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "qlora-kit train: error:" in result.stderr and "nope.jsonl" in result.stderr
    # each process says it once, without a traceback (torchrun adds its own summary, with its own traceback)
    assert result.stderr.count("qlora-kit train: error: data file") == 2
    assert "QloraKitError" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_exception_on_one_process_ends_the_job_within_seconds(tiny_model_dir, tmp_path):
    worker = str(REPO / "tests" / "distributed_worker.py")
    overrides = _overrides(tiny_model_dir, tmp_path / "run", **{"train.parallel": "ddp"})
    result = _run([*TORCHRUN, worker, "raise-on-rank-1", RECIPE, *overrides], timeout=120)
    ended = time.time()
    assert result.returncode != 0
    failed_at = float(re.search(r"injected failure on rank 1 at ([0-9.]+)", result.stderr).group(1))
    # rank 0 waits in the step's all-reduce (timeout: 60 s here); torchrun ends it as soon as rank 1 dies
    assert ended - failed_at < 15


@pytest.mark.slow
def test_smollm2_three_steps_equal_one_process_under_ddp_and_fsdp(smollm2_dir, tmp_path):
    """The real SmolLM2-135M (tied embeddings: the root FSDP group holds one tensor for both): 3 steps."""
    small = {
        "model.name_or_path": smollm2_dir,
        "data.val_path": "null",
        "data.max_samples": 24,
        "data.cutoff_len": 64,
        "train.micro_batch_size": 1,
        "train.max_steps": 3,
        "train.save_steps": 0,
    }
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(smollm2_dir, one, **small, **{"train.gradient_accumulation_steps": 4})], 600)
    assert result.returncode == 0, result.stderr[-3000:]
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        result = _run(_torchrun_train(smollm2_dir, out, **small, **{"train.parallel": parallel}), 600)
        assert result.returncode == 0, result.stderr[-3000:]
        _assert_same_run(out, one, adapter_atol=1e-4)


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.gpu
@two_gpus
@pytest.mark.parametrize(
    "knobs",
    [
        {"train.parallel": "ddp"},
        {"train.parallel": "fsdp"},
        {"train.parallel": "fsdp", "train.fsdp_cpu_offload": True},
    ],
    ids=["ddp", "fsdp", "fsdp_cpu_offload"],
)
def test_two_gpus_nccl_equal_one_gpu(tiny_model_dir, tmp_path, knobs):
    """One process per GPU over nccl (fp32, so the comparison is tight) against one GPU with the same global batch;
    fsdp_cpu_offload: the shards in host memory, each layer copied to its GPU for compute (FSDP2's policy)."""
    cuda = {"model.device": "cuda", "model.compute_dtype": "fp32", "lora.adapter_dtype": "fp32"}
    one = tmp_path / "one"
    cmd = [sys.executable, "-m", "qlora_kit", "train", RECIPE]
    result = _run([*cmd, *_overrides(tiny_model_dir, one, **cuda, **{"train.gradient_accumulation_steps": 4})])
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "two"
    result = _run(_torchrun_train(tiny_model_dir, out, **cuda, **knobs))
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_same_run(out, one, rtol=1e-4, adapter_atol=1e-4)


@pytest.mark.parametrize(
    "knob", ["lora.variant=dora", "lora.variant=vera", "lora.init=pissa", "lora.trainable_tokens=[<|tool|>]"]
)
def test_variants_under_fsdp_are_refused_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch, knob):
    """FSDP wraps plain LoRA layers as each decoder layer loads: a variant or SVD init is named, with the way
    out (ddp, or plain LoRA), in torchrun's environment before any process group or output dir exists."""
    from qlora_kit.config import load_config
    from qlora_kit.errors import QloraKitError
    from qlora_kit.train import prepare

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    overrides = [*_overrides(tiny_model_dir, tmp_path / "run", **{"train.parallel": "fsdp"}), knob]
    with pytest.raises(QloraKitError, match=r"not supported under train\.parallel=fsdp") as error:
        prepare(load_config(RECIPE, overrides))
    assert "train.parallel=ddp" in str(error.value)
    assert not (tmp_path / "run").exists()


def test_fsdp_cpu_offload_on_cpu_is_refused_before_anything_loads(tiny_model_dir, tmp_path, monkeypatch):
    """FSDP2's CPU offload copies shards to a GPU for compute; on a CPU run it would fail deep inside FSDP
    ("Cannot access accelerator device"): it is named, with the fix, before anything loads."""
    from qlora_kit.config import load_config
    from qlora_kit.errors import QloraKitError
    from qlora_kit.train import prepare

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    knobs = {"train.parallel": "fsdp", "train.fsdp_cpu_offload": True}
    with pytest.raises(QloraKitError, match=r"set train\.fsdp_cpu_offload=false"):
        prepare(load_config(RECIPE, _overrides(tiny_model_dir, tmp_path / "run", **knobs)))
    assert not (tmp_path / "run").exists()
