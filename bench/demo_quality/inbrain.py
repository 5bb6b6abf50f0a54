"""In-brain reconstruction metrics of a VAE checkpoint (the demo-quality experiments).

    python bench/demo_quality/inbrain.py --vae-ckpt RUN/vae --data data/demo.h5 [--split test] [--png out.png]

In-brain SSIM: the torchmetrics SSIM map of the whole image (Gaussian 11/1.5, reflect padded,
as oasis_ldm/metrics/image.py), averaged over pixels where the packed mask (nearest-resized to
the model's resolution) is > 0, then over images. In-brain PSNR: from the MSE inside the mask.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.evaluation import reconstruct, side_by_side
from oasis_ldm.loading import load_frozen_vae
from oasis_ldm.metrics.image import as_unit


def inbrain(real_u8: torch.Tensor, fake_u8: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    real, fake = as_unit(real_u8), as_unit(fake_u8)
    whole, smap = structural_similarity_index_measure(
        fake, real, gaussian_kernel=True, sigma=1.5, data_range=1.0, reduction="none", return_full_image=True
    )
    m = (mask > 0).float()
    area = m.sum(dim=(1, 2, 3))
    ssim_in = (smap * m).sum(dim=(1, 2, 3)) / area.clamp(min=1)
    se = (fake - real) ** 2
    mse_in = (se * m).sum(dim=(1, 2, 3)) / area.clamp(min=1)
    mse = se.mean(dim=(1, 2, 3))
    return {
        "ssim": whole,
        "psnr": -10 * torch.log10(mse.clamp(min=1e-10)),
        "ssim_in": ssim_in,
        "psnr_in": -10 * torch.log10(mse_in.clamp(min=1e-10)),
        "area": area,
        "ssim_sum": (smap * m).sum(dim=(1, 2, 3)),
    }


@torch.no_grad()
def evaluate(vae_ckpt: str, data: str, split: str = "test", png: str | None = None) -> dict:
    vae, meta = load_frozen_vae(vae_ckpt)
    size = meta["config"].data.image_size
    ds = OasisH5Dataset(data, split, in_memory=True, with_mask=True, image_size=size, raw=True)
    vals: dict[str, list] = {}
    for a in range(0, len(ds), 32):
        idx = range(a, min(a + 32, len(ds)))
        real, mask = ds.read_raw(idx), ds.read_raw(idx, mask=True)
        out = inbrain(real, reconstruct(vae, real, "cpu")[0], mask)
        for k, v in out.items():
            vals.setdefault(k, []).append(v)
    v = {k: torch.cat(x).double() for k, x in vals.items()}
    keep = v["area"] > 0
    rep = {
        "ssim": v["ssim"].mean().item(),
        "psnr": v["psnr"].mean().item(),
        "ssim_in": v["ssim_in"][keep].mean().item(),
        "psnr_in": v["psnr_in"][keep].mean().item(),
        "ssim_in_pooled": (v["ssim_sum"].sum() / v["area"].sum()).item(),
        "brain_frac": (v["area"].sum() / (len(ds) * size * size)).item(),
        "n": len(ds),
        "size": size,
        "step": meta["step"],
        "data": data,
        "split": split,
    }
    if png:
        from torchvision.utils import save_image

        spread = torch.linspace(0, len(ds) - 1, 8).round().long().tolist()
        shown = ds.read_raw(spread)
        grid = side_by_side(shown, reconstruct(vae, shown, "cpu")[0])
        save_image(grid.float() / 255, png)
    return rep


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--vae-ckpt", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--png")
    a = p.parse_args()
    torch.set_num_threads(2)
    for i, d in enumerate(a.data):
        rep = evaluate(a.vae_ckpt, d, a.split, a.png if i == 0 else None)
        rounded = {k: (round(x, 4) if isinstance(x, float) and math.isfinite(x) else x) for k, x in rep.items()}
        print(json.dumps(rounded))


if __name__ == "__main__":
    main()
