"""Stopping a training run on a signal: one Ctrl-C, and a SIGUSR2 requeue under KillOnBadExit.

Under KillOnBadExit=1 (a cluster setting, or `srun --kill-on-bad-exit`, which srun also takes
from SLURM_KILL_BAD_EXIT in the environment a job inherits) the first rank to leave with a
non-zero status ends every other rank of the step. After the SIGUSR2 save only rank 0 requeues
a submitit job, so no rank may leave before rank 0's requeue is done.

On the test cluster's idle controller `scontrol requeue` answers in about 10 ms, sooner than a
rank that leaves at once has its exit reported (about 2 s here), so the race is never lost
there; on a busy controller the call takes seconds. The test hands the job an `scontrol` that
answers requeue requests 3 s late: srun's SIGTERM to the step then reaches it mid-call, as it
does on a real cluster, through the real submitit, srun and SLURM code.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import slurm_cluster as sc
from conftest import REPO, TINY, quiet_env, train_cmd
from jobs import job_ids, launch, saved_step, starts, wait_for

pytestmark = pytest.mark.slow


def slow_requeue_path(folder: Path, delay_s: float) -> str:
    """A folder holding an `scontrol` that waits `delay_s` before a requeue: a busy controller."""
    folder.mkdir()
    shim = folder / "scontrol"
    real = shutil.which("scontrol", path=sc.cluster_env()["PATH"])
    shim.write_text(f'#!/bin/sh\n[ "$1" = requeue ] && sleep {delay_s}\nexec {real} "$@"\n')
    shim.chmod(0o755)
    return str(folder)


def requeued(job_id: int, run_dir: Path) -> bool:
    """Whether the job started again; fails at once when it ended instead, with rank 0's last error."""
    if len(starts(run_dir)) >= 2:
        return True
    state = sc.job_state(job_id)
    if state in sc.FINISHED_STATES:
        err = run_dir / "submitit" / str(job_id) / f"{job_id}_0_log.err"
        last = err.read_text().strip().splitlines()[-3:] if err.exists() else []
        pytest.fail(f"job {job_id} ended {state} instead of being requeued: {' | '.join(last)}")
    return False


@pytest.mark.slurm
def test_two_node_job_requeues_and_resumes_under_kill_on_bad_exit(tmp_path, tiny_h5):
    env = quiet_env(**sc.require_cluster(), SLURM_KILL_BAD_EXIT="1")
    env["PATH"] = f"{slow_requeue_path(tmp_path / 'bin', 3)}:{env['PATH']}"  # the job inherits PATH
    run_dir = tmp_path / "run"
    sets = [f"data.path={tiny_h5}", "train.max_steps=100000", "train.ckpt_every=20", "train.image_every=100000"]
    args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), *(f"--set={s}" for s in sets)]
    # --time 60: a SIGUSR2 this early is a preemption for submitit, not a timeout.
    cluster = ["--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--time", "60"]
    (job_id,) = job_ids(launch("train.py", *args, *cluster, env=env), "vae training")
    logs = [run_dir / "submitit" / job_id / f"{job_id}_{rank}_log.out" for rank in (0, 1)]
    try:
        wait_for(lambda: len(starts(run_dir)) == 1 and saved_step(run_dir) > 0, 120, "training to start")
        before = saved_step(run_dir)
        sc.run_slurm(["scancel", "--signal=USR2", job_id])
        wait_for(lambda: requeued(int(job_id), run_dir), 120, "the requeued start")
        resumed = wait_for(lambda: re.findall(r"resumed vae from step (\d+)", logs[0].read_text()), 60, "the resume")
        wait_for(lambda: saved_step(run_dir) > int(resumed[0]), 120, "a checkpoint after the resume")
    finally:
        sc.cancel(int(job_id))
    assert int(resumed[0]) > before
    assert {s["slurm_job_id"] for s in starts(run_dir)} == {job_id}
    assert {s["world_size"] for s in starts(run_dir)} == {2}
    assert "Requeued job" in logs[0].read_text()


def test_one_ctrl_c_saves_and_exits_130_without_a_traceback(tmp_path, tiny_h5):
    """Ctrl-C finishes the step, writes last.pt, and leaves with 130 as a shell expects."""
    run_dir = tmp_path / "run"
    sets = ["train.max_steps=100000", "train.ckpt_every=100000", "train.image_every=100000"]
    cmd = train_cmd("vae", run_dir, tiny_h5, *sets)
    env = quiet_env(PYTHONUNBUFFERED="1")
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO) as proc:
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
                break
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(err.splitlines()) <= 1, err
    assert saved_step(run_dir) >= 3 and "caught SIGINT" in out
