"""Data order and step randomness are the same for any number of ranks, and resumable."""

from __future__ import annotations

import torch

from oasis_ldm.train.order import ResumableSampler, step_rows


def test_ranks_together_see_exactly_the_single_process_batches():
    single = list(ResumableSampler(50, batch_size=8, rank=0, world_size=1, seed=3))
    per_rank = [list(ResumableSampler(50, batch_size=4, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 48 and all(len(p) == 24 for p in per_rank)
    for b in range(6):  # global batch b: rows r, r + 2, ... belong to rank r
        merged = [None] * 8
        merged[0::2], merged[1::2] = per_rank[0][4 * b : 4 * b + 4], per_rank[1][4 * b : 4 * b + 4]
        assert merged == single[8 * b : 8 * b + 8]


def test_epochs_differ_and_a_start_position_skips_whole_batches():
    s = ResumableSampler(50, batch_size=4, rank=1, world_size=2, seed=3)
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(0)
    assert list(s) != epoch1
    s.set_epoch(1, start_batch=2)
    assert list(s) == epoch1[2 * 4 :] and len(s) == len(epoch1) - 8


def test_a_sample_draws_the_same_numbers_however_the_step_is_split():
    """(ranks, accumulation) = (1, 1) with batch 8, (2, 1) with 4, (2, 2) with 2: same rows."""
    full = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    single = step_rows(full, micro=0, accum=1, rank=0, world_size=1)
    sampler_rows = list(ResumableSampler(64, batch_size=8, rank=0, world_size=1, seed=1))[:8]
    for world, accum in [(2, 1), (2, 2), (1, 4)]:
        batch = 8 // (world * accum)
        samplers = [iter(ResumableSampler(64, batch, rank=r, world_size=world, seed=1)) for r in range(world)]
        for micro in range(accum):
            for rank in range(world):
                rows = [next(samplers[rank]) for _ in range(batch)]
                noise = step_rows(full, micro, accum, rank, world)
                for row, values in zip(rows, noise, strict=True):  # the noise follows the sample
                    assert torch.equal(values, single[sampler_rows.index(row)])
