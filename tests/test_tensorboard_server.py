"""TensorBoard for real: serve a training run on loopback and read it back over HTTP."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import quiet_env

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def test_tensorboard_serves_the_runs_scalars_and_images(tiny_vae: Path):
    port = free_port()
    tensorboard = Path(sys.executable).parent / "tensorboard"
    cmd = [str(tensorboard), "--logdir", str(tiny_vae), "--host", "127.0.0.1", "--port", str(port)]
    # load_fast=false: the pure-Python reader, no second (data server) process to keep on loopback.
    server = subprocess.Popen(
        [*cmd, "--load_fast=false"], env=quiet_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    base = f"http://127.0.0.1:{port}/data"
    try:
        deadline = time.monotonic() + 90
        runs = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                runs = get_json(f"{base}/runs")
                if runs:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.5)
        assert runs, f"tensorboard did not serve the run (exit {server.poll()}): {server.stderr.read1().decode()}"
        scalars = get_json(f"{base}/plugin/scalars/tags")
        images = get_json(f"{base}/plugin/images/tags")
        run = "tb"  # the run directory's TensorBoard folder, relative to --logdir
        assert run in runs
        assert {"loss/total", "loss/l1", "loss/ssim", "train/lr", "grad_norm/vae"} <= set(scalars[run])
        assert "images/input_vs_reconstruction" in images[run]
        points = get_json(f"{base}/plugin/scalars/scalars?run={run}&tag=loss/total")
        assert [p[1] for p in points] == list(range(1, 7))  # one point per step, in order
    finally:
        server.terminate()
        server.wait(timeout=30)
