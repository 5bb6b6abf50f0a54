"""Files that appear whole or not at all: how every writer of the project writes.

A reader (a resumed trainer, a rerun that counts shards, a merge, a person) sees the old file
or the whole new one, never half of either. The new content goes to a temporary name beside
the target, unique to this host and process (tasks on two nodes can share a pid, and one
shared temp name lets one task rename another's half-written file), is flushed to disk, and
is renamed over the target; the folder is then flushed too, so the rename survives a crash.
On any error the temporary file is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temp_path(path: Path) -> Path:
    """A hidden name next to `path` that only this process uses."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders: the rename is still atomic
        pass
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _link(tmp: Path, path: Path) -> bool:
    """Make `tmp` appear as `path` only if `path` does not exist; False where hard links are not supported."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        return False
    return True


@contextlib.contextmanager
def atomic_path(path: str | Path, *, exclusive: bool = False, temp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write `path`'s new content to (a file, or a folder); on success
    it replaces `path`.

    `exclusive`: `path` is created only if it does not exist yet (FileExistsError otherwise),
    so of several processes starting at once exactly one writes it. `temp` names the
    temporary path where a caller documents it (pack_h5's OUT.partial). A folder replaces an
    existing folder of the same name, which is removed first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp or temp_path(path)
    try:
        yield tmp
        _fsync(tmp)
        if tmp.is_dir() and path.is_dir():
            shutil.rmtree(path)
        if not (exclusive and _link(tmp, path)):
            os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        _remove(tmp)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` whose content replaces `path` only once it is whole (`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f
        f.flush()


def write_text(path: str | Path, text: str, *, exclusive: bool = False) -> None:
    """Atomically write `text` (UTF-8) to `path`; see `atomic_path` for `exclusive`."""
    with atomic_path(path, exclusive=exclusive) as tmp:
        tmp.write_text(text, encoding="utf-8")
