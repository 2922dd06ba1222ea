"""Directories written all at once: checkpoints, adapters, exports and converted models go through here.

    with atomic_dir(target) as tmp:
        ... write files into tmp ...
    # now target holds exactly those files

Files are written into a temp dir beside ``target`` (same filesystem, so the final rename is atomic) and
the dir is renamed into place only when the block ends without an error. An earlier ``target`` survives
until the new one is in place; on any error (a full disk, Ctrl-C) the temp dir is removed and the earlier
``target`` is untouched, so a crash never leaves a half-written dir where a good one was. Errors come out
as they are (``OSError`` ...): each caller turns them into its own message.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """A fresh temp dir beside ``target`` that replaces ``target`` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Put the complete dir ``new`` at ``target``; an older ``target`` survives until the new one is in place."""
    if not target.exists():
        new.rename(target)
        return
    old = target.with_name(f".{target.name}.old-{new.name}")
    target.rename(old)
    try:
        new.rename(target)
    except BaseException:
        old.rename(target)  # put the earlier dir back: a failed replace must not lose it
        raise
    shutil.rmtree(old, ignore_errors=True)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(directory: Path) -> None:
    """Give the dir and what is in it the modes any tool would create them with (mkdtemp makes 0700).

    Files some writers create 0600 get 0666 & ~umask; directories 0777 & ~umask, like ``mkdir``.
    """
    mask = _current_umask()
    directory.chmod(0o777 & ~mask)
    for path in directory.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
