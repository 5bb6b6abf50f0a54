"""Data order that does not depend on how many ranks run the job.

`train.batch_size` is the global batch of one optimizer step (EDM's `--batch`). It is split
over the ranks and, where a rank's share is more than `train.micro_batch` (EDM's
`--batch-gpu`), into accumulation rounds: `BatchPlan`. Every epoch is one seeded permutation
of the split, cut into global batches; round k of a step is rows [k*B/R, (k+1)*B/R) of it,
and rank r takes rows r, r + W, r + 2W, ... of a round, as `DistributedSampler` would.
Random numbers follow the same layout (oasis_ldm/rng.py), so one process, two ranks, or two
ranks with two rounds each train the same model. The data position is counted in samples, so
a run resumed on another number of ranks continues where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch.utils.data import Sampler

from oasis_ldm.rng import epoch_order


class BatchError(ValueError):
    """The global batch cannot be split over this job's ranks; the message is one line."""


@dataclass(frozen=True)
class BatchPlan:
    """How one step's global batch is computed: `rounds` micro-batches of `micro` rows per rank."""

    global_batch: int
    world_size: int
    micro: int
    rounds: int

    @property
    def round_rows(self) -> int:
        """Rows of one accumulation round over all ranks."""
        return self.micro * self.world_size

    def describe(self) -> str:
        """E.g. `global batch 16 (2 ranks x 2 rounds x 4)`."""
        ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
        rounds = "" if self.rounds == 1 else f" x {self.rounds} rounds"
        return f"global batch {self.global_batch} ({ranks}{rounds} x {self.micro})"


def plan_batches(global_batch: int, world_size: int, micro_cap: int = 0) -> BatchPlan:
    """Split `global_batch` over `world_size` ranks, each computing at most `micro_cap` rows at once.

    The micro-batch is the largest divisor of a rank's share that fits the cap (0: no cap),
    so the rounds are a whole number and every round has the same rows on every rank.
    """
    if global_batch % world_size:
        raise BatchError(
            f"train.batch_size={global_batch} (the global batch) does not split over {world_size} ranks: "
            f"use a multiple of {world_size} or another number of ranks"
        )
    share = global_batch // world_size
    cap = share if micro_cap <= 0 else min(micro_cap, share)
    micro = max(d for d in range(1, cap + 1) if share % d == 0)
    return BatchPlan(global_batch, world_size, micro, share // micro)


class ResumableSampler(Sampler[int]):
    """This rank's indices of one epoch, optionally starting at a saved sample position."""

    def __init__(self, size: int, plan: BatchPlan, rank: int, seed: int) -> None:
        if size < plan.global_batch:
            raise BatchError(
                f"the split has {size} rows, fewer than one global batch (train.batch_size={plan.global_batch})"
            )
        self.size, self.plan, self.rank, self.seed = size, plan, rank, seed
        self.epoch, self.start = 0, 0

    def steps_per_epoch(self) -> int:
        return self.size // self.plan.global_batch

    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch() * self.plan.global_batch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Start `epoch` at global sample `start_sample` (a step boundary)."""
        if start_sample % self.plan.round_rows:
            raise ValueError(f"sample position {start_sample} is not a round boundary ({self.plan.round_rows} rows)")
        self.epoch, self.start = epoch, start_sample

    def __iter__(self) -> Iterator[int]:
        order = epoch_order(self.size, self.seed, self.epoch)[self.start : self.samples_per_epoch()]
        rounds = order.view(-1, self.plan.round_rows)  # rows of each round, in order
        return iter(rounds[:, self.rank :: self.plan.world_size].flatten().tolist())

    def __len__(self) -> int:
        return (self.samples_per_epoch() - self.start) // self.plan.world_size
