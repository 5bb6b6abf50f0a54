"""Identities of oasis_ldm.diffusion: schedules, q(x_t|x_0), targets, loss and both samplers."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from oasis_ldm.config import DiffusionConfig, UNetConfig
from oasis_ldm.diffusion import GaussianDiffusion, autocast_model, cosine_betas, linear_betas, x0_and_eps
from oasis_ldm.models import UNet
from oasis_ldm.rng import ImageGenerators

TINY_UNET = UNetConfig(channels=(8, 16, 16, 16), bottleneck=32, groups=4, heads=2, time_dim=16)


def reference_abar(timesteps: int = 1000, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """alpha_bar of DDPM's linear schedule, straight from the definition (float64)."""
    betas = torch.tensor([start + (end - start) * i / (timesteps - 1) for i in range(timesteps)])
    return torch.cumprod(1 - betas.double(), dim=0)


def short_diffusion(target: str = "eps", timesteps: int = 20) -> GaussianDiffusion:
    """Few steps with larger betas, so that samplers run in milliseconds and still end near N(0,1)."""
    return GaussianDiffusion(linear_betas(timesteps, 1e-3, 0.2), target=target)


def tiny_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(TINY_UNET, in_channels=2).eval()


def oracle(x0: torch.Tensor, abar: torch.Tensor, target: str):
    """A model that knows the single clean image x0 and returns the exact eps or v."""

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].float().reshape(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if target == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0

    return model


def test_linear_schedule_matches_its_definition():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    abar = diffusion.schedule.alphas_cumprod
    assert abar.dtype == torch.float64 and abar.shape == (1000,)
    torch.testing.assert_close(abar.double(), reference_abar(), rtol=1e-6, atol=1e-7)
    assert bool((abar[1:] < abar[:-1]).all()) and 0 < abar[-1] < abar[0] < 1


def test_cosine_schedule_endpoints():
    t_count, s = 1000, 0.008
    betas = cosine_betas(t_count)

    def f(t: float) -> float:
        return math.cos((t / t_count + s) / (1 + s) * math.pi / 2) ** 2

    assert betas.dtype == torch.float64
    assert betas[0].item() == pytest.approx(1 - f(1) / f(0), rel=1e-9)
    assert betas[-1].item() == pytest.approx(0.999)  # cos^2 reaches 0 at t = T: clipped
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(schedule="cosine"))
    abar = diffusion.schedule.alphas_cumprod
    assert abar[500].item() == pytest.approx(f(501) / f(0), rel=1e-5)
    assert bool((abar[1:] < abar[:-1]).all()) and abar[-1] < 1e-4 and abar[0] > 0.9999


def test_q_sample_moments_by_monte_carlo():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    x0 = torch.tensor([1.0, -0.5, 2.0])
    n, t = 200_000, 300
    noise = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    xt = diffusion.q_sample(x0.expand(n, 3), torch.full((n,), t), noise)
    a = reference_abar()[t].item()
    five_sigma = 5 * math.sqrt((1 - a) / n)
    torch.testing.assert_close(xt.mean(0), math.sqrt(a) * x0, rtol=0, atol=five_sigma)
    torch.testing.assert_close(xt.var(0), torch.full((3,), 1 - a), rtol=0.02, atol=0)


def test_parameterisations_round_trip():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(6, 2, 4, 4, generator=g), torch.randn(6, 2, 4, 4, generator=g)
    t = torch.tensor([0, 1, 250, 500, 900, 999])
    xt = diffusion.q_sample(x0, t, eps)
    diffusion.target = "v"
    v = diffusion.target_of(x0, eps, t)
    a = reference_abar()[t].float().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-5, atol=1e-5)
    x0_v, eps_v = x0_and_eps(v, xt, a.sqrt(), (1 - a).sqrt(), "v")
    torch.testing.assert_close(x0_v, x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps_v, eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_and_eps(eps, xt, a.sqrt(), (1 - a).sqrt(), "eps")[0], x0, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("target", ["eps", "v"])
def test_training_loss_noises_with_the_given_t_and_noise_and_uses_the_target(target: str):
    diffusion = GaussianDiffusion(linear_betas(10, 1e-3, 0.2), target=target)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4000, 1, 2, 2, generator=g)
    t, noise = torch.randint(0, 10, (4000,), generator=g), torch.randn(4000, 1, 2, 2, generator=g)
    seen = {}

    def zero_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen["xt"], seen["t"] = x, t
        return torch.zeros_like(x)

    loss = diffusion.training_loss(zero_model, x0, t, noise)
    a = diffusion.schedule.alphas_cumprod[seen["t"]].float().reshape(-1, 1, 1, 1)
    eps = (seen["xt"] - a.sqrt() * x0) / (1 - a).sqrt()
    expected_target = eps if target == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0
    assert loss.item() == pytest.approx(expected_target.pow(2).mean().item(), rel=1e-4)
    assert torch.equal(seen["t"], t)
    torch.testing.assert_close(eps, noise, rtol=0, atol=1e-4)  # x_t was noised with the given noise
    assert diffusion.training_loss(zero_model, x0, t, noise).item() == loss.item()


@pytest.mark.parametrize("target", ["eps", "v"])
def test_ddim_with_an_oracle_recovers_x0(target: str):
    diffusion = GaussianDiffusion.from_config(DiffusionConfig(target=target))
    x0 = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4))
    model = oracle(x0, reference_abar(), target)
    x_t = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    for steps in (1, 7, 50):
        torch.testing.assert_close(diffusion.ddim_sample(model, x_t, steps), x0, rtol=1e-4, atol=1e-4)


def test_ddim_timesteps_are_even_and_include_both_ends():
    diffusion = GaussianDiffusion.from_config(DiffusionConfig())
    assert diffusion.ddim_timesteps(1000) == list(range(1000))
    ts = diffusion.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 0 and ts[-1] == 999
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert min(gaps) >= 20 and max(gaps) <= 21
    with pytest.raises(ValueError):
        diffusion.ddim_timesteps(1001)


def test_ddim_eta0_is_deterministic_given_x_t():
    diffusion, unet = short_diffusion(), tiny_unet()
    x_t = ImageGenerators([0, 1]).randn((2, 16, 16), "cpu")
    out1 = diffusion.ddim_sample(unet, x_t, 8, eta=0.0, noise=ImageGenerators([7, 8]))
    out2 = diffusion.ddim_sample(unet, x_t, 8, eta=0.0, noise=ImageGenerators([9, 10]))
    out3 = diffusion.ddim_sample(unet, x_t, 8, eta=0.0)
    assert torch.equal(out1, out2) and torch.equal(out1, out3)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_each_image_depends_only_on_its_own_seed(sampler: str, dtype: torch.dtype):
    diffusion, unet = short_diffusion(), tiny_unet().to(dtype)

    def run(seeds: list[int]) -> torch.Tensor:
        gens = ImageGenerators(seeds)
        x_t = gens.randn((2, 16, 16), "cpu", dtype)
        return diffusion.sample(unet, x_t, sampler, 10, eta=0.7, noise=gens)

    pair, alone = run([11, 12]), run([12])
    assert pair.dtype == dtype
    # float32 convolutions sum in a batch-size dependent order (~1e-6 per step on CPU and cuDNN);
    # in float64 that rounding vanishes and only the seeding could make the images differ.
    atol = 1e-6 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(pair[1:], alone, rtol=0, atol=atol)
    assert (pair[0] - pair[1]).abs().max() > 1e-2


def test_ddim_full_steps_eta1_is_ddpm():
    diffusion, unet = short_diffusion(), tiny_unet()
    abar = reference_abar(20, 1e-3, 0.2)
    betas = 1 - abar[1:] / abar[:-1]
    beta_tilde = betas * (1 - abar[:-1]) / (1 - abar[1:])  # for t = 1..T-1
    sigmas2 = torch.tensor([diffusion.ddim_sigma(t, t - 1, 1.0) ** 2 for t in range(1, 20)]).double()
    torch.testing.assert_close(sigmas2, beta_tilde, rtol=1e-5, atol=1e-9)
    gens_a, gens_b = ImageGenerators([3, 4]), ImageGenerators([3, 4])
    x_t = ImageGenerators([5, 6]).randn((2, 16, 16), "cpu")
    ddpm = diffusion.ddpm_sample(unet, x_t, gens_a)
    ddim = diffusion.ddim_sample(unet, x_t, 20, eta=1.0, noise=gens_b)
    torch.testing.assert_close(ddim, ddpm, rtol=1e-4, atol=1e-4)


def test_training_loss_decreases_on_a_fixed_batch():
    diffusion, unet = short_diffusion(), tiny_unet().train()
    x0 = torch.randn(4, 2, 16, 16, generator=torch.Generator().manual_seed(6))
    opt = torch.optim.Adam(unet.parameters(), lr=3e-3)

    def loss_at(seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        t, noise = torch.randint(0, diffusion.num_timesteps, (4,), generator=g), torch.randn(x0.shape, generator=g)
        return diffusion.training_loss(unet, x0, t, noise)

    with torch.no_grad():
        before = loss_at(0).item()
    for step in range(15):
        opt.zero_grad()
        loss_at(step % 5).backward()
        opt.step()
    with torch.no_grad():
        after = loss_at(0).item()
    assert after < 0.75 * before


def test_sample_dispatches_on_the_sampler():
    cfg = DiffusionConfig(timesteps=20, beta_end=0.2)
    diffusion, unet = GaussianDiffusion.from_config(cfg), tiny_unet()
    x_t = ImageGenerators([1]).randn((2, 16, 16), "cpu")
    torch.testing.assert_close(
        diffusion.sample(unet, x_t, "ddpm", noise=ImageGenerators([2])),
        diffusion.ddpm_sample(unet, x_t, ImageGenerators([2])),
    )
    torch.testing.assert_close(diffusion.sample(unet, x_t, "ddim", 20), diffusion.ddim_sample(unet, x_t, 20))
    with pytest.raises(ValueError):
        diffusion.ddpm_sample(unet, x_t, ImageGenerators([1, 2]))
    with pytest.raises(ValueError, match="sampler='plms'"):
        diffusion.sample(unet, x_t, "plms")


def test_bf16_autocast_covers_the_model_call_only():
    diffusion, unet = short_diffusion(), tiny_unet()
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = unet(x, t)
        seen.append((x.dtype, out.dtype))
        return out

    x_t = ImageGenerators([0, 1]).randn((2, 16, 16), "cpu")
    bf16 = diffusion.ddim_sample(autocast_model(model, "bf16"), x_t, 5, eta=1.0, noise=ImageGenerators([2, 3]))
    fp32 = diffusion.ddim_sample(autocast_model(model, "fp32"), x_t, 5, eta=1.0, noise=ImageGenerators([2, 3]))
    # the state enters every call in float32; the network computes in bf16 under autocast only
    assert seen == [(torch.float32, torch.bfloat16)] * 5 + [(torch.float32, torch.float32)] * 5
    assert bf16.dtype == fp32.dtype == torch.float32
    assert 0 < (bf16 - fp32).abs().mean() < 0.05 * fp32.abs().mean()
    with pytest.raises(ValueError, match="precision 'fp16'"):
        autocast_model(model, "fp16")


def test_per_image_noise_moves_to_the_device_in_one_copy():
    from torch.overrides import TorchFunctionMode

    class CountCopies(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.copies = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.copies += func is torch.Tensor.to
            return func(*args, **(kwargs or {}))

    gens = ImageGenerators(range(8))
    with CountCopies() as mode:
        noise = gens.randn((2, 4, 4), "meta")  # any device other than the generators'
    assert noise.shape == (8, 2, 4, 4) and noise.device.type == "meta" and mode.copies == 1
    alone = ImageGenerators([5]).randn((2, 4, 4), "cpu")
    assert torch.equal(ImageGenerators(range(8)).randn((2, 4, 4), "cpu")[5:6], alone)
