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

import submitit
from common import (
    add_cluster_args,
    describe,
    fail,
    follow,
    make_executor,
    resolve_cluster,
    run_after,
    sbatch_script,
    tasks_per_node,
)

from oasis_ldm.config import ConfigError, load_config, presets


class TrainJob:
    """One task of a training job; submitit pickles it (by value: it lives in __main__)."""

    def __init__(self, stage: str, config: str, overrides: list[str], run_dir: str) -> None:
        self.stage, self.config, self.overrides, self.run_dir = stage, config, overrides, run_dir

    def __call__(self) -> dict:
        import os
        import socket

        from oasis_ldm.config import load_config
        from oasis_ldm.train import train

        dist_env = submitit.helpers.TorchDistributedEnvironment().export(overwrite=True)
        step = train(self.stage, load_config(self.config, self.overrides, stage=self.stage), self.run_dir)
        node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
        return {"rank": dist_env.rank, "world_size": dist_env.world_size, "node": node, "step": step}

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
    add_cluster_args(p)
    return p.parse_args(argv)


def run_dir_of(arg: str) -> Path:
    path = Path(arg)
    return (path if len(path.parts) > 1 or path.is_absolute() else Path("runs") / path).resolve()


def plan(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    """(stage, run dir, overrides) per job; `all` chains the ldm run to the vae run."""
    root = run_dir_of(args.run_dir)
    if args.stage != "all":
        return [(args.stage, root, args.overrides)]
    vae_dir = root / "vae"
    return [("vae", vae_dir, args.overrides), ("ldm", root / "ldm", [*args.overrides, f"ldm.vae_ckpt={vae_dir}"])]


def check(args: argparse.Namespace, jobs: list[tuple[str, Path, list[str]]], cluster: str) -> None:
    """Fail fast, before anything is queued, on flags the job would only trip over later."""
    for stage, _, overrides in jobs:
        try:
            load_config(args.config, overrides, stage=stage)
        except ConfigError as e:
            fail(str(e))
    if cluster != "slurm" and args.nodes != 1:
        fail(f"--nodes {args.nodes} needs --cluster slurm (local runs use one machine)")
    if cluster == "debug" and tasks_per_node(args) != 1:
        fail("--cluster debug runs one task in this process; use --cluster local for several")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cluster = resolve_cluster(args)
    jobs = plan(args)
    check(args, jobs, cluster)
    if args.dry_run:
        for stage, run_dir, _ in jobs:
            dependency = {"dependency": "afterok:<vae job id>"} if stage == "ldm" and len(jobs) == 2 else {}
            print(f"# --- {stage}: {run_dir}")
            print(sbatch_script(args, run_dir / "submitit" / "%j", args.job_name or f"oasis-{stage}", **dependency))
        return 0
    # Local executors run here and know no dependencies: each stage waits for the one before.
    wait = args.wait or cluster != "slurm"
    previous = None
    for stage, run_dir, overrides in jobs:
        ex = make_executor(args, run_dir / "submitit" / "%j", args.job_name or f"oasis-{stage}", cluster)
        if previous is not None and cluster == "slurm":
            run_after(ex, args, previous.job_id)
        job = ex.submit(TrainJob(stage, args.config, overrides, str(run_dir)))
        describe([job], f"{stage} training")
        if stage == jobs[0][0]:
            print(f"watch it with:  tensorboard --logdir {run_dir_of(args.run_dir)}")
        if wait:
            print(f"job {job.job_id} finished: {follow(job)}")
        previous = job
    return 0


if __name__ == "__main__":
    sys.exit(main())
