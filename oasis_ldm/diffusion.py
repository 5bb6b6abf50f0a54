"""Gaussian diffusion maths: noise schedules, eps / v targets, the training loss, DDPM and DDIM.

No network code lives here: a model is any callable `model(x_t, t) -> prediction` with t a
(B,) long tensor of timesteps. Schedules are computed in float64 and kept as float32 tensors
(for batched indexing) plus a float64 copy from which the samplers take exact per-step scalars.
Samplers keep their state in float32 (float64 if x_T is): run a reduced-precision model under
autocast (`autocast_model`); its output is cast back to the state's dtype every step, so only
the network's arithmetic is rounded to bf16, never the state that the steps accumulate.

Randomness. Every draw takes an explicit `torch.Generator` and happens on that generator's
device, then moves to the data's device in the data's dtype. A CPU generator therefore yields
the same numbers on a laptop and on any GPU, so a resumed or re-sharded run repeats them.
Samplers take one generator per image (`per_image_randn`), so image i depends only on its own
seed and never on the batch it was in or the rank that ran it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from oasis_ldm.config import DiffusionConfig

Model = Callable[[Tensor, Tensor], Tensor]
PRECISIONS = ("fp32", "bf16")  # what a sampling request may ask of the U-Net


def autocast_model(model: Model, precision: str) -> Model:
    """`model` as is ("fp32"), or called under bf16 autocast on its input's device ("bf16").

    Autocast wraps the network call alone: the sampler's x_t and its update arithmetic stay
    float32 (rounding them to bf16 every step would accumulate). CPU autocast works too, so
    a test on a laptop runs the code a GPU runs.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return model

    def bf16_model(x: Tensor, t: Tensor) -> Tensor:
        with torch.autocast(x.device.type, torch.bfloat16):
            return model(x, t)

    return bf16_model


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """DDPM's schedule: betas evenly spaced from beta_start to beta_end (float64)."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal: alpha_bar(t) = cos^2(pi/2 (t/T + s) / (1 + s)), betas from its ratios,
    clipped at max_beta so the last step (alpha_bar -> 0) stays finite (float64)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=max_beta)


def per_image_randn(
    shape_per_image: Sequence[int],
    generators: Sequence[torch.Generator],
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """One standard-normal tensor per generator, stacked: (len(generators), *shape_per_image).

    Each image's numbers come from its own generator only (drawn in float32 on that generator's
    device), so they do not change with batch size, batch position, device or rank. The draws
    are stacked where they were made and moved in one copy: one transfer per sampler step, not
    one per image (the generators share a device, the CPU for sampling).
    """
    draws = [torch.randn(tuple(shape_per_image), generator=g, device=g.device) for g in generators]
    return torch.stack(draws).to(device, dtype)


def seeded_generators(seeds: Sequence[int], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per image seed (CPU by default: the same seed gives the same image anywhere)."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    if generator is None:
        return torch.randn(tuple(shape), device=like.device, dtype=like.dtype)
    noise = torch.randn(tuple(shape), generator=generator, device=generator.device)
    return noise.to(like.device, like.dtype)


class GaussianDiffusion:
    """The forward process q(x_t | x_0), its training loss and two reverse-process samplers."""

    _POSTERIOR = ("posterior_mean_coef1", "posterior_mean_coef2", "posterior_variance")

    def __init__(
        self,
        betas: Tensor,
        target: str = "eps",
        sampler: str = "ddim",
        sample_steps: int = 50,
        eta: float = 0.0,
    ) -> None:
        if target not in ("eps", "v"):
            raise ValueError(f"diffusion target {target!r}: expected eps or v")
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        self.target, self.sampler, self.sample_steps, self.eta = target, sampler, sample_steps, eta
        self.num_timesteps = len(betas)
        abar = torch.cumprod(1 - betas, dim=0)
        abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t), beta_tilde_0 = 0.
        post_var = betas * (1 - abar_prev) / (1 - abar)
        self.schedule64 = {
            "betas": betas,
            "alphas_cumprod": abar,
            "alphas_cumprod_prev": abar_prev,
            "sqrt_alphas_cumprod": abar.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
            "posterior_variance": post_var,
            "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
            "posterior_mean_coef2": (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar),
        }
        self.to("cpu")

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Put the float32 tables (`alphas_cumprod`, ...) on `device`; float64 ones stay on the CPU."""
        for name, value in self.schedule64.items():
            setattr(self, name, value.to(device, torch.float32))
        return self

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        if cfg.schedule == "linear":
            betas = linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        elif cfg.schedule == "cosine":
            betas = cosine_betas(cfg.timesteps)
        else:
            raise ValueError(f"diffusion.schedule={cfg.schedule!r}: expected linear or cosine")
        return cls(betas, cfg.target, cfg.sampler, cfg.sample_steps, cfg.eta)

    # -- forward process and parameterisations ------------------------------------------------

    @staticmethod
    def _at(table: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """table[t] shaped (B, 1, 1, ...) to broadcast against x, on x's device and dtype."""
        values = table.to(t.device)[t.long()].to(x.device, x.dtype)
        return values.reshape(-1, *([1] * (x.ndim - 1)))

    def _roots(self, t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) broadcastable against x."""
        return self._at(self.sqrt_alphas_cumprod, t, x), self._at(self.sqrt_one_minus_alphas_cumprod, t, x)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        sa, s1 = self._roots(t, x0)
        return sa * x0 + s1 * noise

    def v_from_eps_x0(self, eps: Tensor, x0: Tensor, t: Tensor) -> Tensor:
        """v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho)."""
        sa, s1 = self._roots(t, x0)
        return sa * eps - s1 * x0

    def predict_x0_eps(self, xt: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)."""
        sa, s1 = self._roots(t, xt)
        return (xt - s1 * eps) / sa

    def predict_eps_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """eps = sqrt(abar_t) v + sqrt(1 - abar_t) x_t."""
        sa, s1 = self._roots(t, xt)
        return sa * v + s1 * xt

    def predict_x0_from_v(self, xt: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
        sa, s1 = self._roots(t, xt)
        return sa * xt - s1 * v

    def training_loss(
        self,
        model: Model,
        x0: Tensor,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | None = None,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """MSE between model(x_t, t) and the configured target, averaged over every element.

        t ~ U{0..T-1} first, then the noise, both from `generator` on its own device (a seeded
        CPU generator per step makes a resumed run draw exactly the same t and noise). A caller
        with its own random streams passes `t` (B,) and/or `noise` (x0's shape) instead.
        Returns (loss, {"t": t, "mse_per_sample": (B,) detached}).
        """
        b = x0.shape[0]
        if t is None and generator is None:
            t = torch.randint(0, self.num_timesteps, (b,), device=x0.device)
        elif t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=generator.device)
        t = t.to(x0.device).long()
        noise = _randn(x0.shape, generator, x0) if noise is None else noise.to(x0.device, x0.dtype)
        xt = self.q_sample(x0, t, noise)
        target = noise if self.target == "eps" else self.v_from_eps_x0(noise, x0, t)
        pred = model(xt, t)
        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
        return per_sample.mean(), {"t": t, "mse_per_sample": per_sample.detach()}

    # -- samplers -------------------------------------------------------------------------------

    def _predict(self, model: Model, x: Tensor, t: int, clip_x0: float | None) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted at integer step t for the whole batch, in x's dtype."""
        a = float(self.schedule64["alphas_cumprod"][t])
        sa, s1 = math.sqrt(a), math.sqrt(1 - a)
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        if self.target == "eps":
            eps, x0 = out, (x - s1 * out) / sa
        else:
            eps, x0 = sa * out + s1 * x, sa * x - s1 * out
        if clip_x0 is not None:
            x0 = x0.clamp(-clip_x0, clip_x0)
            eps = (x - sa * x0) / s1
        return x0, eps

    @staticmethod
    def _noise(x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
        if generators is None:
            return torch.randn_like(x)
        return per_image_randn(x.shape[1:], generators, x.device, x.dtype)

    @staticmethod
    def _check(x_t: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
        """The sampler state: float32, or float64 when x_T is (half precision would drift)."""
        if generators is not None and len(generators) != x_t.shape[0]:
            raise ValueError(f"{len(generators)} generators for a batch of {x_t.shape[0]} images")
        return x_t.to(torch.promote_types(x_t.dtype, torch.float32))

    @torch.no_grad()
    def ddpm_sample(
        self,
        model: Model,
        x_T: Tensor,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> Tensor:
        """Ancestral sampling through all T steps with the posterior variance beta_tilde_t."""
        x = self._check(x_T, generators)
        for t in tqdm(range(self.num_timesteps - 1, -1, -1), desc="ddpm", disable=not progress):
            x0, _ = self._predict(model, x, t, clip_x0)
            c1, c2, var = (float(self.schedule64[k][t]) for k in self._POSTERIOR)
            x = c1 * x0 + c2 * x
            if t > 0:  # beta_tilde_0 = 0: the last step adds no noise
                x = x + math.sqrt(var) * self._noise(x, generators)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """`steps` timesteps evenly spaced over [0, T-1], both ends included, ascending.

        steps == T gives every step; steps == 1 gives [T-1] (one jump from pure noise to x_0).
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"DDIM steps={steps}: expected 1..{self.num_timesteps}")
        if steps == 1:
            return [self.num_timesteps - 1]
        return torch.linspace(0, self.num_timesteps - 1, steps, dtype=torch.float64).round().long().tolist()

    def ddim_sigma(self, t: int, t_prev: int, eta: float) -> float:
        """sigma of the DDIM step t -> t_prev (t_prev = -1 means x_0, abar = 1); eta = 1 with
        consecutive steps equals sqrt(beta_tilde_t), DDPM's posterior standard deviation."""
        abar = self.schedule64["alphas_cumprod"]
        a, a_prev = float(abar[t]), (float(abar[t_prev]) if t_prev >= 0 else 1.0)
        return eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

    @torch.no_grad()
    def ddim_sample(
        self,
        model: Model,
        x_T: Tensor,
        steps: int,
        eta: float = 0.0,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> Tensor:
        """Song et al.'s DDIM; eta = 0 is deterministic given x_T, eta = 1 with steps = T is DDPM."""
        x = self._check(x_T, generators)
        ts = self.ddim_timesteps(steps)
        prev = [-1, *ts[:-1]]
        for t, t_prev in tqdm(list(zip(ts, prev, strict=True))[::-1], desc="ddim", disable=not progress):
            x0, eps = self._predict(model, x, t, clip_x0)
            a_prev = float(self.schedule64["alphas_cumprod"][t_prev]) if t_prev >= 0 else 1.0
            sigma = self.ddim_sigma(t, t_prev, eta)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if eta > 0 and t_prev >= 0:
                x = x + sigma * self._noise(x, generators)
        return x

    def sample(
        self,
        model: Model,
        x_T: Tensor,
        generators: Sequence[torch.Generator] | None = None,
        progress: bool = False,
        clip_x0: float | None = None,
    ) -> Tensor:
        """The configured sampler (`sampler`, `sample_steps` capped at T, `eta` from the config)."""
        if self.sampler == "ddpm":
            return self.ddpm_sample(model, x_T, generators, progress, clip_x0)
        steps = min(self.sample_steps, self.num_timesteps)
        return self.ddim_sample(model, x_T, steps, self.eta, generators, progress, clip_x0)
