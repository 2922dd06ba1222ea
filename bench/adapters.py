"""One base, many adapters: what an extra adapter costs in memory and a switch in time, against PEFT, in one run.

    python bench/adapters.py [--adapters N] [--switches N]

SmolLM2-135M-Instruct, fp32 compute on CPU. N adapters (all-linear, r=16, random nonzero B) are saved with
``save_adapter`` by a child process (the memory it frees is then not reused by the loads measured). Both stacks
then load them one by one onto one base: ours (``load_model``: NF4, then ``adapters.load_adapter(name=)``) and
PEFT's (a dense transformers model, ``PeftModel.from_pretrained`` then ``load_adapter(adapter_name=)``). Memory,
after the base and after 1, 2, 4, ... adapters: each adapter's own tensor bytes, and the growth of live tensor
bytes (every storage the process holds) and of anonymous RSS (after ``malloc_trim``). Time: ``set_adapter``
(PEFT's with ``inference_mode=True``), both stacks interleaved, median of ``--switches``; a reload (the base + one
adapter loaded again from disk), median over the N adapters. Check: the logits after each switch against the
reload of that adapter alone (max abs diff), and against the other adapters.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import MB, busy_machine_note, markdown_table, rss_bytes, save_results
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

from qlora_kit import adapters
from qlora_kit.adapter import save_adapter
from qlora_kit.loading import load_model, load_tokenizer
from qlora_kit.lora import add_lora, lora_layers
from qlora_kit.memory.profile import live_tensor_bytes
from qlora_kit.models import resolve_model_dir
from qlora_kit.quant import NF4Linear
from qlora_kit.weights import release_freed_memory

MODEL = "smollm2-135m-instruct"
PROMPT = "Switching adapters should change the answer, not the base model."


def make_adapters(model_dir: Path, out: Path, count: int) -> None:
    """``count`` adapters of one add_lora'd model, each with its own random A and nonzero B."""
    model = load_model(model_dir, device="cpu", dtype=torch.float32)
    add_lora(model, "all-linear", r=16, alpha=32.0, dropout=0.05)
    for i in range(count):
        torch.manual_seed(i)
        for layer in lora_layers(model).values():
            layer.reset_lora_parameters()
            nn.init.normal_(layer.lora_b.weight, std=0.02)
        save_adapter(model, out / f"a{i}", str(model_dir))


def snapshot() -> dict[str, int]:
    gc.collect()
    release_freed_memory()
    return {"tensor": live_tensor_bytes(), "anon": rss_bytes()["anon"]}


class Ours:
    """A stack under test: how it loads its base and adapters and switches them (``Peft``: the same in PEFT)."""

    label = "qlora-kit (NF4 base)"

    def __init__(self, model_dir: Path) -> None:
        self.model_dir, self.model = model_dir, nn.Module()

    def load_base(self) -> None:
        self.model = load_model(self.model_dir, device="cpu", dtype=torch.float32)

    def add(self, name: str, directory: Path) -> None:
        adapters.load_adapter(self.model, directory, name=name)

    def switch(self, name: str) -> None:
        adapters.set_adapter(self.model, name)

    def own_bytes(self, name: str) -> int:
        return adapters.adapter_bytes(self.model, name)


class Peft(Ours):
    label = "PEFT (dense fp32 base)"

    def load_base(self) -> None:
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    def add(self, name: str, directory: Path) -> None:
        if isinstance(self.model, PeftModel):
            self.model.load_adapter(directory, adapter_name=name)
        else:
            self.model = PeftModel.from_pretrained(self.model, directory, adapter_name=name).eval()

    def switch(self, name: str) -> None:
        self.model.set_adapter(name, inference_mode=True)

    def own_bytes(self, name: str) -> int:
        own = [p for n, p in self.model.named_parameters() if f".lora_A.{name}." in n or f".lora_B.{name}." in n]
        return sum(p.numel() * p.element_size() for p in own)


def nf4_bytes(model: nn.Module) -> int:
    """The 4-bit base's own bytes: every NF4Linear's buffers (codes, double-quantized absmax); 0 for PEFT's."""
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, NF4Linear) for b in m.buffers())


def logits(stack: Ours, ids: torch.Tensor, switch_to: str | None = None) -> torch.Tensor:
    if switch_to is not None:
        stack.switch(switch_to)
    with torch.no_grad():
        return stack.model(ids).logits


def timed(call: Callable[..., Any], *args: Any) -> float:
    started = time.perf_counter()
    call(*args)
    return time.perf_counter() - started


def load_all(stack: Ours, dirs: list[Path]) -> dict[str, Any]:
    """Base, then the adapters one by one: bytes and RSS after each, and each load's time."""
    before = snapshot()
    load_s = timed(stack.load_base)
    after = [snapshot()]
    base = {"nf4": nf4_bytes(stack.model), **{key: after[0][key] - before[key] for key in before}}
    add_s = []
    for i, directory in enumerate(dirs):
        add_s.append(timed(stack.add, f"a{i}", directory))
        after.append(snapshot())
    growth = [{key: s[key] - after[0][key] for key in s} for s in after]
    n = len(dirs)
    return {
        "base_load_s": load_s,
        "base_bytes": base,
        "own_bytes": [stack.own_bytes(f"a{i}") for i in range(n)],
        "growth": {k: growth[k] for k in range(1, n + 1) if k & (k - 1) == 0 or k == n},  # 1, 2, 4, ..., n
        "per_extra": {key: (growth[n][key] - growth[1][key]) / max(n - 1, 1) for key in growth[n]},
        "add_s": add_s,
    }


def reload_alone(stack: Ours, name: str, directory: Path, ids: torch.Tensor) -> tuple[float, torch.Tensor]:
    fresh = type(stack)(stack.model_dir)
    seconds = timed(lambda: (fresh.load_base(), fresh.add(name, directory)))
    return seconds, logits(fresh, ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--switches", type=int, default=200, help="set_adapter calls per stack (median)")
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make:  # the child process
        make_adapters(resolve_model_dir(MODEL), args.make, args.adapters)
        return
    load_at_start = os.getloadavg()[0]
    model_dir = resolve_model_dir(MODEL)
    ids = load_tokenizer(model_dir)(PROMPT, return_tensors="pt").input_ids
    stacks = {"ours": Ours(model_dir), "peft": Peft(model_dir)}
    names = [f"a{i}" for i in range(args.adapters)]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, __file__, "--make", tmp, "--adapters", str(args.adapters)], check=True)
        dirs = [Path(tmp) / name for name in names]
        memory = {key: load_all(stack, dirs) for key, stack in stacks.items()}
        switch_s: dict[str, list[float]] = {key: [] for key in stacks}
        for i in range(args.switches):  # interleaved: contention hits both stacks alike
            for key, stack in stacks.items():
                switch_s[key].append(timed(stack.switch, names[i % len(names)]))
        switched = {key: {n: logits(stack, ids, switch_to=n) for n in names} for key, stack in stacks.items()}
        reload_s: dict[str, list[float]] = {key: [] for key in stacks}
        check: dict[str, dict[str, dict[str, float]]] = {key: {} for key in stacks}
        for name, directory in zip(names, dirs, strict=True):
            for key, stack in stacks.items():
                seconds, alone = reload_alone(stack, name, directory, ids)
                reload_s[key].append(seconds)
                others = [(switched[key][name] - switched[key][o]).abs().max().item() for o in names if o != name]
                own = (switched[key][name] - alone).abs().max().item()
                check[key][name] = {"vs_alone": own, "vs_closest_other": min(others, default=float("nan"))}
    figures = {
        key: {
            **memory[key],
            "add_s_median": statistics.median(memory[key]["add_s"][1:] or memory[key]["add_s"]),
            "switch_ms": 1e3 * statistics.median(switch_s[key]),
            "reload_s": statistics.median(reload_s[key]),
            "reload_all_s": reload_s[key],
            "logits_check": check[key],
        }
        for key in stacks
    }
    ours, peft = figures["ours"], figures["peft"]
    ratios = {key: ours[key] / peft[key] for key in ("add_s_median", "switch_ms", "reload_s")}
    ratios |= {"own_bytes": ours["own_bytes"][0] / peft["own_bytes"][0]}
    ratios |= {"base_tensor_bytes": ours["base_bytes"]["tensor"] / peft["base_bytes"]["tensor"]}
    data = {"model": str(model_dir), "adapters": args.adapters, "switches": args.switches, "prompt": PROMPT}
    data |= {"prompt_tokens": ids.shape[1], "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    data |= {"figures": figures, "ours_over_peft": ratios}
    markdown = _markdown(data, [stack.label for stack in stacks.values()], load_at_start)
    print(markdown)
    save_results("adapters", data, markdown)


def _mib(value: float) -> str:
    return f"{value / MB:,.1f}"


def _column(f: dict[str, Any]) -> list[str]:
    """One stack's cells, in the order of ``_markdown``'s row labels."""
    base, growth, per_extra, check = f["base_bytes"], f["growth"], f["per_extra"], f["logits_check"].values()
    nf4 = f" ({_mib(base['nf4'])} of it NF4)" if base["nf4"] else ""
    return [
        f"{_mib(base['tensor'])}{nf4} / {_mib(base['anon'])}",
        _mib(f["own_bytes"][0]),
        *(f"{_mib(growth[k]['tensor'])} / {_mib(growth[k]['anon'])}" for k in growth),
        f"{_mib(per_extra['tensor'])} / {_mib(per_extra['anon'])}",
        f"{f['base_load_s']:.2f}",
        f"{f['add_s_median']:.3f}",
        f"{f['switch_ms']:.2f}",
        f"{f['reload_s']:.2f}",
        f"{1e3 * f['reload_s'] / f['switch_ms']:,.0f}x",
        f"{max(c['vs_alone'] for c in check):.1e}",
        f"{min(c['vs_closest_other'] for c in check):.2f}",
    ]


def _markdown(data: dict[str, Any], labels: list[str], load_at_start: float) -> str:
    figures, ratios, n = data["figures"], data["ours_over_peft"], data["adapters"]
    what = [
        ("base: live tensor / anon RSS MiB", "base_tensor_bytes"),
        ("one adapter's own tensors MiB", "own_bytes"),
        *((f"after {k} adapter(s): live tensor / anon RSS growth MiB", None) for k in figures["ours"]["growth"]),
        ("per extra adapter: live tensor / anon RSS MiB", None),
        ("load the base s", None),
        ("load one more adapter s (median)", "add_s_median"),
        (f"**switch**: set_adapter ms (median of {data['switches']})", "switch_ms"),
        (f"**reload** base + adapter s (median of {n})", "reload_s"),
        ("reload / switch", None),
        ("max abs logit diff, switched vs that adapter alone (worst)", None),
        ("max abs logit diff to the closest other adapter (least)", None),
    ]
    columns = [_column(figures["ours"]), _column(figures["peft"])]
    rows = [
        [label, ours, peft, f"{ratios[key]:.3g}x" if key else ""]
        for (label, key), ours, peft in zip(what, *columns, strict=True)
    ]
    return "\n\n".join(
        part
        for part in [
            "# One base, many adapters: memory per adapter and switch time, against PEFT",
            f"SmolLM2-135M-Instruct, fp32 compute on CPU, {n} adapters (all-linear, r=16, fp32, random nonzero B) "
            "loaded one by one onto one base. Ours: `load_model` (NF4) + `qlora_kit.adapters.load_adapter(name=)`, "
            "`set_adapter`; PEFT on a dense fp32 transformers model: `PeftModel.from_pretrained` + "
            "`load_adapter(adapter_name=)`, `set_adapter(name, inference_mode=True)`. Both stacks in one process, "
            "switches interleaved; ratios are ours / PEFT. Live tensor bytes: every distinct storage the process "
            "holds; anon RSS after `malloc_trim`. A reload is the base and that one adapter loaded again from disk; "
            f"its logits (a {data['prompt_tokens']}-token prompt) are the reference for the switched model's. "
            f"OMP_NUM_THREADS={data['omp_num_threads']}.",
            busy_machine_note(load_at_start),
            markdown_table(["", *labels, "ours / PEFT"], rows),
        ]
        if part
    )


if __name__ == "__main__":
    main()
