"""Write a folder or a file completely or not at all (torch-free; checkpoints, bundles, reports).

Every temporary name carries its owner: ``.NAME.tmp-HOST-PID-xxxx`` (a folder being written),
``.NAME.old-HOST-PID`` (the previous folder during the final two renames) and
``PREFIX HOST-PID-xxxx`` (a work folder, see ``work_folder``). HOST is a short hash of the host
name, so folders on a shared disk written by another machine (or container) are never judged by
this machine's process table. A process killed mid-write leaves such names behind; the next
writer of the same kind removes those whose owner is dead (``sweep_stale``) and logs what it
removed. A live owner's folders are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import hashlib
import logging
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable, Iterator, List, Optional

logger = logging.getLogger("ftz_edge.atomic")

# ``check(folder)`` raises ValueError (any subclass) with the reason ``folder`` may not be replaced.
ReplaceCheck = Callable[[Path], None]

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<host>[0-9a-f]{8})-(?P<pid>\d+)(?:-.*)?$")


class DestinationError(ValueError):
    """A destination this module will not or cannot write: a folder that is not ours to
    replace, a mount point, a symbolic link, or a final rename the file system refused."""


# -- owners ---------------------------------------------------------------------------------------
def host_tag() -> str:
    """8 hex digits naming this host (a hash: host names may hold characters unfit for a file name)."""
    return hashlib.sha1(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


def owner_tag() -> str:
    """``HOST-PID`` of this process, as it appears in every temporary name made here."""
    return f"{host_tag()}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):  # a PID no process can have
        return False
    return True


def _owner_dead(host: str, pid: str) -> bool:
    # Another host's folders cannot be judged here: they are always left alone.
    return host == host_tag() and not pid_alive(int(pid))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


# -- stale leftovers ------------------------------------------------------------------------------
def sweep_stale(parent: str | Path, name_pattern: str) -> List[str]:
    """Clean up after writers of ``parent/<name>`` (``name`` matching the glob ``name_pattern``)
    that were killed: their ``.tmp-`` folders are removed; an ``.old-`` folder (the complete
    previous folder, renamed aside just before the kill) is put back when ``<name>`` is missing,
    and removed otherwise. Only leftovers whose owning process is dead are touched. Returns one
    line per action, each also logged as a warning."""
    parent = Path(parent)
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return []
    done = []
    for path in entries:
        match = _LEFTOVER.match(path.name)
        if not match or not fnmatch.fnmatchcase(match["name"], name_pattern):
            continue
        if not _owner_dead(match["host"], match["pid"]):
            continue
        destination = parent / match["name"]
        if match["kind"] == "old" and not os.path.lexists(destination):
            try:
                os.replace(path, destination)
                done.append(f"restored {destination} from {path.name}, left by killed process {match['pid']}")
            except OSError as err:
                done.append(f"could not restore {destination} from {path} ({err}); it is kept")
        else:
            _remove(path)
            done.append(f"removed {path}, left by killed process {match['pid']}")
    for line in done:
        logger.warning("ftz-edge: %s", line)
    return done


@contextlib.contextmanager
def work_folder(prefix: str, parent: Optional[str | Path] = None) -> Iterator[Path]:
    """A scratch folder ``<parent>/<prefix>HOST-PID-xxxx`` (``parent``: the system temporary
    folder), removed on exit; the folders of this prefix left by killed processes are removed
    first. A drop-in for ``tempfile.TemporaryDirectory(prefix=...)`` that does not leak."""
    parent = Path(parent) if parent is not None else Path(tempfile.gettempdir())
    for path in sorted(parent.glob(glob.escape(prefix) + "*")):
        tail = path.name[len(prefix):].split("-")
        if len(tail) >= 2 and re.fullmatch(r"[0-9a-f]{8}", tail[0]) and tail[1].isdigit() \
                and _owner_dead(tail[0], tail[1]):
            _remove(path)
            logger.warning("ftz-edge: removed %s, left by killed process %s", path, tail[1])
    folder = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- destinations ---------------------------------------------------------------------------------
def check_destination(destination: str | Path, check: Optional[ReplaceCheck] = None, what: str = "a folder") -> None:
    """Raise DestinationError unless a finished folder may be renamed to ``destination``.

    Refused: a symbolic link (replacing it would cut the link, not update its target), a
    mount point (a rename cannot replace one: EBUSY, found only after the whole work), a file,
    and an existing non-empty folder unless ``check`` accepts it (``check`` raises ValueError
    with the reason; without ``check`` no non-empty folder is ever replaced)."""
    destination = Path(destination)
    if destination.is_symlink():
        raise DestinationError(f"{destination} is a symbolic link; give the folder it points to, or another name")
    if os.path.ismount(destination):
        raise DestinationError(f"{destination} is a mount point, which a finished folder cannot be renamed onto; "
                               f"write to a folder inside it (e.g. {destination / 'out'})")
    if not destination.exists():
        return
    if not destination.is_dir():
        raise DestinationError(f"{destination} exists and is a file, not {what}; refusing to replace it")
    if not any(destination.iterdir()):
        return
    if check is None:
        raise DestinationError(f"{destination} exists and is not empty; refusing to replace it: "
                               "choose another destination or remove it yourself")
    try:
        check(destination)
    except ValueError as err:
        raise DestinationError(f"{destination} exists and is not {what} ({err}); refusing to replace it: "
                               "choose another destination or remove it yourself") from None


@contextlib.contextmanager
def atomic_folder(destination: str | Path, check: Optional[ReplaceCheck] = None, what: str = "a folder") -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``destination``, on any error
    (or interrupt) it is removed and ``destination`` is left as it was.

    ``destination`` must pass ``check_destination(destination, check, what)``: an existing
    non-empty folder is replaced only when ``check`` accepts it, so no caller can replace a
    user's folder by accident. Leftovers of killed writers of ``destination`` are swept first.
    A refused final rename raises DestinationError."""
    destination = Path(destination)
    check_destination(destination, check, what)
    destination.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(destination.parent, glob.escape(destination.name))
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.tmp-{owner_tag()}-", dir=destination.parent))
    _usual_permissions(tmp, 0o777)
    try:
        yield tmp
        # Checked again: the folder may have appeared while the work ran.
        check_destination(destination, check, what)
        replace_folder(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _usual_permissions(path: Path, mode: int) -> None:
    """mkdtemp / mkstemp make owner-only entries; the result should have the usual permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, mode & ~umask)


def atomic_write_bytes(destination: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling, flush it to disk, then rename it over ``destination``:
    a reader sees the old file or the new one, never part of one."""
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.tmp-{owner_tag()}-", dir=destination.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _usual_permissions(Path(tmp), 0o666)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an old folder at ``dst`` is removed only afterwards.

    Two renames: for the instant between them ``dst`` does not exist (a reader sees no bundle,
    never half of one); if the second fails the old folder is put back. A kill between them
    leaves the old folder as ``.NAME.old-HOST-PID``, which ``sweep_stale`` puts back. A rename
    the file system refuses (e.g. EBUSY on a mount point) raises DestinationError."""
    old = None
    try:
        if dst.exists():
            old = dst.with_name(f".{dst.name}.old-{owner_tag()}")
            os.replace(dst, old)
        try:
            os.replace(src, dst)
        except BaseException:
            if old is not None:
                os.replace(old, dst)
            raise
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        hint = " (a mount point cannot be replaced by a rename)" if err.errno == errno.EBUSY else ""
        raise DestinationError(f"cannot move the finished folder into place at {dst}: {reason}{hint}") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
