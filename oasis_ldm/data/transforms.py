"""Pixel scaling, resizing and augmentation of slices, a batch at a time.

Every sample of a batch gets its own random parameters, drawn from an explicit
`torch.Generator` on that generator's device (the trainer's: no host-to-device copy per
micro-batch), then applied to the whole batch in one op. A trainer that seeds the generator
from the step reproduces the exact augmentation after a resume, with any number of workers.

Modes: `none`; `flip` (horizontal flip, p=0.5); `crop` (the seed report's recipe: resize to
1.25x, then torchvision's RandomResizedCrop back to the size with scale (0.8, 1.0), ratio
(3/4, 4/3), as one resampling). `seed`, the earlier name of `crop`, is still accepted.
Images are float in [-1, 1]; masks are uint8 and always resampled with nearest neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_MODES: tuple[str, ...] = ("none", "flip", "crop")
MODE_ALIASES = {"seed": "crop"}  # earlier names, still accepted (configs and checkpoints hold them)
CROP_UPSCALE = 1.25
CROP_SCALE = (0.8, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
CROP_TRIES = 10  # torchvision's RandomResizedCrop tries 10 boxes, then falls back to a centre crop


def check_mode(mode: str) -> str:
    """The mode's name (an earlier alias mapped to it), or ValueError."""
    mode = MODE_ALIASES.get(mode, mode)
    if mode not in AUGMENT_MODES:
        raise ValueError(f"augment={mode!r}: expected one of {', '.join(AUGMENT_MODES)}")
    return mode


def to_float(x: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] (x / 127.5 - 1)."""
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x: Tensor) -> Tensor:
    """float [-1, 1] -> uint8, rounded to nearest and clamped (inverse of `to_float`)."""
    return ((x.float() + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def _size2(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize_batch(x: Tensor, size: int | tuple[int, int], *, nearest: bool = False) -> Tensor:
    """Resize (B, C, H, W) to `size`; bilinear and antialiased when shrinking, or nearest.

    uint8 in -> uint8 out (rounded); float in -> float out. Same size -> `x` itself.
    """
    size = _size2(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if nearest:
        if x.dtype == torch.uint8 and x.device.type == "cpu":
            return F.interpolate(x, size=size, mode="nearest-exact")
        return F.interpolate(x.float(), size=size, mode="nearest-exact").to(x.dtype)
    y = F.interpolate(x.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    if x.dtype == torch.uint8:
        return y.round_().clamp_(0, 255).to(torch.uint8)
    return y.to(x.dtype)


@dataclass(frozen=True)
class AugmentParams:
    """Per-sample parameters of one batch, on the device of the generator that drew them.

    `flip` (B,) bool. `boxes` (B, 4) float64 (top, left, height, width) of each crop in the
    upscaled image of size `upscaled` (H', W'): what the crop recipe crops after its resize.
    """

    flip: Tensor | None = None
    boxes: Tensor | None = None
    upscaled: tuple[int, int] | None = None


def _rand(n: int | tuple[int, ...], generator: torch.Generator | None) -> Tensor:
    """U[0, 1) float64, drawn and kept on the generator's own device (CPU or CUDA)."""
    device = generator.device if generator is not None else torch.device("cpu")
    shape = (n,) if isinstance(n, int) else n
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)


def _crop_boxes(batch: int, height: int, width: int, generator: torch.Generator | None) -> Tensor:
    """torchvision RandomResizedCrop.get_params, vectorised over the batch: (B, 4) t, l, h, w."""
    area = height * width
    u = _rand((batch, CROP_TRIES, 4), generator)
    target = area * (CROP_SCALE[0] + (CROP_SCALE[1] - CROP_SCALE[0]) * u[..., 0])
    log_lo, log_hi = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[..., 2] * (height - h + 1))
    left = torch.floor(u[..., 3] * (width - w + 1))
    found = ok.any(1)
    first = torch.where(found, ok.float().argmax(1), 0)
    pick = torch.stack([top, left, h, w], -1)[torch.arange(batch, device=u.device), first]
    # The fallback box enters as Python scalars (kernel arguments): a tensor made from them on
    # the device would be a blocking host-to-device copy, a host sync per batch.
    columns = [torch.where(found, pick[:, k], float(v)) for k, v in enumerate(_centre_box(height, width))]
    return torch.stack(columns, 1)


def _centre_box(height: int, width: int) -> tuple[int, int, int, int]:
    """RandomResizedCrop's fallback after CROP_TRIES misses: the largest centred valid box."""
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        h, w = height, round(height * CROP_RATIO[1])
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def sample_params(
    batch: int, height: int, width: int, mode: str, generator: torch.Generator | None = None
) -> AugmentParams:
    """Draw per-sample parameters for a batch of (height, width) images."""
    mode = check_mode(mode)
    if mode == "flip":
        return AugmentParams(flip=_rand(batch, generator) < 0.5)
    if mode == "crop":
        up = (int(CROP_UPSCALE * height), int(CROP_UPSCALE * width))
        return AugmentParams(boxes=_crop_boxes(batch, *up, generator), upscaled=up)
    return AugmentParams()


def _crop_theta(params: AugmentParams, height: int, width: int) -> Tensor:
    """affine_grid matrices mapping each output pixel into its crop box of the input image.

    A box in the upscaled image is the same region of the input scaled by (H/H', W/W'), so
    one bilinear sample of the input replaces the resize-then-crop-then-resize of the recipe.
    """
    top, left, h, w = params.boxes.unbind(1)
    sy, sx = params.upscaled[0] / height, params.upscaled[1] / width
    theta = torch.zeros(len(top), 2, 3, dtype=torch.float64, device=top.device)
    theta[:, 0, 0] = w / (sx * width)
    theta[:, 0, 2] = (2 * left + w) / (sx * width) - 1
    theta[:, 1, 1] = h / (sy * height)
    theta[:, 1, 2] = (2 * top + h) / (sy * height) - 1
    return theta


def apply_params(x: Tensor, params: AugmentParams, *, nearest: bool = False) -> Tensor:
    """Apply per-sample parameters to (B, C, H, W) on x's device; masks use `nearest=True`."""
    if params.flip is not None:
        flip = params.flip.to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
    if params.boxes is not None:
        theta = _crop_theta(params, *x.shape[-2:]).to(device=x.device, dtype=torch.float32)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        mode = "nearest" if nearest else "bilinear"
        y = F.grid_sample(x.float(), grid, mode=mode, padding_mode="border", align_corners=False)
        x = y.round_().to(x.dtype) if x.dtype == torch.uint8 else y.to(x.dtype)
    return x


def augment_batch(x: Tensor, mode: str, generator: torch.Generator | None = None) -> Tensor:
    """Augment float (B, C, H, W) in [-1, 1] with per-sample parameters from `generator`.

    Deterministic for a given generator state; `generator=None` draws from torch's global
    CPU generator. Output has x's shape, dtype and device.
    """
    params = sample_params(x.shape[0], x.shape[-2], x.shape[-1], mode, generator)
    return apply_params(x, params)
