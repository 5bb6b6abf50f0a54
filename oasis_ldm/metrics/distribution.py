"""FID and KID between two sets of features (rows = images), computed in float64.

These work on feature tensors, not images, so the maths is testable without Inception and
the (expensive) real-set features can be extracted once and reused. `InceptionFeatures`
also plugs straight into torchmetrics' ``FrechetInceptionDistance(feature=...)`` and
``KernelInceptionDistance(feature=...)`` for callers that prefer those; the functions here
add what those metrics lack: a seedable generator for KID's subsets, reusable real-set
statistics for FID, and a symmetric-eigendecomposition matrix square root.

Fréchet distance between Gaussians fitted to the two sets (unbiased covariances):
    FID = ||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)).
Tr((S_a S_b)^(1/2)) is computed as the sum of sqrt(eigenvalues) of the symmetric PSD matrix
S_a^(1/2) S_b S_a^(1/2), which has the same eigenvalues as S_a S_b; symmetric `eigh` is
stable where a general ``sqrtm`` of a near-singular product returns complex noise.

KID (Bińkowski et al. 2018): the unbiased MMD^2 estimator with the polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over ``subsets`` random subsets of ``subset_size`` rows
drawn without replacement from each set; returns (mean, std) over subsets (population std,
as torch-fidelity and torchmetrics). ``subset_size`` is clipped to the smaller set, as
clean-fid does, so small demo sets still give a value.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _as_rows(feats: Tensor, name: str) -> Tensor:
    """float64 (N, D) with N >= 2, on the tensor's own device."""
    if feats.dim() != 2 or feats.shape[0] < 2:
        raise ValueError(f"{name}: expected features (N >= 2, D), got shape {tuple(feats.shape)}")
    return feats.double()


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """(mean (D,), unbiased covariance (D, D)) in float64: what FID needs from one set."""
    x = _as_rows(feats, "features")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _sqrtm_psd(matrix: Tensor) -> Tensor:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues from rounding -> 0."""
    vals, vecs = torch.linalg.eigh(matrix)
    return (vecs * vals.clamp(min=0).sqrt()) @ vecs.T


def frechet_distance_from_stats(mu_a: Tensor, sigma_a: Tensor, mu_b: Tensor, sigma_b: Tensor) -> float:
    """FID from two (mean, covariance) pairs, e.g. cached real-set statistics."""
    mu_a, mu_b, sigma_a, sigma_b = (t.double() for t in (mu_a, mu_b, sigma_a, sigma_b))
    root_a = _sqrtm_psd(sigma_a)
    middle = root_a @ sigma_b.to(root_a.device) @ root_a
    middle = (middle + middle.T) / 2  # symmetric to rounding; make it exactly so for eigh
    trace_sqrt = torch.linalg.eigvalsh(middle).clamp(min=0).sqrt().sum()
    mean_term = (mu_a - mu_b.to(mu_a.device)).square().sum()
    return float(mean_term + sigma_a.trace() + sigma_b.trace().to(mu_a.device) - 2 * trace_sqrt)


def frechet_distance(feats_a: Tensor, feats_b: Tensor) -> float:
    """FID between two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance_from_stats(*feature_stats(feats_a), *feature_stats(feats_b))


def polynomial_mmd2(x: Tensor, y: Tensor, *, degree: int = 3, coef: float = 1.0) -> Tensor:
    """Unbiased MMD^2 between two equal-size sets with k(x, y) = (x.y / d + coef)^degree.

    Within-set sums exclude the diagonal (i != j), which is what makes the estimator unbiased:
    its expectation is exactly 0 when both sets come from one distribution.
    """
    m, d = x.shape
    if y.shape != (m, d):
        raise ValueError(f"MMD needs equal-size sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    k_xx = (x @ x.T / d + coef) ** degree
    k_yy = (y @ y.T / d + coef) ** degree
    k_xy = (x @ y.T / d + coef) ** degree
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.sum() / (m * m)


def kernel_inception_distance(
    feats_a: Tensor,
    feats_b: Tensor,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """KID (mean, std) over random subsets; see the module docstring.

    ``generator`` (a CPU torch.Generator) makes the subsets, hence the result, reproducible.
    Runs on the features' device: pass CUDA features to make 100 subsets of 1000 cheap.
    """
    a, b = _as_rows(feats_a, "feats_a"), _as_rows(feats_b, "feats_b")
    size = min(subset_size, a.shape[0], b.shape[0])
    b = b.to(a.device)
    values = []
    for _ in range(subsets):
        ia = torch.randperm(a.shape[0], generator=generator)[:size].to(a.device)
        ib = torch.randperm(b.shape[0], generator=generator)[:size].to(a.device)
        values.append(polynomial_mmd2(a[ia], b[ib]))
    scores = torch.stack(values)
    return float(scores.mean()), float(scores.std(unbiased=False))
