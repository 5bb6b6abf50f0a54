"""Batch augmentation on the training device, with parameters drawn by the global-batch rule.

Parameters are drawn on the training device for the step's whole batch from the step's
generator (like every other draw of a step: nothing is copied from pageable host memory per
micro-batch) and sliced to this micro-batch's rows on this rank (see order.py), so the
augmentation of a sample depends on (seed, step, its position in the step's batch) alone: not
on the number of ranks, the accumulation rounds, the data workers, or a resume.
"""

from __future__ import annotations

import dataclasses

import torch

from oasis_ldm.data.transforms import AugmentParams, apply_params, sample_params, to_float
from oasis_ldm.train.context import StepContext

AUGMENT = 10  # the `purpose` id of augmentation draws


def global_params(n: int, height: int, width: int, mode: str, ctx: StepContext) -> AugmentParams:
    """Parameters drawn for the step's whole batch; this micro-batch's rows on this rank."""
    gen = ctx.generator(AUGMENT)
    params = sample_params(ctx.step_rows(n), height, width, mode, gen)
    return dataclasses.replace(
        params,
        flip=None if params.flip is None else ctx.mine(params.flip),
        boxes=None if params.boxes is None else ctx.mine(params.boxes),
    )


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
