"""Process-group set-up from the environment, and the few collectives the project needs.

One entry point for every way a job is started: torchrun and the submitit launchers export
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain `srun python -m oasis_ldm.train` provides
SLURM_PROCID/SLURM_NTASKS instead; anything else is a single process with no process group.
NCCL serves CUDA devices and gloo the CPU. Work is split by global rank, never by local rank.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host() -> str:
    """The job's first node name: the rendezvous host for a plain `srun` launch."""
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    cmd = ["scontrol", "show", "hostnames", nodelist]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def _export_from_slurm() -> None:
    """Translate `srun`'s task variables into torch's env:// variables."""
    os.environ.setdefault("RANK", os.environ["SLURM_PROCID"])
    os.environ.setdefault("WORLD_SIZE", os.environ["SLURM_NTASKS"])
    os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    if "MASTER_ADDR" not in os.environ:
        os.environ["MASTER_ADDR"] = _first_slurm_host()
    # A port derived from the job id lets every task agree on it without talking first.
    os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))


class DeviceError(RuntimeError):
    """This rank cannot use the device the job asked for; the message is one line."""


GPU_ID_VARIABLES = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS")  # lists of GPU indices, e.g. "0,1"
GPU_COUNT_VARIABLE = "SLURM_GPUS_ON_NODE"


def slurm_gave_gpus(environ: dict[str, str] | None = None) -> str | None:
    """`NAME=value` of the SLURM variable saying this job has GPUs, or None."""
    env = os.environ if environ is None else environ
    for name in GPU_ID_VARIABLES:
        value = env.get(name, "").strip()
        if value and value != "(null)":
            return f"{name}={value}"
    count = env.get(GPU_COUNT_VARIABLE, "").strip()
    if count.isdigit() and int(count) > 0:
        return f"{GPU_COUNT_VARIABLE}={count}"
    return None


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """The rank's device. `auto` means CUDA where torch sees it; a rank of a SLURM GPU job that
    sees none fails here rather than joining on the CPU: one gloo rank among NCCL ranks hangs."""
    if preference == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        given = slurm_gave_gpus()
        if preference == "auto" and given is None:
            return torch.device("cpu")
        why = f"SLURM gave this job GPUs ({given})" if given else "train.device=cuda"
        seen = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
        raise DeviceError(
            f"{why} but torch sees no CUDA device (CUDA_VISIBLE_DEVICES={seen}, "
            f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
        )
    # SLURM shows a task either its own GPU or all of the node's: index by local rank when
    # several are visible.
    index = local_rank if torch.cuda.device_count() > local_rank else 0
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the job's process group (or run alone) and pick this rank's device."""
    launched_by_srun = "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and launched_by_srun:
        _export_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_min),
            device_id=dev if dev.type == "cuda" else None,
        )
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_max(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks: any rank raising a flag raises it everywhere."""
    if dist.is_initialized():
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= dist.get_world_size()
    return values


def broadcast(value: torch.Tensor, src: int = 0) -> torch.Tensor:
    if dist.is_initialized():
        dist.broadcast(value, src=src)
    return value


def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the current CUDA device under NCCL."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_rank0(decide: Callable[[], T]) -> T:
    """Run `decide` on rank 0 only and give every rank its result, or raise its error on every rank.

    For decisions all ranks must share (which checkpoint to resume, whether a cache exists):
    each rank deciding for itself can disagree after a read glitch on one node.
    """
    if not dist.is_initialized():
        return decide()
    box: list[object] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", decide())
        except Exception as e:  # handed to every rank, which raises it
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0, device=_collective_device())
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def broadcast_bytes(data: bytes | None) -> bytes:
    """Rank 0's `data` on every rank (others pass None): one file read, shared."""
    if not dist.is_initialized():
        assert data is not None
        return data
    device = _collective_device()
    size = torch.tensor([len(data) if data is not None else 0], dtype=torch.int64, device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() == 0:
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(device)
    else:
        buffer = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.broadcast(buffer, src=0)
    return data if dist.get_rank() == 0 else bytes(buffer.cpu().numpy())


class PeerError(RuntimeError):
    """Another rank failed; its own log says why."""


def on_every_rank(work: Callable[[], T]) -> T:
    """Run `work` on every rank; if it fails anywhere, raise everywhere instead of hanging apart.

    The failing rank raises its own error, the others a PeerError.
    """
    try:
        result, error = work(), None
    except Exception as e:
        result, error = None, e
    if not all_ok(error is None):
        raise error if error is not None else PeerError("another rank failed to start; see its log")
    return result


def all_ok(ok: bool) -> bool:
    """True on every rank when `ok` is true on every rank: ranks fail together, never hang apart."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=_collective_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return float(flag.item()) == 0.0
