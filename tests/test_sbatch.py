"""The plain sbatch scripts (slurm/*.sbatch) on the real two-node test cluster."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import slurm_cluster as sc
from conftest import REPO, TINY, quiet_env
from jobs import launch, read_samples, sample_args, saved_step, starts, wait_for

from oasis_ldm import checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def cpu_copy(script: str, folder: Path) -> str:
    """The script as shipped minus its GPU request: the test cluster's nodes have no GPUs."""
    text = (REPO / "slurm" / script).read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#SBATCH --gpus-per-node")]
    assert len(lines) == len(text.splitlines()) - 1
    (folder / script).write_text("\n".join(lines) + "\n")
    return str(folder / script)


def sbatch(env: dict[str, str], *args: str) -> str:
    """Submit with `env` (the job inherits it: the venv's python first on PATH); the job id."""
    cmd = ["sbatch", "--parsable", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=30, check=True)
    return out.stdout.strip().split(";")[0]


def test_train_sbatch_runs_ddp_over_two_nodes_and_requeues_itself(tmp_path, tiny_h5):
    env = quiet_env(**sc.require_cluster())
    run_dir = tmp_path / "run"
    train_args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), f"--set=data.path={tiny_h5}"]
    train_args += ["--set=train.max_steps=100000", "--set=train.ckpt_every=20", "--set=train.image_every=100000"]
    log = tmp_path / "train.log"
    job = sbatch(
        env,
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=1",
        f"--output={log}",
        "--chdir",
        str(REPO),
        cpu_copy("train.sbatch", tmp_path),
        *train_args,
    )
    try:
        wait_for(lambda: saved_step(run_dir) > 0, 120, "training to start")
        sc.run_slurm(["scancel", "--signal=USR2", job])
        wait_for(lambda: len(starts(run_dir)) == 2, 120, "the requeued start")
        resumed = wait_for(lambda: re.findall(r"resumed vae from step (\d+)", log.read_text()), 60, "the resume")
        wait_for(lambda: saved_step(run_dir) > int(resumed[0]), 120, "a checkpoint after the resume")
    finally:
        sc.cancel(int(job))
    # srun reports 143 after scancel as well: the script must tell a cancel from a SIGUSR2 stop.
    wait_for(lambda: "not requeueing" in log.read_text(), 60, "the script to see the cancel")
    assert sc.wait_for_state(int(job), {"CANCELLED"}, timeout=30, probe=sc.sacct_state) == "CANCELLED"
    assert sc.wait_until_idle(30) == {"n1": "idle", "n2": "idle"}
    assert sc.squeue_state(int(job)) in (None, "CANCELLED") and len(starts(run_dir)) == 2
    assert int(resumed[0]) > 0 and log.read_text().count("saved last.pt on SIGUSR2; requeueing") == 1
    assert {s["slurm_job_id"] for s in starts(run_dir)} == {job}
    assert {s["world_size"] for s in starts(run_dir)} == {2}
    assert checkpoint.load(run_dir / "checkpoints" / "last.pt")["world_size"] == 2


def test_sample_sbatch_array_then_merge_matches_a_local_run(tmp_path, tiny_ldm):
    """An array of 2 (ids 1 and 3: min and step count) x 2 srun tasks is 4 workers, 1 shard each."""
    env = quiet_env(**sc.require_cluster())
    out = tmp_path / "array"
    args = sample_args(tiny_ldm, out)  # 10 images in shards of 3: 4 shards
    script = cpu_copy("sample.sbatch", tmp_path)
    assert sc.wait_until_idle(60) == {"n1": "idle", "n2": "idle"}, "an earlier test left jobs running"
    tasks = ["--array=1-3:2", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out"]
    array = sbatch(env, *tasks, script, *args)
    merge_cmd = shlex.join(["python", "-m", "oasis_ldm.sampling", *args, "--merge-only"])
    after = [f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes"]  # a failed array ends the merge too
    merge = sbatch(env, *after, f"--output={tmp_path}/merge.out", "--wrap", merge_cmd)
    state = sc.wait_for_state(int(merge), {"COMPLETED", "CANCELLED", "FAILED"}, timeout=180, probe=sc.sacct_state)
    logs = "".join(p.read_text() for p in sorted(tmp_path.glob("*.out")))
    assert state == "COMPLETED", logs
    made_by = {}
    for shard in sorted((out / "shards").glob("shard_*.h5")):
        with h5py.File(shard, "r") as f:
            made_by[shard.name] = (int(f.attrs["worker"]), int(f.attrs["workers"]))
    assert made_by == {f"shard_{s:05d}.h5": (s, 4) for s in range(4)}, logs
    assert sorted(re.findall(r"worker (\d+)/4 .*: 1 of 1 shards to make", logs)) == ["0", "1", "2", "3"], logs
    launch("sample.py", *sample_args(tiny_ldm, tmp_path / "local"), "--cluster", "local", env=env)
    assert np.array_equal(read_samples(out)[0], read_samples(tmp_path / "local")[0])
