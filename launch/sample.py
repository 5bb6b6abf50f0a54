"""Generate samples from an ldm checkpoint on a SLURM cluster (or locally) with submitit.

    python launch/sample.py --ckpt runs/demo/ldm --num-samples 10000 --out samples/demo \\
        --nodes 2 --gpus-per-node 4 --partition gpu
    python launch/sample.py --ckpt runs/demo/ldm --num-samples 10000 --out samples/demo \\
        --array 16 --gpus-per-node 1 --partition gpu

Either one job of many tasks (--nodes/--tasks-per-node) or a job array of K one-task jobs
(--array K, each on one GPU when --gpus-per-node is given) makes the shards; a last step
merges them into OUT/samples.h5, samples.npz and grid.png (on SLURM a small job that starts
once the others succeeded). Image i always comes from seed (--seed, i), so the result is
the same however the work was split, and rerunning the same command after a failure makes
only the missing shards. A paired model's samples (data.masks) carry their masks: /masks in
samples.h5, `masks` in samples.npz, beside each slice in grid.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import submitit
from common import (
    add_cluster_args,
    check_local_gpus,
    describe,
    fail,
    follow,
    make_executor,
    resolve_cluster,
    run_after,
    sbatch_script,
    tidy_folder,
)

from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.loading import read_checkpoint
from oasis_ldm.outputs import OutputError
from oasis_ldm.sampling.shards import (
    BadRequest,
    Request,
    RequestMismatch,
    SamplingParams,
    ShardError,
    check_out,
    report_bad,
    request_for,
    write_request,
)
from oasis_ldm.sampling.worker import (
    DefaultsHelpFormatter,
    add_request_args,
    check_request_args,
    params_of,
    say_checkpoint,
)


class SampleJob:
    """One task of a sampling job: a task of a multi-task job, or (with `task`) an array task."""

    def __init__(self, ckpt: str, out: str, params: SamplingParams, device: str, array_size: int | None = None):
        self.ckpt, self.out, self.params, self.device, self.array_size = ckpt, out, params, device, array_size

    def __call__(self, task: int | None = None) -> dict:
        import os
        import socket

        import torch

        from oasis_ldm.sampling.worker import sample_worker
        from oasis_ldm.threads import configure_threads

        configure_threads()  # torch would start one thread per core of the node, not of the task
        if self.array_size is None:
            env = submitit.JobEnvironment()
            worker, workers = env.global_rank, env.num_tasks
        else:
            worker, workers = task, self.array_size
        out = Path(self.out)
        made = sample_worker(self.ckpt, out, self.params, worker=worker, workers=workers, device=self.device)
        node, threads = os.environ.get("SLURMD_NODENAME", socket.gethostname()), torch.get_num_threads()
        return {"worker": worker, "workers": workers, "node": node, "shards_made": made, "threads": threads}

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # Finished shards are on disk; the requeued task makes only the missing ones.
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def merge_job(out: str) -> str:
    from oasis_ldm.sampling.shards import merge

    return str(merge(Path(out)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Launch sharded, seeded sampling with submitit (SLURM, or local processes without it).",
        formatter_class=DefaultsHelpFormatter,
    )
    add_request_args(p)
    p.add_argument(
        "--array",
        type=int,
        default=None,
        metavar="K",
        help="split the work over a job array of K one-task jobs (one GPU each with --gpus-per-node)",
    )
    add_cluster_args(p)
    args = p.parse_args(argv)
    check_request_args(args, p)
    if args.array is not None and args.array < 1:
        p.error("--array must be >= 1")
    return args


def checkpoint_meta(ckpt: str) -> dict:
    """Fail before queueing anything if --ckpt is not an ldm checkpoint; say which step is sampled."""
    try:
        meta = read_checkpoint(ckpt, "ldm")[1]
    except CheckpointError as e:
        fail(f"--ckpt {e}")
    say_checkpoint(meta)
    return meta


def array_task_flags(args: argparse.Namespace) -> argparse.Namespace:
    """The cluster flags of one array task: one task on one node, with one GPU of its own when
    the job asks for GPUs (--gpus-per-node N would reserve N and use one)."""
    one_task = copy.copy(args)
    one_task.nodes, one_task.tasks_per_node = 1, 1
    one_task.gpus_per_node = min(args.gpus_per_node, 1)
    return one_task


def submit_workers(args: argparse.Namespace, out: Path, cluster: str) -> list[submitit.Job]:
    ckpt, params = str(Path(args.ckpt).resolve()), params_of(args)
    if args.array:
        one_task = array_task_flags(args)
        ex = make_executor(one_task, out / "submitit" / "%j", args.job_name or "oasis-sample", cluster)
        job = SampleJob(ckpt, str(out), params, args.device, array_size=args.array)
        return ex.map_array(job, list(range(args.array)))
    ex = make_executor(args, out / "submitit" / "%j", args.job_name or "oasis-sample", cluster)
    return [ex.submit(SampleJob(ckpt, str(out), params, args.device))]


def submit_merge(args: argparse.Namespace, out: Path, cluster: str, after: list[submitit.Job]) -> submitit.Job:
    """A one-task job that merges the shards once every worker job has succeeded."""
    small = copy.copy(args)
    small.nodes, small.tasks_per_node, small.gpus_per_node, small.cpus_per_task = 1, 1, 0, None
    ex = make_executor(small, out / "submitit" / "%j", args.job_name or "oasis-merge", cluster)
    run_after(ex, args, after[0].job_id.split("_")[0])  # the array's id covers all of its tasks
    return ex.submit(merge_job, str(out))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = resolve_cluster(args)
    out = args.out.resolve()
    flags = array_task_flags(args) if args.array else args
    if args.array and args.gpus_per_node > 1:
        print(f"--array: each of the {args.array} array tasks is one task on 1 GPU (not {args.gpus_per_node})")
    if args.dry_run:
        print(sbatch_script(flags, out / "submitit" / "%j", args.job_name or "oasis-sample", array=args.array))
        return 0
    check_local_gpus(args, cluster)
    try:
        check_out(out)
        req = request_for(checkpoint_meta(args.ckpt), params_of(args))
        write_request(out, req)
    except (RequestMismatch, BadRequest) as e:
        fail(str(e))
    try:
        return run(args, out, req, cluster)
    except (ShardError, OutputError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        print(
            "sample.py: interrupted; the finished shards are kept: rerun the same command to make the rest",
            file=sys.stderr,
        )
        return 130


def run(args: argparse.Namespace, out: Path, req: Request, cluster: str) -> int:
    """Submit the workers (and on SLURM the merge) of a written request; merge here otherwise."""
    todo = report_bad(req, out, range(req.num_shards))  # the workers remake the bad ones too
    print(f"{req.num_shards - len(todo)} of {req.num_shards} shards already done; {len(todo)} to make")
    if not todo:
        print(f"wrote {merge_job(str(out))}")
        return 0
    jobs = submit_workers(args, out, cluster)
    describe(jobs, "sampling")
    if cluster == "slurm":
        merge = submit_merge(args, out, cluster, jobs)
        describe([merge], "merge")
        if args.wait:
            for job in [*jobs, merge]:
                print(f"job {job.job_id} finished: {follow(job)}")
        return 0
    for job in jobs:  # local executors: wait here, then merge here
        print(f"job {job.job_id} finished: {follow(job)}")
    tidy_folder(out / "submitit" / "%j")  # a local job's controller makes it as the job starts
    print(f"wrote {merge_job(str(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
