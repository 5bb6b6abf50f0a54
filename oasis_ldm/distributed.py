"""Process-group set-up from the environment, and the few collectives the project needs.

One entry point for every way a job is started: torchrun and the submitit launchers export
RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; a plain `srun python -m oasis_ldm.train` provides
SLURM_PROCID/SLURM_NTASKS instead; anything else is a single process with no process group
(unless OASIS_GROUP_OF_ONE=1 asks for one: bench/gpu_check.py runs NCCL and DDP on one GPU).
NCCL serves CUDA devices and gloo the CPU. Work is split by global rank, never by local rank.

Start-up: the ranks meet in a rendezvous bounded by `STARTUP_TIMEOUT_S`, so a rank that failed
before joining (a DeviceError, say) ends the others within minutes even where srun does not
kill them (the launchers pass --kill-on-bad-exit, which ends them at once). They then tell
each other which GPUs they see, and each takes one no other rank of its node took.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
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
    grouped: bool = False  # a process group exists (always when world_size > 1)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the models are wrapped in DDP: any process group, even of one rank."""
        return self.world_size > 1 or self.grouped


STARTUP_TIMEOUT_S = 300.0  # the rendezvous: every rank must have joined by then
GROUP_OF_ONE = "OASIS_GROUP_OF_ONE"  # "1": one rank still makes a process group and uses DDP


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


def device_kind(preference: str = "auto") -> str:
    """This rank's kind of device, "cuda" or "cpu". `auto` means CUDA where torch sees it; a rank
    of a SLURM GPU job that sees none fails here rather than joining on the CPU: one gloo rank
    among NCCL ranks hangs."""
    if preference == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    given = slurm_gave_gpus()
    if preference == "auto" and given is None:
        return "cpu"
    why = f"SLURM gave this job GPUs ({given})" if given else "train.device=cuda"
    raise DeviceError(
        f"{why} but torch sees no CUDA device (CUDA_VISIBLE_DEVICES={_visible_variable()}, "
        f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
    )


def _visible_variable() -> str:
    return os.environ.get("CUDA_VISIBLE_DEVICES", "unset")


def _use_gpu(index: int) -> torch.device:
    """Make CUDA device `index` this process's own (set once: CUDA 12 makes a context on it)."""
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """The device of a process that meets no others (sampling, evaluation, one trainer).

    SLURM shows a task its own GPU, all of the node's, or (--gpu-bind=closest) those near its
    CPUs, which its node's tasks share in the order of their local ranks (block distribution,
    SLURM's default): local rank modulo the visible count covers all three. Trainers of a
    process group map exactly instead (`assign_gpus`).
    """
    if device_kind(preference) == "cpu":
        return torch.device("cpu")
    return _use_gpu(local_rank % torch.cuda.device_count())


@dataclass(frozen=True)
class GpuView:
    """What one rank sees: where it runs and which GPUs, by UUID, in its CUDA index order."""

    rank: int
    host: str
    local_rank: int
    gpus: tuple[str, ...]
    visible: str  # its CUDA_VISIBLE_DEVICES, for the messages
    kind: str = "cuda"  # or "cpu": all ranks must agree (one gloo rank among NCCL ranks hangs)


def visible_gpus() -> tuple[str, ...]:
    """This process's CUDA devices by UUID (one GPU has one UUID however a task numbers it),
    without making a CUDA context on any of them."""
    ids = []
    for i in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(i), "uuid", None)
        ids.append(str(uuid) if uuid is not None else f"index {i}")
    return tuple(ids)


def assign_gpus(views: list[GpuView]) -> dict[int, int]:
    """Each rank's CUDA index (-1 on CPUs): the ranks of a node, in local-rank order, each take
    the first GPU they see that no rank before them took, as SLURM hands its GPUs out. Every
    rank computes the same table, so a rank left without a GPU of its own fails on every rank,
    in one line naming what it sees (NCCL would fail later with "Duplicate GPU detected"), and
    so do ranks of a job that would mix CUDA and CPU ranks (mixed backends hang)."""
    kinds = {kind: sorted(v.rank for v in views if v.kind == kind) for kind in {v.kind for v in views}}
    if len(kinds) > 1:
        raise DeviceError(
            f"ranks {kinds['cuda']} see a CUDA device and ranks {kinds['cpu']} none: every rank of a job must "
            "use the same kind of device (set train.device=cuda to make the CPU ranks say why)"
        )
    if "cpu" in kinds:
        return {v.rank: -1 for v in views}
    taken: dict[str, dict[str, int]] = {}
    index = {}
    for v in sorted(views, key=lambda v: (v.host, v.local_rank, v.rank)):
        users = taken.setdefault(v.host, {})
        free = [i for i, gpu in enumerate(v.gpus) if gpu not in users]
        if not free:
            others = sorted({users[g] for g in v.gpus})
            raise DeviceError(
                f"rank {v.rank} (LOCAL_RANK={v.local_rank}) on {v.host} sees {len(v.gpus)} GPU(s) "
                f"(CUDA_VISIBLE_DEVICES={v.visible}), all taken by ranks {others}: run one task per GPU "
                "(--tasks-per-node equal to --gpus-per-node)"
            )
        users[v.gpus[free[0]]] = v.rank
        index[v.rank] = free[0]
    return index


class PeerError(RuntimeError):
    """Another rank failed; its own log says why."""


def _rendezvous(rank: int, world_size: int) -> dist.Store:
    """The job's store, once every rank has joined it (within STARTUP_TIMEOUT_S)."""
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    timeout = datetime.timedelta(seconds=STARTUP_TIMEOUT_S)
    try:
        store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    except dist.DistStoreError:  # rank 0, waiting for the others
        raise PeerError(
            f"rank {rank} of {world_size}: not every rank joined at {where} within {STARTUP_TIMEOUT_S:.0f} s; "
            "a rank that failed to start says why in its log"
        ) from None
    except dist.DistNetworkError:  # another rank, waiting for rank 0
        raise PeerError(
            f"rank {rank} of {world_size}: could not reach rank 0 at {where} within {STARTUP_TIMEOUT_S:.0f} s "
            "(if it failed to start, its log says why; else check MASTER_ADDR and MASTER_PORT)"
        ) from None
    except dist.DistError as e:
        reason = " ".join(str(e).split())
        raise PeerError(f"rank {rank} of {world_size}: the rendezvous at {where} failed ({reason[:200]})") from None
    return store


def _share_views(store: dist.Store, view: GpuView, world_size: int) -> list[GpuView]:
    """Every rank's GpuView, exchanged through the rendezvous store (torchrun's agent keeps its
    store across restarts of the workers: each attempt has its own keys)."""
    prefix = f"oasis/gpus/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.set(f"{prefix}/{view.rank}", json.dumps(asdict(view)))
    views = []
    for r in range(world_size):
        fields = json.loads(store.get(f"{prefix}/{r}"))
        views.append(GpuView(**{**fields, "gpus": tuple(fields["gpus"])}))
    return views


def init_distributed(device: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the job's process group (or run alone) and pick this rank's device."""
    launched_by_srun = "SLURM_PROCID" in os.environ and "SLURM_STEP_ID" in os.environ
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1 and launched_by_srun:
        _export_from_slurm()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    wants_group = world_size > 1 or os.environ.get(GROUP_OF_ONE) == "1"
    if not wants_group or dist.is_initialized():
        dev = pick_device(device, local_rank)
        return DistEnv(rank, world_size, local_rank, dev, grouped=dist.is_initialized())
    kind = device_kind(device)  # a DeviceError here leaves before joining: the others stop at the rendezvous
    store = _rendezvous(rank, world_size)
    gpus = visible_gpus() if kind == "cuda" else ()
    view = GpuView(rank, socket.gethostname(), local_rank, gpus, _visible_variable(), kind)
    index = assign_gpus(_share_views(store, view, world_size))[rank]
    dev = _use_gpu(index) if kind == "cuda" else torch.device("cpu")
    timeout = datetime.timedelta(minutes=timeout_min)
    dist.init_process_group(
        backend="nccl" if kind == "cuda" else "gloo",
        store=dist.PrefixStore("default_pg", store),  # as init_method="env://" would wrap it
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=dev if kind == "cuda" else None,
    )
    store.set_timeout(timeout)  # joined: from now on the collectives' own timeout rules
    return DistEnv(rank, world_size, local_rank, dev, grouped=True)


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


def read_on_rank0(read: Callable[[], tuple[T, bytes]]) -> tuple[T, bytes]:
    """`read()` run on rank 0 alone, its (value, bytes) given to every rank: one read of shared
    storage per job, the same bytes everywhere; a failed read raises on every rank."""
    mine: list[bytes] = []

    def decide() -> T:
        value, data = read()
        mine.append(data)
        return value

    value = on_rank0(decide)
    return value, broadcast_bytes(mine[0] if mine else None)


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
