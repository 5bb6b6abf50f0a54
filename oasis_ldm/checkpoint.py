"""Checkpoint files: atomic writes, keep-last-k snapshots, corrupt-file fallback.

Layout of RUN_DIR/checkpoints/: one fixed `last.pt` (what a restarted or requeued job
resumes from, whatever step it holds) plus numbered `step_XXXXXXXX.pt` snapshots. A job
killed while writing never leaves a half-written `last.pt`: the bytes go to a temporary
file that is fsync'ed and renamed over the old one. Everything loads with
`weights_only=True`, so checkpoints hold tensors and plain Python values only.
"""

from __future__ import annotations

import hashlib
import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from oasis_ldm.atomic import atomic_open

LAST = "last.pt"
SNAPSHOT_RE = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("step", "stage", "config", "models")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def snapshot_name(step: int) -> str:
    return f"step_{step:08d}.pt"


class _KeepsWriteError:
    """A file whose `write` remembers the OSError it raised: torch.save turns a failed write (a
    full disk) into an assertion about zip positions, without the system's reason."""

    def __init__(self, f: Any) -> None:
        self.f, self.error = f, None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` so that readers see the old file or the whole new one; a failed
    write raises its OSError (ENOSPC, EDQUOT, ...), with the temp file removed."""
    with atomic_open(path, "wb") as f:
        writer = _KeepsWriteError(f)
        try:
            torch.save(obj, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None
            raise


def verify(data: bytes, path: Path) -> None:
    """Check the CRC-32 that the zip format stores for every record of a torch checkpoint.

    `torch.load` does not read them: a flipped bit in a tensor loads silently, with a damaged
    weight. Reading them back costs one pass over the bytes (milliseconds per 100 MB).
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint (checksum mismatch in {bad})")


def parse(data: bytes, path: Path) -> dict[str, Any]:
    """Verify and load checkpoint bytes read from `path`, always onto the CPU.

    CPU first, whatever device trains: RNG states and NumPy values must stay there, and
    `load_state_dict` places each tensor where its model or optimizer lives (an optimizer's
    `step` stays a CPU scalar, as AdamW wants it: no host sync per parameter).
    """
    verify(data, path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # garbage bytes, unpickling refused, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not an oasis-ldm checkpoint (missing keys)")
    return obj


def read(path: Path) -> bytes:
    """A checkpoint file's bytes, in one read (parse, hash and share them: never read it twice)."""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None


def load(path: Path) -> dict[str, Any]:
    """Load and check one checkpoint file; raise CheckpointError if it is unusable."""
    return parse(read(path), Path(path))


@dataclass(frozen=True)
class Found:
    """The checkpoint a run resumes from: its file, its bytes (to share with other ranks), its state."""

    path: Path
    data: bytes
    state: dict[str, Any]
    note: str | None = None  # why newer files were passed over, for the one warning a fallback prints


def snapshots(ckpt_dir: Path) -> list[Path]:
    """Numbered snapshots, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if SNAPSHOT_RE.match(p.name))


def prune_snapshots(ckpt_dir: Path, keep: int) -> None:
    snaps = snapshots(ckpt_dir)
    for old in snaps[: max(0, len(snaps) - keep)]:
        old.unlink(missing_ok=True)


def find_latest(ckpt_dir: Path) -> Found | None:
    """`last.pt`, or the newest good snapshot when it is missing or damaged; None if nothing.

    A damaged `last.pt` is not deleted: it is left for a person to inspect, and the next
    checkpoint write replaces it. A fallback says why in `Found.note`, for one warning line.
    """
    candidates = [ckpt_dir / LAST, *reversed(snapshots(ckpt_dir))]
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            data = path.read_bytes()
            state = parse(data, path)
        except (CheckpointError, OSError) as e:
            problems.append(str(e))
            continue
        note = None
        if problems:
            note = f"{'; '.join(problems)}; resuming from {path.name} (step {state['step']}) instead"
        return Found(path, data, state, note)
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(problems))
    return None


def has_checkpoint(ckpt_dir: Path) -> bool:
    """Whether the run directory's checkpoints/ holds any checkpoint file (good or not)."""
    return (ckpt_dir / LAST).exists() or bool(snapshots(ckpt_dir))


def resolve(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run directory whose `checkpoints/last.pt` is meant."""
    path = Path(path_or_run)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise CheckpointError(f"{path_or_run}: no checkpoint found (expected a .pt file or a run directory)")
    return path


def sha256(data: bytes) -> str:
    """The checksum outputs record of a checkpoint, from bytes already read."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
