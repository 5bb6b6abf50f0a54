"""Gaussian diffusion maths: noise schedules, eps / v targets, the training loss, DDPM and DDIM.

No network code lives here: a model is any callable `model(x_t, t) -> prediction` with t a
(B,) long tensor of timesteps. The schedule is one float64 table (`Schedule`): the samplers
take exact per-step scalars from it on the CPU, and training gathers from its copy on the
training device. A model's output becomes (x_0, eps) in one place (`x0_and_eps`), for eps
and v targets alike. Samplers keep their state in float32 (float64 if x_T is): run a
reduced-precision model under autocast (`autocast_model`); its output is cast back to the
state's dtype every step, so only the network's arithmetic is rounded to bf16, never the
state that the steps accumulate.

Randomness. The training loss takes its timesteps and noise from the caller (the trainer's
step draws, oasis_ldm/rng.py); the samplers draw each image's noise from that image's own
generator (`rng.ImageGenerators`), so image i depends only on its own seed, never on the batch
it was in or the rank that ran it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from oasis_ldm.config import DiffusionConfig
from oasis_ldm.rng import ImageGenerators

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


SAMPLERS = ("ddim", "ddpm")


@dataclass(frozen=True)
class Schedule:
    """The schedule's per-timestep values, float64: one table, computed once from the betas."""

    betas: Tensor
    alphas_cumprod: Tensor  # abar_t
    alphas_cumprod_prev: Tensor  # abar_{t-1}, 1 at t = 0
    posterior_variance: Tensor  # beta_tilde_t of q(x_{t-1} | x_t, x_0); 0 at t = 0
    posterior_mean_coef1: Tensor  # of x_0
    posterior_mean_coef2: Tensor  # of x_t

    @classmethod
    def from_betas(cls, betas: Tensor) -> Schedule:
        betas = betas.to(torch.float64)
        if betas.ndim != 1 or not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1)")
        abar = torch.cumprod(1 - betas, dim=0)
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        return cls(
            betas=betas,
            alphas_cumprod=abar,
            alphas_cumprod_prev=prev,
            posterior_variance=betas * (1 - prev) / (1 - abar),
            posterior_mean_coef1=betas * prev.sqrt() / (1 - abar),
            posterior_mean_coef2=(1 - prev) * (1 - betas).sqrt() / (1 - abar),
        )

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def x0_and_eps(pred: Tensor, x_t: Tensor, sa: Tensor | float, s1: Tensor | float, target: str) -> tuple[Tensor, Tensor]:
    """(x_0, eps) from a model's prediction of `target` at x_t, with sa = sqrt(abar_t) and
    s1 = sqrt(1 - abar_t): eps directly, or v = sa eps - s1 x_0 (Salimans & Ho)."""
    if target == "eps":
        return (x_t - s1 * pred) / sa, pred
    return sa * x_t - s1 * pred, sa * pred + s1 * x_t


class GaussianDiffusion:
    """The forward process q(x_t | x_0), its training loss and two reverse-process samplers."""

    def __init__(self, betas: Tensor, target: str = "eps") -> None:
        if target not in ("eps", "v"):
            raise ValueError(f"diffusion target {target!r}: expected eps or v")
        self.target = target
        self.schedule = Schedule.from_betas(betas)  # on the CPU: the samplers' exact scalars
        self._on_device = self.schedule  # its copy where training gathers from it
        self.num_timesteps = len(self.schedule.betas)

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """Keep a copy of the table on `device`, for the training loss's batched lookups."""
        self._on_device = self.schedule.to(device)
        return self

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        if cfg.schedule == "linear":
            betas = linear_betas(cfg.timesteps, cfg.beta_start, cfg.beta_end)
        elif cfg.schedule == "cosine":
            betas = cosine_betas(cfg.timesteps)
        else:
            raise ValueError(f"diffusion.schedule={cfg.schedule!r}: expected linear or cosine")
        return cls(betas, cfg.target)

    # -- forward process and the training loss ------------------------------------------------

    def _roots(self, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """(sqrt(abar_t), sqrt(1 - abar_t)) per sample, shaped to broadcast against `like`."""
        table = self._on_device.alphas_cumprod
        abar = table[t.to(table.device).long()].reshape(-1, *([1] * (like.ndim - 1)))  # float64: exact roots
        return abar.sqrt().to(like.device, like.dtype), (1 - abar).sqrt().to(like.device, like.dtype)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise."""
        sa, s1 = self._roots(t, x0)
        return sa * x0 + s1 * noise

    def target_of(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the model learns to predict at x_t: the noise, or v = sqrt(abar) eps - sqrt(1 - abar) x_0."""
        if self.target == "eps":
            return noise
        sa, s1 = self._roots(t, x0)
        return sa * noise - s1 * x0

    def training_loss(self, model: Model, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """MSE between model(x_t, t) and the target, over every element, in fp32.

        The caller draws `t` (B,) and `noise` (x0's shape) from its own streams, so a resumed
        or re-sharded run repeats them exactly.
        """
        t, noise = t.to(x0.device).long(), noise.to(x0.device, x0.dtype)
        pred = model(self.q_sample(x0, t, noise), t)
        return F.mse_loss(pred.float(), self.target_of(x0, noise, t).float())

    # -- samplers -------------------------------------------------------------------------------

    def _scalar(self, name: str, t: int) -> float:
        """An exact float64 value of the table at step t (t = -1: before the first step, abar = 1)."""
        return 1.0 if t < 0 else float(getattr(self.schedule, name)[t])

    def _predict(self, model: Model, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """(x0, eps) predicted at integer step t for the whole batch, in x's dtype."""
        a = self._scalar("alphas_cumprod", t)
        out = model(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)).to(x.dtype)
        return x0_and_eps(out, x, math.sqrt(a), math.sqrt(1 - a), self.target)

    @staticmethod
    def _state(x_T: Tensor, noise: ImageGenerators | None) -> Tensor:
        """The sampler state: float32, or float64 when x_T is (half precision would drift)."""
        if noise is not None and len(noise) != x_T.shape[0]:
            raise ValueError(f"{len(noise)} generators for a batch of {x_T.shape[0]} images")
        return x_T.to(torch.promote_types(x_T.dtype, torch.float32))

    @staticmethod
    def _noise(x: Tensor, noise: ImageGenerators | None) -> Tensor:
        return torch.randn_like(x) if noise is None else noise.randn(x.shape[1:], x.device, x.dtype)

    @torch.no_grad()
    def ddpm_sample(
        self, model: Model, x_T: Tensor, noise: ImageGenerators | None = None, progress: bool = False
    ) -> Tensor:
        """Ancestral sampling through all T steps with the posterior variance beta_tilde_t."""
        x = self._state(x_T, noise)
        for t in tqdm(range(self.num_timesteps - 1, -1, -1), desc="ddpm", disable=not progress):
            x0, _ = self._predict(model, x, t)
            x = self._scalar("posterior_mean_coef1", t) * x0 + self._scalar("posterior_mean_coef2", t) * x
            if t > 0:  # beta_tilde_0 = 0: the last step adds no noise
                x = x + math.sqrt(self._scalar("posterior_variance", t)) * self._noise(x, noise)
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
        a, a_prev = self._scalar("alphas_cumprod", t), self._scalar("alphas_cumprod", t_prev)
        return eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))

    @torch.no_grad()
    def ddim_sample(
        self, model: Model, x_T: Tensor, steps: int, eta: float = 0.0, noise: ImageGenerators | None = None,
        progress: bool = False,
    ) -> Tensor:  # fmt: skip
        """Song et al.'s DDIM; eta = 0 is deterministic given x_T, eta = 1 with steps = T is DDPM."""
        x = self._state(x_T, noise)
        ts = self.ddim_timesteps(steps)
        for t, t_prev in tqdm(list(zip(ts, [-1, *ts[:-1]], strict=True))[::-1], desc="ddim", disable=not progress):
            x0, eps = self._predict(model, x, t)
            a_prev, sigma = self._scalar("alphas_cumprod", t_prev), self.ddim_sigma(t, t_prev, eta)
            x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
            if eta > 0 and t_prev >= 0:
                x = x + sigma * self._noise(x, noise)
        return x

    def sample(
        self, model: Model, x_T: Tensor, sampler: str = "ddim", steps: int = 50, eta: float = 0.0,
        noise: ImageGenerators | None = None, progress: bool = False,
    ) -> Tensor:  # fmt: skip
        """x_0 from x_T by `sampler`: DDIM with `steps` and `eta`, or DDPM through all T steps."""
        if sampler == "ddpm":
            return self.ddpm_sample(model, x_T, noise, progress)
        if sampler == "ddim":
            return self.ddim_sample(model, x_T, steps, eta, noise, progress)
        raise ValueError(f"sampler={sampler!r}: expected one of {', '.join(SAMPLERS)}")
