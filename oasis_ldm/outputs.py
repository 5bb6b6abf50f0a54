"""The rule for every path a command writes: never over a file it did not make, never over
its own inputs, and one line when the disk is full or read-only.

Each command checks its outputs before any work (`check_writable`, `check_not_input`), so a
typo in `--out` fails in a second instead of after hours, and a write that fails anyway
(the disk filled meanwhile) becomes one `OutputError` naming the file and the free space
(`writing`). Every writer writes through oasis_ldm/atomic.py, so a failed write leaves the
previous file whole and no temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path

# Errors that say the disk (or the folder) cannot take the file, not that the program is wrong.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM})


class OutputError(RuntimeError):
    """An output cannot be written, or must not be: one line naming the file and why."""


def nearest_existing(path: Path) -> Path:
    """`path`, or the closest folder above it that exists (where a new file would be made)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: Path) -> str:
    """The free space on the disk that holds (or would hold) `path`, for people: "12.3 MiB"."""
    try:
        free = shutil.disk_usage(nearest_existing(path)).free
    except OSError:
        return "unknown space"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return f"{free:.1f} TiB"


def reason(e: OSError) -> str:
    return os.strerror(e.errno) if e.errno else " ".join(str(e).split()) or type(e).__name__


def write_failed(path: Path, e: OSError, advice: str = "free space and rerun the same command") -> OutputError:
    """One line for a failed write: the file, the system's reason, the free space, what to do."""
    return OutputError(f"{path}: write failed ({reason(e)}; {free_space(path)} free on its disk): {advice}")


@contextlib.contextmanager
def writing(path: Path, advice: str = "free space and rerun the same command") -> Iterator[None]:
    """Turn an OSError while writing `path` into one `OutputError` line (see `write_failed`)."""
    try:
        yield
    except OSError as e:
        raise write_failed(path, e, advice) from None


def check_writable(path: Path, flag: str) -> None:
    """Fail before any work if `path` (a file or folder to be made) cannot be written.

    A real probe, not os.access: root on a read-only mount, NFS with root squashing and quotas
    all answer "allowed" to access(2). The probe file is unique to this process and removed.
    """
    where = nearest_existing(path)
    if where == Path(path).absolute() and where.is_file():
        where = where.parent  # a file to replace: its folder takes the new one
    if not where.is_dir():
        raise OutputError(f"{flag} {path}: cannot write here ({where} is not a folder)")
    probe = where / f".oasis-ldm-probe.{socket.gethostname()}.{os.getpid()}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"{flag} {path}: cannot write here ({reason(e)})") from None
    with contextlib.suppress(OSError):
        probe.unlink()


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file (links and `..` included); False if either is missing."""
    a, b = Path(a), Path(b)
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_input(out: Path, inputs: Mapping[str, Path | str | None], flag: str = "--out") -> None:
    """Refuse an output that is one of the command's inputs (`{flag: path}`)."""
    for name, path in inputs.items():
        if path is not None and (same_file(out, path) or Path(out).absolute() == Path(path).absolute()):
            raise OutputError(f"{flag} {out}: is the {name} input; refusing to write over it")
