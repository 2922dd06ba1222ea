"""``qlora-kit train | plan | profile | export | generate``.

The entry points of the commands (their arguments, what they print, their exit status) live here and call
the library; ``main`` dispatches and turns ``QloraKitError`` into a one-paragraph message and exit status 2
(no traceback soup for bad input). Library imports happen inside each entry point, so ``--help`` stays fast
(``qlora-kit plan`` never imports torch). The library logs; ``configure_logging`` shows its INFO messages
on stdout and its warnings on stderr. Only this module prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qlora_kit.errors import QloraKitError
from qlora_kit.facts import (
    DTYPE_CHOICES,
    DTYPE_NAMES,
    LORA_INITS,
    LORA_VARIANTS,
    OPTIMIZER_CHOICES,
    PCIE_GBPS,
    PROMPT_TEMPLATES,
    TFLOPS,
    GiB,
    parse_size,
)

if TYPE_CHECKING:
    from qlora_kit.memory import ModelShape

USAGE = """usage: qlora-kit COMMAND [ARGS]

commands:
  train RECIPE [key=value ...]   fine-tune with a YAML recipe (see recipes/); --help lists every key
  plan --model M [...]           plan GPU memory for a QLoRA run before starting it
  profile RECIPE [--steps N]     measure memory by phase over a few real steps, next to the plan
  export RUN_DIR --out DIR       merge the adapter into the dequantized weights (HF checkpoint)
  generate --model M [...]       generate with a base model (+ adapter) or an exported dir
"""


def train_main(argv: list[str] | None = None) -> int:
    from qlora_kit.config import config_help, load_config, to_yaml

    parser = argparse.ArgumentParser(
        prog="qlora-kit train",
        description="Fine-tune a causal LM with QLoRA from a YAML recipe; key=value arguments override it.",
        epilog=config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("recipe", help="YAML recipe, e.g. recipes/smollm2_alpaca.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. lora.r=8 train.max_steps=10")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args = parser.parse_intermixed_args(argv)  # key=value overrides may follow options
    if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 talks; the others say only errors
        logging.getLogger("qlora_kit").setLevel(logging.ERROR)
    cfg = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    from qlora_kit.train import train

    result = train(cfg)
    return 0 if result.status == "completed" else 130


EXIT_DOES_NOT_FIT = 3  # `qlora-kit plan` exit status when the run does not fit (2 is the CLI's bad input)
PLAN_EPILOG = f"""exit status:
  0  the run fits in --gpu (or no --gpu was given)
  2  bad input (the message says what to fix)
  {EXIT_DOES_NOT_FIT}  the run does not fit in --gpu (with --max: not even 1 fits); the table says why and what fits
"""


def plan_main(argv: list[str] | None = None) -> int:
    """``qlora-kit plan``: the memory plan of a run (exit status 3 when it does not fit in --gpu)."""
    from qlora_kit.memory import PRESETS, model_shape, plan_memory, plan_parallel

    p = argparse.ArgumentParser(
        prog="qlora-kit plan",
        description="Plan the GPU memory of a QLoRA run.",
        epilog=PLAN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="HF checkpoint dir, hub id, short id or preset (see --list-presets)")
    p.add_argument("--seq", type=int, default=512, help="sequence length in tokens (default 512)")
    p.add_argument("--batch", type=int, default=1, help="micro batch size (default 1)")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank r (default 64)")
    p.add_argument("--variant", choices=LORA_VARIANTS, default="lora", help="lora.variant (default lora)")
    p.add_argument("--init", choices=LORA_INITS, default="default", help="lora.init (default default)")
    p.add_argument("--targets", default="all-linear", help="attention | all-linear | q_proj,v_proj,...")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (> 0 keeps a mask per adapter)")
    p.add_argument("--optimizer", default="auto", choices=OPTIMIZER_CHOICES, help="auto: paged 32-bit")
    p.add_argument("--checkpointing", default="on", choices=("on", "off"), help="per-layer, default on")
    p.add_argument("--compute-dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on cuda")
    p.add_argument("--adapter-dtype", default="auto", choices=DTYPE_CHOICES, help="auto: compute")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (> 1 keeps gradients live)")
    p.add_argument(
        "--master-weights",
        default="on",
        choices=("on", "off"),
        help="fp32 master copies of 16-bit adapters (train.fp32_master_weights; default on): 4 B/param",
    )
    p.add_argument("--trainable-tokens", type=int, default=0, help="token rows trained (lora.trainable_tokens)")
    p.add_argument("--modules-to-save", default="", help="embed_tokens,lm_head trained in full (lora.modules_to_save)")
    p.add_argument("--extra-adapters", type=int, default=0, help="more adapters like this one loaded on the same base")
    p.add_argument("--gpu", help="memory to fit in: 24GB, 48GB, 80GB (as GiB: 24GB = 24 x 2^30) or bytes")
    p.add_argument("--gpus", type=int, default=1, help="processes (GPUs) under torchrun: the plan is per process")
    p.add_argument("--parallel", default="ddp", choices=("ddp", "fsdp"), help="with --gpus > 1 (train.parallel)")
    p.add_argument("--fsdp-cpu-offload", action="store_true", help="fsdp shards in host RAM (train.fsdp_cpu_offload)")
    p.add_argument(
        "--offload",
        default="",
        help="weights,activations (or one of them): stream the 4-bit layers from host RAM (model.offload_weights), "
        "keep the checkpointed layer inputs there (train.offload_activations)",
    )
    p.add_argument(
        "--resident-layers",
        default="auto",
        help="with --offload weights: decoder layers kept on the GPU; auto = as many as fit in --gpu (none without)",
    )
    p.add_argument(
        "--pcie-gbps", type=float, default=PCIE_GBPS, help=f"host->GPU copy rate, GB/s (default {PCIE_GBPS:g})"
    )
    p.add_argument(
        "--tflops",
        type=float,
        default=TFLOPS,
        help=f"achieved bf16 matmul TFLOPS for the step time (default {TFLOPS:g})",
    )
    p.add_argument("--max", choices=("batch", "seq"), help="print the largest batch or seq that fits in --gpu")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--list-presets", action="store_true", help="list the built-in model shapes")
    args = p.parse_args(argv)
    if args.list_presets:
        for s in PRESETS.values():
            kv = f" ({s.kv_heads} kv)" if s.kv_heads != s.heads else ""
            print(f"{s.name:<12} {s.params / 1e9:5.1f}B  hidden {s.hidden}, {s.layers} layers, ", end="")
            print(f"{s.heads} heads{kv}, ffn {s.ffn}, vocab {s.vocab}")
        return 0
    if not args.model:
        p.error("--model is required (an HF dir, hub id or one of --list-presets)")
    if args.max and args.gpu is None:
        p.error("--max needs --gpu")
    if args.gpus < 1 or (args.max and args.gpus > 1):
        p.error("--gpus must be >= 1, and --max plans one process (leave --gpus out)")
    if args.fsdp_cpu_offload and (args.parallel != "fsdp" or args.gpus < 2):
        p.error("--fsdp-cpu-offload needs --parallel fsdp and --gpus 2 or more")
    if args.offload and args.gpus > 1:
        p.error("--offload plans one process; past one GPU use --parallel fsdp (with --fsdp-cpu-offload)")
    gpu = parse_size(args.gpu, "--gpu") if args.gpu is not None else None
    knobs = dict(seq_len=args.seq, batch_size=args.batch, rank=args.rank, targets=args.targets)
    optimizer = "adamw" if args.optimizer == "auto" and args.gpus > 1 and args.parallel == "fsdp" else args.optimizer
    knobs |= dict(optimizer=optimizer, checkpointing=args.checkpointing == "on", device=args.device)
    knobs |= dict(compute_dtype=args.compute_dtype, adapter_dtype=args.adapter_dtype, lora_dropout=args.dropout)
    knobs |= dict(grad_accumulation=args.accum, master_weights=args.master_weights == "on")
    knobs |= offload_knobs(p, args)
    knobs |= dict(variant=args.variant, init=args.init)
    saved = [name for name in args.modules_to_save.split(",") if name]
    knobs |= dict(trainable_tokens=args.trainable_tokens, modules_to_save=saved, extra_adapters=args.extra_adapters)
    shape = model_shape(args.model)
    if args.max:
        return _print_max(shape, gpu, args.max, args.json, knobs)
    plan = plan_memory(shape, **knobs, gpu_bytes=gpu, suggest=args.gpus == 1)
    plan = plan_parallel(plan, args.gpus, args.parallel, args.fsdp_cpu_offload)  # one process: as it is
    print(plan.to_json() if args.json else plan.table())
    return EXIT_DOES_NOT_FIT if plan.fits is False else 0


def offload_knobs(p: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """``--offload``, ``--resident-layers``, ``--pcie-gbps``, ``--tflops`` as planner knobs."""
    parts = {part.strip() for part in args.offload.split(",") if part.strip()}
    if parts - {"weights", "activations"}:
        p.error(f"--offload takes weights, activations or both (weights,activations), not {args.offload!r}")
    resident = args.resident_layers
    if resident != "auto" and not resident.isdigit():
        p.error(f"--resident-layers takes auto or a number of layers >= 0, not {resident!r}")
    knobs = dict(offload_weights="weights" in parts, offload_activations="activations" in parts)
    return knobs | dict(
        resident_layers=None if resident == "auto" else int(resident), pcie_gbps=args.pcie_gbps, tflops=args.tflops
    )


def _print_max(shape: ModelShape, gpu: int, vary: str, as_json: bool, knobs: dict) -> int:
    """``--max batch|seq``: the largest value that fits; when not even 1 does, why, and exit status 3."""
    from qlora_kit.memory import VARY_KEYS, gib_text, max_fitting, plan_memory

    best = max_fitting(shape, gpu, vary=vary, **knobs)
    if as_json:
        print(json.dumps({vary: best}))
    elif best:
        print(f"largest {vary} that fits in {gib_text(gpu)} GiB: {best}")
    else:
        plan = plan_memory(shape, **{**knobs, VARY_KEYS[vary]: 1}, gpu_bytes=gpu)
        print(f"no {vary} fits in {gib_text(gpu)} GiB: not even {vary} 1 ({plan.total / GiB:.2f} GiB planned)")
        print("\n".join(plan.advice()))
    return 0 if best else EXIT_DOES_NOT_FIT


def profile_main(argv: list[str] | None = None) -> int:
    """``qlora-kit profile``: measured peak memory by phase over a few real steps, beside the plan."""
    from qlora_kit.config import load_config
    from qlora_kit.memory import format_table, profile_run, write_outputs

    p = argparse.ArgumentParser(
        prog="qlora-kit profile",
        description="Run a few real training steps of a recipe and report measured peak memory by phase "
        "(load, forward, backward, optimizer step) next to the planner's prediction.",
    )
    p.add_argument("recipe", help="YAML recipe, e.g. recipes/smollm2_alpaca.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.micro_batch_size=2 data.cutoff_len=64")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of one micro-batch each (default 3)")
    p.add_argument("--out", help="where profile.json/.md/.png go (default: the recipe's output.dir)")
    args = p.parse_intermixed_args(argv)  # key=value overrides may follow options
    if args.steps < 1:
        p.error("--steps must be at least 1")
    cfg = load_config(args.recipe, args.overrides)
    result = profile_run(cfg, args.steps)
    out = Path(args.out or cfg.output.dir)
    if result["world_size"] > 1:  # under torchrun each process measures and writes its own
        out = out / f"profile-rank{result['rank']}"
        print(f"process {result['rank']} of {result['world_size']} (its own peaks, its share of the plan)")
    paths = write_outputs(result, out)
    print(format_table(result))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


def export_main(argv: list[str] | None = None) -> int:
    """``qlora-kit export``: merge a run's adapter into its base model, written as a standard HF checkpoint."""
    from qlora_kit.export import MERGE_TARGETS, QUANTIZE_FORMATS, export_merged

    p = argparse.ArgumentParser(
        prog="qlora-kit export",
        description="Merge a trained LoRA adapter into its base model and write a standard Hugging Face "
        "checkpoint dir (streamed shard by shard; peak memory about one shard).",
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER_DIR", help="a training run dir (with adapter/) or an adapter dir")
    p.add_argument("--out", required=True, help="the directory to write (refused if it exists, unless --force)")
    p.add_argument("--dtype", default="bf16", choices=DTYPE_NAMES, help="dtype of the exported weights")
    p.add_argument(
        "--max-shard-size",
        default="5GB",
        help="largest shard file, e.g. 500MB or 5GB (the default). Binary, like every size qlora-kit reads: "
        "5GB = 5 GiB = 5 x 2^30 bytes (transformers would read 5GB as 5 x 10^9)",
    )
    p.add_argument(
        "--merge-into",
        default="dequantized",
        choices=MERGE_TARGETS,
        help="dequantized (default): the NF4 weights training saw; original: the 16-bit checkpoint weights "
        "(re-introduces quantization error the adapter never saw)",
    )
    p.add_argument(
        "--quantize", choices=QUANTIZE_FORMATS, default=None, help="re-quantize the merged model in bitsandbytes 4-bit"
    )
    p.add_argument(
        "--force", action="store_true", help="replace an earlier export at --out (never a dir holding other files)"
    )
    p.add_argument("--base-model", default=None, help="base model path or id (default: the adapter config's)")
    p.add_argument(
        "--device", default="auto", help="where weights are quantized and merged: auto, cpu, cuda (match training)"
    )
    args = p.parse_args(argv)
    export_merged(
        args.source,
        args.out,
        dtype=args.dtype,
        max_shard_size=args.max_shard_size,
        merge_into=args.merge_into,
        quantize=args.quantize,
        force=args.force,
        base_model=args.base_model,
        device=args.device,
    )
    return 0


GENERATE_TEMPLATES = ("auto", *PROMPT_TEMPLATES)  # auto: the template recorded with the run, else by the tokenizer


def _generate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qlora-kit generate",
        description="Generate text with a base model + LoRA adapter, or an exported merged model.",
    )
    p.add_argument("--model", required=True, help="base model or exported dir: path, hub id or short id")
    p.add_argument(
        "--adapter",
        action="append",
        default=None,
        metavar="[NAME=]DIR",
        help="adapter dir (or training run dir) to apply; repeat as NAME=DIR to load several on the one base "
        "(each costs only its own weights) and pick one with --use, or with /adapter NAME in --interactive",
    )
    p.add_argument("--use", default=None, metavar="NAME", help="the adapter to answer with (default: the first)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="one prompt; the answer is streamed to the terminal")
    source.add_argument("--interactive", action="store_true", help="read prompts from stdin until EOF or 'exit'")
    p.add_argument(
        "--input",
        default="",
        help="the Alpaca format's input field: context for the instruction in --prompt (alpaca template only)",
    )
    p.add_argument(
        "--template",
        default="auto",
        choices=GENERATE_TEMPLATES,
        help="prompt format: alpaca, chat (the tokenizer's chat template), none (raw text); auto (default): the "
        "template recorded with the adapter or export (the one training used), else chat when the tokenizer "
        "has a chat template, else alpaca",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy decoding")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling (with --temperature > 0)")
    p.add_argument(
        "--merge-adapter",
        action="store_true",
        help="fold the adapter into dense layers (dequantized weight + scaled B@A in the compute dtype): "
        "faster generation, 4-8x the memory of those layers",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="compute dtype (auto: as training picks)")
    p.add_argument(
        "--quantize",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="load the decoder linears in NF4. Default: yes for a base model (as training saw it), no for a "
        "merged qlora-kit export (re-quantizing it loses part of the fine-tune)",
    )
    return p


def generate_main(argv: list[str] | None = None) -> int:
    """``qlora-kit generate``: one prompt, or a prompt loop on stdin; answers are streamed to stdout."""
    args = _generate_parser().parse_args(argv)
    from qlora_kit.generate import check_prompt, generate_text, load_for_generation

    if args.prompt is not None:
        check_prompt(args.prompt)  # before minutes of loading
    model, tokenizer, recorded = load_for_generation(
        args.model, args.adapter, args.device, args.dtype, args.quantize, args.merge_adapter, use=args.use
    )
    template = recorded if args.template == "auto" and recorded else args.template
    switch = _adapter_switch(model, args)

    def answer(prompt: str) -> None:
        sampling = dict(temperature=args.temperature, top_p=args.top_p, input_text=args.input)
        generate_text(model, tokenizer, prompt, template, args.max_new_tokens, stream=True, **sampling)

    if args.prompt is not None:
        answer(args.prompt)
        return 0
    print("Type a prompt and press Enter; '/adapter NAME' (or off) switches adapters; 'exit' or Ctrl-D quits.")
    while True:
        try:
            prompt = input(">>> ")
        except EOFError:
            print()
            return 0
        if prompt.strip() in {"exit", "quit"}:
            return 0
        if prompt.strip().startswith("/adapter"):
            template = switch(prompt.strip().removeprefix("/adapter").strip(), template)
        elif prompt.strip():
            answer(prompt)


def _adapter_switch(model, args: argparse.Namespace):
    """The interactive ``/adapter NAME`` (``/adapter off``: the base model; ``/adapter``: the list): switches
    the loaded adapters on the one base and returns the prompt template to use next."""
    from qlora_kit import adapters
    from qlora_kit.generate import recorded_template
    from qlora_kit.models import resolve_model_dir

    def switch(name: str, template: str) -> str:
        names = adapters.adapter_names(model)
        if not names or args.merge_adapter:
            print("no adapters to switch: load them with --adapter NAME=DIR (without --merge-adapter)")
            return template
        if not name:
            print(f"adapters: {', '.join(names)}; active: {adapters.active_adapter(model) or 'off'}")
            return template
        if name != "off" and name not in names:
            print(f"no adapter named {name!r}; loaded: {', '.join(names)} (or off)")
            return template
        if name == "off":
            adapters.disable_adapters(model)
            print("adapter off: the base model answers")
        else:
            adapters.set_adapter(model, name)
            print(f"adapter {name} active")
        if args.template != "auto":
            return template
        recorded = [adapters.registry(model).directories[name]] if name != "off" else []
        return recorded_template(resolve_model_dir(args.model), *recorded) or args.template

    return switch


COMMANDS = {
    "train": train_main,
    "plan": plan_main,
    "profile": profile_main,
    "export": export_main,
    "generate": generate_main,
}


def quiet_third_party_noise() -> None:
    """Silence messages that only confuse a qlora-kit user; set before the libraries are imported.

    - bitsandbytes (0.50, CPUs with AVX512-BF16) logs at import that it could not fetch a CPU gemv kernel
      through the ``kernels`` package (which downloads code from the Hugging Face hub). qlora-kit never
      calls bnb's 4-bit gemv: ``NF4Linear`` dequantizes and multiplies, so the advice is moot.
    - datasets draws "Generating train split" bars for every local file it reads; our own data summary
      line says what was read. A user can bring them back with HF_DATASETS_DISABLE_PROGRESS_BARS=0.
    """
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


class _PlainFormatter(logging.Formatter):
    """INFO as the bare message (what a user reads as the command's output); warnings and errors prefixed."""

    def format(self, record: logging.LogRecord) -> str:
        message = super().format(record)
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


class _StdStream(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are when a record is written (not when it was made), so
    redirecting them later (pytest's capture, contextlib.redirect_stdout) redirects the messages too."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    @property  # type: ignore[override]
    def stream(self):
        return getattr(sys, self._name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns one; the property decides
        pass


def configure_logging() -> None:
    """The library logs (``logging.getLogger(__name__)`` in each module); the CLI shows its INFO messages on
    stdout, warnings on stderr. QLORA_KIT_LOG_LEVEL=DEBUG (or WARNING) changes what is shown."""
    package = logging.getLogger("qlora_kit")
    if any(getattr(h, "qlora_kit_cli", False) for h in package.handlers):
        return  # main() called twice in one process (tests)
    for stream, keep in (("stdout", lambda r: r.levelno < logging.WARNING), ("stderr", None)):
        handler = _StdStream(stream)
        handler.setFormatter(_PlainFormatter("%(message)s"))
        handler.qlora_kit_cli = True  # type: ignore[attr-defined]
        if keep is not None:
            handler.addFilter(keep)
        else:
            handler.setLevel(logging.WARNING)
        package.addHandler(handler)
    package.setLevel(os.environ.get("QLORA_KIT_LOG_LEVEL", "INFO").upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    quiet_third_party_noise()
    configure_logging()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"qlora-kit: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command](rest) or 0
    except QloraKitError as e:
        print(f"qlora-kit {command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
