"""The run directory's provenance: the resolved config, the history of starts, its outputs.

RUN_DIR/config.yaml is the config of the run as it now trains, and RUN_DIR/run.json says what
made it: every start (first run, restart, requeue) appends its version, git revision, world
size, host and job id, and the config changes it made (`preflight.MAY_CHANGE`, and input paths
that moved), with the step they took effect at; `inputs` holds each input's given and resolved
path and what identifies its content (inputs.py); `outputs` lists the TensorBoard event files
and image grids the trainer wrote, the only files a fresh start over a run whose checkpoints
are gone removes (`purge_outputs`): a file someone else put there is never deleted. Only
rank 0 writes here, after every check has passed (preflight.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oasis_ldm import __version__
from oasis_ldm.atomic import write_text
from oasis_ldm.config import Config, dump_yaml
from oasis_ldm.train.preflight import Change


def git_revision() -> str:
    """The package's git revision (+ "-dirty"), or "unknown" outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("-dirty" if dirty else "")


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Start:
    """One start of a run, as run.json records it."""

    stage: str
    world_size: int
    step: int  # the step it resumed from (0: a fresh start)
    threads: int  # torch's CPU threads
    changes: list[Change] = field(default_factory=list)  # a resume's config changes, from step + 1
    replaced: list[Change] = field(default_factory=list)  # a fresh start's config against the old one
    inputs: dict[str, Any] = field(default_factory=dict)  # inputs.record_of: paths and identities


def record(run_dir: Path, cfg: Config, start: Start) -> None:
    """Write the resolved config and append this start to run.json."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_yaml(cfg))
    run_json = run_dir / "run.json"
    info = json.loads(run_json.read_text()) if run_json.exists() else {"starts": []}
    info["stage"] = start.stage
    if start.inputs:
        info["inputs"] = start.inputs
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "version": __version__,
        "git_revision": git_revision(),
        "world_size": start.world_size,
        "torch_threads": start.threads,
        "host": socket.gethostname(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "from_step": start.step,
        "command": sys.argv,
    }
    for name, items in (("config_changes", start.changes), ("config_replaced", start.replaced)):
        if items:
            entry[name] = [_change(c) for c in items]
    info["starts"].append(entry)
    write_text(run_json, json.dumps(info, indent=2) + "\n")


def _change(c: Change) -> dict[str, Any]:
    return {"key": c.key, "old": _plain(c.old), "new": _plain(c.new), **({"why": c.why} if c.why else {})}


def note_outputs(run_dir: Path, paths: list[Path]) -> None:
    """Add files the trainer wrote (TensorBoard events, image grids) to run.json's `outputs`."""
    run_json = run_dir / "run.json"
    if not paths or not run_json.is_file():
        return
    info = json.loads(run_json.read_text())
    listed = info.setdefault("outputs", [])
    new = [str(p.relative_to(run_dir)) for p in paths if str(p.relative_to(run_dir)) not in listed]
    if new:
        listed.extend(new)
        write_text(run_json, json.dumps(info, indent=2) + "\n")


def purge_outputs(run_dir: Path) -> int:
    """Remove the outputs run.json lists (a fresh start over a run whose checkpoints are gone),
    and only those: how many files were removed."""
    run_json = run_dir / "run.json"
    if not run_json.is_file():
        return 0
    info = json.loads(run_json.read_text())
    removed = 0
    for name in info.get("outputs", []):
        path = run_dir / name
        if ".." not in Path(name).parts and path.is_file() and not path.is_symlink():
            path.unlink()
            removed += 1
    if info.pop("outputs", None) is not None:
        write_text(run_json, json.dumps(info, indent=2) + "\n")
    return removed
