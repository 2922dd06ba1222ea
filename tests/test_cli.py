"""The CLI as a user meets it: help that reads once, and no third-party noise on stderr."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qlora_kit.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", ["train", "plan", "profile", "export", "generate"])
def test_help_is_quiet_and_exits_0(command):
    done = _cli(command, "--help")
    assert done.returncode == 0
    assert done.stderr == "", done.stderr  # e.g. bitsandbytes' "pip install kernels" advice on AVX512-BF16 CPUs
    assert f"qlora-kit {command}" in done.stdout


def test_train_help_states_its_heading_once_and_where_recipe_values_show():
    out = _cli("train", "--help").stdout
    assert out.count("config keys") == 1
    assert "--print-config" in out and "train.resume" in out


def test_unknown_command_is_exit_2_with_usage():
    done = _cli("fly")
    assert done.returncode == 2 and "unknown command 'fly'" in done.stderr and "commands:" in done.stderr
