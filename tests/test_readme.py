"""The README's first screen is a contract: CI (.ci/run) runs the same set-up and test commands a newcomer copies."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _first_screen_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S)
    assert block, "the README has no bash block on its first screen"
    return [line.split("  #")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_first_screen_is_set_up_main_job_and_tests():
    setup, main_job, tests = _first_screen_commands()
    assert "python3 -m venv" in setup and "pip install" in setup
    assert main_job.startswith("qlora-kit train recipes/")
    assert (ROOT / main_job.split()[-1]).is_file()
    assert tests == "python -m pytest -q"


def test_ci_runs_the_readme_commands_in_a_fresh_venv():
    setup, _, tests = _first_screen_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install = setup.split("&& ", 2)[-1]  # the README's commands after creating and activating its venv
    assert install in ci, f"{install!r} (README) is not what .ci/run installs"
    assert "python3 -m venv" in ci and "mktemp -d" in ci
    assert re.search(rf"^{re.escape(tests)}$", ci, re.M), ".ci/run does not run the README's test command"


def test_readme_python_example_runs(tmp_path, monkeypatch, smollm2_dir):
    """The README's Python block, as written, in a fresh directory: it trains and saves a loadable adapter."""
    block = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    losses = namespace["losses"]
    assert len(losses) == 3 and losses[-1] < losses[0]  # it learns the one example
    from qlora_kit import load_adapter, load_model

    model = load_model(smollm2_dir)
    load_adapter(model, tmp_path / "runs" / "api_demo" / "adapter")


def test_public_api_names_all_import():
    import qlora_kit

    assert set(qlora_kit.__all__) >= {"load_model", "add_lora", "train", "export_merged", "plan_memory"}
    for name in qlora_kit.__all__:
        assert getattr(qlora_kit, name) is not None, name
