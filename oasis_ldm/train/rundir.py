"""The run directory's provenance: the resolved config, the history of starts, stale outputs.

RUN_DIR/config.yaml is the config of the run as it now trains, and RUN_DIR/run.json says what
made it: every start (first run, restart, requeue) appends its version, git revision, world
size, host and job id, and the config changes it made (`preflight.MAY_CHANGE`), with the step
they took effect at. Only rank 0 writes here, after every check has passed (preflight.py).
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


def record(run_dir: Path, cfg: Config, start: Start) -> None:
    """Write the resolved config and append this start to run.json."""
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    write_text(run_dir / "config.yaml", dump_yaml(cfg))
    run_json = run_dir / "run.json"
    info = json.loads(run_json.read_text()) if run_json.exists() else {"starts": []}
    info["stage"] = start.stage
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
            entry[name] = [{"key": c.key, "old": _plain(c.old), "new": _plain(c.new)} for c in items]
    info["starts"].append(entry)
    write_text(run_json, json.dumps(info, indent=2) + "\n")


def stale_outputs(run_dir: Path) -> list[Path]:
    """TensorBoard events and image grids of an earlier run whose checkpoints are gone."""
    found = [p for p in (run_dir / "tb").glob("**/events.out.tfevents.*") if p.is_file()]
    return found + sorted((run_dir / "images").glob("*.png"))


def purge(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
