"""The learning-rate rule of every optimiser in the project: a linear warm-up, then constant or
a cosine decay to a floor. The trainer (train/loop.py) and the evaluator's segmenters
(segmentation.py) both take it from here."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", floor: float = 0.0) -> float:
    """The factor on the peak rate at optimiser step `step` (1-based): `step / warmup` during the
    warm-up, then 1 (`constant`) or a cosine from 1 at `warmup` to `floor` at `total` (`cosine`),
    `floor` after it. A run extended past its old `total` follows the new, longer curve."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
