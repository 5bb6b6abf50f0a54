"""Train on a SLURM cluster (or locally) with submitit; requeued jobs resume exactly.

    python launch/train.py --stage vae --config oasis256 --run-dir runs/vae256 \\
        --nodes 2 --gpus-per-node 4 --partition gpu --time 240
    python launch/train.py --stage all --config demo --run-dir runs/demo --cluster local --wait

On a time limit or a preemption SLURM sends SIGUSR2 `--signal-delay` seconds early; the
training loop finishes its step, writes RUN_DIR/checkpoints/last.pt, and hands the signal to
submitit, which calls `TrainJob.checkpoint` and requeues the same job id. The requeued job
runs the same callable, which resumes from last.pt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NamedTuple

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
    tasks_per_node,
    tidy_folder,
)

from oasis_ldm.config import Config, ConfigError, load_config, presets

# Cores a GPU task needs beyond its DataLoader workers: the training loop's own thread, the
# loader's pin-memory thread, NCCL's proxy thread, and one for torch's CPU-side work. A CPU
# job keeps SLURM's default (its threads are sized from what SLURM gives it).
GPU_TASK_THREADS = 4
CPUS_HELP = (
    f"CPU cores per task; default on GPU jobs: data.num_workers + {GPU_TASK_THREADS} (the loop, pin-memory "
    "and NCCL threads, one for torch), on CPU jobs: SLURM's"
)


class TrainJob:
    """One task of a training job; submitit pickles it (by value: it lives in __main__)."""

    def __init__(self, stage: str, config: str, overrides: list[str], run_dir: str) -> None:
        self.stage, self.config, self.overrides, self.run_dir = stage, config, overrides, run_dir

    def __call__(self) -> dict:
        import os
        import socket

        from oasis_ldm.config import load_config
        from oasis_ldm.train import train

        # Keep SLURM's CUDA_VISIBLE_DEVICES (this task's GPUs, or all of the node's): submitit's
        # default replaces it with the local rank, which on nodes without device cgroups is
        # another job's GPU. The library picks a visible device by local rank.
        dist_env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        step = train(self.stage, load_config(self.config, self.overrides, stage=self.stage), self.run_dir)
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        devices = os.environ.get("CUDA_VISIBLE_DEVICES")
        return {
            "rank": dist_env.rank,
            "world_size": dist_env.world_size,
            "node": node,
            "step": step,
            "devices": devices,
        }

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # last.pt is already on disk (the loop saved it before passing the signal on);
        # the requeued job runs this same callable and resumes from it.
        return submitit.helpers.DelayedSubmission(TrainJob(self.stage, self.config, self.overrides, self.run_dir))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Launch oasis-ldm training with submitit (SLURM, or local processes without it).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stage", required=True, choices=("vae", "ldm", "all"), help="all = vae, then ldm after it")
    p.add_argument("--config", default="oasis256", help=f"preset ({', '.join(presets())}) or YAML file")
    p.add_argument(
        "--run-dir", required=True, help="run directory; a bare name means runs/NAME (--stage all: vae/ and ldm/)"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    add_cluster_args(p, cpus_help=CPUS_HELP)
    return p.parse_args(argv)


def run_dir_of(arg: str) -> Path:
    path = Path(arg)
    return (path if len(path.parts) > 1 or path.is_absolute() else Path("runs") / path).resolve()


class Planned(NamedTuple):
    """One training job: its stage, run directory, overrides and resolved config."""

    stage: str
    run_dir: Path
    overrides: list[str]
    cfg: Config


def plan(args: argparse.Namespace) -> list[Planned]:
    """The jobs to submit, their configs resolved; `all` chains the ldm run to the vae run."""
    root = run_dir_of(args.run_dir)
    if args.stage == "all":
        vae_dir = root / "vae"
        jobs = [("vae", vae_dir, args.overrides), ("ldm", root / "ldm", [*args.overrides, f"ldm.vae_ckpt={vae_dir}"])]
    else:
        jobs = [(args.stage, root, args.overrides)]
    try:
        return [Planned(stage, d, o, load_config(args.config, o, stage=stage)) for stage, d, o in jobs]
    except ConfigError as e:
        fail(str(e))


def check_flags(args: argparse.Namespace, cluster: str) -> None:
    """Fail fast, before anything is queued, on flags the job would only trip over later."""
    if cluster != "slurm" and args.nodes != 1:
        fail(f"--nodes {args.nodes} needs --cluster slurm (local runs use one machine)")
    if cluster == "debug" and tasks_per_node(args) != 1:
        fail("--cluster debug runs one task in this process; use --cluster local for several")
    if not args.dry_run:
        check_local_gpus(args, cluster)


def check_starts(args: argparse.Namespace, jobs: list[Planned]) -> None:
    """The trainer's own start checks (config, data, autoencoder, run directory and its lock,
    world size), made here so that a start it would refuse is never queued and leaves nothing
    in its run directory. (The config was validated as it loaded, in `plan`.)"""
    from oasis_ldm.train.preflight import StartError, check_start  # imports torch: not for --help, --dry-run

    world_size = args.nodes * tasks_per_node(args)
    for job in jobs:
        try:
            check_start(job.stage, job.cfg, job.run_dir, vae_ready=not after_vae(args, job), world_size=world_size)
        except (StartError, ConfigError) as e:
            fail(str(e))


def after_vae(args: argparse.Namespace, job: Planned) -> bool:
    """Whether `job` is the ldm job of --stage all: it waits for, and encodes with, the vae job's
    autoencoder, which does not exist yet."""
    return args.stage == "all" and job.stage == "ldm"


def job_flags(args: argparse.Namespace, cfg: Config) -> argparse.Namespace:
    """The cluster flags of one job: --cpus-per-task's GPU default sized from its config."""
    cpus = args.cpus_per_task
    if cpus is None and args.gpus_per_node:
        cpus = cfg.data.num_workers + GPU_TASK_THREADS
    return argparse.Namespace(**{**vars(args), "cpus_per_task": cpus})


def dry_run(args: argparse.Namespace, jobs: list[Planned]) -> None:
    """Print the sbatch script of each job (flags and config are checked; files are not)."""
    for job in jobs:
        dependency = {"dependency": "afterok:<vae job id>"} if after_vae(args, job) else {}
        name = args.job_name or f"oasis-{job.stage}"
        print(f"# --- {job.stage}: {job.run_dir}")
        print(
            sbatch_script(
                job_flags(args, job.cfg), job.run_dir / "submitit" / "%j", name, collective=True, **dependency
            )
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = resolve_cluster(args)
    jobs = plan(args)
    check_flags(args, cluster)
    if args.dry_run:
        dry_run(args, jobs)
        return 0
    check_starts(args, jobs)
    # Local executors run here and know no dependencies: each stage waits for the one before.
    wait = args.wait or cluster != "slurm"
    previous = None
    for job in jobs:
        flags = job_flags(args, job.cfg)
        folder = job.run_dir / "submitit" / "%j"
        ex = make_executor(flags, folder, args.job_name or f"oasis-{job.stage}", cluster, collective=True)
        if previous is not None and cluster == "slurm":
            run_after(ex, args, previous.job_id)
        submitted = ex.submit(TrainJob(job.stage, args.config, job.overrides, str(job.run_dir)))
        describe([submitted], f"{job.stage} training")
        if job is jobs[0]:
            print(f"watch it with:  tensorboard --logdir {run_dir_of(args.run_dir)}")
        if wait:
            print(f"job {submitted.job_id} finished: {follow(submitted)}")
            tidy_folder(folder)  # a local job's controller makes it as the job starts
        previous = submitted
    return 0


if __name__ == "__main__":
    sys.exit(main())
