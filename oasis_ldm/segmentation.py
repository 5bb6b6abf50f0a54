"""Judging image-mask pairs by segmentation: train on synthetic, test on real (TSTR).

A paired model is only as useful as its pairs are for training a segmenter. So
`segmentation_report` trains the small `Segmenter` four times, on

- (a) ``real``: as many real training slices as there are synthetic pairs (spread over the
  split's cases and slice levels by `spread_rows`), the like-for-like baseline;
- (a') ``real_full``: the whole real training split;
- (b) ``synthetic``: the generated pairs;
- (c) ``mixed``: the whole real split and the generated pairs together;

and tests each on the real test split. Every variant gets the same training budget (the
same steps of the same batch size, so the same number of slices seen, whatever its set's
size) and the same initial weights, so their Dice differ only by what they were trained
on. Everything is deterministic for a seed on a given device and thread count: the
weights come from `torch.manual_seed` (inside `fork_rng`, so the caller's global stream is
untouched), and the batch order and the horizontal flips from their own generators.

Dice, from torchmetrics (`DiceScore`, class labels in, background excluded):

- Test-split Dice is per class over the whole split (``aggregation_level="global"``: the
  overlaps and sizes of every test slice are summed first), then averaged over CSF, grey
  and white matter. Per-slice Dice is undefined on slices that lack a class (the top and
  bottom of the brain have no white matter), and pooling weighs every pixel once.
- ``mask_agreement`` asks whether *each* generated pair agrees: per pair, the Dice between
  its mask and the full-real segmenter's prediction on its slice (averaged over the
  foreground classes present in either), then averaged over pairs. ``mask_agreement_real``
  is the same statistic on the real test split: the ceiling to read it against.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torchmetrics.segmentation import DiceScore
from tqdm.auto import tqdm

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.masks import CLASS_NAMES, NUM_CLASSES, to_labels
from oasis_ldm.data.transforms import to_float
from oasis_ldm.lr import lr_factor
from oasis_ldm.models.segmenter import Segmenter
from oasis_ldm.rng import EvalStream, derive_seed, generator

VARIANTS = ("real", "real_full", "synthetic", "mixed")
TEST_SPLIT = "test"  # every segmenter is tested on the real test split
FOREGROUND = CLASS_NAMES[1:]  # the Dice classes: background is most of a slice and trivially right
PREDICT_BATCH = 32  # slices per forward pass when predicting (bounds the one-hot Dice states too)


@dataclass(frozen=True)
class SegmenterTraining:
    """How each segmenter of a report is trained; the same for every variant (a fair budget)."""

    steps: int = 600  # optimiser steps; steps * batch_size slices seen by every variant
    batch_size: int = 16
    lr: float = 5e-3  # AdamW peak, after a linear warm-up over the first 5 % of steps, then cosine to 0
    weight_decay: float = 1e-4
    dice_weight: float = 1.0  # loss = cross-entropy + dice_weight * (1 - soft foreground Dice)
    flip: bool = True  # horizontal flips of image and mask together, half of the slices
    widths: tuple[int, ...] = (8, 16, 32, 64)  # measured on the demo: more steps beat more width

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"SegmenterTraining: steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )


# --- data -------------------------------------------------------------------------------------


def real_pairs(path: str | Path, split: str, image_size: int | None) -> tuple[Tensor, Tensor, np.ndarray]:
    """A packed split's uint8 images and masks (N, 1, S, S) and its case ids (N,)."""
    data = OasisH5Dataset(path, split, in_memory=True, image_size=image_size, with_mask=True, raw=True)
    rows = range(len(data))
    return data.read_raw(rows), data.read_raw(rows, mask=True), np.asarray(data.case_id)


def _quotas(sizes: np.ndarray, n: int) -> np.ndarray:
    """Split n picks over groups of `sizes` as evenly as their sizes allow (water-filling)."""
    quota = np.zeros_like(sizes)
    while quota.sum() < n:
        open_ = np.flatnonzero(quota < sizes)
        need = n - int(quota.sum())
        share = np.diff(np.floor(np.arange(len(open_) + 1) * need / len(open_)).astype(np.int64))
        quota[open_] = np.minimum(quota[open_] + share, sizes[open_])
    return quota


def spread_rows(case_id: np.ndarray, n: int) -> np.ndarray:
    """n row indices spread over cases (as even a count per case as possible) and, within a
    case, over its slices at evenly spaced levels; all rows when n >= len(case_id).

    Rows of one case are taken in row order, which the packed file keeps sorted by slice.
    Deterministic, unlike a random subset, and never all one level (as a fixed stride
    equal to the slices per case would be).
    """
    case_id = np.asarray(case_id)
    if n >= len(case_id):
        return np.arange(len(case_id))
    order = np.argsort(case_id, kind="stable")
    _, starts, sizes = np.unique(case_id[order], return_index=True, return_counts=True)
    picks = []
    for start, size, k in zip(starts, sizes, _quotas(sizes, n), strict=True):
        picks.append(order[start + np.floor((np.arange(k) + 0.5) * size / k).astype(np.int64)])
    return np.sort(np.concatenate(picks))


def labels_of(masks: Tensor) -> Tensor:
    """uint8 mask values (N, 1, H, W) -> uint8 class labels (N, H, W), converted in chunks
    (a whole OASIS split as int64 labels would take 5 GB); raises on values outside the classes."""
    chunks = [to_labels(masks[a : a + PREDICT_BATCH]).to(torch.uint8) for a in range(0, len(masks), PREDICT_BATCH)]
    return torch.cat(chunks)


def checked_labels(name: str, images: Tensor, masks: Tensor) -> Tensor:
    """The class labels of a set of uint8 pairs (N, 1, H, W), after checking their form and values."""
    if images.dtype != torch.uint8 or masks.dtype != torch.uint8:
        raise ValueError(f"{name}: images and masks must be uint8, got {images.dtype} and {masks.dtype}")
    if images.dim() != 4 or images.shape[1] != 1 or images.shape != masks.shape:
        shapes = f"{tuple(images.shape)} and {tuple(masks.shape)}"
        raise ValueError(f"{name}: expected images and masks (N, 1, H, W) of one shape, got {shapes}")
    if len(images) == 0:
        raise ValueError(f"{name}: no pairs")
    try:
        return labels_of(masks)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


# --- training ---------------------------------------------------------------------------------


def batch_order(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless batches of row indices: seeded permutations of range(n), one after another."""
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(n, generator=generator)])
        batch, pending = pending[:batch_size], pending[batch_size:]
        yield batch


def segmentation_loss(logits: Tensor, labels: Tensor, dice_weight: float) -> Tensor:
    """Cross-entropy + dice_weight * (1 - soft Dice of the foreground classes, pooled over the batch).

    Cross-entropy is written out (log-softmax times one-hot) because CUDA's fused
    `nll_loss2d` has no deterministic kernel.
    """
    log_p = torch.log_softmax(logits.float(), dim=1)
    hot = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).to(log_p.dtype)
    loss = -(log_p * hot).sum(1).mean()
    if dice_weight:
        p, t = log_p.exp()[:, 1:], hot[:, 1:]
        dims = (0, 2, 3)
        dice = (2 * (p * t).sum(dims) + 1) / (p.sum(dims) + t.sum(dims) + 1)
        loss = loss + dice_weight * (1 - dice.mean())
    return loss


def _flip_half(x: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    flip = (torch.rand(len(x), generator=generator) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x, torch.where(flip[:, None, None], labels.flip(-1), labels)


def train_segmenter(
    images: Tensor,
    masks: Tensor,
    *,
    settings: SegmenterTraining = SegmenterTraining(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    desc: str = "segmenter",
    progress: bool = True,
) -> Segmenter:
    """A `Segmenter` trained on uint8 pairs (N, 1, H, W), in eval mode on `device`.

    The same seed gives the same initial weights whatever the data, and the same weights
    after training for the same data, settings, device and thread count.
    """
    labels = checked_labels(desc, images, masks)
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, EvalStream.SEGMENTER_WEIGHTS))
        model = Segmenter(settings.widths).to(device)
    x_all, y_all = images.to(device), labels.to(device)
    order = batch_order(len(images), settings.batch_size, generator("cpu", seed, EvalStream.SEGMENTER_ORDER))
    flips = generator("cpu", seed, EvalStream.SEGMENTER_FLIPS)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda done: lr_factor(done + 1, max(1, settings.steps // 20), settings.steps, "cosine")
    )
    model.train()
    with _deterministic_cudnn():
        for _ in tqdm(range(settings.steps), desc=desc, unit="step", disable=not progress, leave=False):
            idx = next(order).to(device)
            x, y = to_float(x_all.index_select(0, idx)), y_all.index_select(0, idx).long()
            if settings.flip:
                x, y = _flip_half(x, y, flips)
            loss = segmentation_loss(model(x), y, settings.dice_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@contextmanager
def _deterministic_cudnn() -> Iterator[None]:
    """cuDNN picks deterministic algorithms (and no benchmarking) inside the block, then restores."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@torch.no_grad()
def predict(model: Segmenter, images: Tensor, batch_size: int = PREDICT_BATCH) -> Tensor:
    """uint8 images (N, 1, H, W) -> long class labels (N, H, W) on the CPU: each pixel's likeliest class."""
    device = next(model.parameters()).device
    out = [
        model(to_float(images[a : a + batch_size].to(device))).argmax(1).cpu()
        for a in range(0, len(images), batch_size)
    ]
    return torch.cat(out)


# --- Dice ---------------------------------------------------------------------------------------


def _dice(pred: Tensor, target: Tensor, metric: DiceScore) -> Tensor:
    """Feed (N, H, W) label pairs to a torchmetrics DiceScore in chunks; its result."""
    for a in range(0, len(pred), PREDICT_BATCH):
        metric.update(pred[a : a + PREDICT_BATCH].long(), target[a : a + PREDICT_BATCH].long())
    return metric.compute()


def split_dice(pred: Tensor, target: Tensor) -> dict[str, float]:
    """Dice of each foreground class over a whole set of (N, H, W) label maps (pooled pixels).

    A class absent from both gives NaN (0/0); on a test split of brain slices it never is.
    """
    metric = DiceScore(
        NUM_CLASSES, include_background=False, average="none", aggregation_level="global", input_format="index"
    )
    per_class = _dice(pred, target, metric)
    return {name: float(v) for name, v in zip(FOREGROUND, per_class.tolist(), strict=True)}


def pairwise_dice(pred: Tensor, target: Tensor) -> float:
    """Mean over slices of each slice's Dice (mean over the foreground classes present in
    its prediction or target); slices that are all background in both are left out."""
    metric = DiceScore(
        NUM_CLASSES, include_background=False, average="macro", aggregation_level="samplewise", input_format="index"
    )
    return float(_dice(pred, target, metric))


def mean_dice(per_class: dict[str, float]) -> float:
    return float(np.mean([per_class[name] for name in FOREGROUND]))


# --- the report ---------------------------------------------------------------------------------


class Pairs(NamedTuple):
    """uint8 slices and their masks, (N, 1, H, W) each, and (real training pairs) their case ids."""

    images: Tensor
    masks: Tensor
    case_ids: np.ndarray | None = None


def training_sets(train: Pairs, synthetic: Pairs) -> dict[str, Pairs]:
    """The pairs each variant trains on; "real" holds as many real slices as there are
    synthetic pairs, spread over the training cases and levels (`spread_rows`)."""
    cases = np.arange(len(train.images)) if train.case_ids is None else np.asarray(train.case_ids)
    if len(cases) != len(train.images):
        raise ValueError(f"case ids: {len(cases)} ids for {len(train.images)} training slices")
    subset = torch.from_numpy(spread_rows(cases, len(synthetic.images)))
    return {
        "real": Pairs(train.images[subset], train.masks[subset]),
        "real_full": train,
        "synthetic": synthetic,
        "mixed": Pairs(torch.cat([train.images, synthetic.images]), torch.cat([train.masks, synthetic.masks])),
    }


def segmentation_report(
    train: Pairs | tuple,
    test: Pairs | tuple,
    synthetic: Pairs | tuple,
    *,
    settings: SegmenterTraining = SegmenterTraining(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Train on synthetic, test on real: the figures of four segmenters (see the module doc).

    All images and masks are uint8 (N, 1, H, W) of one H x W; masks hold 0/85/170/255.
    ``train.case_ids`` (the real training rows' cases) lets the equal-count real subset
    spread over cases; without them, rows are spread as if each were its own case. Every
    variant trains for ``settings.steps`` steps of ``settings.batch_size`` slices from the
    same initial weights (``seed``): an equal budget, whatever the size of its set.

    Keys: ``seg_dice_{real,real_full,synthetic,mixed}`` (mean foreground Dice on the test
    split), ``seg_dice_per_class`` ({variant: {class: Dice}}), ``tstr_ratio``
    (synthetic / real at equal count), ``mask_agreement`` and ``mask_agreement_real``,
    the counts ``n_train_real``, ``n_real_subset``, ``n_synthetic``, ``n_test``, the
    ``image_size``, ``seed``, ``device``, ``training`` (the settings) and
    ``seconds_per_segmenter``.
    """
    sets = {"train": Pairs(*train), "test": Pairs(*test), "synthetic": Pairs(*synthetic)}
    labels = {name: checked_labels(name, pairs.images, pairs.masks) for name, pairs in sets.items()}
    sizes = {tuple(pairs.images.shape[-2:]) for pairs in sets.values()}
    if len(sizes) != 1:
        raise ValueError(f"segmentation_report: train, test and synthetic slices differ in size: {sorted(sizes)}")
    training = training_sets(sets["train"], sets["synthetic"])
    start = time.perf_counter()
    per_class, judge = {}, None
    for variant in tqdm(VARIANTS, desc="segmentation report", unit="segmenter", disable=not progress):
        pairs = training[variant]
        model = train_segmenter(
            pairs.images, pairs.masks, settings=settings, seed=seed, device=device, desc=variant, progress=progress
        )
        per_class[variant] = split_dice(predict(model, sets["test"].images), labels["test"])
        judge = model if variant == "real_full" else judge  # the best-informed real segmenter judges the pairs
    seconds = (time.perf_counter() - start) / len(VARIANTS)
    dice = {variant: mean_dice(per_class[variant]) for variant in VARIANTS}
    return {
        **{f"seg_dice_{variant}": dice[variant] for variant in VARIANTS},
        "seg_dice_per_class": per_class,
        "tstr_ratio": dice["synthetic"] / dice["real"] if dice["real"] > 0 else float("nan"),
        "mask_agreement": pairwise_dice(predict(judge, sets["synthetic"].images), labels["synthetic"]),
        "mask_agreement_real": pairwise_dice(predict(judge, sets["test"].images), labels["test"]),
        **counts(sets, training),
        "seed": seed,
        "device": str(device),
        "training": {**asdict(settings), "widths": list(settings.widths)},
        "seconds_per_segmenter": seconds,
    }


def counts(sets: dict[str, Pairs], training: dict[str, Pairs]) -> dict[str, int]:
    return {
        "n_train_real": len(sets["train"].images),
        "n_real_subset": len(training["real"].images),
        "n_synthetic": len(sets["synthetic"].images),
        "n_test": len(sets["test"].images),
        "image_size": int(sets["train"].images.shape[-1]),
    }


def evaluate_segmentation(
    data: str | Path,
    synthetic: Pairs | tuple,
    *,
    split: str = "train",
    settings: SegmenterTraining = SegmenterTraining(),
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """`segmentation_report` of generated pairs against a packed file: real training pairs from
    ``split``, real test pairs from the test split, both resized to the pairs' size."""
    synthetic = Pairs(*synthetic)
    size = int(synthetic.images.shape[-1])
    train, test = Pairs(*real_pairs(data, split, size)), Pairs(*real_pairs(data, TEST_SPLIT, size))
    report = segmentation_report(train, test, synthetic, settings=settings, seed=seed, device=device, progress=progress)
    return {"split": split, "test_split": TEST_SPLIT, **report}
