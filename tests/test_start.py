"""Starting, restarting and refusing a training run: nothing lost, nothing blocked, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, quiet_env, train, train_cmd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oasis_ldm import checkpoint
from oasis_ldm.train.lock import LOCK_NAME

pytestmark = pytest.mark.slow


def run(cmd: list[str], **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(**env), cwd=REPO, timeout=300)


def one_line_error(out: subprocess.CompletedProcess) -> str:
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    return lines[0]


# --- failed starts block nothing --------------------------------------------------------------------


def test_a_bad_data_path_fails_in_one_line_writes_nothing_and_the_fix_runs(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    missing = one_line_error(run(train_cmd("vae", run_dir, tmp_path / "nope.h5")))
    assert "data.path=" in missing and "nope.h5: no such file" in missing
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not hdf5 at all" * 100)
    assert "not a readable HDF5 file" in one_line_error(run(train_cmd("vae", run_dir, garbage)))
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(tiny_h5.read_bytes()[: tiny_h5.stat().st_size // 2])
    assert "truncated.h5" in one_line_error(run(train_cmd("vae", run_dir, truncated)))
    assert not run_dir.exists()  # nothing written: no config.yaml, run.json or checkpoints/
    out = train("vae", run_dir, tiny_h5, "train.max_steps=2")
    assert "saved last.pt at step 2" in out.stdout


def test_a_bad_vae_checkpoint_blocks_no_corrected_rerun(tmp_path, tiny_h5, tiny_vae, tiny_ldm):
    run_dir = tmp_path / "ldm"
    error = one_line_error(run(train_cmd("ldm", run_dir, tiny_h5, f"ldm.vae_ckpt={tmp_path / 'none'}")))
    assert "ldm.vae_ckpt=" in error and "no checkpoint found" in error
    wrong_stage = one_line_error(run(train_cmd("ldm", run_dir, tiny_h5, f"ldm.vae_ckpt={tiny_ldm}")))
    assert "this is the ldm stage's checkpoint; the vae stage's is needed" in wrong_stage
    assert not run_dir.exists()
    train("ldm", run_dir, tiny_h5, f"ldm.vae_ckpt={tiny_vae}", "train.max_steps=2")


def test_a_run_dir_without_checkpoints_takes_a_new_config_and_records_it(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=2")
    for ckpt in (run_dir / "checkpoints").iterdir():
        ckpt.unlink()
    out = train("vae", run_dir, tiny_h5, "train.max_steps=2", "vae.kl_weight=0.5")
    assert "holds no checkpoint: starting at step 1 and removing" in out.stdout
    start = json.loads((run_dir / "run.json").read_text())["starts"][-1]
    assert {"key": "vae.kl_weight", "old": 1e-06, "new": 0.5} in start["config_replaced"]
    # The old run's TensorBoard events were purged: one curve, from the new run only.
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [1, 2]
    writers = {p.name.split(".")[-2] for p in (run_dir / "tb").glob("events.out.tfevents.*")}
    assert len(writers) == 1  # every event file left is the new process's (its pid)


# --- resume may change what steers the run -----------------------------------------------------------


def test_a_resume_may_lower_the_rate_and_records_the_change(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=2")
    out = train("vae", run_dir, tiny_h5, "train.max_steps=4", "train.lr=0.0005", "train.log_every=2")
    assert "from step 3: train.lr: 0.001 -> 0.0005" in out.stdout
    start = json.loads((run_dir / "run.json").read_text())["starts"][-1]
    assert start["from_step"] == 2
    assert {"key": "train.lr", "old": 0.001, "new": 0.0005} in start["config_changes"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["lr"] == 0.0005
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert "config/changes/text_summary" in events.Tags()["tensors"]
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert lrs[4] == pytest.approx(0.0005)
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["config"]["train"]["lr"] == 0.0005


def test_max_steps_below_the_checkpoint_says_so(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=4")
    out = train("vae", run_dir, tiny_h5, "train.max_steps=2")
    assert "already at step 4 (train.max_steps=2); nothing to do" in out.stdout


def test_a_fresh_run_prints_its_start_and_end(tmp_path, tiny_h5):
    out = train("vae", tmp_path / "run", tiny_h5, "train.max_steps=2")
    start = [line for line in out.stdout.splitlines() if "global batch" in line]
    assert start == [f"[oasis-ldm] vae: {tmp_path / 'run'} | global batch 4 (1 rank x 4) | steps 1..2"]
    assert out.stdout.strip().splitlines()[-1] == "[oasis-ldm] saved last.pt at step 2"


def test_help_shows_the_defaults():
    out = run(["python", "-m", "oasis_ldm.train", "--help"])
    assert out.returncode == 0 and "(default: oasis256)" in " ".join(out.stdout.split())


def test_a_gpu_job_whose_rank_sees_no_gpu_fails_in_one_line(tmp_path, tiny_h5):
    out = run(train_cmd("vae", tmp_path / "run", tiny_h5, "train.device=auto"), SLURM_JOB_GPUS="0")
    assert "SLURM gave this job GPUs (SLURM_JOB_GPUS=0) but torch sees no CUDA device" in one_line_error(out)


# --- one trainer per run directory --------------------------------------------------------------


def wait_for_lock(run_dir: Path, proc: subprocess.Popen, timeout: float = 60) -> dict:
    lock = run_dir / LOCK_NAME
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock.exists() and (run_dir / "run.json").exists():
            return json.loads(lock.read_text())
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail("the first trainer never took the lock")


def test_a_second_trainer_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    long_run = train_cmd("vae", run_dir, tiny_h5, "train.max_steps=100000", "train.ckpt_every=100000")
    first = subprocess.Popen(long_run, env=quiet_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        holder = wait_for_lock(run_dir, first)
        assert holder["pid"] == first.pid and holder["host"] == socket.gethostname()
        error = one_line_error(run(train_cmd("vae", run_dir, tiny_h5, "train.max_steps=2")))
        assert f"is in use by host {socket.gethostname()} pid {first.pid}" in error
        assert len(json.loads((run_dir / "run.json").read_text())["starts"]) == 1  # the refused start wrote nothing
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / LOCK_NAME).exists()  # SIGKILL left it behind
    out = train("vae", run_dir, tiny_h5, "train.max_steps=2")
    assert f"took over the lock of host {socket.gethostname()} pid {first.pid}: its process is gone" in out.stdout
    assert not (run_dir / LOCK_NAME).exists()  # released at the end


def write_lock(run_dir: Path, *, host: str, heartbeat_age: float, job: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = {"host": host, "pid": 1, "slurm_job_id": job, "started": now - 600, "heartbeat": now - heartbeat_age}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def test_a_lock_on_a_lost_node_or_of_the_same_requeued_job_blocks_nothing(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    write_lock(run_dir, host="lost-node", heartbeat_age=5)
    error = one_line_error(run(train_cmd("vae", run_dir, tiny_h5, "train.max_steps=1")))
    assert re.search(r"is in use by host lost-node pid 1 \(heartbeat \d+ s ago\)", error)
    write_lock(run_dir, host="lost-node", heartbeat_age=3600)
    out = train("vae", run_dir, tiny_h5, "train.max_steps=1")
    assert re.search(r"took over the lock of host lost-node pid 1: no heartbeat for 36\d\d s", out.stdout)
    write_lock(run_dir, host="other-node", heartbeat_age=1, job="4242")
    out = run(train_cmd("vae", run_dir, tiny_h5, "train.max_steps=2"), SLURM_JOB_ID="4242")
    assert out.returncode == 0, out.stderr
    assert "SLURM job 4242: it is this SLURM job's earlier run (requeued)" in out.stdout


def test_the_holder_keeps_its_heartbeat(tmp_path):
    from oasis_ldm.train import lock as lock_module

    held = lock_module.RunLock(tmp_path)
    old = lock_module.HEARTBEAT_S
    lock_module.HEARTBEAT_S = 0.05
    try:
        held.acquire()
        first = json.loads((tmp_path / LOCK_NAME).read_text())["heartbeat"]
        time.sleep(0.3)
        later = json.loads((tmp_path / LOCK_NAME).read_text())
        assert later["heartbeat"] > first and later["pid"] == os.getpid()
    finally:
        held.release()
        lock_module.HEARTBEAT_S = old
    assert not (tmp_path / LOCK_NAME).exists()
