"""Helpers for tests that run jobs on the project's SLURM test cluster.

`slurm/testcluster.sh up` boots a real two-node cluster (nodes n1 and n2, partition
`debug`) on this host, and `make test` boots it around the suite. Tests call
`require_cluster()` first: it fails (never skips) when the cluster is down, since a
skipped SLURM test would hide that the launchers were never exercised.

Functions shipped to jobs by submitit are pickled by cloudpickle; this module registers
itself to be pickled by value, so its job-side helpers (`describe_task`) run in a job
without `tests/` on the job's `sys.path`. A test module can do the same for its own
functions with `cloudpickle.register_pickle_by_value(sys.modules[__name__])`.
"""

from __future__ import annotations

import functools
import os
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTCLUSTER = REPO_ROOT / "slurm" / "testcluster.sh"
NODES = ("n1", "n2")
PARTITION = "debug"
# Job states that a job does not leave (a requeue aside).
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL"}
)
UNUSABLE_NODE_STATES = frozenset({"down", "drained", "draining", "fail", "failing", "inval", "unknown"})

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@functools.cache
def slurm_conf() -> str:
    """The cluster's slurm.conf, as `testcluster.sh env` names it (one source of truth)."""
    out = subprocess.run([str(TESTCLUSTER), "env"], check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and words[1].startswith("SLURM_CONF="):
            return words[1].split("=", 1)[1]
    raise RuntimeError(f"{TESTCLUSTER} env printed no SLURM_CONF: {out!r}")


def cluster_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """An environment for SLURM clients: `base` (default os.environ) plus SLURM_CONF and PATH."""
    env = dict(os.environ if base is None else base)
    env["SLURM_CONF"] = slurm_conf()
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join([*path, *(d for d in ("/usr/bin", "/usr/sbin") if d not in path)])
    return env


def run_slurm(args: list[str], timeout: float = 30) -> str:
    """Run a SLURM client command on the test cluster and return its stdout.

    Raises RuntimeError carrying the command's stderr, which is where SLURM explains itself.
    """
    proc = subprocess.run(args, env=cluster_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def node_states() -> dict[str, str]:
    """Each node's state as sinfo reports it (e.g. {'n1': 'idle', 'n2': 'mixed'})."""
    out = run_slurm(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10)
    return dict(line.split(maxsplit=1) for line in sorted(set(out.splitlines())) if line.strip())


def controller_address(conf_text: str) -> tuple[str, int]:
    """slurmctld's address and port from slurm.conf text (SlurmctldHost=name(addr))."""
    settings = dict(line.split("=", 1) for line in conf_text.splitlines() if "=" in line and not line.startswith("#"))
    host = settings.get("SlurmctldHost", "localhost").strip()
    if "(" in host:
        host = host.split("(", 1)[1].rstrip(")")
    return host, int(settings.get("SlurmctldPort", "6817").strip())


def cluster_problem() -> str | None:
    """Why the cluster cannot take jobs, or None when both nodes answer."""
    # Without the file SLURM's clients look for a controller in DNS, and without a
    # listening slurmctld they retry for ~10 s: check both directly first.
    conf = Path(slurm_conf())
    if not conf.is_file():
        return f"{conf} does not exist"
    host, port = controller_address(conf.read_text())
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as err:
        return f"no slurmctld on {host}:{port} ({err.strerror or err})"
    try:
        states = node_states()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return str(err)
    bad = {n: s for n, s in states.items() if s.split("+")[0].rstrip("*~#$@%!^-") in UNUSABLE_NODE_STATES}
    if sorted(states) != sorted(NODES) or bad:
        return f"nodes are {states}, expected {list(NODES)} up"
    return None


def require_cluster() -> dict[str, str]:
    """Fail the calling test unless the cluster is up; return the client environment.

    Also sets SLURM_CONF in os.environ, because submitit calls sbatch/sacct with the
    test process's own environment.
    """
    problem = cluster_problem()
    script = TESTCLUSTER.relative_to(REPO_ROOT)
    if problem is not None:
        pytest.fail(
            f"SLURM test cluster is not up ({problem}); start it with "
            f"`{script} install && {script} up` (`make test` does this)",
            pytrace=False,
        )
    os.environ["SLURM_CONF"] = slurm_conf()
    return cluster_env()


def sbatch(args: Iterable[str], timeout: float = 30) -> int:
    """Submit a batch job (sbatch flags and script or --wrap) and return its job id."""
    out = run_slurm(["sbatch", "--parsable", *args], timeout=timeout)
    return int(out.strip().split(";")[0])


def squeue_state(job_id: int) -> str | None:
    """The job's state while slurmctld still holds it (including recently ended jobs)."""
    try:
        out = run_slurm(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%T"], timeout=10)
    except RuntimeError:  # squeue errors out once the job is purged from memory
        return None
    lines = out.split()
    return lines[-1] if lines else None


def sacct_state(job_id: int) -> str | None:
    """The job allocation's state in accounting, or None while not yet recorded.

    This is what submitit polls; "CANCELLED by 0" is reduced to "CANCELLED".
    """
    out = run_slurm(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State"], timeout=10)
    lines = [line for line in out.splitlines() if line.strip()]
    return lines[-1].split()[0] if lines else None


def job_state(job_id: int) -> str | None:
    """The job's state from slurmctld, falling back to accounting."""
    return squeue_state(job_id) or sacct_state(job_id)


def wait_for_state(
    job_id: int,
    states: Iterable[str],
    timeout: float = 30,
    probe: Callable[[int], str | None] = job_state,
    poll_s: float = 0.2,
) -> str:
    """Poll until the job is in one of `states`; return that state.

    Raises TimeoutError naming the last state seen, and fails fast when the job
    finished in a state that was not asked for.
    """
    wanted = frozenset(states)
    deadline = time.monotonic() + timeout
    state = None
    while True:
        state = probe(job_id)
        if state in wanted:
            return state
        if state in FINISHED_STATES:
            raise AssertionError(f"job {job_id} ended {state}, waited for {sorted(wanted)}")
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"job {job_id} still {state} after {timeout}s, waited for {sorted(wanted)}; queue: {queue_summary()}"
            )
        time.sleep(poll_s)


def queue_summary() -> str:
    """Every job slurmctld holds, with its state and pending reason: why a job waits."""
    try:
        out = run_slurm(["squeue", "-h", "-t", "all", "-o", "%i %T %r %N"], timeout=10)
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        return f"(squeue failed: {err})"
    return "; ".join(line.strip() for line in out.splitlines() if line.strip()) or "(empty)"


def wait_until_idle(timeout: float = 30) -> dict[str, str]:
    """Wait until every node is idle (the previous test's jobs may still be completing)."""
    deadline = time.monotonic() + timeout
    while True:
        states = node_states()
        if set(states.values()) == {"idle"} or time.monotonic() > deadline:
            return states
        time.sleep(0.2)


def expand_hostlist(nodelist: str) -> list[str]:
    """Expand a SLURM hostlist such as 'n[1-2]' into ['n1', 'n2']."""
    return run_slurm(["scontrol", "show", "hostnames", nodelist], timeout=10).split()


def job_hosts(job_id: int) -> list[str]:
    """The nodes a job runs or ran on; [] while it is pending.

    slurmctld is asked first: accounting fills in a job's NodeList only some seconds
    after the job has ended (and shows a placeholder before), so sacct is only the
    fallback for jobs that slurmctld has already forgotten (MinJobAge).
    """
    try:
        nodelist = run_slurm(["squeue", "-h", "-t", "all", "-j", str(job_id), "-o", "%N"], timeout=10)
    except RuntimeError:  # purged from slurmctld's memory
        out = run_slurm(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "NodeList"], timeout=10)
        nodelist = out.splitlines()[-1] if out.strip() else ""
    nodelist = nodelist.strip()
    return expand_hostlist(nodelist) if nodelist and nodelist != "None assigned" else []


def cancel(job_id: int) -> None:
    """Cancel a job, ignoring a job that has already gone."""
    subprocess.run(["scancel", str(job_id)], env=cluster_env(), capture_output=True, timeout=30, check=False)


def describe_task() -> dict[str, Any]:
    """Run inside a submitit task: what that task sees of the job and of torch.distributed.

    Returns the submitit JobEnvironment view and the variables that
    TorchDistributedEnvironment().export() sets for `init_process_group("env://")`.
    """
    import submitit
    import submitit.helpers

    job_env = submitit.JobEnvironment()
    submitit.helpers.TorchDistributedEnvironment().export()
    torch_vars = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
    return {
        "job_id": job_env.job_id,
        "global_rank": job_env.global_rank,
        "local_rank": job_env.local_rank,
        "num_tasks": job_env.num_tasks,
        "num_nodes": job_env.num_nodes,
        "hostnames": list(job_env.hostnames),
        "node": os.environ.get("SLURMD_NODENAME"),
        "torch_env": {k: os.environ[k] for k in torch_vars},
    }
