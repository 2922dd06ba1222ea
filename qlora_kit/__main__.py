"""``python -m qlora_kit COMMAND ...``: the same as the ``qlora-kit`` command (and what torchrun launches)."""

import sys

from qlora_kit.cli import main

sys.exit(main())
