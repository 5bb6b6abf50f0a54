"""What a stage needs to know about the micro-batch it is computing.

The context hands out the step's random numbers under the rule of `order.py` (drawn for the
global micro-batch, sliced to this rank) and the autocast policy, so stages never touch
global RNG state and a resumed or re-sharded run draws the same numbers.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from oasis_ldm.distributed import DistEnv
from oasis_ldm.seeding import derive_seed, make_generator
from oasis_ldm.train.order import global_randint, global_randn


@dataclass
class StepContext:
    step: int  # the optimizer step being computed (1-based)
    micro: int  # micro-batch index within the step
    env: DistEnv
    seed: int
    loss_scale: float  # 1 / grad_accum
    bf16: bool

    def generator(self, purpose: int, device: torch.device | None = None) -> torch.Generator:
        return make_generator(device or self.env.device, self.seed, self.step, self.micro, purpose)

    def seed_for(self, purpose: int) -> int:
        return derive_seed(self.seed, self.step, self.micro, purpose)

    def randn(self, local_shape: tuple[int, ...], purpose: int) -> torch.Tensor:
        gen = self.generator(purpose)
        return global_randn(local_shape, gen, self.env.rank, self.env.world_size, self.env.device)

    def randint(self, high: int, n: int, purpose: int) -> torch.Tensor:
        gen = self.generator(purpose)
        return global_randint(high, n, gen, self.env.rank, self.env.world_size, self.env.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.bf16 and self.env.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
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
