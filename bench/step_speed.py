"""Side-by-side training-step speed of demo-preset variants (experiment script for issue 12).

    python bench/step_speed.py --stage vae --variant base: --variant w24:vae.base_channels=24 ...
    python bench/step_speed.py --stage ldm --variant base: --variant lat4:vae.latent_channels=4

Each variant is `name:key=value;key=value` (config overrides on the demo preset's stage, plus
the bench-only keys stage=vae|ldm, threads=N, channels_last=1, compile=1). All variants are built in one
process and timed in interleaved rounds (A B C A B C ...), so load from other processes hits
every variant alike; the median s/step per variant and its ratio to the first are printed,
and the last line is one JSON object. With --profile, one step of the first variant is
profiled (torch.profiler, CPU) and the top ops are printed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from oasis_ldm.config import load_config
from oasis_ldm.diffusion import GaussianDiffusion
from oasis_ldm.models import UNet, build_vae
from oasis_ldm.train.losses import ssim_loss

BENCH_KEYS = ("threads", "channels_last", "compile")


def parse_variant(text: str):
    name, _, rest = text.partition(":")
    overrides, bench = [], {}
    for item in filter(None, rest.split(";")):
        k, _, v = item.partition("=")
        if k == "stage":
            bench[k] = v
        elif k in BENCH_KEYS:
            bench[k] = int(v)
        else:
            overrides.append(item)
    return name, overrides, bench


def make_vae_step(cfg, bench, gen):
    vae = build_vae(cfg)
    fmt = torch.channels_last if bench.get("channels_last") else torch.contiguous_format
    vae = vae.to(memory_format=fmt)
    model = torch.compile(vae) if bench.get("compile") else vae
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    s, b, f = cfg.data.image_size, cfg.train.batch_size, vae.factor
    x = (torch.rand((b, 1, s, s), generator=gen) * 2 - 1).contiguous(memory_format=fmt)
    noise = torch.randn((b, cfg.vae.latent_channels, s // f, s // f), generator=gen)
    v = cfg.vae

    def step():
        opt.zero_grad(set_to_none=True)
        recon, post = model(x, noise=noise)
        loss = v.l1_weight * (recon - x).abs().mean() + v.ssim_weight * ssim_loss(recon, x)
        loss = loss + v.kl_weight * post.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()

    return step, b


def make_ldm_step(cfg, bench, gen):
    f = 2 ** (len(cfg.vae.channel_mult) - 1)
    c, hw, b = cfg.vae.latent_channels, cfg.data.image_size // f, cfg.train.batch_size
    unet = UNet(cfg.unet, in_channels=c)
    fmt = torch.channels_last if bench.get("channels_last") else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    model = torch.compile(unet) if bench.get("compile") else unet
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    z = torch.randn((b, c, hw, hw), generator=gen).contiguous(memory_format=fmt)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = diffusion.training_loss(model, z, gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()

    return step, b


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=("vae", "ldm"), default="vae", help="default stage (a variant may say stage=ldm)")
    p.add_argument("--config", default="demo")
    p.add_argument("--variant", action="append", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    variants = []
    for text in a.variant:
        name, overrides, bench = parse_variant(text)
        stage = bench.get("stage", a.stage)
        cfg = load_config(a.config, overrides, stage=stage)
        torch.manual_seed(0)
        step, batch = (make_vae_step if stage == "vae" else make_ldm_step)(cfg, bench, gen)
        threads = bench.get("threads", 2)
        torch.set_num_threads(threads)
        for _ in range(2):  # warm-up (and compile)
            step()
        variants.append((name, step, batch, threads))
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        name, step, _, threads = variants[0]
        torch.set_num_threads(threads)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"== profile of one step, variant {name}, {threads} threads")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    times = {name: [] for name, *_ in variants}
    for _ in range(a.rounds):
        for name, step, _, threads in variants:
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[name].append((time.perf_counter() - t0) / a.steps)
    base = statistics.median(times[variants[0][0]])
    out = {}
    for name, _, batch, _ in variants:
        med = statistics.median(times[name])
        out[name] = {"s_per_step": round(med, 4), "img_per_s": round(batch / med, 2), "rel_time": round(med / base, 3)}
        print(f"{name:>16}: {med:.3f} s/step  {batch / med:7.1f} img/s  x{med / base:.2f} time of {variants[0][0]}")
    print(json.dumps({"variants": out}))


if __name__ == "__main__":
    main()
