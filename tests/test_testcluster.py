"""The SLURM test cluster behaves like a real two-node cluster: the launchers' tests rely on it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import slurm_cluster as sc
import submitit

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _cluster() -> None:
    sc.require_cluster()


def _srun_nodes(*args: str) -> dict[int, str]:
    """Run `srun -l <args> printenv SLURMD_NODENAME`; map each task rank to its node."""
    out = sc.run_slurm(["srun", "-l", *args, "printenv", "SLURMD_NODENAME"])
    pairs = (line.split(":", 1) for line in out.splitlines() if line.strip())
    return {int(rank): node.strip() for rank, node in pairs}


def test_two_idle_nodes_in_default_partition() -> None:
    assert sc.wait_until_idle() == {"n1": "idle", "n2": "idle"}
    assert sc.run_slurm(["sinfo", "-h", "-o", "%P %D"]).split() == ["debug*", "2"]


def test_srun_spans_both_nodes() -> None:
    assert _srun_nodes("-N2") == {0: "n1", 1: "n2"}


def test_two_tasks_fit_on_one_node() -> None:
    ranks = _srun_nodes("-N1", "-n2")
    assert sorted(ranks) == [0, 1]
    assert len(set(ranks.values())) == 1
    assert set(ranks.values()) <= set(sc.NODES)


def test_sacct_records_completed_and_failed_jobs(tmp_path: Path) -> None:
    out = tmp_path / "ok.out"
    ok = sc.sbatch(["-o", str(out), "--wrap", "echo hello from $SLURMD_NODENAME"])
    bad = sc.sbatch(["-o", "/dev/null", "--wrap", "exit 3"])
    assert sc.wait_for_state(ok, {"COMPLETED"}, probe=sc.sacct_state) == "COMPLETED"
    assert sc.wait_for_state(bad, {"FAILED"}, probe=sc.sacct_state) == "FAILED"
    exit_code = sc.run_slurm(["sacct", "-n", "-X", "-P", "-j", str(bad), "-o", "ExitCode"]).strip()
    assert exit_code == "3:0"
    hosts = sc.job_hosts(ok)
    assert len(hosts) == 1 and hosts[0] in sc.NODES
    assert out.read_text().strip() == f"hello from {hosts[0]}"


def _wait_done(job: submitit.Job, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            sc.cancel(int(job.job_id))
            pytest.fail(f"submitit job {job.job_id} not done after {timeout}s (state {job.state})")
        time.sleep(0.5)


def test_submitit_two_node_job_sees_both_nodes(tmp_path: Path) -> None:
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(nodes=2, tasks_per_node=1, timeout_min=5)
    job = executor.submit(sc.describe_task)
    _wait_done(job, timeout=60)
    tasks = sorted(job.results(), key=lambda task: task["global_rank"])

    assert [t["global_rank"] for t in tasks] == [0, 1]
    assert [t["node"] for t in tasks] == ["n1", "n2"]
    assert sc.job_hosts(int(job.job_id)) == ["n1", "n2"]
    ports = set()
    for task in tasks:
        assert task["hostnames"] == ["n1", "n2"]
        assert (task["num_tasks"], task["num_nodes"], task["local_rank"]) == (2, 2, 0)
        torch_env = task["torch_env"]
        assert torch_env["MASTER_ADDR"] == "n1"
        assert torch_env["WORLD_SIZE"] == "2"
        assert torch_env["RANK"] == str(task["global_rank"])
        ports.add(torch_env["MASTER_PORT"])
    assert len(ports) == 1  # every rank must meet at the same rendezvous port


@pytest.mark.slow
def test_requeue_restarts_same_job_id(record_property: pytest.RecordProperty) -> None:
    job_id = sc.sbatch(["-o", "/dev/null", "--wrap", "sleep 300"])
    try:
        sc.wait_for_state(job_id, {"RUNNING"}, timeout=30)
        start = time.monotonic()
        sc.run_slurm(["scontrol", "requeue", str(job_id)])
        sc.wait_for_state(job_id, {"PENDING"}, timeout=10, poll_s=0.1)
        sc.wait_for_state(job_id, {"RUNNING"}, timeout=30)
        elapsed = time.monotonic() - start
        record_property("requeue_to_running_s", round(elapsed, 1))
        print(f"requeued job {job_id} running again after {elapsed:.1f}s")
        assert elapsed < 25
        details = sc.run_slurm(["scontrol", "show", "job", str(job_id)])
        assert "Restarts=1" in details.split()
    finally:
        sc.cancel(job_id)


def test_client_environment_names_the_cluster_config() -> None:
    env = sc.cluster_env({"PATH": "/bin"})
    assert Path(env["SLURM_CONF"]).is_file()
    assert env["PATH"].split(":")[0] == "/bin"
    out = subprocess.run(["scontrol", "show", "config"], env=env, capture_output=True, text=True, check=True).stdout
    config = dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)
    config = {key.strip(): value.strip() for key, value in config.items()}
    assert config["SLURM_CONF"] == env["SLURM_CONF"]
    assert config["MULTIPLE_SLURMD"] == "Yes"  # what lets two slurmd share this host


def test_require_cluster_fails_loudly_without_a_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "OASIS_SLURM_DIR": str(tmp_path / "no-cluster"), "PYTHONPATH": str(sc.REPO_ROOT / "tests")}
    env.pop("SLURM_CONF", None)
    proc = subprocess.run(
        [sys.executable, "-c", "import slurm_cluster; slurm_cluster.require_cluster()"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "SLURM test cluster is not up" in proc.stderr
    assert "slurm/testcluster.sh" in proc.stderr
