"""Cluster flags and the submitit executor, shared by launch/train.py and launch/sample.py.

Only the launching process uses this module; the submitted callables are defined in the
launch scripts themselves (submitit pickles them by value) and call the library directly.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import submitit


def add_cluster_args(p: argparse.ArgumentParser, cpus_help: str = "CPU cores per task (data workers + 1)") -> None:
    """The cluster flags; `cpus_help` lets a launcher that fills in --cpus-per-task say how."""
    g = p.add_argument_group("cluster")
    g.add_argument(
        "--cluster",
        choices=("auto", "slurm", "local", "debug"),
        default="auto",
        help="where to run: slurm, local subprocesses, or debug (in this process); auto = slurm where sbatch exists",
    )
    g.add_argument("--nodes", type=int, default=1, help="number of nodes")
    g.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (0 on CPU nodes)")
    g.add_argument(
        "--tasks-per-node", type=int, default=None, help="tasks (ranks) per node; default one per GPU, else 1"
    )
    g.add_argument("--cpus-per-task", type=int, default=None, help=cpus_help)
    g.add_argument("--mem", default=None, help="memory per node, SLURM syntax (e.g. 64G); default: the partition's")
    g.add_argument("--time", type=int, default=60, help="time limit per job in minutes")
    g.add_argument("--partition", default=None, help="SLURM partition")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="SLURM node constraint (features), e.g. a100")
    g.add_argument("--exclude", default=None, help="nodes to avoid, SLURM node list syntax")
    g.add_argument(
        "--slurm-extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any other sbatch option, passed through (repeatable), e.g. --slurm-extra reservation=mine",
    )
    g.add_argument(
        "--max-requeues",
        type=int,
        default=3,
        help="how many times a job that hits its time limit is requeued (preemptions are not counted)",
    )
    g.add_argument(
        "--signal-delay", type=int, default=120, help="seconds before the time limit that SIGUSR2 asks for a checkpoint"
    )
    g.add_argument("--job-name", default=None, help="SLURM job name (default: derived from the run)")
    g.add_argument("--dry-run", action="store_true", help="print the sbatch script that would be submitted and exit")
    g.add_argument("--wait", action="store_true", help="block until the job ends, streaming its log")


def fail(message: str) -> None:
    """One line on stderr and exit status 2, as argparse does for bad flags."""
    prog = Path(sys.argv[0]).name
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_cluster(args: argparse.Namespace) -> str:
    if args.dry_run:
        return "slurm"
    if args.cluster == "auto":
        return "slurm" if shutil.which("sbatch") else "local"
    if args.cluster == "slurm" and not shutil.which("sbatch"):
        fail("--cluster slurm: sbatch is not on PATH (try --cluster local)")
    return args.cluster


def check_local_gpus(args: argparse.Namespace, cluster: str) -> None:
    """Refuse GPUs a local run cannot have: without them its ranks would quietly run on the CPU."""
    if cluster == "slurm" or not args.gpus_per_node:
        return
    import torch  # not for --help or --dry-run

    found = torch.cuda.device_count()
    if found < args.gpus_per_node:
        fail(
            f"--gpus-per-node {args.gpus_per_node} --cluster {cluster}: this machine has {found} CUDA device(s) "
            "(for CPU ranks use --gpus-per-node 0 --tasks-per-node N)"
        )


def tidy_folder(folder: Path) -> None:
    """Remove the empty `%j` folder submitit leaves beside the jobs' own folders."""
    if folder.name == "%j":
        with contextlib.suppress(OSError):
            folder.rmdir()  # only while empty


def tasks_per_node(args: argparse.Namespace) -> int:
    return args.tasks_per_node or max(1, args.gpus_per_node)


def slurm_extra(args: argparse.Namespace) -> dict[str, str]:
    extra = {}
    for item in args.slurm_extra:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--slurm-extra {item!r}: expected KEY=VALUE")
        extra[key.strip().lstrip("-")] = value
    return extra


# srun arguments of jobs whose tasks meet in collectives (training): the first task to fail ends
# the step at once, as slurm/train.sbatch's srun does, instead of leaving the others waiting up
# to the collective timeout in a rendezvous or a broadcast for a rank that is gone.
COLLECTIVE_SRUN_ARGS = ("--kill-on-bad-exit=1",)


def executor_parameters(args: argparse.Namespace, name: str, collective: bool = False) -> dict[str, Any]:
    """submitit AutoExecutor parameters for the cluster flags (`collective`: see COLLECTIVE_SRUN_ARGS)."""
    params: dict[str, Any] = {
        "name": name,
        "nodes": args.nodes,
        "tasks_per_node": tasks_per_node(args),
        "timeout_min": args.time,
        "slurm_signal_delay_s": args.signal_delay,
    }
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    optional = {
        "slurm_mem": args.mem,
        "slurm_partition": args.partition,
        "slurm_account": args.account,
        "slurm_qos": args.qos,
        "slurm_constraint": args.constraint,
        "slurm_exclude": args.exclude,
    }
    params.update({k: v for k, v in optional.items() if v is not None})
    if collective:
        params["slurm_srun_args"] = list(COLLECTIVE_SRUN_ARGS)
    extra = slurm_extra(args)
    if extra:
        params["slurm_additional_parameters"] = extra
    return params


def make_executor(
    args: argparse.Namespace, folder: Path, name: str, cluster: str, collective: bool = False
) -> submitit.AutoExecutor:
    """An executor for `cluster`; SLURM-only flags are ignored by the local ones."""
    ex = submitit.AutoExecutor(folder=folder, cluster=cluster, slurm_max_num_timeout=args.max_requeues)
    params = executor_parameters(args, name, collective)
    if cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    ex.update_parameters(**params)
    return ex


class _ScriptOnly(submitit.SlurmExecutor):
    """A SLURM executor that only writes script text: it needs no srun (a laptop, a dry run)."""

    @classmethod
    def affinity(cls) -> int:
        return 2


def sbatch_script(
    args: argparse.Namespace, folder: Path, name: str, array: int | None = None, collective: bool = False, **extra: Any
) -> str:
    """The sbatch script submitit would submit for these flags (for --dry-run), on any machine."""
    # AutoExecutor and SlurmExecutor refuse to be built where srun is missing (a laptop, a dry
    # run), so translate the generic names with submitit's own table and use `_ScriptOnly`.
    ex = _ScriptOnly(folder=folder, max_num_timeout=args.max_requeues)
    names = submitit.SlurmExecutor._equivalence_dict()
    params = executor_parameters(args, name, collective)
    ex.update_parameters(**{names.get(k, k.removeprefix("slurm_")): v for k, v in params.items()}, **extra)
    if array:
        ex.parameters["map_count"] = array  # what submitit's map_array sets for a job array
    return ex._make_submission_file_text(ex._submitit_command_str, "dry-run")


def run_after(ex: submitit.AutoExecutor, args: argparse.Namespace, job_id: str) -> None:
    """Make `ex`'s next job start once `job_id` (a job, or a whole array) has succeeded.

    kill-on-invalid-dep: if that job fails, the dependent one is cancelled rather than left
    pending forever.
    """
    extra = {**slurm_extra(args), "kill-on-invalid-dep": "yes"}
    ex.update_parameters(slurm_dependency=f"afterok:{job_id}", slurm_additional_parameters=extra)


def describe(jobs: list[submitit.Job], what: str) -> None:
    for job in jobs:
        print(f"submitted {what}: job {job.job_id}")
        print(f"  log: {job.paths.stdout}")
        print(f"  err: {job.paths.stderr}")


def follow(job: submitit.Job, poll_s: float = 5.0) -> Any:
    """Block until `job` ends, printing new lines of its rank-0 log as they arrive."""
    printed = 0
    while not job.done():
        printed = _print_new(job.paths.stdout, printed)
        time.sleep(poll_s)
    _print_new(job.paths.stdout, printed)
    return job.results()


def _print_new(path: Path, printed: int) -> int:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return printed
    for line in lines[printed:]:
        print(f"  | {line}", flush=True)
    return len(lines)
