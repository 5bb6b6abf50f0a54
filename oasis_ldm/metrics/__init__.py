"""Evaluation metrics: paired reconstruction quality, FID / KID, memorisation and diversity.

Images everywhere are uint8 [0, 255] or float [-1, 1], shaped (B, 1, H, W) or (B, H, W);
`as_unit` maps them to float32 [0, 1] and every metric uses data_range = 1.0. Paired
figures also come averaged over the real slice's brain region (`brain_region`).
"""

from oasis_ldm.metrics.distribution import (
    feature_stats,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    polynomial_mmd2,
)
from oasis_ldm.metrics.image import (
    MAX_PSNR,
    ReconstructionMeter,
    as_unit,
    ieee_float32,
    ms_ssim,
    ms_ssim_betas,
    ms_ssim_scales,
    paired_figures,
    psnr,
    reconstruction_metrics,
    ssim,
)
from oasis_ldm.metrics.inception import (
    InceptionFeatures,
    detect_weights_format,
    extract_features,
    load_inception,
)
from oasis_ldm.metrics.neighbours import (
    MEMORISATION_THRESHOLD,
    NeighbourResult,
    mean_pairwise_ms_ssim,
    nearest_training_ssim,
    summarise_neighbour_ssim,
)
from oasis_ldm.metrics.region import FOREGROUND_MARGIN, brain_region, fill_holes, foreground

__all__ = [
    "FOREGROUND_MARGIN",
    "MAX_PSNR",
    "MEMORISATION_THRESHOLD",
    "InceptionFeatures",
    "NeighbourResult",
    "ReconstructionMeter",
    "as_unit",
    "brain_region",
    "detect_weights_format",
    "extract_features",
    "feature_stats",
    "fill_holes",
    "foreground",
    "frechet_distance",
    "frechet_distance_from_stats",
    "ieee_float32",
    "kernel_inception_distance",
    "load_inception",
    "mean_pairwise_ms_ssim",
    "ms_ssim",
    "ms_ssim_betas",
    "ms_ssim_scales",
    "nearest_training_ssim",
    "paired_figures",
    "polynomial_mmd2",
    "psnr",
    "reconstruction_metrics",
    "ssim",
    "summarise_neighbour_ssim",
]
