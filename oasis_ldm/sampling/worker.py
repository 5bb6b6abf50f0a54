"""One sampling worker: its request flags, where it sits among the workers, and its shards.

Shared by `python -m oasis_ldm.sampling` (srun, job arrays, by hand) and the submitit
launcher launch/sample.py, so both make exactly the same shards from the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path

from oasis_ldm.diffusion import PRECISIONS
from oasis_ldm.distributed import pick_device
from oasis_ldm.loading import load_pipeline
from oasis_ldm.sampling.shards import SamplingParams, check_out, generate_shards, request_for, write_request


class WorkerError(ValueError):
    """This process cannot tell which share of the shards is its own."""


def _task_in_step(env: Mapping[str, str]) -> tuple[int, int]:
    """(task, tasks) inside one array task or job: a torchrun rank, an srun task, or alone.

    The batch script itself (no srun) is one process whatever --ntasks says: SLURM_PROCID is
    0 there and SLURM_NTASKS counts the tasks srun would start, so only a step's count is used.
    """
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
    return 0, 1


def _array_task(env: Mapping[str, str]) -> tuple[int, int]:
    """(index, count) of this SLURM array task, 0-based, for arrays A-B and A-B:S alike.

    SLURM exports an array's min, max and step but not its list: a list such as 0,3,7
    (reported as step 1) cannot be numbered 0, 1, 2 and is refused.
    """
    task, count = int(env["SLURM_ARRAY_TASK_ID"]), int(env["SLURM_ARRAY_TASK_COUNT"])
    low, step = int(env.get("SLURM_ARRAY_TASK_MIN", "0")), int(env.get("SLURM_ARRAY_TASK_STEP", "1"))
    high = int(env.get("SLURM_ARRAY_TASK_MAX", str(low + (count - 1) * step)))
    if step < 1 or low + (count - 1) * step != high or (task - low) % step:
        raise WorkerError(
            f"SLURM array {low}-{high} of {count} tasks is not evenly spaced (step {step}): "
            "submit --array=A-B or --array=A-B:S"
        )
    return (task - low) // step, count


def worker_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(worker, workers) of this process among all that share the request.

    In a job array each array task runs `tasks` processes (srun tasks or torchrun ranks), so
    worker = array_index x tasks + task of array_count x tasks; without an array it is the task.
    """
    env = os.environ if environ is None else environ
    task, tasks = _task_in_step(env)
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        index, count = _array_task(env)
        return index * tasks + task, count * tasks
    return task, tasks


def sample_worker(
    ckpt: str | Path, out: Path, params: SamplingParams, *, worker: int = 0, workers: int = 1, device: str = "auto"
) -> int:
    """Make worker `worker`'s missing or bad shards of the request; returns how many it made."""
    check_out(out)  # before the checkpoint is read: a wrong --out fails in a second
    # The launcher that started this process numbers it: torchrun's LOCAL_RANK wins over the
    # SLURM_LOCALID of the srun task torchrun runs in (which all of its workers share).
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")))
    pipe, meta = load_pipeline(ckpt, pick_device(device, local_rank))
    say_checkpoint(meta)
    req = request_for(meta, params)
    write_request(out, req)
    return generate_shards(pipe, req, out, worker, workers, progress=True)


def say_checkpoint(meta: dict) -> None:
    """Which checkpoint, and which step, is sampled (a damaged last.pt falls back, saying so)."""
    if meta.get("note"):
        print(f"warning: {meta['note']}", flush=True)
    print(f"sampling step {meta['step']} of {meta['path']}", flush=True)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to every option that has a default and does not state it itself
    (argparse's ArgumentDefaultsHelpFormatter also prints "(default: None)" for required flags)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or action.required or unset:  # `is`: a default of 0 is a default
            return text
        return f"{text} (default: %(default)s)"


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
    p.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="the U-Net's precision: bf16 autocast or fp32; the sampler state and the VAE decoder stay fp32 "
        "(default: the checkpoint's train.precision)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to sample")


def check_request_args(args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    for flag in ("num_samples", "steps", "batch_size", "shard_size"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not math.isfinite(args.eta) or args.eta < 0:
        p.error(f"--eta {args.eta}: must be a finite number >= 0")


def params_of(args: argparse.Namespace) -> SamplingParams:
    """The sampling parameters that `add_request_args` defines."""
    return SamplingParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingParams)})
