"""Batch augmentation on the training device, with parameters drawn by the global-batch rule.

Parameters are drawn on the CPU for the whole global micro-batch from the step's generator
and sliced to this rank's rows (see order.py), so the augmentation of a sample depends on
(seed, step, its position in the global batch) alone: not on the number of ranks, the data
workers, or whether the run was resumed.
"""

from __future__ import annotations

import dataclasses

import torch

from oasis_ldm.data.transforms import AugmentParams, apply_params, sample_params, to_float
from oasis_ldm.train.context import StepContext
from oasis_ldm.train.order import rank_rows

AUGMENT = 10  # the `purpose` id of augmentation draws


def _rank_params(params: AugmentParams, ctx: StepContext) -> AugmentParams:
    rank, world = ctx.env.rank, ctx.env.world_size
    return dataclasses.replace(
        params,
        flip=None if params.flip is None else rank_rows(params.flip, rank, world),
        boxes=None if params.boxes is None else rank_rows(params.boxes, rank, world),
    )


def global_params(n: int, height: int, width: int, mode: str, ctx: StepContext) -> AugmentParams:
    gen = ctx.generator(AUGMENT, torch.device("cpu"))
    return _rank_params(sample_params(n * ctx.env.world_size, height, width, mode, gen), ctx)


def prepare_images(batch: torch.Tensor, mode: str, ctx: StepContext) -> torch.Tensor:
    """uint8 (B, 1, H, W) from the loader -> augmented float [-1, 1] on the device."""
    x = to_float(batch.to(ctx.env.device, non_blocking=True))
    if mode == "none":
        return x
    return apply_params(x, global_params(x.shape[0], x.shape[-2], x.shape[-1], mode, ctx))


def flip_latents(z: torch.Tensor, mode: str, ctx: StepContext) -> torch.Tensor:
    """Horizontal flips in latent space (cached latents; the config allows none or flip)."""
    if mode == "none":
        return z
    return apply_params(z, global_params(z.shape[0], z.shape[-2], z.shape[-1], "flip", ctx))
