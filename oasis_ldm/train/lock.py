"""One trainer per run directory: a lock file with its holder and a heartbeat, safe on NFS.

Two trainers on one run directory would both write last.pt and TensorBoard events, and the
second would resume from the first's checkpoint mid-run. So rank 0 of a trainer holds
RUN_DIR/lock: a JSON file naming its host, pid and SLURM job, created with O_EXCL (atomic on
local disks and on NFSv3 and later, unlike fcntl locks, which need a lock daemon on NFS) and
rewritten every `HEARTBEAT_S` seconds by a daemon thread. A start finding the lock held is
refused in one line naming the holder, unless the holder is gone:
- the same SLURM job id: this is that job requeued (preempted, timed out, or a node lost);
- the same host and its pid is no longer running (SIGKILL, an OOM kill, a crash);
- no heartbeat for `STALE_AFTER_S` seconds (a lost node, a process frozen for good).
A `lock` that is a folder, or a file whose content is not such a record, was not made here:
it is refused in one line and left alone. The launcher and every rank check the lock before a
start (`check_free`), without touching it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from pathlib import Path
from typing import Any

from oasis_ldm.atomic import write_text
from oasis_ldm.train.preflight import StartError

LOCK_NAME = "lock"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 60.0


def _job_id() -> str | None:
    return os.environ.get("SLURM_JOB_ID")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


HOLDER_KEYS = ("host", "pid", "heartbeat")
WRITE_WAIT_S = 2.0  # how long an empty lock file may take to get its content (one write, microseconds)


def read_holder(path: Path) -> dict[str, Any] | None:
    """The holder's record; None while it is being written (empty, or the start of our JSON).

    FileNotFoundError when there is no lock; StartError when `path` is not a lock file of this
    project (a folder, or other content): refused, never deleted.
    """
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise StartError(
            f"{path}: is not this project's lock file (a folder?); if no trainer uses {path.parent}, remove it"
        )
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StartError(f"{path}: unreadable lock file ({e.strerror or e})") from None
    if not text.strip() or (text.lstrip().startswith('{"host"') and not text.rstrip().endswith("}")):
        return None  # a trainer between creating the file and writing its one line
    try:
        holder = json.loads(text)
    except ValueError:
        holder = None
    if not isinstance(holder, dict) or any(k not in holder for k in HOLDER_KEYS):
        shown = " ".join(text.split())[:40]
        raise StartError(
            f"{path}: not a lock file of this project (it holds {shown!r}); if no trainer uses {path.parent}, delete it"
        )
    return holder


def in_use(path: Path, holder: dict[str, Any], now: float) -> StartError:
    beat = now - float(holder.get("heartbeat", now))
    return StartError(
        f"{path.parent} is in use by {describe(holder)} (heartbeat {beat:.0f} s ago): wait for it or stop it; "
        f"if it is gone, its lock expires {STALE_AFTER_S:.0f} s after its last heartbeat (or delete {path})"
    )


def check_free(run_dir: Path) -> None:
    """Refuse a start on a run directory that a live trainer holds, as `acquire` would, without
    touching the lock (the launcher checks before it submits, every rank before it starts)."""
    path = Path(run_dir) / LOCK_NAME
    try:
        holder = read_holder(path)
    except FileNotFoundError:
        return
    if holder is not None and gone_because(holder, time.time()) is None:
        raise in_use(path, holder, time.time())


def describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"host {holder.get('host')} pid {holder.get('pid')}{job}"


def gone_because(holder: dict[str, Any], now: float) -> str | None:
    """Why the lock's holder no longer runs, or None when it may still be training."""
    if holder.get("slurm_job_id") and holder.get("slurm_job_id") == _job_id():
        return "it is this SLURM job's earlier run (requeued)"
    if holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1))):
        return "its process is gone"
    age = now - float(holder.get("heartbeat", 0.0))
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s"
    return None


class RunLock:
    """Exclusive hold of a run directory by this process (rank 0 of a trainer)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.token = secrets.token_hex(8)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self, started: float) -> str:
        holder = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm_job_id": _job_id(),
            "started": started,
            "heartbeat": time.time(),
            "token": self.token,
        }
        return json.dumps(holder) + "\n"

    def _read(self) -> dict[str, Any] | None:
        """The holder's record (see `read_holder`); while it is being written, waits for it a moment."""
        deadline = time.monotonic() + WRITE_WAIT_S
        while (holder := read_holder(self.path)) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return holder

    def acquire(self) -> str | None:
        """Take the lock or raise StartError naming its holder; returns a note when one was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(5):
            started = time.time()
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                note = self._take_over_if_gone() or note
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self._content(started))
                f.flush()
                os.fsync(f.fileno())
            self._start_heartbeat(started)
            return note
        raise StartError(f"{self.path}: could not take the lock (it keeps changing hands)")

    def _take_over_if_gone(self) -> str | None:
        try:
            holder = self._read()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile: try again
        now = time.time()
        if holder is None:  # still empty: its trainer died between creating it and writing it, or is frozen
            if age <= STALE_AFTER_S:
                raise StartError(f"{self.path.parent} is being started by another trainer (lock file being written)")
            reason, who = f"an empty lock file untouched for {age:.0f} s", "an unknown holder"
        else:
            reason, who = gone_because(holder, now), describe(holder)
            if reason is None:
                raise in_use(self.path, holder, now)
        # Rename, then delete: of two trainers taking over at once, one rename wins.
        grave = self.path.with_name(f"{LOCK_NAME}.stale.{socket.gethostname()}.{os.getpid()}")
        try:
            os.replace(self.path, grave)
            grave.unlink(missing_ok=True)
        except FileNotFoundError:
            return None
        return f"took over the lock of {who}: {reason}"

    def _start_heartbeat(self, started: float) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self._rewrite(started)

        self._thread = threading.Thread(target=beat, name="oasis-ldm-lock-heartbeat", daemon=True)
        self._thread.start()

    def _rewrite(self, started: float) -> None:
        """A fresh heartbeat, atomically, and only while the lock is still ours."""
        try:
            holder = self._read()
        except (FileNotFoundError, StartError):
            return
        if holder is None or holder.get("token") != self.token:
            return
        with contextlib.suppress(OSError):  # a missed beat; the next one retries
            write_text(self.path, self._content(started))

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            holder = self._read()
        except (FileNotFoundError, StartError):
            return
        if holder is not None and holder.get("token") == self.token:
            self.path.unlink(missing_ok=True)
