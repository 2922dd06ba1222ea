"""Before/after samples of a run: held-out (or configured) prompts answered greedily through
``generate_text``, so each sample is exactly what ``qlora-kit generate`` prints for the same prompt; and
the commands that reproduce them from the adapter and from an export.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

from torch import nn

from qlora_kit.config import RunConfig
from qlora_kit.data import PreparedData, Prompt, prompt_template
from qlora_kit.generate import generate_text

logger = logging.getLogger(__name__)


def sample_prompts(cfg: RunConfig, data: PreparedData, n_from_val: int = 3) -> list[Prompt]:
    """The configured prompts (in the run's template), else the first held-out rows' prompts."""
    template = prompt_template(cfg.data.format, cfg.data.template)
    if cfg.output.sample_prompts:
        return [Prompt(prompt, "", template) for prompt in cfg.output.sample_prompts]
    return list((data.val_prompts or [])[:n_from_val])


def write_samples(path: Path, title: str, model: nn.Module, tokenizer: Any, prompts: list[Prompt], cfg: RunConfig):
    """Answer each prompt greedily, log prompt and answer, and write them (with the references) to ``path``."""
    records = []
    logger.info(f"--- samples {title} ---")
    for prompt in prompts:
        answer = generate_text(
            model,
            tokenizer,
            prompt.instruction,
            prompt.template,
            cfg.output.sample_max_new_tokens,
            input_text=prompt.input,
        )
        records.append(
            {
                "prompt": prompt.instruction,
                "input": prompt.input,
                "template": prompt.template,
                "generated": answer,
                "reference": prompt.reference,
            }
        )
        shown = " | ".join(line for line in f"{prompt.instruction}\n{prompt.input}".splitlines() if line.strip())
        reference = f"   (reference: {prompt.reference!r})" if prompt.reference is not None else ""
        logger.info(f"> {shown}\n  {answer.strip()!r}{reference}")
    path.write_text(json.dumps(records, indent=2) + "\n")


def reproduce_commands(cfg: RunConfig, out: Path, prompts: list[Prompt], dtype_name: str) -> str:
    """The commands that give the first after-training sample again: generate on the base + adapter, export
    (in the compute dtype), generate on the export. ``--template`` is left out: the recorded one applies."""
    device = [] if cfg.model.device == "auto" else ["--device", cfg.model.device]
    compute = [] if cfg.model.compute_dtype == "auto" else ["--dtype", cfg.model.compute_dtype]
    if prompts:
        first = prompts[0]
        ask = ["--prompt", first.instruction, *(["--input", first.input] if first.input else [])]
        ask += ["--max-new-tokens", str(cfg.output.sample_max_new_tokens)]
        heading = "the first after-training sample (samples_after.json) again, from the adapter and from an export:"
    else:
        ask, heading = ["--interactive"], "talk to the trained model, with the adapter or as an export:"
    merged = str(out) + "-merged"
    commands = [
        ["qlora-kit", "generate", "--model", cfg.model.name_or_path, "--adapter", str(out), *ask, *device, *compute],
        ["qlora-kit", "export", str(out), "--out", merged, "--dtype", dtype_name, *device],
        ["qlora-kit", "generate", "--model", merged, *ask, *device, *compute],
    ]
    return heading + "".join(f"\n  {shlex.join(command)}" for command in commands)
