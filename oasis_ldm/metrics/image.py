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

In-region figures (``region=``, a bool mask of the real image's shape, usually its brain,
see `oasis_ldm.metrics.region`): SSIM is the same whole-image map averaged over the
region's pixels only (the window still sees the surrounding pixels, as in the whole-image
figure), PSNR comes from the mean squared error over the region's pixels. An image whose
region is empty has NaN in-region figures, and the means leave it out.

Precision: convolutions and matmuls run in plain float32 (`oasis_ldm.precision.ieee_float32`), never TF32,
so a report computed on a GPU matches the CPU's (cuDNN's default TF32 rounds to a 10-bit
mantissa: SSIM's blur(x^2) - blur(x)^2 then errs by about 1e-4 against C2 = 9e-4).

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
    structural_similarity_index_measure,
)

from oasis_ldm.precision import ieee_float32

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


def _region(region: Tensor, real: Tensor) -> Tensor:
    """A bool region of ``real``'s (B, 1, H, W) shape, on its device."""
    region = region.unsqueeze(1) if region.dim() == 3 else region
    if region.shape != real.shape:
        raise ValueError(f"region shape {tuple(region.shape)} does not match the images {tuple(real.shape)}")
    return region.to(real.device, torch.bool)


def _region_mean(values: Tensor, region: Tensor) -> Tensor:
    """Per-image float64 mean of a (B, 1, H, W) map over a bool region; NaN where it is empty."""
    weights = region.double()
    return (values.double() * weights).sum((1, 2, 3)) / weights.sum((1, 2, 3))


def psnr(real: Tensor, fake: Tensor, region: Tensor | None = None) -> Tensor:
    """Per-image PSNR in dB, shape (B,), over the whole image or ``region``; +inf where identical."""
    real, fake = _pair(real, fake)
    return _psnr_unit(real, fake, None if region is None else _region(region, real))


def _psnr_unit(real: Tensor, fake: Tensor, region: Tensor | None = None) -> Tensor:
    """10 log10(1 / MSE), the squared errors summed in float64 (data range 1)."""
    squared = (fake.double() - real.double()).square()
    mse = squared.mean((1, 2, 3)) if region is None else _region_mean(squared, region)
    return (10 * torch.log10(1.0 / mse)).float()


def ssim(real: Tensor, fake: Tensor, region: Tensor | None = None, *, sigma: float = SSIM_SIGMA) -> Tensor:
    """Per-image SSIM, shape (B,): the mean of the SSIM map over the whole image or ``region``."""
    real, fake = _pair(real, fake)
    whole, smap = _ssim_unit(real, fake, sigma=sigma)
    return whole if region is None else _region_mean(smap, _region(region, real)).float()


@ieee_float32()
def _ssim_unit(real: Tensor, fake: Tensor, *, sigma: float = SSIM_SIGMA) -> tuple[Tensor, Tensor]:
    """Per-image SSIM (B,) and its (B, 1, H, W) map, of which it is the mean."""
    return structural_similarity_index_measure(
        fake, real, gaussian_kernel=True, sigma=sigma, data_range=1.0, reduction="none", return_full_image=True
    )


def paired_figures(real: Tensor, fake: Tensor, region: Tensor | None = None) -> dict[str, Tensor]:
    """Per-image (B,) float32 figures of one batch of pairs, from one SSIM map.

    "psnr", "ssim" over the whole image; with ``region`` (the real images' brain) also
    "psnr_brain", "ssim_brain" over it and "brain_fraction", the share of pixels it covers.
    """
    real, fake = _pair(real, fake)
    return _figures_unit(real, fake, None if region is None else _region(region, real))


def _figures_unit(real: Tensor, fake: Tensor, region: Tensor | None) -> dict[str, Tensor]:
    whole, smap = _ssim_unit(real, fake)
    figures = {"psnr": _psnr_unit(real, fake), "ssim": whole}
    if region is not None:
        figures["psnr_brain"] = _psnr_unit(real, fake, region)
        figures["ssim_brain"] = _region_mean(smap, region).float()
        figures["brain_fraction"] = region.float().mean((1, 2, 3))
    return figures


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


@ieee_float32()
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
    averaging; ``n_identical`` counts the images whose PSNR was infinite. Batches given a
    ``region`` (give one with every batch or with none) add the in-brain means, taken over
    the ``n_brain`` images whose region is not empty, and the mean ``brain_fraction``.
    """

    def __init__(self, *, ms_ssim_scales: int | None = None, max_psnr: float = MAX_PSNR) -> None:
        self.scales = ms_ssim_scales
        self.max_psnr = max_psnr
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._sums = {"psnr": 0.0, "ssim": 0.0, "ms_ssim": 0.0}
        self._brain_sums: dict[str, float] = {}
        self.n = 0
        self.n_identical = 0
        self.n_brain = 0

    @torch.no_grad()
    def update(self, real: Tensor, fake: Tensor, region: Tensor | None = None) -> None:
        """Add one batch of (real, fake) pairs in any accepted input format, and their brain region."""
        real, fake = _pair(real, fake)
        figures = _figures_unit(real, fake, None if region is None else _region(region, real))
        self.n_identical += int(torch.isinf(figures["psnr"]).sum())
        self._sums["psnr"] += _capped_sum(figures["psnr"], self.max_psnr)
        self._sums["ssim"] += figures["ssim"].double().sum().item()
        self._sums["ms_ssim"] += _ms_ssim_unit(real, fake, scales=self.scales).double().sum().item()
        self.n += len(figures["psnr"])
        if region is not None:
            inside = ~torch.isnan(figures["ssim_brain"])
            sums = self._brain_sums
            sums["psnr_brain"] = sums.get("psnr_brain", 0.0) + _capped_sum(figures["psnr_brain"][inside], self.max_psnr)
            sums["ssim_brain"] = sums.get("ssim_brain", 0.0) + figures["ssim_brain"][inside].double().sum().item()
            sums["brain_fraction"] = sums.get("brain_fraction", 0.0) + figures["brain_fraction"].double().sum().item()
            self.n_brain += int(inside.sum())

    def compute(self) -> dict[str, float]:
        """Means so far: {"psnr", "ssim", "ms_ssim", "n", "n_identical"} (NaN means if n == 0),
        and with regions {"psnr_brain", "ssim_brain", "brain_fraction", "n_brain"}."""
        means = {k: (v / self.n if self.n else math.nan) for k, v in self._sums.items()}
        result = {**means, "n": self.n, "n_identical": self.n_identical}
        if self._brain_sums:
            brain = self._brain_sums
            result["psnr_brain"] = brain["psnr_brain"] / self.n_brain if self.n_brain else math.nan
            result["ssim_brain"] = brain["ssim_brain"] / self.n_brain if self.n_brain else math.nan
            result["brain_fraction"] = brain["brain_fraction"] / self.n
            result["n_brain"] = self.n_brain
        return result


def _capped_sum(values: Tensor, cap: float) -> float:
    """Sum of per-image PSNRs with +inf (identical images) counted as ``cap``."""
    return values.clamp(max=cap).double().sum().item()


def reconstruction_metrics(
    real: Tensor, fake: Tensor, region: Tensor | None = None, **meter_kwargs: object
) -> dict[str, float]:
    """Batch means of one batch, with the same conventions as `ReconstructionMeter`."""
    meter = ReconstructionMeter(**meter_kwargs)  # type: ignore[arg-type]
    meter.update(real, fake, region)
    return meter.compute()
