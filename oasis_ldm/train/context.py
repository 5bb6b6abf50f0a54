"""What a stage needs to know about the micro-batch it is computing.

The context hands out the step's random numbers (`draws`, under the rule of oasis_ldm/rng.py)
and the autocast policy, so stages never touch global RNG state and a resumed or re-sharded
run draws the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from oasis_ldm.distributed import DistEnv
from oasis_ldm.rng import StepDraws


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

    @property
    def draws(self) -> StepDraws:
        """This round's random numbers, by the rule of oasis_ldm/rng.py."""
        e = self.env
        return StepDraws(self.seed, self.step, self.micro, self.accum, e.rank, e.world_size, e.device)

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
