"""Training throughput of the latent model against pixel-space diffusion with the same U-Net.

    python bench/train_step.py                        # oasis256 sizes, CPU or the visible GPU
    python bench/train_step.py --bf16 --compile       # on a GPU

Measured in one run, same U-Net config, same optimizer step:
  ldm (encode)  VAE encoder (frozen, no grad) + U-Net step on 64x64x3 latents of 256x256 slices
  ldm (cache)   U-Net step on cached latents (ldm.latent_cache=true)
  pixel         U-Net step directly on 256x256x1 slices
Prints images/s, the ratios, model FLOPs per image (torch's FLOP counter, run on eager copies
of the models: a compiled graph hides its operators from it) and, on a GPU whose dense bf16
peak is known, the model FLOP utilisation (MFU). The frozen encoder runs in fp32, as in the
trainer. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from oasis_ldm.config import load_config
from oasis_ldm.diffusion import GaussianDiffusion
from oasis_ldm.models import UNet, build_vae

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) by exact model: the first pattern
# that matches the device name wins, so variants come before their family.
PEAK_BF16_TFLOPS = [
    (r"H100 NVL", 835.0),
    (r"H100 PCIe", 756.0),
    (r"H100", 989.0),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200 NVL", 835.0),
    (r"H200", 989.0),  # SXM
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bA10\b", 125.0),
]


def peak_tflops(name: str) -> float | None:
    return next((peak for pattern, peak in PEAK_BF16_TFLOPS if re.search(pattern, name)), None)


def make_step(unet, diffusion, opt, device, bf16, encoder=None):
    """One optimizer step on a batch; `encoder` maps images to scaled latents first (fp32)."""

    def step(x: torch.Tensor) -> None:
        if encoder is not None:
            with torch.no_grad():
                x = encoder(x)
        t = torch.randint(0, diffusion.num_timesteps, (x.shape[0],), device=x.device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion.training_loss(unet, x, t, torch.randn_like(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def timed(step, x: torch.Tensor, warmup: int, steps: int, device: torch.device) -> float:
    """Images per second over `steps` steps after `warmup` untimed ones."""
    for _ in range(warmup):
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * x.shape[0] / (time.perf_counter() - t0)


def flops_per_image(step, x: torch.Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        step(x)
    return counter.get_total_flops() / x.shape[0]


def build(cfg, in_channels: int, device: torch.device, compile_: bool):
    """(the model to time, its optimizer, the eager model FLOPs are counted on)."""
    unet = UNet(cfg.unet, in_channels=in_channels).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    model = torch.compile(unet) if compile_ else unet
    return model, opt, unet


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="oasis256", help="preset or YAML file giving the VAE and U-Net sizes")
    p.add_argument("--batch-size", type=int, default=None, help="images per step (default: 32 on GPU, 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 on GPU, 2 on CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 on GPU, 1 on CPU)")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA or CPU)")
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Nets (CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--flops", action="store_true", help="count model FLOPs on the CPU too (always on a GPU)")
    args = p.parse_args()
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch = args.batch_size or (32 if gpu else 2)
    steps, warmup = args.steps or (20 if gpu else 2), args.warmup or (5 if gpu else 1)
    cfg = load_config(args.config, stage="ldm")
    torch.manual_seed(0)
    size, c = cfg.data.image_size, cfg.vae.latent_channels
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    vae = build_vae(cfg).to(device).eval().requires_grad_(False)
    f = vae.factor
    images = torch.randn(batch, 1, size, size, device=device)
    latents = torch.randn(batch, c, size // f, size // f, device=device)

    unet, opt, eager = build(cfg, c, device, args.compile)
    encoder = lambda x: vae.encode(x).sample()  # noqa: E731
    encode = make_step(unet, diffusion, opt, device, args.bf16, encoder=encoder)
    cached = make_step(unet, diffusion, opt, device, args.bf16)
    pixel_unet, pixel_opt, pixel_eager = build(cfg, 1, device, args.compile)
    pixel = make_step(pixel_unet, diffusion, pixel_opt, device, args.bf16)

    results = {
        "ldm_encode": timed(encode, images, warmup, steps, device),
        "ldm_cache": timed(cached, latents, warmup, steps, device),
        "pixel": timed(pixel, images, warmup, steps, device),
    }
    # Counting runs each step once more: worth it on a GPU (MFU), minutes of CPU for the pixel step.
    count = gpu or args.flops
    eager_steps = {
        "ldm_encode": (make_step(eager, diffusion, opt, device, args.bf16, encoder=encoder), images),
        "ldm_cache": (make_step(eager, diffusion, opt, device, args.bf16), latents),
        "pixel": (make_step(pixel_eager, diffusion, pixel_opt, device, args.bf16), images),
    }
    flops = {k: flops_per_image(fn, x) for k, (fn, x) in eager_steps.items()} if count else {}
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = peak_tflops(name) if gpu and args.bf16 else None
    latent = f"{c}x{size // f}x{size // f}"
    print(f"device {name}; config {args.config}: {size}x{size} slices, latent {latent}; batch {batch}")
    print(f"{'pipeline':<14}{'images/s':>12}{'GFLOP/image':>14}{'MFU':>8}")
    for key, img_s in results.items():
        gflop = f"{flops[key] / 1e9:.1f}" if key in flops else "n/a"
        mfu = f"{img_s * flops[key] / 1e12 / peak:.1%}" if peak and key in flops else "n/a"
        print(f"{key:<14}{img_s:>12.2f}{gflop:>14}{mfu:>8}")
    ratio = results["ldm_encode"] / results["pixel"]
    print(
        f"ldm (encode) / pixel = {ratio:.1f}x (target >= 8); ldm (cache) / pixel = "
        f"{results['ldm_cache'] / results['pixel']:.1f}x"
    )
    summary = {"ldm_img_s": results["ldm_encode"], "pixel_img_s": results["pixel"], "ldm_vs_pixel": ratio}
    summary.update(ldm_cache_img_s=results["ldm_cache"], device=name, batch=batch, bf16=args.bf16)
    if peak:
        summary["mfu_ldm"] = results["ldm_encode"] * flops["ldm_encode"] / 1e12 / peak
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in summary.items()}))


if __name__ == "__main__":
    main()
