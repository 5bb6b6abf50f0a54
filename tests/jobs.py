"""Helpers for tests that drive the launchers and jobs: run a script, poll for a state."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO

from oasis_ldm import checkpoint


def launch(script: str, *args: str, env: dict[str, str], timeout: float = 300) -> str:
    cmd = [sys.executable, str(REPO / "launch" / script), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert out.returncode == 0, f"{script} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


def job_ids(stdout: str, what: str) -> list[str]:
    return re.findall(rf"submitted {what}: job (\S+)", stdout)


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def starts(run_dir: Path) -> list[dict]:
    path = run_dir / "run.json"
    return json.loads(path.read_text())["starts"] if path.exists() else []


def saved_step(run_dir: Path) -> int:
    last = run_dir / "checkpoints" / "last.pt"
    return checkpoint.load(last)["step"] if last.exists() else 0


def sample_args(ckpt: Path, out: Path, n: int = 10) -> list[str]:
    return [
        "--ckpt",
        str(ckpt),
        "--out",
        str(out),
        "--num-samples",
        str(n),
        "--seed",
        "7",
        "--shard-size",
        "3",
        "--batch-size",
        "2",
        "--steps",
        "5",
        "--eta",
        "1.0",
    ]


def read_samples(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(out / "samples.h5", "r") as f:
        return f["images"][:], f["seed"][:]
