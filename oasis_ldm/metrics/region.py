"""The brain region of a slice: where the in-brain SSIM and PSNR are averaged.

About 70 % of an OASIS slice is black background that any model reproduces, so figures
averaged over the whole image look better than the anatomy deserves. The in-brain figures
average over the brain region of the *real* slice only (a reconstruction or a sample must
not choose where it is judged):

- where the split has segmentation masks: mask > 0 (CSF, grey and white matter);
- otherwise the slice's foreground (`foreground`): pixels brighter than the background
  level (the median of the slice's outermost ring of pixels, 0 on the skull-stripped OASIS
  slices) by more than ``FOREGROUND_MARGIN`` grey levels of 255, with its holes filled, so
  dark ventricles and CSF enclosed by tissue count as brain.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# Grey levels of 255 (4 %) above the background: clear of its noise and of the halo a resize
# leaves at the brain's edge; dark CSF inside the brain comes back through the hole filling.
FOREGROUND_MARGIN = 10


def _as_rows(x: Tensor) -> Tensor:
    """(B, H, W) or (B, 1, H, W) -> (B, 1, H, W)."""
    x = x.unsqueeze(1) if x.dim() == 3 else x
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected (B, 1, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    return x


def background_level(images: Tensor) -> Tensor:
    """Per-slice background grey level, (B, 1, 1, 1) uint8: the median of the outermost ring."""
    x = _as_rows(images)
    ring = torch.cat([x[..., 0, :], x[..., -1, :], x[..., 1:-1, 0], x[..., 1:-1, -1]], dim=-1)
    return ring.flatten(1).median(dim=1).values.view(-1, 1, 1, 1)


def _runs(free: Tensor) -> Tensor:
    """Run ids along the last axis of bool (N, L): free pixels between two blocked ones share one."""
    return torch.cumsum(~free, dim=1, dtype=torch.int32)


def _spread(outside: Tensor, free: Tensor, runs: Tensor) -> Tensor:
    """Extend ``outside`` (bool (N, L), within ``free``) over every run of free pixels it touches."""
    from_left = torch.where(outside, runs, -1).cummax(1).values == runs  # run ids grow along the row
    from_right = torch.where(outside, runs, runs.shape[1] + 1).flip(1).cummin(1).values.flip(1) == runs
    return (from_left | from_right) & free


def fill_holes(region: Tensor) -> Tensor:
    """Bool (B, 1, H, W): ``region`` plus every pixel the image border cannot reach around it.

    The outside is flooded from the border's non-region pixels through 4-connected steps (a
    one-pixel diagonal gap in the region's rim does not let it in), the standard complement
    of an 8-connected region, as scipy's binary_fill_holes does. Each pass spreads the
    outside along whole runs of free pixels, in rows and then in columns, so the flood
    converges in as many passes as it needs turns (about 12 on brain slices), not one per pixel.
    """
    free = ~_as_rows(region)[:, 0]
    b, h, w = free.shape
    outside = torch.zeros_like(free)
    for edge in (np.s_[:, 0], np.s_[:, -1], np.s_[:, :, 0], np.s_[:, :, -1]):
        outside[edge] = free[edge]
    free_r, free_c = free.reshape(b * h, w), free.transpose(1, 2).reshape(b * w, h)
    runs_r, runs_c = _runs(free_r), _runs(free_c)
    while True:
        before = outside
        outside = _spread(outside.reshape(b * h, w), free_r, runs_r).view(b, h, w)
        outside = _spread(outside.transpose(1, 2).reshape(b * w, h), free_c, runs_c).view(b, w, h).transpose(1, 2)
        if torch.equal(outside, before):
            return (~outside)[:, None]


def foreground(images: Tensor, margin: int = FOREGROUND_MARGIN) -> Tensor:
    """Bool (B, 1, H, W) brain region of uint8 slices that have no mask (module docstring)."""
    x = _as_rows(images)
    if x.dtype != torch.uint8:
        raise TypeError(f"the foreground rule reads uint8 slices, got {x.dtype}")
    return fill_holes(x.int() > background_level(x).int() + margin)


def brain_region(images: Tensor, masks: Tensor | None = None) -> Tensor:
    """Bool (B, 1, H, W) brain region of real uint8 slices: ``masks > 0``, else `foreground`."""
    if masks is not None:
        masks = _as_rows(masks)
        if masks.shape != _as_rows(images).shape:
            raise ValueError(f"masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        return masks > 0
    return foreground(images)
