"""One sampling worker: its request flags, where it sits among the workers, and its shards.

Shared by `python -m oasis_ldm.sampling` (srun, job arrays, by hand) and the submitit
launcher launch/sample.py, so both make exactly the same shards from the same flags.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from oasis_ldm.distributed import pick_device
from oasis_ldm.sampling.pipeline import load_pipeline
from oasis_ldm.sampling.shards import generate_shards, request_for, write_request


def worker_from_env() -> tuple[int, int]:
    """(worker, workers): a SLURM array task, a task of `srun`, a torchrun rank, or alone."""
    pairs = [
        ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
        ("SLURM_PROCID", "SLURM_NTASKS"),
        ("RANK", "WORLD_SIZE"),
    ]
    for index, count in pairs:
        if index in os.environ and count in os.environ:
            return int(os.environ[index]), int(os.environ[count])
    return 0, 1


def sample_worker(
    ckpt: str | Path,
    out: Path,
    *,
    num_samples: int,
    seed: int = 0,
    sampler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    batch_size: int = 32,
    shard_size: int = 256,
    worker: int = 0,
    workers: int = 1,
    device: str = "auto",
) -> int:
    """Make worker `worker`'s missing shards of the request; returns how many it made."""
    local_rank = int(os.environ.get("SLURM_LOCALID", os.environ.get("LOCAL_RANK", "0")))
    pipe, meta = load_pipeline(ckpt, pick_device(device, local_rank))
    req = request_for(
        meta,
        num_samples=num_samples,
        seed=seed,
        sampler=sampler,
        steps=steps,
        eta=eta,
        batch_size=batch_size,
        shard_size=shard_size,
    )
    write_request(out, req)
    return generate_shards(pipe, req, out, worker, workers, progress=True)


def add_request_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="an ldm run directory or checkpoint file")
    p.add_argument("--num-samples", type=int, required=True, help="how many images")
    p.add_argument("--out", required=True, type=Path, help="output folder (shards/, samples.h5, samples.npz, grid.png)")
    p.add_argument("--seed", type=int, default=0, help="image i is drawn from seed (seed, i)")
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="reverse process")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always takes all of them)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--shard-size", type=int, default=256, help="images per shard file (the unit of rerun)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to sample")


def check_request_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    for flag in ("num_samples", "steps", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.eta < 0:
        p.error("--eta must be >= 0")


def request_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of `sample_worker` that `add_request_args` defines (but ckpt/out)."""
    keys = ("num_samples", "seed", "sampler", "steps", "eta", "batch_size", "shard_size", "device")
    return {k: getattr(args, k) for k in keys}
