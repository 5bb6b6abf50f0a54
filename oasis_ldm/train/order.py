"""Data order and per-step randomness that do not depend on how many ranks run the job.

Every epoch is one seeded permutation of the split, cut into global micro-batches of
`world_size * batch_size` rows; rank r takes rows r, r + W, r + 2W, ... of each one, which
is exactly what `DistributedSampler` would hand it. Random numbers follow the same rule:
they are drawn for the step's whole batch (all micro-batches, all ranks) from a generator
seeded by (seed, step, purpose) and each rank keeps the rows of its samples. So one process
with batch 4B, two with batch 2B, and two with batch B and two accumulation steps see the
same samples with the same noise, and a resumed run, which starts the sampler at its saved
position, replays the uninterrupted one exactly.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from oasis_ldm.seeding import derive_seed


class ResumableSampler(Sampler[int]):
    """This rank's indices of one epoch, optionally starting at a saved micro-batch."""

    def __init__(self, size: int, batch_size: int, rank: int, world_size: int, seed: int) -> None:
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.global_batch = batch_size * world_size
        if size < self.global_batch:
            raise ValueError(
                f"the split has {size} rows, fewer than one global batch "
                f"({world_size} ranks x train.batch_size={batch_size})"
            )
        self.epoch, self.start_batch = 0, 0

    def batches_per_epoch(self) -> int:
        return self.size // self.global_batch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, 0x5A3, self.epoch))
        order = torch.randperm(self.size, generator=gen)[: self.batches_per_epoch() * self.global_batch]
        mine = order[self.start_batch * self.global_batch :][self.rank :: self.world_size]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch() - self.start_batch) * self.batch_size


def step_rows(full: torch.Tensor, micro: int, accum: int, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of micro-batch `micro`, from a tensor drawn for the step's whole batch.

    The step's rows are ordered micro-batch first, then position r + W*j within it, which is
    how the sampler hands out samples: so the draw for a sample depends on where it sits in
    the step's global batch, not on how ranks and accumulation divide that batch.
    """
    per_micro = full.shape[0] // accum
    return full[micro * per_micro : (micro + 1) * per_micro][rank::world_size]
