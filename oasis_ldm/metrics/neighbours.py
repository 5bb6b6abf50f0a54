"""Memorisation and diversity checks: nearest training slice by SSIM, pairwise MS-SSIM.

Memorisation: a sample whose SSIM to some training slice is near 1 is a copy, not a new
brain. `nearest_training_ssim` finds, for every sample, the training slice with the
highest SSIM and reports that SSIM and the slice's position in the training stream (the
caller maps position -> case_id / slice_idx). The course threshold is "SSIM > 0.6".

Exact search costs one SSIM per (sample, training slice) pair (10k x 9.7k at 256 px is
far too many), so by default it runs in two streaming passes over the training set:
  1. prefilter: images are area-downsampled to ``prefilter_size`` px and the ``top_k``
     training slices nearest in L2 on those thumbnails are kept per sample;
  2. exact: SSIM (full resolution, `oasis_ldm.metrics.image.ssim` conventions) is computed
     only against those candidates, and the best one wins.
The prefilter is a heuristic: a slice with the best SSIM but not among the ``top_k``
nearest thumbnails is missed (an exact copy never is: its thumbnail distance is 0).
``top_k=None`` compares against every slice in one pass, for small sets or audits.
Memory is bounded by one training batch plus (N, top_k) candidates; the training set is
never held whole.

Diversity: mean pairwise MS-SSIM within a set (lower = more varied). Compare a sample
set's value with that of an equal-size random subset of real slices, computed the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from oasis_ldm.metrics.image import as_unit, ieee_float32, ms_ssim, ssim

MEMORISATION_THRESHOLD = 0.6
PREFILTER_SIZE = 32  # px of the area-downsampled copies the prefilter compares
PAIR_BATCH = 256  # SSIM pairs evaluated at once: the search's working memory
TrainSource = Any  # Tensor | np.ndarray | h5py.Dataset | Callable[[], Iterable[Tensor | np.ndarray]]


@dataclass
class NeighbourResult:
    """Per-sample best SSIM to the training set and the position of that training slice."""

    ssim: Tensor  # (N,) float32
    index: Tensor  # (N,) int64, position in the training stream

    def summary(self, threshold: float = MEMORISATION_THRESHOLD) -> dict[str, float]:
        return summarise_neighbour_ssim(self.ssim, threshold)


def summarise_neighbour_ssim(best: Tensor, threshold: float = MEMORISATION_THRESHOLD) -> dict[str, float]:
    """{"mean", "p10", "p50", "p90", "frac_above", "threshold", "n"} of per-sample best SSIMs."""
    x = best.detach().double().cpu()
    q = torch.quantile(x, x.new_tensor([0.1, 0.5, 0.9])).tolist()
    return {
        "mean": float(x.mean()),
        "p10": q[0],
        "p50": q[1],
        "p90": q[2],
        "frac_above": float((x > threshold).double().mean()),
        "threshold": threshold,
        "n": x.numel(),
    }


def _batch_factory(train: TrainSource, batch_size: int) -> Callable[[], Iterable[Tensor]]:
    """A zero-argument function yielding training batches as tensors, callable once per pass."""
    if callable(train) and not isinstance(train, Tensor | np.ndarray):
        return lambda: (torch.as_tensor(np.asarray(b)) if not isinstance(b, Tensor) else b for b in train())

    def sliced() -> Iterable[Tensor]:
        for start in range(0, len(train), batch_size):
            chunk = train[start : start + batch_size]
            yield chunk if isinstance(chunk, Tensor) else torch.as_tensor(np.asarray(chunk))

    return sliced


def _thumbnails(images: Tensor, size: int, device: torch.device) -> Tensor:
    """Area-downsampled, flattened [0, 1] images: (B, size * size)."""
    x = as_unit(images.to(device))
    if min(x.shape[-2:]) > size:
        x = F.adaptive_avg_pool2d(x, (size, size))
    return x.flatten(1)


@ieee_float32()  # cdist runs as a matmul: TF32 there could reorder the candidates
def _prefilter(
    samples: Tensor, batches: Iterable[Tensor], top_k: int, size: int, device: torch.device, progress: bool
) -> Tensor:
    """Pass 1: (N, k) training positions nearest to each sample in thumbnail L2."""
    s = torch.cat([_thumbnails(c, size, device) for c in samples.split(256)])
    best_d = s.new_empty((s.shape[0], 0))
    best_i = torch.empty((s.shape[0], 0), dtype=torch.long, device=device)
    offset = 0
    for batch in tqdm(batches, desc="neighbours: prefilter", disable=not progress, unit="batch"):
        t = _thumbnails(batch, size, device)
        d = torch.cat([best_d, torch.cdist(s, t)], 1)
        i = torch.cat([best_i, torch.arange(offset, offset + t.shape[0], device=device).expand(s.shape[0], -1)], 1)
        best_d, pos = d.topk(min(top_k, d.shape[1]), dim=1, largest=False)
        best_i = i.gather(1, pos)
        offset += t.shape[0]
    if offset == 0:
        raise ValueError("the training set is empty")
    return best_i


def _candidate_ssim(
    samples: Tensor, batches: Iterable[Tensor], cand: Tensor, pair_batch: int, device: torch.device, progress: bool
) -> Tensor:
    """Pass 2: exact SSIM of every (sample, candidate) pair, as an (N, k) tensor."""
    out = torch.full(cand.shape, -torch.inf, device=device)
    offset = 0
    for batch in tqdm(batches, desc="neighbours: exact ssim", disable=not progress, unit="batch"):
        lo, hi = offset, offset + batch.shape[0]
        offset = hi
        rows, cols = ((cand >= lo) & (cand < hi)).nonzero(as_tuple=True)
        if rows.numel() == 0:
            continue
        train = batch.to(device)
        for r, c in zip(rows.split(pair_batch), cols.split(pair_batch), strict=True):
            out[r, c] = ssim(train[cand[r, c] - lo], samples[r.cpu()].to(device))
    return out


def _exhaustive_ssim(
    samples: Tensor, batches: Iterable[Tensor], pair_batch: int, device: torch.device, progress: bool
) -> tuple[Tensor, Tensor]:
    """One pass, SSIM against every training slice; running best per sample."""
    n = samples.shape[0]
    best = torch.full((n,), -torch.inf, device=device)
    index = torch.full((n,), -1, dtype=torch.long, device=device)
    offset = 0
    for batch in tqdm(batches, desc="neighbours: exact ssim", disable=not progress, unit="batch"):
        train = batch.to(device)
        per_chunk = max(1, pair_batch // train.shape[0])
        for start in range(0, n, per_chunk):
            fake = samples[start : start + per_chunk].to(device)
            m = fake.shape[0]
            tiled = train.repeat(m, *([1] * (train.dim() - 1)))  # train slices, once per sample
            values = ssim(tiled, fake.repeat_interleave(train.shape[0], 0))
            top, arg = values.view(m, train.shape[0]).max(1)
            better = top > best[start : start + m]
            best[start : start + m] = torch.where(better, top, best[start : start + m])
            index[start : start + m] = torch.where(better, arg + offset, index[start : start + m])
        offset += train.shape[0]
    return best, index


@torch.no_grad()
def nearest_training_ssim(
    samples: Tensor,
    train: TrainSource,
    *,
    top_k: int | None = 16,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> NeighbourResult:
    """Best SSIM of each sample to any training slice, and that slice's position.

    ``samples``: (N, 1, H, W) / (N, H, W) in any `as_unit` format (may stay on the CPU).
    ``train``: a tensor, numpy array or h5py dataset (read ``batch_size`` slices at a time),
    or a zero-argument callable returning an iterable of batches (it is called once per
    pass, twice with the prefilter, and must yield the same order each time).
    ``top_k=None`` disables the prefilter (exhaustive). `PAIR_BATCH` bounds how many SSIM
    pairs are evaluated at once (the working memory), `PREFILTER_SIZE` the prefilter's side.
    """
    device = torch.device(device) if device is not None else samples.device
    batches = _batch_factory(train, batch_size)
    if top_k is None:
        best, index = _exhaustive_ssim(samples, batches(), PAIR_BATCH, device, progress)
    else:
        cand = _prefilter(samples, batches(), top_k, PREFILTER_SIZE, device, progress)
        values = _candidate_ssim(samples, batches(), cand, PAIR_BATCH, device, progress)
        best, pos = values.max(1)
        index = cand.gather(1, pos[:, None]).squeeze(1)
    return NeighbourResult(ssim=best.cpu(), index=index.cpu())


def _pairs(n: int, max_pairs: int | None, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """All pairs i < j, or ``max_pairs`` uniformly random pairs i != j (with replacement)."""
    if max_pairs is None or n * (n - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(n, n, offset=1)
        return i, j
    i = torch.randint(n, (max_pairs,), generator=generator)
    j = torch.randint(n - 1, (max_pairs,), generator=generator)
    return i, j + (j >= i).long()  # skip the diagonal, keep j uniform over the others


@torch.no_grad()
def mean_pairwise_ms_ssim(
    images: Tensor,
    *,
    max_pairs: int | None = 5000,
    generator: torch.Generator | None = None,
    scales: int | None = None,
    pair_batch: int = 128,
    device: torch.device | str | None = None,
) -> float:
    """Mean MS-SSIM over pairs of distinct images of one set (1 = all identical).

    Uses every pair i < j when there are at most ``max_pairs`` of them, otherwise
    ``max_pairs`` random pairs drawn with ``generator`` (an unbiased estimate of the same
    mean). ``scales`` as in `oasis_ldm.metrics.image.ms_ssim` (None = most that fit).
    """
    if images.shape[0] < 2:
        raise ValueError("diversity needs at least two images")
    device = torch.device(device) if device is not None else images.device
    i, j = _pairs(images.shape[0], max_pairs, generator)
    total = torch.zeros((), dtype=torch.float64, device=device)
    for a, b in zip(i.split(pair_batch), j.split(pair_batch), strict=True):
        total += ms_ssim(images[a].to(device), images[b].to(device), scales=scales).double().sum()
    return float(total / i.numel())
