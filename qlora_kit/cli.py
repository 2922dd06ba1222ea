"""``qlora-kit train | plan | profile | export | generate``.

Each subcommand lives with the code it runs; this file only dispatches and turns ``QloraKitError``
into a one-paragraph message and exit status 2 (no traceback soup for bad input).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from qlora_kit.errors import QloraKitError

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


def _lazy(module: str, function: str):
    def run(argv: list[str]) -> int:
        return getattr(__import__(f"qlora_kit.{module}", fromlist=[function]), function)(argv)

    return run


COMMANDS = {
    "train": train_main,
    "plan": _lazy("memory", "plan_main"),
    "profile": _lazy("profile", "profile_main"),
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
