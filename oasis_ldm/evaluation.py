"""Evaluation reports: reconstruction quality of a VAE, realism and diversity of samples.

Both compare against one split of the packed file, resized to the resolution the model was
trained at (recorded in its checkpoint, or in samples.h5 by the sampler). Reports are plain
dicts ready for JSON; `side_by_side` makes the picture that goes with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.transforms import to_float, to_uint8
from oasis_ldm.metrics import (
    ReconstructionMeter,
    extract_features,
    frechet_distance,
    kernel_inception_distance,
    load_inception,
    mean_pairwise_ms_ssim,
    ms_ssim_scales,
    nearest_training_ssim,
)
from oasis_ldm.sampling.pipeline import load_frozen_vae

PROVENANCE = ("checkpoint", "checkpoint_sha256", "checkpoint_step", "sampler", "steps", "eta", "seed")


class EvaluationError(ValueError):
    """Inputs that cannot be compared (sizes, stages, splits); the message is one line."""


def load_split(data: str | Path, split: str, image_size: int | None) -> OasisH5Dataset:
    try:
        return OasisH5Dataset(data, split, in_memory=True, image_size=image_size, raw=True)
    except (ValueError, KeyError, OSError) as e:
        raise EvaluationError(str(e)) from None


def side_by_side(left: torch.Tensor, right: torch.Tensor, rows: int = 8) -> torch.Tensor:
    """uint8 (B, 1, H, W) pairs -> one (1, H', W') grid: each row is `left[i] | right[i]`."""
    pairs = torch.stack([left[:rows], right[:rows]], dim=1).flatten(0, 1)
    from torchvision.utils import make_grid

    return make_grid(pairs, nrow=2, padding=2, pad_value=255)


@torch.no_grad()
def evaluate_reconstruction(
    vae_ckpt: str | Path, data: str | Path, split: str, *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], torch.Tensor]:
    """PSNR / SSIM / MS-SSIM of the VAE's reconstructions (posterior mean) over a split."""
    vae, meta = load_frozen_vae(vae_ckpt, device)
    size = meta["config"].data.image_size
    images = load_split(data, split, size)
    meter = ReconstructionMeter(ms_ssim_scales=ms_ssim_scales(size))
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruction", unit="batch"):
        real = images.read_raw(range(start, min(start + batch_size, len(images))))
        meter.update(real, reconstruct(vae, real, device))
    spread = torch.linspace(0, len(images) - 1, min(8, len(images))).round().long().tolist()  # cases, levels
    shown = images.read_raw(spread)
    picture = side_by_side(shown, reconstruct(vae, shown, device))
    report = {**meter.compute(), "split": split, "image_size": size, "ms_ssim_scales": ms_ssim_scales(size)}
    report.update(checkpoint=meta["path"], checkpoint_sha256=meta["sha256"], checkpoint_step=meta["step"])
    return report, picture


def reconstruct(vae: torch.nn.Module, real: torch.Tensor, device: str | torch.device) -> torch.Tensor:
    """uint8 in, uint8 out: the decoded posterior mean, as a user would see the image."""
    return to_uint8(vae(to_float(real).to(device), sample_posterior=False)[0].clamp(-1, 1)).cpu()


def read_samples(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """uint8 (N, 1, H, W) images of a samples.h5 file and its attributes."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            images = torch.from_numpy(f["images"][:])[:, None]
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as e:
        raise EvaluationError(f"{path}: not a samples file ({e})") from None
    return images, attrs


def check_sizes(samples: torch.Tensor, attrs: dict[str, Any], data: Path, real: OasisH5Dataset) -> None:
    if tuple(samples.shape[-2:]) != real.size:
        h, w = samples.shape[-2:]
        raise EvaluationError(
            f"samples are {h}x{w} but {data} slices are compared at {real.size[0]}x{real.size[1]}"
            + ("" if "image_size" in attrs else " (the samples file does not record its model's resolution)")
        )


@torch.no_grad()
def evaluate_samples(
    samples_path: str | Path,
    data: str | Path,
    split: str,
    *,
    inception_weights: str | Path | None = None,
    max_pairs: int = 2000,
    top_k: int = 16,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], torch.Tensor]:
    """Nearest-slice SSIM (memorisation/realism), diversity against real slices, FID/KID."""
    inception = load_inception(inception_weights, device) if inception_weights is not None else None  # fail early
    samples, attrs = read_samples(samples_path)
    real = load_split(data, split, int(attrs["image_size"]) if "image_size" in attrs else None)
    check_sizes(samples, attrs, Path(data), real)
    n = len(samples)
    if n < 2 or len(real) < 2:
        raise EvaluationError(f"need at least two samples and two {split} slices (got {n} and {len(real)})")
    real_images = real.read_raw(range(len(real)))
    nn = nearest_training_ssim(samples, real_images, top_k=top_k, device=device)
    summary = nn.summary()
    gen = torch.Generator().manual_seed(seed)
    subset = real_images[torch.randperm(len(real), generator=gen)[: min(n, len(real))]]
    scales = ms_ssim_scales(samples.shape[-1])
    report: dict[str, Any] = {
        "nn_ssim_mean": summary["mean"],
        "nn_ssim_p10": summary["p10"],
        "nn_ssim_p50": summary["p50"],
        "nn_ssim_p90": summary["p90"],
        "nn_ssim_frac_above_0.6": summary["frac_above"],
        "diversity_ms_ssim": mean_pairwise_ms_ssim(samples, max_pairs=max_pairs, generator=gen, device=device),
        "real_diversity_ms_ssim": mean_pairwise_ms_ssim(subset, max_pairs=max_pairs, generator=gen, device=device),
        "n": n,
        "n_real": len(real),
        "split": split,
        "ms_ssim_scales": scales,
        "samples": str(samples_path),
        **{k: attrs[k] for k in PROVENANCE if k in attrs},
        "neighbours": [
            {"case_id": int(real.case_id[i]), "slice_idx": int(real.slice_idx[i]), "ssim": round(float(s), 4)}
            for i, s in zip(nn.index.tolist(), nn.ssim.tolist(), strict=True)
        ],
    }
    if inception is not None:
        report.update(inception_scores(inception, samples, real_images, seed, device))
    return report, side_by_side(samples, real_images[nn.index])


def inception_scores(
    model: torch.nn.Module, samples: torch.Tensor, real: torch.Tensor, seed: int, device: str | torch.device
) -> dict[str, float]:
    fake_f = extract_features(model, samples, device=device, desc="inception (samples)")
    real_f = extract_features(model, real, device=device, desc="inception (real)")
    kid, kid_std = kernel_inception_distance(fake_f, real_f, generator=torch.Generator().manual_seed(seed))
    return {
        "fid": frechet_distance(fake_f, real_f),
        "kid": kid,
        "kid_std": kid_std,
        "inception_format": model.weights_format,
    }
