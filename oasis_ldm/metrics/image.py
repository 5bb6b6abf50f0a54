"""Paired image metrics: PSNR, SSIM and MS-SSIM, per image and over a whole split.

Input convention (every metric in this package):
    uint8 images in [0, 255], shaped (B, 1, H, W) or (B, H, W), or floating-point images in
    [-1, 1] (the model's range) shaped the same way. `as_unit` maps both onto float32
    (B, 1, H, W) in [0, 1]; every metric then uses ``data_range = 1.0``. Floats are clamped
    to [-1, 1] first, because decoder outputs overshoot slightly and an overshoot is not
    information a metric should reward. A float tensor already in [0, 1] is therefore *not*
    accepted as-is: convert it with ``x * 2 - 1`` first.

The SSIM maths is torchmetrics' (`structural_similarity_index_measure`): Gaussian window
sigma 1.5 (11 taps), K1 = 0.01, K2 = 0.03, the input reflect-padded by 5 pixels so the
SSIM map covers the whole image, and the per-image value is the mean of that map.

PSNR of identical images is +inf. Per-image values keep the inf; batch means cap every
value at ``max_psnr`` (100 dB, far above any real reconstruction of 8-bit data, whose
1-grey-level error is 48 dB) and report how many images were identical, so the mean is
finite and the cap is visible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

MAX_PSNR = 100.0
SSIM_SIGMA = 1.5
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003, five scales


def as_unit(x: Tensor) -> Tensor:
    """Map uint8 [0, 255] or float [-1, 1] images to float32 (B, 1, H, W) in [0, 1]."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4 or x.shape[1] != 1:
        raise ValueError(f"expected greyscale images (B, 1, H, W) or (B, H, W), got shape {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float() / 255.0
    if not x.is_floating_point():
        raise TypeError(f"expected uint8 or floating-point images, got {x.dtype}")
    return (x.float().clamp(-1.0, 1.0) + 1.0) / 2.0


def _pair(real: Tensor, fake: Tensor) -> tuple[Tensor, Tensor]:
    """Normalise a (real, fake) pair and check the shapes agree."""
    real, fake = as_unit(real), as_unit(fake)
    if real.shape != fake.shape:
        raise ValueError(f"real and fake shapes differ: {tuple(real.shape)} vs {tuple(fake.shape)}")
    return real, fake.to(real.device)


def psnr(real: Tensor, fake: Tensor) -> Tensor:
    """Per-image PSNR in dB, shape (B,); +inf where the two images are identical."""
    return _psnr_unit(*_pair(real, fake))


def _psnr_unit(real: Tensor, fake: Tensor) -> Tensor:
    return peak_signal_noise_ratio(fake, real, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(real: Tensor, fake: Tensor, *, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-image SSIM, shape (B,) (see the module docstring for the window and padding)."""
    return _ssim_unit(*_pair(real, fake), sigma=sigma)


def _ssim_unit(real: Tensor, fake: Tensor, *, sigma: float = SSIM_SIGMA) -> Tensor:
    return structural_similarity_index_measure(
        fake, real, gaussian_kernel=True, sigma=sigma, data_range=1.0, reduction="none"
    )


def _gaussian_taps(sigma: float) -> int:
    """Width of torchmetrics' Gaussian window for ``sigma`` (11 for 1.5)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def ms_ssim_scales(size: int, *, sigma: float = SSIM_SIGMA) -> int:
    """Most scales (at most 5) MS-SSIM can use on ``size``-pixel images.

    Every scale halves the image, and the window must still fit at the coarsest one:
    size > (taps - 1) * 2 ** (scales - 1), the rule of the original MS-SSIM code (5 scales
    of an 11-tap window need 161 px). torchmetrics, which computes the value, checks the
    stricter size // (scales - 1) ** 2 > taps - 1 (5 scales need 176 px), so both must hold.
    With 11 taps: 256 px -> 5 scales, 128 px -> 4, 64 px -> 3, 44 px -> 3.
    """
    taps = _gaussian_taps(sigma)
    for scales in range(len(MS_SSIM_BETAS), 0, -1):
        classic = size > (taps - 1) * 2 ** (scales - 1)
        library = size // max(1, scales - 1) ** 2 > taps - 1 and size >= 2**scales
        if classic and library:
            return scales
    raise ValueError(f"images of {size} px are too small for MS-SSIM with sigma {sigma}")


def ms_ssim_betas(scales: int) -> tuple[float, ...]:
    """The first ``scales`` standard MS-SSIM weights, renormalised to sum to 1.

    Renormalising keeps a perfect score at 1 and the relative weight of the scales that
    remain; values are only comparable between runs that used the same number of scales.
    """
    if not 1 <= scales <= len(MS_SSIM_BETAS):
        raise ValueError(f"MS-SSIM scales must be in 1..{len(MS_SSIM_BETAS)}, got {scales}")
    head = MS_SSIM_BETAS[:scales]
    return tuple(b / sum(head) for b in head)


def ms_ssim(real: Tensor, fake: Tensor, *, scales: int | None = None, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-image MS-SSIM, shape (B,).

    ``scales=None`` picks `ms_ssim_scales` of the smaller image side (5 at 256 px, 3 at the
    demo's 64 px). Negative contrast terms are clipped at 0 (torchmetrics' "relu"), so
    anti-correlated images score 0 instead of NaN.
    """
    return _ms_ssim_unit(*_pair(real, fake), scales=scales, sigma=sigma)


def _ms_ssim_unit(real: Tensor, fake: Tensor, *, scales: int | None, sigma: float = SSIM_SIGMA) -> Tensor:
    if scales is None:
        scales = ms_ssim_scales(min(real.shape[-2:]), sigma=sigma)
    return multiscale_structural_similarity_index_measure(
        fake,
        real,
        gaussian_kernel=True,
        sigma=sigma,
        kernel_size=_gaussian_taps(sigma),  # only used by torchmetrics' size check
        data_range=1.0,
        reduction="none",
        betas=ms_ssim_betas(scales),
        normalize="relu",
    )


class ReconstructionMeter:
    """Streaming PSNR / SSIM / MS-SSIM means over a split, fed batch by batch.

    Sums are kept in float64 on the CPU, so memory is constant and the result does not
    depend on how the split was batched. PSNR values are capped at ``max_psnr`` before
    averaging; ``n_identical`` counts the images whose PSNR was infinite.
    """

    def __init__(self, *, ms_ssim_scales: int | None = None, max_psnr: float = MAX_PSNR) -> None:
        self.scales = ms_ssim_scales
        self.max_psnr = max_psnr
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums = {"psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0}
        self.n = 0
        self.n_identical = 0

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor) -> None:
        """Add one batch of (real, fake) pairs in any accepted input format."""
        real, fake = _pair(real, fake)
        values = _psnr_unit(real, fake)
        self.n_identical += int(torch.isinf(values).sum())
        self._sums["psnr"] += values.clamp(max=self.max_psnr).double().sum().item()
        self._sums["ssim"] += _ssim_unit(real, fake).double().sum().item()
        self._sums["ms_ssim"] += _ms_ssim_unit(real, fake, scales=self.scales).double().sum().item()
        self.n += real.shape[0]

    def compute(self) -> dict[str, float]:
        """Means so far: {"psnr", "ssim", "ms_ssim", "n", "n_identical"} (NaN means if n == 0)."""
        means = {k: (v / self.n if self.n else math.nan) for k, v in self._sums.items()}
        return {**means, "n": self.n, "n_identical": self.n_identical}


def reconstruction_metrics(real: Tensor, fake: Tensor, **meter_kwargs: object) -> dict[str, float]:
    """Batch means of one batch, with the same conventions as `ReconstructionMeter`."""
    meter = ReconstructionMeter(**meter_kwargs)  # type: ignore[arg-type]
    meter.update(real, fake)
    return meter.compute()
