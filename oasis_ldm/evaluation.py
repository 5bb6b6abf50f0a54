"""Evaluation reports: reconstruction quality of a VAE, realism and diversity of samples.

Both compare against one split of the packed file, resized to the resolution the model was
trained at (recorded in its checkpoint, or in samples.h5 by the sampler). Reports are plain
dicts ready for JSON; `side_by_side` makes the picture that goes with them.

Paired figures come twice: over the whole image, and inside the brain of the real slice
(`*_brain`: the split's masks > 0 where it has masks, else the slice's foreground; see
`oasis_ldm.metrics.region`), because the black background that fills about 70 % of an OASIS
slice is reproduced by any model and inflates the whole-image figures. Everything runs in
plain float32 (`ieee_float32`), so a report made on a GPU matches the CPU's.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.masks import decode_mask, pair_input, split_output, to_labels
from oasis_ldm.data.transforms import to_float, to_uint8
from oasis_ldm.loading import load_frozen_vae
from oasis_ldm.metrics import (
    MAX_PSNR,
    MEMORISATION_THRESHOLD,
    ReconstructionMeter,
    brain_region,
    extract_features,
    frechet_distance,
    ieee_float32,
    kernel_inception_distance,
    load_inception,
    mean_pairwise_ms_ssim,
    ms_ssim_scales,
    nearest_training_ssim,
    paired_figures,
    summarise_neighbour_ssim,
)
from oasis_ldm.segmentation import SegmenterTraining, evaluate_segmentation, pairwise_dice

PROVENANCE = ("checkpoint", "checkpoint_sha256", "checkpoint_step", "sampler", "steps", "eta", "seed")
PICTURE_SIDE = 256  # smaller slices are enlarged by a whole factor in the pictures, so anatomy shows
OUTLINE_RGB = (255, 176, 0)  # the brain region's outline in the pictures: amber, apart from any grey


class EvaluationError(ValueError):
    """Inputs that cannot be compared (sizes, stages, splits); the message is one line."""


def load_split(data: str | Path, split: str, image_size: int | None) -> OasisH5Dataset:
    try:
        return OasisH5Dataset(data, split, in_memory=True, image_size=image_size, raw=True)
    except (ValueError, KeyError, OSError) as e:
        raise EvaluationError(str(e)) from None


def stored_size(real: OasisH5Dataset) -> int:
    """The side of the split's slices as packed, before any resize to the model's resolution."""
    return int(real.info.splits[real.split].height)


def has_masks(real: OasisH5Dataset) -> bool:
    """Whether the split was packed with its segmentation masks."""
    return real.info.splits[real.split].has_masks


def region_rule(real: OasisH5Dataset) -> str:
    """How the split's brain region is found: "masks" (mask > 0) or "foreground" (no masks)."""
    return "masks" if has_masks(real) else "foreground"


def real_regions(real: OasisH5Dataset, indices: list[int], images: torch.Tensor) -> torch.Tensor:
    """Bool (B, 1, S, S) brain region of the split's rows ``indices`` (``images`` are those rows)."""
    return brain_region(images, real.read_raw(indices, mask=True) if has_masks(real) else None)


def side_by_side(
    left: torch.Tensor, right: torch.Tensor, region: torch.Tensor | None = None, rows: int = 8, per_row: int = 4
) -> torch.Tensor:
    """uint8 (B, 1, H, W) pairs -> one RGB (3, H', W') grid of the first `rows` pairs
    `left[i] | right[i]`, `per_row` pairs a row (a strip that fits a page and a TensorBoard pane).

    Slices under PICTURE_SIDE px are enlarged by a whole factor (nearest, each pixel a square).
    ``region`` (bool, the real slice's brain) is outlined on both images, just outside its
    pixels: it shows where the in-brain figures are measured, and whether the reconstruction
    or sample stays within the real slice's outline.
    """
    from torchvision.utils import make_grid

    factor = max(1, -(-PICTURE_SIDE // left.shape[-1]))
    pairs = torch.stack([left[:rows], right[:rows]], dim=1).flatten(0, 1)
    tiles = pairs.repeat_interleave(factor, -2).repeat_interleave(factor, -1).expand(-1, 3, -1, -1).clone()
    if region is not None:
        edge = outline(region[:rows].repeat_interleave(factor, -2).repeat_interleave(factor, -1))
        edge = edge.repeat_interleave(2, 0)[:, 0]  # the same outline on both images of a row
        for c, value in enumerate(OUTLINE_RGB):
            tiles[:, c][edge] = value
    return make_grid(tiles, nrow=2 * per_row, padding=2, pad_value=255)


def outline(region: torch.Tensor) -> torch.Tensor:
    """Bool ring of pixels just outside a bool (B, 1, H, W) region (8-connected)."""
    grown = torch.nn.functional.max_pool2d(region.float(), 3, stride=1, padding=1) > 0
    return grown & ~region


@torch.no_grad()
@ieee_float32()
def evaluate_reconstruction(
    vae_ckpt: str | Path, data: str | Path, split: str, *, batch_size: int = 32, device: str | torch.device = "cpu"
) -> tuple[dict[str, Any], torch.Tensor]:
    """PSNR / SSIM / MS-SSIM of the VAE's reconstructions (posterior mean) over a split,
    over the whole image and inside the brain; for a paired VAE also `mask_dice`, the mean
    per-slice Dice of its decoded masks against the real ones (CSF, grey and white matter)."""
    vae, meta = load_frozen_vae(vae_ckpt, device)
    size = meta["config"].data.image_size
    images = load_split(data, split, size)
    paired = vae.in_channels > 1
    if paired and not has_masks(images):
        raise EvaluationError(f"{data}: split {split!r} has no masks, which the paired autoencoder encodes")
    meter = ReconstructionMeter(ms_ssim_scales=ms_ssim_scales(size))
    real_masks, decoded_masks = [], []
    for start in tqdm(range(0, len(images), batch_size), desc="reconstruction", unit="batch"):
        rows = list(range(start, min(start + batch_size, len(images))))
        real, masks = images.read_raw(rows), images.read_raw(rows, mask=True) if paired else None
        recon, decoded = reconstruct(vae, real, device, masks)
        meter.update(real, recon, real_regions(images, rows, real))
        if paired:
            real_masks.append(masks)
            decoded_masks.append(decoded)
    spread = torch.linspace(0, len(images) - 1, min(8, len(images))).round().long().tolist()  # cases, levels
    shown = images.read_raw(spread)
    recon = reconstruct(vae, shown, device, images.read_raw(spread, mask=True) if paired else None)[0]
    picture = side_by_side(shown, recon, real_regions(images, spread, shown))
    report = {
        **meter.compute(),
        "region": region_rule(images),
        "split": split,
        "image_size": size,
        "data_image_size": stored_size(images),  # differs from image_size: the split was resized to it
        "ms_ssim_scales": ms_ssim_scales(size),
    }
    if paired:
        report["mask_dice"] = pairwise_dice(to_labels(torch.cat(decoded_masks)), to_labels(torch.cat(real_masks)))
    report.update(checkpoint=meta["path"], checkpoint_sha256=meta["sha256"], checkpoint_step=meta["step"])
    return report, picture


def reconstruct(
    vae: torch.nn.Module, real: torch.Tensor, device: str | torch.device, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 in, uint8 out: the decoded posterior mean, as a user would see the image; a paired
    VAE also reads the slices' masks and gives back its decoded masks (else None)."""
    x = to_float(real).to(device)
    if masks is not None:
        x = pair_input(x, masks.to(device))
    out = vae(x, sample_posterior=False)[0]
    if masks is None:
        return to_uint8(out.clamp(-1, 1)).cpu(), None
    image, logits = split_output(out)
    return to_uint8(image.clamp(-1, 1)).cpu(), decode_mask(logits).cpu()


def read_samples(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """uint8 (N, 1, H, W) images of a samples.h5 file and its attributes."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            images = torch.from_numpy(f["images"][:])[:, None]
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as e:
        raise EvaluationError(f"{path}: not a samples file ({e})") from None
    return images, attrs


def read_sample_masks(path: str | Path) -> torch.Tensor:
    """uint8 (N, 1, H, W) masks of a paired model's samples.h5; EvaluationError when it has none."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if "masks" not in f:
                raise EvaluationError(
                    f"{path}: holds no masks; --segmentation needs samples of a paired model (data.masks=true, "
                    "e.g. --config demo-paired)"
                )
            return torch.from_numpy(f["masks"][:])[:, None]
    except OSError as e:
        raise EvaluationError(f"{path}: not a samples file ({e})") from None


def check_segmentation_inputs(
    samples_path: str | Path, data: str | Path, split: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples' images and masks, once the samples and the split are known to have masks."""
    images, attrs = read_samples(samples_path)
    masks = read_sample_masks(samples_path)
    real = load_split(data, split, int(attrs["image_size"]) if "image_size" in attrs else None)
    check_sizes(images, attrs, Path(data), real)
    if not has_masks(real):
        raise EvaluationError(f"{data}: split {split!r} has no masks; --segmentation needs a file packed with them")
    return images, masks


def evaluate_sample_segmentation(
    samples_path: str | Path,
    data: str | Path,
    split: str,
    *,
    steps: int = SegmenterTraining.steps,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Train on synthetic, test on real: segmenters trained on the samples' image-mask pairs and
    on real pairs of `split`, all tested on the real test split (oasis_ldm/segmentation.py)."""
    images, masks = check_segmentation_inputs(samples_path, data, split)
    settings = dataclasses.replace(SegmenterTraining(), steps=steps)
    try:
        return evaluate_segmentation(data, (images, masks), split=split, settings=settings, seed=seed, device=device)
    except (KeyError, ValueError) as e:
        raise EvaluationError(str(e)) from None


def check_sizes(samples: torch.Tensor, attrs: dict[str, Any], data: Path, real: OasisH5Dataset) -> None:
    if tuple(samples.shape[-2:]) != real.size:
        h, w = samples.shape[-2:]
        raise EvaluationError(
            f"samples are {h}x{w} but {data} slices are compared at {real.size[0]}x{real.size[1]}"
            + ("" if "image_size" in attrs else " (the samples file does not record its model's resolution)")
        )


@dataclass(frozen=True)
class SampleChecks:
    """How the samples report searches and draws (tools/evaluate.py's flags)."""

    max_pairs: int = 2000  # random pairs for the MS-SSIM diversity figures
    top_k: int = 16  # nearest-slice candidates kept by the fast prefilter
    seed: int = 0  # of the real subset, the pairs and the KID subsets


@torch.no_grad()
@ieee_float32()
def evaluate_samples(
    samples_path: str | Path,
    data: str | Path,
    split: str,
    *,
    checks: SampleChecks = SampleChecks(),
    inception_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Any], torch.Tensor]:
    """Nearest-slice SSIM (memorisation/realism), diversity against real slices, FID/KID."""
    max_pairs, top_k, seed = checks.max_pairs, checks.top_k, checks.seed
    inception = load_inception(inception_weights, device) if inception_weights is not None else None  # fail early
    samples, attrs = read_samples(samples_path)
    real = load_split(data, split, int(attrs["image_size"]) if "image_size" in attrs else None)
    check_sizes(samples, attrs, Path(data), real)
    n = len(samples)
    if n < 2 or len(real) < 2:
        raise EvaluationError(f"need at least two samples and two {split} slices (got {n} and {len(real)})")
    real_images = real.read_raw(range(len(real)))
    nn = nearest_training_ssim(samples, real_images, top_k=top_k, device=device)
    figures = neighbour_figures(samples, real, real_images, nn.index, device)
    gen = torch.Generator().manual_seed(seed)
    subset = real_images[torch.randperm(len(real), generator=gen)[: min(n, len(real))]]
    report: dict[str, Any] = {
        **neighbour_summary("nn_ssim", nn.ssim),
        **neighbour_summary("nn_ssim_brain", figures["ssim_brain"]),
        "nn_psnr_mean": capped_mean(figures["psnr"]),
        "nn_psnr_brain_mean": capped_mean(figures["psnr_brain"]),
        "nn_brain_fraction": float(figures["brain_fraction"].double().mean()),
        "nn_n_brain": int((~torch.isnan(figures["ssim_brain"])).sum()),  # neighbours with some brain
        "region": region_rule(real),
        "diversity_ms_ssim": mean_pairwise_ms_ssim(samples, max_pairs=max_pairs, generator=gen, device=device),
        "real_diversity_ms_ssim": mean_pairwise_ms_ssim(subset, max_pairs=max_pairs, generator=gen, device=device),
        "n": n,
        "n_real": len(real),
        "split": split,
        "image_size": int(samples.shape[-1]),
        "data_image_size": stored_size(real),  # differs from image_size: the split was resized to it
        "ms_ssim_scales": ms_ssim_scales(samples.shape[-1]),
        "samples": str(samples_path),
        **{k: attrs[k] for k in PROVENANCE if k in attrs},
        "neighbours": neighbour_list(real, nn.index, nn.ssim, figures["ssim_brain"]),
    }
    if inception is not None:
        report.update(inception_scores(inception, samples, real_images, seed, device))
    shown = nn.index[:8].tolist()
    picture = side_by_side(samples[:8], real_images[shown], real_regions(real, shown, real_images[shown]))
    return report, picture


def neighbour_figures(
    samples: torch.Tensor,
    real: OasisH5Dataset,
    real_images: torch.Tensor,
    index: torch.Tensor,
    device: str | torch.device,
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Whole-image and in-brain figures (`paired_figures`) of each sample against its nearest slice.

    The neighbour is the one the whole-image search chose; only those N pairs are measured
    again (one SSIM map each, against the N x top_k maps of the search).
    """
    parts = []
    for start in range(0, len(index), batch_size):
        rows = index[start : start + batch_size].tolist()
        nearest = real_images[rows]
        region = real_regions(real, rows, nearest)
        fake = samples[start : start + batch_size]
        parts.append({k: v.cpu() for k, v in paired_figures(nearest.to(device), fake, region).items()})
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def neighbour_summary(prefix: str, values: torch.Tensor) -> dict[str, float]:
    """``prefix``_{mean, p10, p50, p90, frac_above_0.6} of per-sample SSIMs (NaN ones left out)."""
    kept = values[~torch.isnan(values)]
    summary = summarise_neighbour_ssim(kept, MEMORISATION_THRESHOLD) if kept.numel() else {}
    out = {f"{prefix}_{key}": summary.get(key, math.nan) for key in ("mean", "p10", "p50", "p90")}
    out[f"{prefix}_frac_above_{MEMORISATION_THRESHOLD}"] = summary.get("frac_above", math.nan)
    return out


def capped_mean(psnr: torch.Tensor) -> float:
    """Mean PSNR with +inf (an exact copy) counted as MAX_PSNR, NaN (an empty region) left out."""
    kept = psnr[~torch.isnan(psnr)]
    return float(kept.clamp(max=MAX_PSNR).double().mean()) if kept.numel() else float("nan")


def neighbour_list(
    real: OasisH5Dataset, index: torch.Tensor, ssim: torch.Tensor, ssim_brain: torch.Tensor
) -> list[dict[str, Any]]:
    """Every sample's nearest slice (case, slice) with its whole-image and in-brain SSIM."""
    out = []
    for i, whole, brain in zip(index.tolist(), ssim.tolist(), ssim_brain.tolist(), strict=True):
        out.append(
            {
                "case_id": int(real.case_id[i]),
                "slice_idx": int(real.slice_idx[i]),
                "ssim": round(whole, 4),
                "ssim_brain": None if math.isnan(brain) else round(brain, 4),  # NaN: the slice has no brain
            }
        )
    return out


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
