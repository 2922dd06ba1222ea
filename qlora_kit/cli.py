"""``qlora-kit train | plan | profile | export | generate``.

The entry points of the commands (their arguments, what they print, their exit status) live here and call
the library; ``main`` dispatches and turns ``QloraKitError`` into a one-paragraph message and exit status 2
(no traceback soup for bad input). Library imports happen inside each entry point, so ``--help`` stays fast
(``qlora-kit plan`` never imports torch). export and generate are still reached through ``_lazy``.
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
from qlora_kit.facts import DTYPE_CHOICES, OPTIMIZER_CHOICES, GiB, parse_size

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
    from qlora_kit.memory import PRESETS, model_shape, plan_memory

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
    p.add_argument("--targets", default="all-linear", help="attention | all-linear | q_proj,v_proj,...")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (> 0 keeps a mask per adapter)")
    p.add_argument("--optimizer", default="auto", choices=OPTIMIZER_CHOICES, help="auto: paged 32-bit")
    p.add_argument("--checkpointing", default="on", choices=("on", "off"), help="per-layer, default on")
    p.add_argument("--compute-dtype", default="auto", choices=DTYPE_CHOICES, help="auto: bf16 on cuda")
    p.add_argument("--adapter-dtype", default="auto", choices=DTYPE_CHOICES, help="auto: compute")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (> 1 keeps gradients live)")
    p.add_argument("--gpu", help="memory to fit in: 24GB, 48GB, 80GB (as GiB: 24GB = 24 x 2^30) or bytes")
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
    gpu = parse_size(args.gpu, "--gpu") if args.gpu is not None else None
    knobs = dict(seq_len=args.seq, batch_size=args.batch, rank=args.rank, targets=args.targets)
    knobs |= dict(optimizer=args.optimizer, checkpointing=args.checkpointing == "on", device=args.device)
    knobs |= dict(compute_dtype=args.compute_dtype, adapter_dtype=args.adapter_dtype, lora_dropout=args.dropout)
    knobs |= dict(grad_accumulation=args.accum)
    shape = model_shape(args.model)
    if args.max:
        return _print_max(shape, gpu, args.max, args.json, knobs)
    plan = plan_memory(shape, **knobs, gpu_bytes=gpu)
    print(plan.to_json() if args.json else plan.table())
    return EXIT_DOES_NOT_FIT if plan.fits is False else 0


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
    paths = write_outputs(result, Path(args.out or cfg.output.dir))
    print(format_table(result))
    print(f"wrote {', '.join(str(path) for path in paths.values())}")
    return 0


def _lazy(module: str, function: str):
    def run(argv: list[str]) -> int:
        return getattr(__import__(f"qlora_kit.{module}", fromlist=[function]), function)(argv)

    return run


COMMANDS = {
    "train": train_main,
    "plan": plan_main,
    "profile": profile_main,
    "export": _lazy("export", "export_main"),
    "generate": _lazy("generate", "generate_main"),
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
