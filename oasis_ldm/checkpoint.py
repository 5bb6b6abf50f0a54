"""Checkpoint files: atomic writes, keep-last-k snapshots, corrupt-file fallback.

Layout of RUN_DIR/checkpoints/: one fixed `last.pt` (what a restarted or requeued job
resumes from, whatever step it holds) plus numbered `step_XXXXXXXX.pt` snapshots. A job
killed while writing never leaves a half-written `last.pt`: the bytes go to a temporary
file that is fsync'ed and renamed over the old one. Everything loads with
`weights_only=True`, so checkpoints hold tensors and plain Python values only.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

LAST = "last.pt"
SNAPSHOT_RE = re.compile(r"^step_(\d{8})\.pt$")
REQUIRED_KEYS = ("step", "stage", "config", "models")


class CheckpointError(RuntimeError):
    """No usable checkpoint where one was expected."""


def snapshot_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def atomic_save(obj: dict[str, Any], path: Path) -> None:
    """Write `obj` to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check one checkpoint; raise CheckpointError if it is unusable."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, garbage bytes, unpickling refused, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not an oasis-ldm checkpoint (missing keys)")
    return obj


def snapshots(ckpt_dir: Path) -> list[Path]:
    """Numbered snapshots, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if SNAPSHOT_RE.match(p.name))


def prune_snapshots(ckpt_dir: Path, keep: int) -> None:
    snaps = snapshots(ckpt_dir)
    for old in snaps[: max(0, len(snaps) - keep)]:
        old.unlink(missing_ok=True)


def load_latest(ckpt_dir: Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """`last.pt`, or the newest good snapshot when it is missing or corrupt; None if nothing.

    A corrupt `last.pt` is not deleted: it is left for a person to inspect, and the next
    checkpoint write replaces it.
    """
    candidates = [ckpt_dir / LAST, *reversed(snapshots(ckpt_dir))]
    problems = []
    for path in candidates:
        if not path.exists():
            continue
        try:
            obj = load(path, map_location)
        except CheckpointError as e:
            problems.append(str(e))
            warnings.warn(f"{e}; trying an older snapshot", RuntimeWarning, stacklevel=2)
            continue
        if problems:
            note = f"resuming from {path.name} (step {obj['step']}) instead"
            warnings.warn(note, RuntimeWarning, stacklevel=2)
        return obj
    if problems:
        raise CheckpointError("no usable checkpoint in " + str(ckpt_dir) + ": " + "; ".join(problems))
    return None


def resolve(path_or_run: str | Path) -> Path:
    """A checkpoint file, or a run directory whose `checkpoints/last.pt` is meant."""
    path = Path(path_or_run)
    if path.is_dir():
        path = path / "checkpoints" / LAST
    if not path.is_file():
        raise CheckpointError(f"{path_or_run}: no checkpoint found (expected a .pt file or a run directory)")
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
