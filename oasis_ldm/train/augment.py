"""Batch augmentation on the training device: the loader's uint8 batch as the models see it.

The parameters are a step draw like any other (oasis_ldm/rng.py, stream AUGMENT), made on the
training device, so nothing is copied from pageable host memory per micro-batch. Masks (paired
mode) get the same geometry as their slices, resampled with nearest neighbour.
"""

from __future__ import annotations

import dataclasses

import torch

from oasis_ldm.data.masks import pair_input
from oasis_ldm.data.transforms import AugmentParams, apply_params, sample_params, to_float
from oasis_ldm.rng import Stream
from oasis_ldm.train.context import StepContext


def global_params(n: int, height: int, width: int, mode: str, ctx: StepContext) -> AugmentParams:
    """Parameters drawn for the step's whole batch; this micro-batch's rows on this rank."""
    draws = ctx.draws
    params = sample_params(draws.full_rows(n), height, width, mode, draws.generator(Stream.AUGMENT))
    return dataclasses.replace(
        params,
        flip=None if params.flip is None else draws.mine(params.flip),
        boxes=None if params.boxes is None else draws.mine(params.boxes),
    )


def prepare_batch(batch: torch.Tensor | list[torch.Tensor], mode: str, ctx: StepContext) -> Batch:
    """The loader's uint8 (B, 1, H, W) images, or [images, masks] in paired mode, on the device:
    float images in [-1, 1] and uint8 masks, both given the same augmentation (masks nearest)."""
    images, masks = batch if isinstance(batch, (list, tuple)) else (batch, None)
    x = to_float(images.to(ctx.env.device, non_blocking=True))
    m = None if masks is None else masks.to(ctx.env.device, non_blocking=True)
    if mode != "none":
        params = global_params(x.shape[0], x.shape[-2], x.shape[-1], mode, ctx)
        x = apply_params(x, params)
        m = None if m is None else apply_params(m, params, nearest=True)
    return Batch(x, m)


@dataclasses.dataclass(frozen=True)
class Batch:
    """One micro-batch as the models see it."""

    images: torch.Tensor  # float (B, 1, H, W) in [-1, 1]
    masks: torch.Tensor | None  # uint8 (B, 1, H, W) mask values, paired mode only

    def model_input(self) -> torch.Tensor:
        """What the autoencoder encodes: the images, or images and one-hot masks (data/masks.py;
        unchecked: packed masks hold the four values, and a check would be a host sync)."""
        return self.images if self.masks is None else pair_input(self.images, self.masks, check=False)


def flip_rows(n: int, mode: str, ctx: StepContext) -> torch.Tensor:
    """(n,) bool: which rows of this micro-batch the step flips. Cached latents are not flipped
    themselves: a flipped row takes the posterior of its mirrored slice (latent_cache.py)."""
    if mode == "none":
        return torch.zeros(n, dtype=torch.bool, device=ctx.env.device)
    return global_params(n, 1, 1, "flip", ctx).flip.to(ctx.env.device)
