"""Shared by the bench scripts: who ran it (machine info), how to save figures, how to read host memory.

Scripts run as ``python bench/<name>.py`` from the repo root, so they import this as ``from _common import ...``
(the script's own directory is on ``sys.path``). Results go to ``bench/results/<name>.json`` and ``.md``.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MB = 1024 * 1024


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine: say so instead of failing the bench
        return None


def machine_info() -> dict[str, Any]:
    """Where and with what a figure was measured; stored next to every result."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gb": round(_ram_bytes() / 1024**3, 1),
        # Other work on the machine skews timings (not memory figures): say how busy it was when measured.
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _version("bitsandbytes"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gb"] = round(props.total_memory / 1024**3, 1)
        info["cuda_version"] = torch.version.cuda
    return info


def machine_markdown(info: dict[str, Any]) -> str:
    gpu = f"{info['gpu']} ({info['gpu_memory_gb']} GB), CUDA {info['cuda_version']}" if info.get("cuda") else "none"
    return (
        f"Machine: {info['cpu']}, {info['nproc']} CPUs (torch threads {info['torch_threads']}), "
        f"{info['ram_gb']} GB RAM, GPU: {gpu}; {info['platform']}; load average {info.get('load_avg_1m')}.  \n"
        f"Python {info['python']}, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, "
        f"transformers {info['transformers']}, peft {info['peft']}. Measured {info['date']}."
    )


def busy_machine_note(load_avg_at_start: float) -> str:
    """A warning for the report when other work was running as the bench started ("" on a quiet machine).

    Take ``os.getloadavg()[0]`` before the bench starts its own work, which would count too. Memory figures
    hold on a busy machine; timings do not: CPU kernels parallelized with OpenMP then wait for scheduler time
    slices (several ms each), so absolute times can be many times the quiet machine's.
    """
    cpus = os.cpu_count() or 1
    if load_avg_at_start < 0.5 * cpus:
        return ""
    return (
        f"**Busy machine:** load average {load_avg_at_start:.1f} on {cpus} CPUs when this run started (other work "
        "running, or just ended): absolute timings are pessimistic; compare contenders from the same run only."
    )


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save_results(name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``bench/results/<name>.json`` (data plus ``machine``) and ``<name>.md`` (markdown plus machine line).

    ``data["machine"]`` is filled in with ``machine_info()`` unless the caller already put one there.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    data = {**data, "machine": data.get("machine") or machine_info()}
    json_path = RESULTS_DIR / f"{name}.json"
    md_path = RESULTS_DIR / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    command = "python " + " ".join([f"bench/{name}.py", *sys.argv[1:]])
    md_path.write_text(f"{markdown.rstrip()}\n\n{machine_markdown(data['machine'])}  \nCommand: `{command}`\n")
    print(f"saved {json_path} and {md_path}")
    return json_path, md_path


# --- host memory (Linux) --------------------------------------------------------------------------------


def peak_rss_bytes() -> int:
    """This process's peak resident set since it started (``ru_maxrss``, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> dict[str, int]:
    """Current resident set, total and split into anonymous / file-backed pages (from /proc/self/status).

    The split matters when comparing loaders: pages of a memory-mapped checkpoint count in RSS as
    ``RssFile`` (the kernel may drop them), heap copies count as ``RssAnon``.
    """
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssFile": "file", "RssShmem": "shmem"}
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) * 1024
    return out


class RssSampler:
    """Peak anonymous and file-backed RSS, sampled every few ms (``ru_maxrss`` only gives the total)."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self.peak = {"rss": 0, "anon": 0, "file": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, value in rss_bytes().items():
                if key in self.peak:
                    self.peak[key] = max(self.peak[key], value)
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def llama_tensor_shapes(shape: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM, in the order transformers saves them."""
    h, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
        ]
    return [*shapes, ("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def write_synthetic_llama(model_dir: Path, shape: dict[str, Any], shard_bytes: int) -> None:
    """Random bf16 weights of a Llama ``shape`` (a LlamaConfig kwargs dict) as ~``shard_bytes`` shards + index.

    Built shard by shard, so making a checkpoint never needs the whole model in memory.
    """
    import torch
    from safetensors.torch import save_file

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]  # grouped first: file names carry the count
    size_in_shard = 0
    for name, tensor_shape in llama_tensor_shapes(shape):
        nbytes = 2 * math.prod(tensor_shape)
        if shards[-1] and size_in_shard + nbytes > shard_bytes:
            shards.append([])
            size_in_shard = 0
        shards[-1].append((name, tensor_shape))
        size_in_shard += nbytes
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, tensor_shape in shard:  # only this shard is ever in memory
            if len(tensor_shape) == 1:
                tensors[name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(tensor_shape, generator=generator) * 0.02).to(torch.bfloat16)
            weight_map[name] = filename
            total += tensors[name].numel() * 2
        save_file(tensors, str(model_dir / filename), metadata={"format": "pt"})
        del tensors
        print(f"  wrote {filename}", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def load_reference_nf4(model_dir: str | Path, dtype, device_map: Any):
    """The reference stack's QLoRA base: transformers + bitsandbytes NF4 with double quantization."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=dtype, device_map=device_map
    )


def synthetic_checkpoint(model_dir: Path, shape: dict[str, Any], shard_bytes: int) -> Path:
    """A random-weight Llama checkpoint of ``shape`` in ``model_dir`` (config + shards), written once: a complete
    one with the same shape (its ``bench_complete.json`` marker, written last) is reused."""
    from transformers import LlamaConfig

    marker = model_dir / "bench_complete.json"
    if marker.is_file() and json.loads(marker.read_text()) == shape:
        return model_dir
    model_dir.mkdir(parents=True, exist_ok=True)
    print(f"writing a random-weight checkpoint to {model_dir} (once) ...", flush=True)
    LlamaConfig(**shape, dtype="bfloat16").save_pretrained(model_dir)
    write_synthetic_llama(model_dir, shape, shard_bytes)
    marker.write_text(json.dumps(shape))
    return model_dir
