"""The submitit launchers against the real two-node SLURM test cluster (slurm/testcluster.sh)."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import slurm_cluster as sc
import submitit
from conftest import REPO, TINY, quiet_env
from jobs import job_ids, launch, read_samples, sample_args, saved_step, starts, wait_for

from oasis_ldm import checkpoint
from oasis_ldm.config import TrainConfig, from_dict
from oasis_ldm.models import build_vae

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


@pytest.fixture
def env() -> dict[str, str]:
    return quiet_env(**sc.require_cluster())


# --- training ---------------------------------------------------------------------------------


def test_train_runs_one_ddp_job_across_both_nodes(tmp_path, tiny_h5, env):
    run_dir = tmp_path / "run"
    args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), "--set", f"data.path={tiny_h5}"]
    # The GPUs SLURM gives a task reach it in CUDA_VISIBLE_DEVICES (here through sbatch's export
    # of this environment: the nodes have none): each rank must still see them after the
    # torch.distributed variables are exported, not its local rank in their place.
    env = {**env, "CUDA_VISIBLE_DEVICES": "2,3"}
    out = launch("train.py", *args, "--cluster", "slurm", "--nodes", "2", "--tasks-per-node", "1", "--wait", env=env)
    (job_id,) = job_ids(out, "vae training")
    assert f"tensorboard --logdir {run_dir}" in out
    results = submitit.SlurmJob(run_dir / "submitit" / "%j", job_id, tasks=(0, 1)).results()
    assert sorted((r["rank"], r["node"]) for r in results) == [(0, "n1"), (1, "n2")]
    assert [r["devices"] for r in results] == ["2,3", "2,3"]
    assert {r["world_size"] for r in results} == {2} and {r["step"] for r in results} == {6}
    saved = checkpoint.load(run_dir / "checkpoints" / "last.pt")
    assert saved["world_size"] == 2 and saved["step"] == 6
    build_vae(from_dict(saved["config"])).load_state_dict(saved["models"]["vae"])  # it loads


def test_preempted_job_is_requeued_and_resumes_until_max_requeues(tmp_path, tiny_h5, env):
    """SIGUSR2 (what SLURM sends before a time limit or a preemption) -> last.pt -> requeue -> resume."""
    run_dir = tmp_path / "run"
    sets = [f"data.path={tiny_h5}", "train.max_steps=100000", "train.ckpt_every=20", "train.image_every=100000"]
    args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), *(f"--set={s}" for s in sets)]
    # With --time under 10 minutes submitit counts every SIGUSR2 as a timeout: the cap applies.
    out = launch("train.py", *args, "--cluster", "slurm", "--time", "5", "--max-requeues", "1", env=env)
    (job_id,) = job_ids(out, "vae training")
    for attempt in (1, 2):
        wait_for(lambda a=attempt: len(starts(run_dir)) == a and saved_step(run_dir) > 0, 120, f"start {attempt}")
        before = saved_step(run_dir)
        sc.run_slurm(["scancel", "--signal=USR2", job_id])
        wait_for(lambda b=before: saved_step(run_dir) > b, 60, "the checkpoint written on SIGUSR2")
    # The first signal requeued the job under the same id; it resumed, not restarted.
    first, second = starts(run_dir)
    assert first["slurm_job_id"] == second["slurm_job_id"] == job_id
    log = (run_dir / "submitit" / job_id / f"{job_id}_0_log.out").read_text()
    resumed = [int(m) for m in re.findall(r"resumed vae from step (\d+)", log)]
    assert len(resumed) == 1 and resumed[0] > 0
    # The second signal exceeded --max-requeues 1: the job ends instead of coming back.
    state = sc.wait_for_state(int(job_id), {"FAILED", "COMPLETED", "CANCELLED"}, timeout=60, probe=sc.sacct_state)
    assert state == "FAILED"
    assert len(starts(run_dir)) == 2
    with pytest.raises(submitit.core.utils.UncompletedJobError, match="timed-out too many times"):
        submitit.SlurmJob(run_dir / "submitit" / "%j", job_id).result()


def test_time_limit_requeues_and_resumes(tmp_path, tiny_h5, env):
    """A real time limit: SLURM's own warning signal, a checkpoint, a requeue, a resume."""
    run_dir = tmp_path / "run"
    sets = [f"data.path={tiny_h5}", "train.max_steps=1000000", "train.ckpt_every=500", "train.image_every=1000000"]
    args = ["--stage", "vae", "--config", TINY, "--run-dir", str(run_dir), *(f"--set={s}" for s in sets)]
    out = launch("train.py", *args, "--cluster", "slurm", "--time", "2", "--signal-delay", "75", env=env)
    (job_id,) = job_ids(out, "vae training")
    try:
        wait_for(lambda: len(starts(run_dir)) == 2, 170, "the requeued start", poll=1)
        log = run_dir / "submitit" / job_id / f"{job_id}_0_log.out"
        found = wait_for(lambda: re.findall(r"resumed vae from step (\d+)", log.read_text()), 60, "the resume")
    finally:
        sc.cancel(int(job_id))
    assert int(found[0]) > 0 and "caught SIGUSR2" in log.read_text()


def test_stage_all_chains_ldm_after_vae(tmp_path, tiny_h5, env):
    root = tmp_path / "both"
    args = ["--stage", "all", "--config", TINY, "--run-dir", str(root), "--set", f"data.path={tiny_h5}"]
    out = launch("train.py", *args, "--set", "train.max_steps=3", "--cluster", "slurm", "--wait", env=env)
    (vae_job,), (ldm_job,) = job_ids(out, "vae training"), job_ids(out, "ldm training")
    assert int(ldm_job) > int(vae_job)
    ldm = checkpoint.load(root / "ldm" / "checkpoints" / "last.pt")
    assert Path(ldm["extra"]["vae_path"]) == (root / "vae" / "checkpoints" / "last.pt").resolve()
    script = (root / "ldm" / "submitit" / ldm_job / f"{ldm_job}_submission.sh").read_text()
    assert f"#SBATCH --dependency=afterok:{vae_job}" in script.splitlines()


# --- dry runs -----------------------------------------------------------------------------------


def test_dry_run_prints_the_sbatch_flags(tmp_path):
    flags = ["--partition", "gpu", "--account", "proj42", "--qos", "high", "--time", "90", "--nodes", "2"]
    flags += [
        "--gpus-per-node",
        "4",
        "--signal-delay",
        "100",
        "--constraint",
        "a100",
        "--slurm-extra",
        "reservation=r1",
    ]
    out = launch(
        "train.py",
        "--stage",
        "all",
        "--config",
        "demo",
        "--run-dir",
        str(tmp_path / "r"),
        *flags,
        "--dry-run",
        env=quiet_env(),
    )
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj42",
        "#SBATCH --qos=high",
        "#SBATCH --time=90",
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --signal=USR2@100",
        "#SBATCH --constraint=a100",
        "#SBATCH --reservation=r1",
        "#SBATCH --dependency='afterok:<vae job id>'",
    ]:
        assert line in out.splitlines(), line
    assert out.count("#!/bin/bash") == 2  # vae and ldm
    # GPU jobs get cores for the loader's workers (demo: none) plus 4; CPU jobs SLURM's default.
    assert out.splitlines().count("#SBATCH --cpus-per-task=4") == 2
    vae = ["--stage", "vae", "--config", "demo", "--run-dir", "r", "--dry-run"]
    assert "--cpus-per-task" not in launch("train.py", *vae, env=quiet_env())
    workers = launch("train.py", *vae, "--gpus-per-node", "1", "--set", "data.num_workers=6", env=quiet_env())
    assert "#SBATCH --cpus-per-task=10" in workers.splitlines()
    sample = launch(
        "sample.py",
        "--ckpt",
        "x",
        "--num-samples",
        "10",
        "--out",
        str(tmp_path / "s"),
        "--array",
        "3",
        "--dry-run",
        env=quiet_env(),
    )
    assert "#SBATCH --array=0-2%3" in sample.splitlines()


def test_bad_flags_fail_in_one_line(tmp_path):
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--stage", "vae", "--run-dir", str(tmp_path)]
    out = subprocess.run([*cmd, "--set", "train.bogus=1"], capture_output=True, text=True, env=quiet_env(), cwd=REPO)
    known = ", ".join(sorted(f.name for f in dataclasses.fields(TrainConfig)))
    assert out.returncode == 2
    assert out.stderr.strip() == f"train.py: error: --set: unknown key train.bogus (known: {known})"
    out = subprocess.run([*cmd, "--cluster", "local", "--nodes", "2"], capture_output=True, text=True, env=quiet_env())
    assert out.returncode == 2 and "--nodes 2 needs --cluster slurm" in out.stderr


@pytest.mark.parametrize(
    ("stage", "sets", "flags", "message"),
    [
        ("all", ["data.path={tmp}/missing.h5"], [], "data.path={tmp}/missing.h5: no such file"),
        ("ldm", ["data.path={data}", "ldm.vae_ckpt={tmp}/no_vae"], [], "ldm.vae_ckpt={tmp}/no_vae"),
        ("vae", ["data.path={data}"], ["--tasks-per-node", "3"], "does not split over 3 ranks"),
    ],
    ids=["missing-data", "missing-vae", "world-size"],
)
def test_a_start_the_trainer_would_refuse_is_never_submitted(tmp_path, tiny_h5, stage, sets, flags, message):
    """The launcher makes the trainer's start checks: one line, no job, nothing in the run dir."""
    run_dir = tmp_path / "run"
    values = {"tmp": tmp_path, "data": tiny_h5}
    args = ["--stage", stage, "--config", TINY, "--run-dir", str(run_dir), "--cluster", "local", *flags]
    args += [f"--set={s.format(**values)}" for s in sets]
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=120)
    assert out.returncode == 2, out.stdout + out.stderr
    assert len(out.stderr.splitlines()) == 1 and message.format(**values) in out.stderr, out.stderr
    assert "submitted" not in out.stdout and not run_dir.exists()


# --- sampling ---------------------------------------------------------------------------------------


def test_sampling_is_identical_for_one_process_two_tasks_and_an_array(tmp_path, tiny_ldm, env):
    launch("sample.py", *sample_args(tiny_ldm, tmp_path / "local"), "--cluster", "local", env=env)
    launch(
        "sample.py",
        *sample_args(tiny_ldm, tmp_path / "tasks"),
        "--cluster",
        "slurm",
        "--nodes",
        "2",
        "--tasks-per-node",
        "1",
        "--wait",
        env=env,
    )
    launch(
        "sample.py", *sample_args(tiny_ldm, tmp_path / "array"), "--cluster", "slurm", "--array", "3", "--wait", env=env
    )
    reference, seeds = read_samples(tmp_path / "local")
    assert reference.shape == (10, 32, 32) and reference.dtype == np.uint8 and len(set(seeds)) == 10
    for name in ("tasks", "array"):
        images, other_seeds = read_samples(tmp_path / name)
        assert np.array_equal(images, reference), name
        assert np.array_equal(other_seeds, seeds)
    npz = np.load(tmp_path / "array" / "samples.npz")["arr_0"]
    assert npz.shape == (10, 32, 32, 1) and np.array_equal(npz[..., 0], reference)
    assert (tmp_path / "array" / "grid.png").exists()
    with h5py.File(tmp_path / "array" / "samples.h5", "r") as f:
        assert f.attrs["checkpoint_sha256"] == checkpoint.file_sha256(tiny_ldm / "checkpoints" / "last.pt")
        assert f.attrs["sampler"] == "ddim" and f.attrs["steps"] == 5


def test_killed_sampling_reruns_only_the_missing_shards(tmp_path, tiny_ldm, env):
    out = tmp_path / "s"
    args = [*sample_args(tiny_ldm, out, n=60), "--shard-size", "1", "--sampler", "ddpm"]
    stdout = launch("sample.py", *args, "--cluster", "slurm", env=env)
    (job_id,) = job_ids(stdout, "sampling")
    shards = out / "shards"
    wait_for(lambda: shards.exists() and len(list(shards.glob("shard_*.h5"))) >= 2, 120, "the first shards")
    sc.cancel(int(job_id))
    # SLURM sends SIGTERM (which submitit ignores) and SIGKILL KillWait=5 s later: wait for it.
    wait_for(lambda: sc.sacct_state(int(job_id)) == "CANCELLED", 30, "the cancelled state")
    time.sleep(7)
    before = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.h5")}
    assert 2 <= len(before) < 60, "the job finished before it could be killed: make it slower"
    time.sleep(1)
    assert len(list(shards.glob("shard_*.h5"))) == len(before), "the job is still writing"
    stdout = launch("sample.py", *args, "--cluster", "slurm", "--wait", env=env)
    assert f"{len(before)} of 60 shards already done; {60 - len(before)} to make" in stdout
    after = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard_*.h5")}
    assert len(after) == 60 and all(after[name] == t for name, t in before.items())
    assert not list(shards.glob(".*"))  # no temporary file of a killed write is left
    ref_args = [*sample_args(tiny_ldm, tmp_path / "ref", n=60), "--shard-size", "1", "--sampler", "ddpm"]
    launch("sample.py", *ref_args, "--cluster", "local", env=env)
    assert np.array_equal(read_samples(out)[0], read_samples(tmp_path / "ref")[0])


def test_sampling_refuses_a_vae_checkpoint(tmp_path, tiny_vae):
    cmd = [sys.executable, str(REPO / "launch" / "sample.py"), *sample_args(tiny_vae, tmp_path / "s")]
    out = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO)
    assert out.returncode == 2
    assert out.stderr.strip().endswith("this is the vae stage's checkpoint; the ldm stage's is needed")
