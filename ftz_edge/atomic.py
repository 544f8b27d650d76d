"""Write a folder completely or not at all (torch-free; used by checkpoints and bundles)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(destination: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``destination``, on any error
    (or interrupt) it is removed and ``destination`` is left as it was."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-", dir=destination.parent))
    # mkdtemp makes the folder owner-only; the result should have the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        replace_folder(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old folder at ``dst`` is removed only afterwards.

    Two renames: for the instant between them ``dst`` does not exist (a reader sees no bundle,
    never half of one); if the second fails the old folder is put back."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
