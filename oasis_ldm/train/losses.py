"""Reconstruction losses of the vae stage.

SSIM is computed with a separable Gaussian window (two 1-D passes instead of one 11x11
convolution): the same value as torchmetrics' SSIM (tests check it), at a fraction of the
cost, which matters when the loss runs every step on a CPU. Its blurs run in IEEE float32
forward and backward (`oasis_ldm.precision`): under cuDNN's default TF32 the differences of
blurred moments, and their gradients, would depend on the device.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from oasis_ldm.precision import ieee_float32

K1, K2 = 0.01, 0.03


@functools.cache
def _gaussian(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _separable(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Valid convolution of each channel with g along W, then along H."""
    c, k = x.shape[1], len(g)
    x = F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)
    return F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)


class _IEEEBlur(torch.autograd.Function):
    """The Gaussian blur with its backward pass in IEEE float32 too (autograd's own backward
    would run wherever `.backward()` is called, under the caller's TF32 setting).

    The blur is linear and its window symmetric, so its adjoint is the same blur of the
    gradient padded by k - 1 on every side (a "full" convolution).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g)
        with ieee_float32():
            return _separable(x, g)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (g,) = ctx.saved_tensors
        pad = len(g) - 1
        with ieee_float32():
            return _separable(F.pad(grad, (pad, pad, pad, pad)), g), None


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _IEEEBlur.apply(x, g)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Mean SSIM of two (B, C, H, W) batches; reflect-padded to full size, as torchmetrics does.

    Always fp32, also inside bf16 autocast: the variances are differences of blurred moments,
    blur(x^2) - blur(x)^2, which cancel in bf16's 8-bit mantissa (measured on a slice and its
    slightly noisy copy: 1 - SSIM 0.262 under bf16 autocast against 0.035 in fp32).
    """
    return ssim_map(x, y, data_range, size, sigma).mean()


def ssim_map(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0, size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """The SSIM map (B, C, H, W) whose mean `ssim` is, in fp32 (see `ssim`)."""
    with torch.autocast(x.device.type, enabled=False):
        return _ssim_fp32(x.float(), y.float(), data_range, size, sigma)


def _ssim_fp32(x: torch.Tensor, y: torch.Tensor, data_range: float, size: int, sigma: float) -> torch.Tensor:
    g = _gaussian(size, sigma, x.device)
    pad = (size - 1) // 2
    x, y = (F.pad(t, (pad, pad, pad, pad), mode="reflect") for t in (x, y))
    mu_x, mu_y = _blur(x, g), _blur(y, g)
    var_x = (_blur(x * x, g) - mu_x**2).clamp(min=0)
    var_y = (_blur(y * y, g) - mu_y**2).clamp(min=0)
    cov = _blur(x * y, g) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    num = (2 * mu_x * mu_y + c1) * (2 * cov + c2)
    den = (mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)
    return num / den


def ssim_loss(recon: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """1 - SSIM on [-1, 1] images (Gaussian window 11, sigma 1.5); with `weight` (B, 1, H, W)
    the SSIM map is averaged with those pixel weights instead of uniformly."""
    return 1.0 - weighted_mean(ssim_map(recon, target, data_range=2.0), weight)


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of a (B, C, H, W) loss map, with (B, 1, H, W) pixel weights shared by its channels
    (`brain_weight`), or uniform when `weight` is None."""
    if weight is None:
        return values.mean()
    return (values * weight).sum() / (weight.sum() * values.shape[1])


def brain_weight(target: torch.Tensor, extra: float) -> torch.Tensor | None:
    """Pixel weights 1 + `extra` inside the brain, 1 outside (None when `extra` is 0).

    The brain is the target's foreground (above the black background of skull-stripped slices),
    grown by one pixel so its boundary counts; no mask is needed. Whole-image losses spend
    most of their weight on the background (about 65 % of a slice), which any model reproduces.
    """
    if extra == 0:
        return None
    with torch.no_grad():
        fg = (target.float() > -1.0 + 2.0 / 255).amax(dim=1, keepdim=True).float()
        fg = F.max_pool2d(fg, 3, stride=1, padding=1)
        return 1.0 + extra * fg


def soft_dice_loss(logits: torch.Tensor, labels: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice of the tissue classes (all but background) over the batch, in fp32.

    Cross-entropy is dominated by the background's pixels; Dice weighs each tissue by its own
    area, so thin CSF counts as much as white matter.
    """
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.float().softmax(dim=1)[:, 1:]
        target = torch.nn.functional.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        inter = (probs * target).sum(dim=(2, 3))
        total = probs.sum(dim=(2, 3)) + target.sum(dim=(2, 3))
        return 1.0 - ((2 * inter + eps) / (total + eps)).mean()
