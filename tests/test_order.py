"""Data order and step randomness are the same for any number of ranks, and resumable."""

from __future__ import annotations

import pytest
import torch

from oasis_ldm.rng import step_rows
from oasis_ldm.train.order import BatchError, ResumableSampler, plan_batches


def sampler(size: int, global_batch: int, world: int, rank: int, micro: int = 0, seed: int = 3) -> ResumableSampler:
    return ResumableSampler(size, plan_batches(global_batch, world, micro), rank, seed)


def test_ranks_together_see_exactly_the_single_process_batches():
    single = list(sampler(50, 8, world=1, rank=0))
    per_rank = [list(sampler(50, 8, world=2, rank=r)) for r in range(2)]
    assert len(single) == 48 and all(len(p) == 24 for p in per_rank)
    for b in range(6):  # global batch b: rows r, r + 2, ... belong to rank r
        merged = [None] * 8
        merged[0::2], merged[1::2] = per_rank[0][4 * b : 4 * b + 4], per_rank[1][4 * b : 4 * b + 4]
        assert merged == single[8 * b : 8 * b + 8]


def test_epochs_differ_and_a_start_position_skips_whole_steps():
    s = sampler(50, 8, world=2, rank=1)
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(0)
    assert list(s) != epoch1
    s.set_epoch(1, start_sample=16)  # two global batches in: this rank skips 2 x 4 of its rows
    assert list(s) == epoch1[2 * 4 :] and len(s) == len(epoch1) - 8


def test_a_resume_on_another_world_size_continues_the_same_sample_sequence():
    """The position is in samples: 1 rank for 2 steps, then 2 ranks, sees the 1-rank order."""
    single = list(sampler(64, 8, world=1, rank=0))
    halves = [sampler(64, 8, world=2, rank=r) for r in range(2)]
    for s in halves:
        s.set_epoch(0, start_sample=16)
    rest = [list(s) for s in halves]
    for b in range(6):
        merged = [None] * 8
        merged[0::2], merged[1::2] = rest[0][4 * b : 4 * b + 4], rest[1][4 * b : 4 * b + 4]
        assert merged == single[16 + 8 * b : 16 + 8 * b + 8]


def test_the_plan_splits_the_global_batch_and_refuses_what_does_not_split():
    assert plan_batches(16, 1) == plan_batches(16, 1, 0)
    plan = plan_batches(16, 2, micro_cap=3)  # share 8: the largest divisor <= 3 is 2
    assert (plan.micro, plan.rounds, plan.round_rows) == (2, 4, 4)
    assert plan_batches(16, 4, micro_cap=100).rounds == 1
    with pytest.raises(BatchError, match=r"train.batch_size=4 \(the global batch\) does not split over 3 ranks"):
        plan_batches(4, 3)


def test_a_sample_draws_the_same_numbers_however_the_step_is_split():
    """(ranks, rounds) = (1, 1), (2, 1), (2, 2), (1, 4) for a global batch of 8: same rows."""
    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    single = step_rows(full, micro=0, accum=1, rank=0, world_size=1)
    sampler_rows = list(sampler(64, 8, world=1, rank=0, seed=1))[:8]
    for world, accum in [(2, 1), (2, 2), (1, 4)]:
        micro = 8 // (world * accum)
        samplers = [iter(sampler(64, 8, world=world, rank=r, micro=micro, seed=1)) for r in range(world)]
        for m in range(accum):
            for rank in range(world):
                rows = [next(samplers[rank]) for _ in range(micro)]
                noise = step_rows(full, m, accum, rank, world)
                for row, values in zip(rows, noise, strict=True):  # the noise follows the sample
                    assert torch.equal(values, single[sampler_rows.index(row)])
