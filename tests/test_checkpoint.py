"""Checkpoints and adapters lose nothing: a full disk mid-save leaves the earlier ones intact and no
half-written directory; a damaged checkpoint is named, not unpickled into garbage."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

from qlora_kit import adapter as adapter_module
from qlora_kit import checkpoint as checkpoint_module
from qlora_kit.adapter import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from qlora_kit.checkpoint import (
    MARKER_NAME,
    STATE_NAME,
    find_resume_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from qlora_kit.config import LoRAConfig
from qlora_kit.errors import QloraKitError
from qlora_kit.loading import load_model
from qlora_kit.lora import add_lora, lora_state_dict


@pytest.fixture
def model(tiny_llama_dir: Path):
    torch.manual_seed(0)
    model = load_model(tiny_llama_dir, device="cpu")
    add_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_b" in name:
            torch.nn.init.normal_(param)  # non-zero B, so a restored adapter is told apart from a fresh one
    return model


def _disk_full_after(nbytes: int):
    """A writer that puts ``nbytes`` of garbage at the path, then fails as a full disk does."""

    def write(*args, **kwargs):
        path = next(a for a in (*args, *kwargs.values()) if isinstance(a, (str, Path)) and str(a).endswith(".pt"))
        Path(path).write_bytes(b"\0" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    return write


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_keeps_the_last_k_and_resume_auto_picks_the_newest(model, tmp_path):
    for step in (2, 4, 6):
        save_checkpoint(tmp_path, step, model, {"note": step}, "base", keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 6]
    assert find_resume_checkpoint("auto", tmp_path).path == tmp_path / "checkpoints" / "step-000006"
    assert find_resume_checkpoint("none", tmp_path) is None
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "step-000006").iterdir()) == sorted(
        [CONFIG_NAME, WEIGHTS_NAME, STATE_NAME, MARKER_NAME]
    )


def test_checkpoint_round_trip_restores_adapter_and_rng(model, tmp_path):
    torch.manual_seed(123)
    saved = {k: v.clone() for k, v in lora_state_dict(model).items()}
    path = save_checkpoint(tmp_path, 3, model, {"note": "x"}, "base", keep_last=1)
    expected_draw = torch.rand(3)  # what the RNG gives right after the save
    for param in model.parameters():
        if param.requires_grad:
            param.data.zero_()
    state = load_checkpoint(path, model)
    assert state["step"] == 3 and state["note"] == "x"
    assert all(torch.equal(v, saved[k]) for k, v in lora_state_dict(model).items())
    assert torch.equal(torch.rand(3), expected_draw)


def test_full_disk_mid_checkpoint_leaves_earlier_checkpoints_and_no_partial_dir(model, tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=2)
    before = _files(tmp_path)
    monkeypatch.setattr(checkpoint_module.torch, "save", _disk_full_after(4096))
    with pytest.raises(QloraKitError, match=r"step-000004.*earlier checkpoints are untouched.*resume=auto"):
        save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=2)
    assert _files(tmp_path) == before  # byte for byte, and no temp dir or step-000004 left behind
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]


def test_full_disk_while_saving_an_adapter_keeps_the_old_one(model, tmp_path, monkeypatch):
    target = save_adapter(model, tmp_path / "adapter", "base")
    before = _files(tmp_path)

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(adapter_module, "save_file", full_disk)
    with pytest.raises(QloraKitError, match=r"No space left.*adapter that was there is intact"):
        save_adapter(model, target, "base")
    assert _files(tmp_path) == before


def damaged_message(newest: Path, file: str, earlier: Path | None) -> str:
    """The regex of the damaged-checkpoint message: which file, and the ways on."""
    if earlier is None:
        way_on = rf"No other checkpoint is left: delete {re.escape(str(newest))}, and train.resume=auto starts"
    else:
        way_on = (
            rf"Resume from the newest other checkpoint with train.resume={re.escape(str(earlier))}, "
            rf"or delete {re.escape(str(newest))} and resume with train.resume=auto"
        )
    damaged = rf"checkpoint {re.escape(str(newest))} is damaged \({file}: .*\)"
    return rf"{damaged}; the other checkpoints are untouched\. {way_on}"


def test_damaged_checkpoint_is_named(model, tmp_path):
    path = save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=1)
    state_file = path / STATE_NAME
    state_file.write_bytes(state_file.read_bytes()[:100])  # truncated, e.g. copied off a full disk
    before = _files(tmp_path)
    with pytest.raises(QloraKitError, match=damaged_message(path, STATE_NAME, None)):
        load_checkpoint(path, model)
    assert _files(tmp_path) == before


def test_damaged_state_of_the_newest_checkpoint_names_the_one_to_resume_from(model, tmp_path):
    earlier = save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=2)
    newest = save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=2)
    (newest / STATE_NAME).write_bytes((newest / STATE_NAME).read_bytes()[:100])
    before = _files(tmp_path)
    with pytest.raises(QloraKitError, match=damaged_message(newest, STATE_NAME, earlier)):
        load_checkpoint(newest, model)
    assert _files(tmp_path) == before


@pytest.mark.parametrize("file", [WEIGHTS_NAME, CONFIG_NAME])
def test_damaged_adapter_of_a_checkpoint_is_named(model, tmp_path, file):
    earlier = save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=2)
    newest = save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=2)
    (newest / file).write_bytes((newest / file).read_bytes()[:60])  # read through adapter.read_adapter
    before = _files(tmp_path)
    with pytest.raises(QloraKitError, match=damaged_message(newest, file, earlier)):
        load_checkpoint(newest, model)
    assert _files(tmp_path) == before


def test_checkpoint_adapter_config_is_the_runs_lora_config(model, tmp_path):
    lora = LoRAConfig(r=4, alpha=8, dropout=0.0, targets="all-linear")
    path = save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=1, lora=lora)
    config = json.loads((path / CONFIG_NAME).read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    with pytest.raises(QloraKitError, match="is not what the model's LoRA layers hold"):
        save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=1, lora=LoRAConfig(r=16))
    assert [c.step for c in list_checkpoints(tmp_path)] == [2]  # nothing half-written, nothing pruned


DAMAGED_MARKERS = [
    pytest.param(b'{"step": 4', id="truncated"),
    pytest.param(b"\xff\xfe{\x00", id="not-utf8"),
    pytest.param(b'{"stp": 4}', id="no-step"),
    pytest.param(b"[4]", id="not-an-object"),
]


@pytest.mark.parametrize("marker", DAMAGED_MARKERS)
def test_damaged_marker_of_the_newest_checkpoint_stops_resume_and_names_the_ways_on(model, tmp_path, marker):
    earlier = save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=2)
    newest = save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=2)
    (newest / MARKER_NAME).write_bytes(marker)
    before = _files(tmp_path)
    with pytest.raises(QloraKitError, match=damaged_message(newest, MARKER_NAME, earlier)):
        find_resume_checkpoint("auto", tmp_path)  # not a silent step back to step 2
    with pytest.raises(QloraKitError, match=damaged_message(newest, MARKER_NAME, earlier)):
        find_resume_checkpoint(str(newest), tmp_path)
    assert _files(tmp_path) == before
    assert find_resume_checkpoint(str(earlier), tmp_path).path == earlier  # the way on the message names works
    assert [(c.step, c.damage is not None) for c in list_checkpoints(tmp_path)] == [(2, False), (4, True)]


def test_saving_beside_a_damaged_checkpoint_never_prunes_good_ones_for_it(model, tmp_path):
    save_checkpoint(tmp_path, 2, model, {}, "base", keep_last=3)
    damaged = save_checkpoint(tmp_path, 4, model, {}, "base", keep_last=3)
    (damaged / MARKER_NAME).write_bytes(b'{"step": 4')
    damaged_files = _files(damaged)
    save_checkpoint(tmp_path, 6, model, {}, "base", keep_last=2)  # was a JSONDecodeError mid-save
    assert [c.step for c in list_checkpoints(tmp_path)] == [2, 4, 6]  # the damaged one is not counted
    save_checkpoint(tmp_path, 8, model, {}, "base", keep_last=2)
    assert [c.step for c in list_checkpoints(tmp_path)] == [4, 6, 8]  # good ones pruned as usual
    assert _files(damaged) == damaged_files  # left for the user to look at or delete
    assert find_resume_checkpoint("auto", tmp_path).path == tmp_path / "checkpoints" / "step-000008"


def test_resume_path_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(QloraKitError, match="not a complete checkpoint dir"):
        find_resume_checkpoint(str(tmp_path), tmp_path)
