"""The run directory: resolved config, provenance, and a guard against mixing runs.

RUN_DIR/config.yaml is the resolved config of the run and RUN_DIR/run.json says what
made it (stage, package version, git revision, world size). A restart into an existing run
directory must train the same model: a changed config is refused with the keys that differ,
except `train.max_steps`, which may grow to extend a finished run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from oasis_ldm import __version__
from oasis_ldm.config import Config, dump_yaml, to_dict

MAY_CHANGE = {("train", "max_steps")}


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


def config_differences(old: dict, new: dict) -> list[str]:
    diffs = []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section, {}), new.get(section, {})
        for key in sorted(set(a) | set(b)):
            if (section, key) not in MAY_CHANGE and a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    return diffs


class RunDirError(RuntimeError):
    pass


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check(run_dir: Path, cfg: Config, stage: str) -> None:
    """Refuse to resume a run directory that holds another stage or another config.

    Every rank calls this before rank 0 writes anything, so all ranks fail alike.
    """
    saved = run_dir / "config.yaml"
    if saved.exists():
        with open(saved, encoding="utf-8") as f:
            old = yaml.safe_load(f) or {}
        diffs = config_differences(old, to_dict(cfg))
        if diffs:
            raise RunDirError(f"{run_dir} holds a run with another config: " + "; ".join(diffs))
    run_json = run_dir / "run.json"
    if run_json.exists():
        recorded = json.loads(run_json.read_text()).get("stage", stage)
        if recorded != stage:
            raise RunDirError(f"{run_dir} holds a {recorded} run, not a {stage} run")


def record(run_dir: Path, cfg: Config, stage: str, world_size: int) -> None:
    """Rank 0: write the resolved config and append this start to run.json.

    Every start (first run, restart, requeue) appends an entry, so a run keeps its history.
    """
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / "config.yaml", dump_yaml(cfg))
    run_json = run_dir / "run.json"
    info = json.loads(run_json.read_text()) if run_json.exists() else {"stage": stage, "starts": []}
    info["starts"].append(
        {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "version": __version__,
            "git_revision": git_revision(),
            "world_size": world_size,
            "host": socket.gethostname(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "command": sys.argv,
        }
    )
    _write_atomic(run_json, json.dumps(info, indent=2) + "\n")
