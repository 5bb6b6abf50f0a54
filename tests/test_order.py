"""Data order and step randomness are the same for any number of ranks, and resumable."""

from __future__ import annotations

import torch

from oasis_ldm.train.order import ResumableSampler, global_randn


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


def test_global_noise_slices_are_the_single_process_rows():
    full = global_randn((6, 3), torch.Generator().manual_seed(5), 0, 1, torch.device("cpu"))
    halves = [global_randn((3, 3), torch.Generator().manual_seed(5), r, 2, torch.device("cpu")) for r in range(2)]
    assert torch.equal(full[0::2], halves[0]) and torch.equal(full[1::2], halves[1])
