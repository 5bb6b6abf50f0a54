"""Sampling speed: DDIM with 50 steps against DDPM with all 1000, on the demo checkpoint.

    python bench/sampling.py [--ckpt demo_out/runs/demo/ldm] [--images 16]

Both draw the same images (same per-image seeds) from the same EMA U-Net and decode them with
the same VAE; the time includes decoding. DDIM-50 with eta = 1 draws fresh noise every step
(per-image CPU generators, one copy to the device per step) where eta = 0 draws none: their
ratio is what the per-step noise costs. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.loading import load_pipeline
from oasis_ldm.rng import image_seed


def seconds_per_image(
    pipe, seeds: list[int], sampler: str, steps: int, device: torch.device, eta: float = 0.0
) -> float:
    pipe.generate(seeds[:1], sampler, steps=min(steps, 2) if sampler == "ddim" else steps, eta=eta)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    pipe.generate(seeds, sampler, steps=steps, eta=eta)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / len(seeds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", default="demo_out/runs/demo/ldm", help="ldm run directory or checkpoint (make demo)")
    p.add_argument("--images", type=int, default=16, help="images per measurement (one batch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    try:
        pipe, meta = load_pipeline(args.ckpt, device)
    except CheckpointError as e:
        print(f"sampling bench: error: {e} (run `make demo` first, or pass --ckpt)", file=sys.stderr)
        return 1
    seeds = [image_seed(0, i) for i in range(args.images)]
    T = pipe.diffusion.num_timesteps
    ddim = seconds_per_image(pipe, seeds, "ddim", 50, device)
    noisy = seconds_per_image(pipe, seeds, "ddim", 50, device, eta=1.0)
    ddpm = seconds_per_image(pipe, seeds, "ddpm", T, device)
    ratio = ddpm / ddim
    shape = "x".join(map(str, pipe.latent_shape))
    print(f"checkpoint {Path(meta['path'])} (step {meta['step']}), latent {shape}, {args.images} images, {device}")
    print(f"DDIM-50    {ddim * 1e3:9.1f} ms/image")
    print(f"DDIM-50 eta=1 {noisy * 1e3:6.1f} ms/image ({noisy / ddim:.3f}x eta=0: the per-step noise)")
    print(f"DDPM-{T:<5} {ddpm * 1e3:9.1f} ms/image")
    print(f"DDIM-50 is {ratio:.1f}x faster (target >= 15)")
    print(
        json.dumps(
            {
                "ddim50_s_per_img": round(ddim, 5),
                "ddpm1000_s_per_img": round(ddpm, 5),
                "ddim50_vs_ddpm1000": round(ratio, 2),
                "ddim50_eta1_s_per_img": round(noisy, 5),
                "eta1_vs_eta0": round(noisy / ddim, 3),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
