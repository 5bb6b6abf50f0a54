"""Tests for oasis_ldm.metrics: reference formulas written here, independent of the code under test."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest
import torch
import torchvision
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from oasis_ldm.metrics import (
    MAX_PSNR,
    InceptionFeatures,
    ReconstructionMeter,
    as_unit,
    brain_region,
    extract_features,
    feature_stats,
    foreground,
    frechet_distance,
    frechet_distance_from_stats,
    kernel_inception_distance,
    load_inception,
    mean_pairwise_ms_ssim,
    ms_ssim,
    ms_ssim_betas,
    ms_ssim_scales,
    nearest_training_ssim,
    paired_figures,
    psnr,
    reconstruction_metrics,
    ssim,
    summarise_neighbour_ssim,
)
from oasis_ldm.metrics.neighbours import _pairs


def _phantom(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """uint8 (n, 1, size, size) smooth 'brain-like' blobs on black, different per image."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([0.4, 0.4, 0.3]) + torch.tensor([-0.2, -0.2, 0.5])
        head = ((xx - cx) ** 2 + (yy - cy) ** 2 < r**2).float()
        texture = 0.5 + 0.3 * torch.sin(6 * xx + 3 * torch.rand(1, generator=g)) * torch.cos(5 * yy)
        out.append((255 * head * texture).round().to(torch.uint8))
    return torch.stack(out)[:, None]


def _noise(n: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8, generator=g)


# ----------------------------------------------------------------------------- as_unit


def test_as_unit_maps_both_conventions_to_unit_range():
    u8 = torch.tensor([[[0, 255], [51, 102]]], dtype=torch.uint8)  # (B, H, W)
    out = as_unit(u8)
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    assert torch.allclose(out.flatten(), torch.tensor([0.0, 1.0, 0.2, 0.4]))
    fl = torch.tensor([-1.0, 0.0, 1.0, 1.5]).view(1, 1, 2, 2)
    assert torch.allclose(as_unit(fl).flatten(), torch.tensor([0.0, 0.5, 1.0, 1.0]))  # clamped overshoot
    with pytest.raises(ValueError, match="greyscale"):
        as_unit(torch.zeros(2, 3, 8, 8))


# ----------------------------------------------------------------------------- image metrics


def test_identical_images_psnr_inf_ssim_one_and_capped_mean():
    x = _phantom(3)
    assert torch.isinf(psnr(x, x)).all()
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-5)
    assert torch.allclose(ms_ssim(x, x), torch.ones(3), atol=1e-5)
    noisy = (x.float() + 10).clamp(0, 255).to(torch.uint8)
    finite = psnr(x[1:2], noisy[1:2]).item()
    result = reconstruction_metrics(x[:2], torch.cat([x[:1], noisy[1:2]]))
    assert result["n"] == 2 and result["n_identical"] == 1
    assert result["psnr"] == pytest.approx((MAX_PSNR + finite) / 2, rel=1e-6)


def test_psnr_matches_hand_formula_for_known_noise():
    rng = np.random.default_rng(1)
    real = rng.integers(30, 220, size=(2, 64, 64)).astype(np.uint8)
    fake = np.clip(real.astype(np.int64) + rng.integers(-12, 13, size=real.shape), 0, 255).astype(np.uint8)
    mse = ((real / 255.0 - fake / 255.0) ** 2).reshape(2, -1).mean(1)
    expected = 10 * np.log10(1.0 / mse)
    got = psnr(torch.from_numpy(real), torch.from_numpy(fake)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    # the [-1, 1] float path is the same images, so the same PSNR
    as_float = psnr(torch.from_numpy(real).float() / 127.5 - 1, torch.from_numpy(fake).float() / 127.5 - 1)
    np.testing.assert_allclose(as_float.numpy(), expected, rtol=1e-4)


def _gaussian_blur(a: np.ndarray, sigma: float, radius: int) -> np.ndarray:
    """Separable Gaussian filter in float64, mirror padding without repeating the edge."""
    taps = np.exp(-(np.arange(-radius, radius + 1) ** 2) / (2 * sigma**2))
    taps /= taps.sum()
    padded = np.pad(a, radius, mode="reflect")
    h, w = a.shape
    cols = sum(t * padded[k : k + h, :] for k, t in enumerate(taps))
    return sum(t * cols[:, k : k + w] for k, t in enumerate(taps))


def _reference_ssim_map(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Wang et al. SSIM map, Gaussian window 11 (sigma 1.5), K1 0.01, K2 0.03, data range 1.

    Borders: the image is mirror-padded (edge not repeated), so the map covers the whole
    image, the convention oasis_ldm.metrics documents.
    """
    c1, c2 = 0.01**2, 0.03**2

    def blur(a: np.ndarray) -> np.ndarray:
        return _gaussian_blur(a, sigma=1.5, radius=5)  # 11 taps

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _reference_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Whole-image SSIM: the map's mean over every pixel."""
    return float(_reference_ssim_map(x, y).mean())


def test_ssim_of_gaussian_blur_matches_reference_formula():
    real = _phantom(2, seed=3)
    unit = real.double().numpy()[:, 0] / 255.0
    blurred = np.stack([_gaussian_blur(im, sigma=1.2, radius=4) for im in unit])
    fake = torch.from_numpy(blurred * 2 - 1).float()[:, None]
    got = ssim(real, fake)
    for i in range(2):
        ref = _reference_ssim(unit[i], np.clip(blurred[i], 0, 1))
        assert 0.3 < ref < 0.999  # a real, partial loss of structure
        assert got[i].item() == pytest.approx(ref, abs=1e-4)


def test_ms_ssim_scales_follow_image_size_and_betas_sum_to_one():
    assert [ms_ssim_scales(s) for s in (64, 128, 256)] == [3, 4, 5]
    assert sum(ms_ssim_betas(3)) == pytest.approx(1.0)
    x = _phantom(2)
    y = (x.float() * 0.8).to(torch.uint8)
    value = ms_ssim(x, y)
    assert ((value > 0) & (value < 1)).all()
    with pytest.raises(ValueError):
        ms_ssim(x, y, scales=5)  # 5 scales do not fit 64 px


def test_meter_streams_to_the_same_means_as_one_batch():
    real = _phantom(6, seed=4)
    fake = (real.float() * 0.9 + 8).clamp(0, 255).to(torch.uint8)
    meter = ReconstructionMeter()
    meter.update(real[:4], fake[:4])
    meter.update(real[4:], fake[4:])
    streamed = meter.compute()
    assert streamed["n"] == 6 and streamed["n_identical"] == 0
    assert streamed["psnr"] == pytest.approx(psnr(real, fake).double().mean().item(), rel=1e-6)
    assert streamed["ssim"] == pytest.approx(ssim(real, fake).double().mean().item(), rel=1e-6)
    assert streamed["ms_ssim"] == pytest.approx(ms_ssim(real, fake).double().mean().item(), rel=1e-6)
    meter.reset()
    assert meter.compute()["n"] == 0 and math.isnan(meter.compute()["psnr"])


# ----------------------------------------------------------------------------- in-brain figures


def _disc(size: int, radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    """Bool (size, size) disc."""
    cy, cx = centre if centre is not None else ((size - 1) / 2, (size - 1) / 2)
    yy, xx = np.mgrid[0:size, 0:size]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2


def _blur_inside(real: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 copy of ``real`` blurred (sigma 1.2) inside ``mask`` only, untouched outside."""
    blurred = np.rint(_gaussian_blur(real.astype(np.float64), sigma=1.2, radius=4)).clip(0, 255)
    return np.where(mask, blurred, real).astype(np.uint8)


def _far_outside(mask: np.ndarray, distance: int = 6) -> np.ndarray:
    """Pixels more than ``distance`` px (Chebyshev) from ``mask``: out of reach of SSIM's 11-px window."""
    near = mask.copy()
    for _ in range(distance):
        padded = np.pad(near, 1)
        near = np.max(
            [padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] for dy in range(3) for dx in range(3)], 0
        )
    return ~near


def test_blur_inside_the_mask_drops_the_in_mask_figures_by_the_reference_amount():
    head = _phantom(2, seed=5).numpy()[:, 0]
    texture = np.random.default_rng(5).integers(-40, 41, head.shape)  # fine detail that a blur removes
    real = np.where(head > 0, np.clip(head + texture, 1, 255), 0).astype(np.uint8)
    mask = np.stack([_disc(64, 14, (30, 34)), _disc(64, 18, (33, 29))])
    fake = np.stack([_blur_inside(r, m) for r, m in zip(real, mask, strict=True)])
    got = paired_figures(torch.from_numpy(real), torch.from_numpy(fake), torch.from_numpy(mask))
    for i in range(2):
        x, y = real[i] / 255.0, fake[i] / 255.0
        smap = _reference_ssim_map(x, y)
        expected_ssim = smap[mask[i]].mean()
        expected_psnr = 10 * np.log10(1.0 / ((x - y)[mask[i]] ** 2).mean())
        assert 0.3 < expected_ssim < 0.95  # a real loss of structure, not a rounding
        assert got["ssim_brain"][i].item() == pytest.approx(expected_ssim, abs=1e-4)
        assert got["psnr_brain"][i].item() == pytest.approx(expected_psnr, rel=1e-5)
        assert got["brain_fraction"][i].item() == pytest.approx(mask[i].mean())
        # none outside: every pixel out of the blur's reach keeps SSIM 1, and those pixels are identical
        far = torch.from_numpy(_far_outside(mask[i]))[None]
        assert ssim(torch.from_numpy(real[i : i + 1]), torch.from_numpy(fake[i : i + 1]), far).item() == pytest.approx(
            1.0, abs=1e-6
        )
        assert torch.isinf(
            psnr(torch.from_numpy(real[i : i + 1]), torch.from_numpy(fake[i : i + 1]), ~torch.from_numpy(mask[i])[None])
        )
        # the whole-image figures dilute the same damage with the untouched background
        assert got["ssim"][i].item() > got["ssim_brain"][i].item()
        assert got["psnr"][i].item() > got["psnr_brain"][i].item()


def test_a_change_outside_the_mask_leaves_the_in_brain_figures_unchanged():
    real = _phantom(1, seed=6)
    mask = torch.from_numpy(_disc(64, 12))[None, None]
    reconstruction = (real.float() * 0.9 + 5).round().to(torch.uint8)  # damaged everywhere
    far = torch.from_numpy(_far_outside(mask[0, 0].numpy()))[None, None]
    noise = torch.randint(0, 80, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    changed = torch.where(far, noise, reconstruction)  # new background, far from the brain
    before, after = paired_figures(real, reconstruction, mask), paired_figures(real, changed, mask)
    assert after["ssim_brain"].item() == pytest.approx(before["ssim_brain"].item(), abs=1e-6)
    assert after["psnr_brain"].item() == pytest.approx(before["psnr_brain"].item(), abs=1e-6)
    assert after["ssim"].item() < before["ssim"].item() - 0.01  # the whole-image figures do move
    assert after["psnr"].item() < before["psnr"].item() - 0.5
    # next to the brain the SSIM window reaches in (5 px), but the in-brain PSNR never moves
    ring = ~mask & ~far
    near = torch.where(ring, noise, reconstruction)
    assert paired_figures(real, near, mask)["psnr_brain"].item() == pytest.approx(before["psnr_brain"].item(), abs=1e-6)


def test_in_brain_figures_on_an_all_ones_mask_are_the_whole_image_ones():
    real = _phantom(3, seed=7)
    fake = (real.float() * 0.85 + 10).clamp(0, 255).to(torch.uint8)
    ones = torch.ones(real.shape, dtype=torch.bool)
    got = paired_figures(real, fake, ones)
    assert torch.allclose(got["ssim_brain"], got["ssim"], atol=1e-6)
    assert torch.allclose(got["psnr_brain"], got["psnr"], atol=1e-5)
    assert torch.allclose(got["brain_fraction"], torch.ones(3))
    assert torch.allclose(ssim(real, fake, ones), ssim(real, fake), atol=1e-6)
    result = reconstruction_metrics(real, fake, ones)
    assert result["ssim_brain"] == pytest.approx(result["ssim"], abs=1e-6)
    assert result["psnr_brain"] == pytest.approx(result["psnr"], abs=1e-5)
    assert result["n_brain"] == 3 and result["brain_fraction"] == pytest.approx(1.0)


def test_meter_leaves_images_without_brain_out_of_the_brain_means():
    real = _phantom(3, seed=8)
    fake = (real.float() * 0.9).to(torch.uint8)
    region = torch.from_numpy(_disc(64, 15)).expand(3, 1, 64, 64).clone()
    region[2] = False  # a slice above the vertex: no brain at all
    meter = ReconstructionMeter()
    meter.update(real[:2], fake[:2], region[:2])
    meter.update(real[2:], fake[2:], region[2:])
    result = meter.compute()
    direct = paired_figures(real[:2], fake[:2], region[:2])
    assert result["n"] == 3 and result["n_brain"] == 2
    assert result["ssim_brain"] == pytest.approx(direct["ssim_brain"].double().mean().item(), rel=1e-6)
    assert result["psnr_brain"] == pytest.approx(direct["psnr_brain"].double().mean().item(), rel=1e-6)
    assert result["brain_fraction"] == pytest.approx(region.double().mean().item())
    assert "ssim_brain" not in reconstruction_metrics(real, fake)  # no region, no brain keys
    assert math.isnan(ssim(real[2:], fake[2:], region[2:]).item())


def test_foreground_is_the_bright_slice_with_its_enclosed_dark_parts():
    size = 48
    head = _disc(size, 16)
    ventricle = _disc(size, 4, (22, 24))  # dark CSF enclosed by tissue: brain
    sulcus = np.zeros((size, size), bool)
    sulcus[23:25, 32:] = True  # a dark cleft open to the background: not brain
    image = np.where(head & ~ventricle, 140, 0).astype(np.uint8)
    image[sulcus] = 0
    diagonal = np.zeros((size, size), bool)  # a rim broken only diagonally still encloses its hole
    diagonal[2:7, 2:7] = True
    diagonal[3:6, 3:6] = False
    image[diagonal] = 90
    image[3, 3] = 0
    image[2, 2] = 0  # the hole at (3, 3) touches the outside at a corner only
    expected = (head & ~sulcus) | diagonal
    expected[2, 2] = False
    expected[3:6, 3:6] = True
    raised = image.astype(np.int64) + 30  # the same slice on a grey background: the level is relative
    for picture in (image, raised.astype(np.uint8)):
        got = foreground(torch.from_numpy(picture)[None, None])[0, 0].numpy()
        np.testing.assert_array_equal(got, expected)
    faint = np.where(head, 8, 0).astype(np.uint8)  # below the 10-level margin: background
    assert not foreground(torch.from_numpy(faint)[None, None]).any()


def test_brain_region_uses_the_masks_where_there_are_some():
    images = _phantom(2, seed=9)
    masks = torch.zeros_like(images)
    masks[:, :, 20:40, 20:40] = 85  # CSF counts
    masks[0, :, 25:30, 25:30] = 255
    np.testing.assert_array_equal(brain_region(images, masks).numpy(), (masks > 0).numpy())
    np.testing.assert_array_equal(brain_region(images).numpy(), foreground(images).numpy())
    with pytest.raises(ValueError, match="do not match"):
        brain_region(images, masks[:1])


# ----------------------------------------------------------------------------- precision (TF32)


def _tf32_in_use() -> bool:
    """Whether CUDA convolutions or matmuls would run in TF32 now (either torch API)."""
    if hasattr(torch.backends.cudnn, "conv"):
        conv, mm = torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision
        return "tf32" in (conv, mm)
    return torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on():
    """TF32 switched on for convolutions and matmuls, as cuDNN and `set_float32_matmul_precision("high")` do."""
    if hasattr(torch.backends.cudnn, "conv"):
        switches = [
            (torch.backends.cudnn.conv, "fp32_precision", "tf32"),
            (torch.backends.cuda.matmul, "fp32_precision", "tf32"),
        ]
    else:
        switches = [(torch.backends.cudnn, "allow_tf32", True), (torch.backends.cuda.matmul, "allow_tf32", True)]
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, value in switches:
        setattr(owner, name, value)
    assert _tf32_in_use()
    yield
    for (owner, name, _), value in zip(switches, saved, strict=True):
        setattr(owner, name, value)


def test_metrics_compute_without_tf32_and_restore_the_setting(tf32_on, monkeypatch):
    seen = []
    for name in ("conv2d", "avg_pool2d"):
        original = getattr(torch.nn.functional, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(_tf32_in_use())
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, name, spy)
    original_cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda *a, **k: (seen.append(_tf32_in_use()), original_cdist(*a, **k))[1])
    real = _phantom(4, seed=10)
    fake = (real.float() * 0.9).to(torch.uint8)
    ssim(real, fake)
    ms_ssim(real, fake)
    paired_figures(real, fake, torch.ones(real.shape, dtype=torch.bool))
    reconstruction_metrics(real, fake)
    nearest_training_ssim(fake, real, top_k=2, progress=False)
    assert seen and not any(seen), f"{sum(seen)} of {len(seen)} calls ran with TF32 allowed"
    assert _tf32_in_use()  # the caller's setting is back


@pytest.mark.cuda
def test_figures_are_the_same_on_cpu_and_gpu(tf32_on):
    """TF32 convolutions (operands rounded to 10 mantissa bits, simulated on the CPU) move per-image
    SSIM by up to 0.007 on demo slices; plain float32 on both devices agrees to about 1e-6."""
    real = torch.cat([_phantom(6, size=128, seed=11), _noise(2, size=128, seed=12)])
    fake = real.float() * 0.8 + torch.randn(real.shape, generator=torch.Generator().manual_seed(0)) * 6
    fake = fake.clamp(0, 255).round().to(torch.uint8)
    region = brain_region(real)
    cpu = {**paired_figures(real, fake, region), "ms_ssim": ms_ssim(real, fake)}
    gpu = {
        **paired_figures(real.cuda(), fake.cuda(), region.cuda()),
        "ms_ssim": ms_ssim(real.cuda(), fake.cuda()),
    }
    np.testing.assert_array_equal(region.numpy(), brain_region(real.cuda()).cpu().numpy())
    for key, value in cpu.items():
        assert torch.allclose(gpu[key].cpu(), value, atol=1e-5, rtol=0), key
    near_cpu = nearest_training_ssim(fake, real, top_k=3, progress=False)
    near_gpu = nearest_training_ssim(fake, real, top_k=3, device="cuda", progress=False)
    assert near_cpu.index.tolist() == near_gpu.index.tolist()
    assert torch.allclose(near_cpu.ssim, near_gpu.ssim, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- FID / KID


def _exact_moments(n: int, mu: torch.Tensor, var: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples whose empirical mean and unbiased covariance are exactly mu and diag(var)."""
    z = torch.randn(n, mu.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(z.T @ z / (n - 1))
    white = torch.linalg.solve_triangular(chol, z.T, upper=False).T
    return mu + var.sqrt() * white


def _closed_form_fid(mu1, var1, mu2, var2) -> float:
    return float((mu1 - mu2).square().sum() + (var1 + var2 - 2 * (var1 * var2).sqrt()).sum())


def test_fid_of_a_set_with_itself_is_zero():
    feats = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(feats, feats)) < 1e-8
    assert frechet_distance(feats, feats + 1.0) == pytest.approx(32.0, rel=1e-9)  # mean shift only


def test_fid_matches_closed_form_for_gaussians():
    g = torch.Generator().manual_seed(5)
    d = 8
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    var1 = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.2
    var2 = torch.rand(d, generator=g, dtype=torch.float64) * 2 + 0.2
    expected = _closed_form_fid(mu1, var1, mu2, var2)
    # exact moments: the estimator must reproduce the closed form to rounding
    exact = frechet_distance(_exact_moments(1000, mu1, var1, 1), _exact_moments(1000, mu2, var2, 2))
    assert exact == pytest.approx(expected, rel=1e-9)
    # plain large samples: close, up to sampling noise
    a = mu1 + var1.sqrt() * torch.randn(50_000, d, generator=g, dtype=torch.float64)
    b = mu2 + var2.sqrt() * torch.randn(50_000, d, generator=g, dtype=torch.float64)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


class _Identity(nn.Module):
    """Feature 'extractor' that returns its input, to feed feature tensors to torchmetrics."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_fid_agrees_with_torchmetrics_on_correlated_features():
    g = torch.Generator().manual_seed(7)
    mix = torch.randn(6, 6, generator=g, dtype=torch.float64)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ mix
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) @ mix.T + 0.3
    reference = FrechetInceptionDistance(feature=_Identity(6))
    reference.update(a, real=True)
    reference.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(float(reference.compute()), rel=1e-6)
    assert frechet_distance_from_stats(*feature_stats(a), *feature_stats(b)) == pytest.approx(
        frechet_distance(a, b), rel=1e-12
    )


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_kid_agrees_with_torchmetrics_on_full_sets():
    g = torch.Generator().manual_seed(8)
    a = torch.randn(120, 10, generator=g, dtype=torch.float64)
    b = torch.randn(120, 10, generator=g, dtype=torch.float64) * 1.3 + 0.2
    reference = KernelInceptionDistance(feature=_Identity(10), subsets=1, subset_size=120)
    reference.update(a, real=True)
    reference.update(b, real=False)
    mean, std = kernel_inception_distance(a, b, subsets=3, subset_size=120)  # full sets: order-free
    assert mean == pytest.approx(float(reference.compute()[0]), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-12)


def test_kid_identical_sets_is_the_small_unbiased_value():
    a = torch.rand(300, 64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    k = (a @ a.T / 64 + 1) ** 3
    m = a.shape[0]
    expected = -2 * (k.diagonal().mean() - k.mean()) / (m - 1)  # the U-statistic on one set, by hand
    mean, _ = kernel_inception_distance(a, a, subsets=1, subset_size=m)
    assert mean == pytest.approx(float(expected), rel=1e-9)
    shifted, _ = kernel_inception_distance(a, a + 0.2, subsets=1, subset_size=m)
    assert abs(mean) < 0.05 * shifted  # O(1/m), small next to a real difference


def test_kid_is_unbiased_for_samples_of_one_distribution():
    means, biased = [], []
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        a, b = torch.randn(200, 16, generator=g), torch.randn(200, 16, generator=g)
        means.append(kernel_inception_distance(a, b, subsets=10, subset_size=100, generator=g)[0])
        x, y = a[:100].double(), b[:100].double()
        kern = lambda p, q: (p @ q.T / 16 + 1) ** 3  # noqa: E731
        biased.append(float(kern(x, x).mean() + kern(y, y).mean() - 2 * kern(x, y).mean()))
    avg, sem = np.mean(means), np.std(means, ddof=1) / math.sqrt(len(means))
    assert abs(avg) < 4 * sem + 1e-3
    assert abs(avg) < 0.1 * np.mean(biased)  # the V-statistic's bias would be caught
    g = torch.Generator().manual_seed(0)
    shifted = kernel_inception_distance(torch.randn(200, 16), torch.randn(200, 16) + 0.5, subsets=10, generator=g)
    assert shifted[0] > 10 * sem


def test_kid_generator_makes_subsets_reproducible():
    a, b = torch.randn(300, 8), torch.randn(300, 8) + 0.1
    first = kernel_inception_distance(a, b, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
    again = kernel_inception_distance(a, b, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(3))
    assert first == again and first[1] > 0


# ----------------------------------------------------------------------------- Inception


def _he_init(net: nn.Module) -> None:
    """Random weights that keep activations O(1) through 90+ layers (the default init fades)."""
    g = torch.Generator().manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            with torch.no_grad():
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("inception")
    fid_net = InceptionFeatures("pytorch-fid").net
    _he_init(fid_net)
    tv_net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    _he_init(tv_net)
    paths = {"pytorch-fid": root / "pt_inception.pth", "torchvision": root / "inception_v3_google.pth"}
    torch.save(fid_net.state_dict(), paths["pytorch-fid"])
    torch.save(tv_net.state_dict(), paths["torchvision"])  # includes AuxLogits.*
    return paths


@pytest.fixture(scope="module")
def loaded(weight_files):
    return {fmt: load_inception(path) for fmt, path in weight_files.items()}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["pytorch-fid", "torchvision"])
def test_inception_loads_both_formats_and_gives_pool_features(weight_files, loaded, fmt):
    model = loaded[fmt]
    assert model.weights_format == fmt and model.num_features == 2048
    expected = torch.load(weight_files[fmt], weights_only=True)["Conv2d_1a_3x3.conv.weight"]
    assert torch.equal(model.net.Conv2d_1a_3x3.conv.weight, expected)
    images = _phantom(2, seed=11)
    feats = model(images)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all()
    assert (feats[0] - feats[1]).abs().max() > 1e-3 * feats.abs().max()  # different slices differ
    assert torch.allclose(model(images[:, 0].float() / 127.5 - 1), feats, rtol=1e-4, atol=1e-5)  # float input


def test_fid_format_uses_tensorflow_pooling_blocks(loaded):
    fid = loaded["pytorch-fid"]
    plain = InceptionFeatures("torchvision")
    state = {k: v for k, v in fid.net.state_dict().items() if not k.startswith("fc.")}
    plain.net.load_state_dict(state, strict=False)
    x = _phantom(1, seed=2)
    assert not torch.allclose(fid(x), plain(x))  # same weights, different pooling


def test_torchvision_preprocessing_matches_torchvision_transform_input():
    images = _phantom(1, seed=5)
    ours = InceptionFeatures("torchvision").preprocess(images)
    unit = torch.nn.functional.interpolate(
        as_unit(images).expand(-1, 3, -1, -1), size=(299, 299), mode="bilinear", align_corners=False
    )
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    reference = torchvision.models.inception_v3(weights=None, transform_input=True, init_weights=False)
    assert torch.allclose(ours, reference._transform_input((unit - mean) / std), atol=1e-5)
    assert torch.allclose(InceptionFeatures("pytorch-fid").preprocess(images), 2 * unit - 1, atol=1e-6)


def test_inception_plugs_into_torchmetrics_and_extracts_in_batches(loaded):
    model = loaded["torchvision"]
    metric = FrechetInceptionDistance(feature=model)
    assert metric.real_features_sum.shape == (2048,)
    images = _phantom(2, seed=6)
    feats = extract_features(model, images, batch_size=1, progress=False)
    assert feats.shape == (2, 2048) and feats.dtype == torch.float64
    assert torch.allclose(feats.float(), model(images), rtol=1e-4, atol=1e-5)


def test_missing_or_bad_weights_name_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        load_inception(None)
    with pytest.raises(FileNotFoundError, match="--inception-weights"):
        load_inception(tmp_path / "absent.pth")
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048), "Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match=r"--inception-weights.*10 classes"):
        load_inception(bad)


# ----------------------------------------------------------------------------- neighbours / diversity


def test_nearest_neighbour_finds_exact_copies_through_the_prefilter(tmp_path):
    train = torch.cat([_phantom(20, seed=12), _noise(20, seed=13)])  # 40 slices
    samples = torch.cat([train[[7, 33]], _phantom(2, seed=99)])
    as_float = samples.float() / 127.5 - 1  # samples arrive in the model's [-1, 1] range
    h5 = tmp_path / "train.h5"
    with h5py.File(h5, "w") as f:
        f["images"] = train[:, 0].numpy()
    with h5py.File(h5, "r") as f:
        sources = [train, train.numpy(), f["images"], lambda: iter(train.split(7))]
        for source in sources:
            result = nearest_training_ssim(as_float, source, top_k=3, batch_size=16, progress=False)
            assert result.index[:2].tolist() == [7, 33]
            assert torch.allclose(result.ssim[:2], torch.ones(2), atol=1e-5)
            assert (result.ssim[2:] < 0.999).all()
    exhaustive = nearest_training_ssim(as_float, train, top_k=None, batch_size=16, progress=False)
    assert exhaustive.index[:2].tolist() == [7, 33]
    assert (exhaustive.ssim >= result.ssim - 1e-6).all()  # exhaustive is never worse
    direct = ssim(train[exhaustive.index[2:]], samples[2:])
    assert torch.allclose(exhaustive.ssim[2:], direct, atol=1e-6)


def test_neighbour_summary_is_computed_from_the_values():
    best = torch.tensor([0.1, 0.5, 0.65, 0.9, 0.2])
    summary = summarise_neighbour_ssim(best)
    assert summary["frac_above"] == pytest.approx(2 / 5)
    assert summary["mean"] == pytest.approx(float(best.double().mean()))
    assert summary["p50"] == pytest.approx(0.5)
    assert summary["p10"] < summary["p50"] < summary["p90"]


def test_diversity_of_identical_images_is_one_and_of_noise_is_low():
    same = _phantom(1, seed=4).repeat(5, 1, 1, 1)
    assert mean_pairwise_ms_ssim(same) == pytest.approx(1.0, abs=1e-5)
    noise = _noise(8, seed=21)
    assert mean_pairwise_ms_ssim(noise) < 0.15
    brains = _phantom(8, seed=22)
    assert mean_pairwise_ms_ssim(brains) > mean_pairwise_ms_ssim(noise)


def test_diversity_pair_sampling_is_reproducible_and_unbiased():
    i, j = _pairs(50, 400, torch.Generator().manual_seed(0))
    assert i.numel() == 400 and bool((i != j).all())
    images = _phantom(12, seed=23)
    full = mean_pairwise_ms_ssim(images)  # 66 pairs, all used
    sampled = mean_pairwise_ms_ssim(images, max_pairs=40, generator=torch.Generator().manual_seed(1))
    again = mean_pairwise_ms_ssim(images, max_pairs=40, generator=torch.Generator().manual_seed(1))
    assert sampled == again
    assert sampled == pytest.approx(full, abs=0.1)


def test_brain_weighted_ssim_loss_ignores_what_the_weights_ignore():
    from oasis_ldm.train.losses import brain_weight, ssim_loss

    target = torch.full((2, 1, 32, 32), -1.0)
    target[:, :, 8:24, 8:24] = torch.rand((2, 1, 16, 16), generator=torch.Generator().manual_seed(0))
    assert brain_weight(target, 0.0) is None
    w = brain_weight(target, 3.0)
    assert w[0, 0, 7, 7] == 4.0 and w[0, 0, 0, 0] == 1.0  # the foreground, grown by one pixel
    assert torch.allclose(ssim_loss(target, target, w), torch.tensor(0.0), atol=1e-6)
    noisy_bg = target.clone()
    noisy_bg[:, :, :4] += 0.2  # damage the background only: the weighted loss cares less
    assert ssim_loss(noisy_bg, target, w) < ssim_loss(noisy_bg, target)
    assert torch.allclose(ssim_loss(noisy_bg, target, torch.ones_like(target)), ssim_loss(noisy_bg, target))
