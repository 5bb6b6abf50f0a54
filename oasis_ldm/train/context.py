"""What a stage needs to know about the micro-batch it is computing.

The context hands out the step's random numbers under the rule of `order.py` (drawn for the
step's whole batch, sliced to this micro-batch and rank) and the autocast policy, so stages
never touch global RNG state and a resumed or re-sharded run draws the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from oasis_ldm.distributed import DistEnv
from oasis_ldm.seeding import make_generator
from oasis_ldm.train.order import step_rows


@dataclass
class StepContext:
    step: int  # the optimizer step being computed (1-based)
    micro: int  # micro-batch index within the step
    accum: int  # micro-batches per step
    env: DistEnv
    seed: int
    bf16: bool

    @property
    def loss_scale(self) -> float:
        return 1.0 / self.accum

    def generator(self, purpose: int, device: torch.device | None = None) -> torch.Generator:
        return make_generator(device or self.env.device, self.seed, self.step, purpose)

    def step_rows(self, local_rows: int) -> int:
        """Rows of the step's whole batch, for a micro-batch of `local_rows` on this rank."""
        return local_rows * self.env.world_size * self.accum

    def mine(self, full: torch.Tensor) -> torch.Tensor:
        """This micro-batch's rows on this rank, out of a draw for the whole step."""
        return step_rows(full, self.micro, self.accum, self.env.rank, self.env.world_size)

    def randn(self, local_shape: tuple[int, ...], purpose: int) -> torch.Tensor:
        n, *rest = local_shape
        full = torch.randn((self.step_rows(n), *rest), generator=self.generator(purpose), device=self.env.device)
        return self.mine(full)

    def randint(self, high: int, n: int, purpose: int) -> torch.Tensor:
        gen = self.generator(purpose)
        return self.mine(torch.randint(0, high, (self.step_rows(n),), generator=gen, device=self.env.device))

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast on CUDA and on the CPU alike, so CPU runs take the same code as GPU runs.

        What must stay fp32 leaves it itself: the SSIM loss (losses.py), the posterior's
        moments (DiagonalGaussian), the frozen encoder of the ldm stage (not run under it).
        """
        if self.bf16:
            return torch.autocast(self.env.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


class Stage(Protocol):
    """What the loop needs from a stage (`vae` or `ldm`); see vae_stage.py and ldm_stage.py."""

    name: str
    main: str  # key of the model that the EMA tracks and inference uses
    models: dict[str, nn.Module]  # trainable modules, each with its own optimizer
    dataset: Dataset  # rows the sampler indexes; its batches go to `backward`

    def lr(self, model: str) -> float: ...

    def initialise(self) -> None:
        """Work done once, on a fresh start only (the ldm stage's latent scale factor)."""

    def backward(self, wrapped: dict[str, nn.Module], batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch, back-propagated with `ctx.loss_scale`; detached terms out."""

    def log_images(self, ema_model: nn.Module, logger: Any, step: int) -> None: ...

    def state(self) -> dict[str, Any]:
        """Stage-specific checkpoint content (ldm: scale factor, VAE path and checksum)."""

    def load_state(self, state: dict[str, Any]) -> None: ...
