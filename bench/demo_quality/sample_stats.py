"""Anatomy figures of a sample set against real slices (the demo-quality experiments).

    python bench/demo_quality/sample_stats.py --samples OUT/samples.h5 --data data/demo.h5 [--vae-ckpt RUN/vae]

- nn_ssim: each sample's SSIM to its nearest train slice (as tools/evaluate.py), mean.
- hist_w1: Wasserstein-1 distance (grey levels) between the brain-pixel intensity histograms
  of the samples and of the real train slices (brain = pixel > 8/255 after a 3x3 opening).
  A blurred set loses the grey/white-matter peaks and drifts away from the real histogram.
- grad_ratio: mean gradient magnitude inside the brain, samples / real (1 = as sharp as real;
  blur gives < 1, noise > 1).
- wm_gm_gap: distance between the two main intensity modes of the brain (2-means on brain
  pixels, grey levels): the grey/white-matter contrast; reported for real slices too.
With --vae-ckpt, the same figures for the VAE's reconstructions of the test split: the
ceiling the decoder puts on samples. One JSON line.
"""

from __future__ import annotations

import argparse
import json

import h5py
import torch
import torch.nn.functional as F

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.evaluation import reconstruct
from oasis_ldm.loading import load_frozen_vae
from oasis_ldm.metrics import nearest_training_ssim


def brain(x: torch.Tensor) -> torch.Tensor:
    fg = (x.float() > 8).float()
    fg = -F.max_pool2d(-fg, 3, 1, 1)  # erode: drop the partial-volume rim
    return fg > 0


def stats(x: torch.Tensor) -> dict[str, torch.Tensor]:
    m = brain(x)
    v = x.float()
    gx, gy = v[..., :, 1:] - v[..., :, :-1], v[..., 1:, :] - v[..., :-1, :]
    g = (gx[..., :-1, :] ** 2 + gy[..., :, :-1] ** 2).sqrt()
    mg = m[..., :-1, :-1]
    vals = v[m]
    lo, hi = vals.quantile(0.25), vals.quantile(0.9)
    for _ in range(20):  # 2-means on brain intensities
        split = (lo + hi) / 2
        lo, hi = vals[vals <= split].mean(), vals[vals > split].mean()
    return {"vals": vals, "grad": g[mg].mean(), "gap": hi - lo}


def w1(a: torch.Tensor, b: torch.Tensor) -> float:
    q = torch.linspace(0, 1, 1001)
    return (a.quantile(q) - b.quantile(q)).abs().mean().item()


def compare(fake: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    s, r = stats(fake), stats(real)
    sub = lambda t: t[torch.randperm(len(t), generator=torch.Generator().manual_seed(0))[:200_000]]  # noqa: E731
    return {
        "hist_w1": round(w1(sub(s["vals"]), sub(r["vals"])), 2),
        "grad_ratio": round((s["grad"] / r["grad"]).item(), 3),
        "wm_gm_gap": round(s["gap"].item(), 1),
        "real_wm_gm_gap": round(r["gap"].item(), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples")
    p.add_argument("--data", required=True)
    p.add_argument("--vae-ckpt")
    a = p.parse_args()
    torch.set_num_threads(1)
    out = {}
    if a.samples:
        with h5py.File(a.samples, "r") as f:
            samples = torch.from_numpy(f["images"][:])[:, None]
        size = samples.shape[-1]
        train = OasisH5Dataset(a.data, "train", in_memory=True, image_size=size, raw=True)
        real = train.read_raw(range(len(train)))
        nn = nearest_training_ssim(samples, real, top_k=16)
        out.update({"nn_ssim": round(float(nn.ssim.mean()), 4), **compare(samples, real), "n": len(samples)})
    if a.vae_ckpt:
        vae, meta = load_frozen_vae(a.vae_ckpt)
        size = meta["config"].data.image_size
        test = OasisH5Dataset(a.data, "test", in_memory=True, image_size=size, raw=True)
        real = test.read_raw(range(len(test)))
        rec = torch.cat([reconstruct(vae, real[i : i + 32], "cpu")[0] for i in range(0, len(real), 32)])
        out.update({f"recon_{k}": v for k, v in compare(rec, real).items()})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
