"""What a training step changes and a checkpoint holds, in one object: `TrainState`.

The models (and their DDP/compiled wrappers), one AdamW per model, the EMA of the main model,
how the global batch is split, and the position in the data. `state_dict` is the checkpoint's
content, defined here only; `load_state_dict` puts a CPU checkpoint back into models and
optimizers that live on the training device (`load_state_dict` of each places the tensors; an
optimizer's `step` stays a CPU scalar).

No RNG state is stored: every random number of a step comes from a generator seeded by
(seed, step, stream) (oasis_ldm/rng.py), initial weights from torch.manual_seed(seed), and
data workers draw nothing, so a resume needs none, whatever GPUs it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from oasis_ldm import __version__, checkpoint
from oasis_ldm.config import Config, to_dict
from oasis_ldm.distributed import DistEnv
from oasis_ldm.train.context import Stage
from oasis_ldm.train.ema import EMA
from oasis_ldm.train.order import BatchPlan


@dataclass
class Position:
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    samples_in_epoch: int = 0  # global samples of `epoch` already consumed (a step boundary)


@dataclass
class TrainState:
    stage: Stage
    optimizers: dict[str, torch.optim.Optimizer]
    ema: EMA
    plan: BatchPlan
    pos: Position = field(default_factory=Position)
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # what steps call: DDP, compiled

    @classmethod
    def create(cls, stage: Stage, plan: BatchPlan, cfg: Config) -> TrainState:
        optimizers = {
            name: torch.optim.AdamW(
                model.parameters(), lr=stage.lr(name), betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay
            )
            for name, model in stage.models.items()
        }
        return cls(stage, optimizers, EMA(stage.models[stage.main], cfg.train.ema_decay), plan)

    def wrap(self, env: DistEnv, cfg: Config) -> None:
        """DDP across ranks, then optionally torch.compile (CUDA only); after any restore."""
        for name, model in self.stage.models.items():
            if env.distributed:
                ids = [env.device.index] if env.device.type == "cuda" else None
                # No model here has buffers (GroupNorm only), so DDP's buffer sync is a no-op: leave
                # its default, whose keyword was renamed across torch releases.
                model = DistributedDataParallel(model, device_ids=ids)
            if cfg.train.compile and env.device.type == "cuda":
                model = torch.compile(model)
            self.wrapped[name] = model

    def state_dict(self, cfg: Config, env: DistEnv) -> dict[str, Any]:
        """The checkpoint's content."""
        return {
            "stage": self.stage.name,
            "step": self.pos.step,
            "epoch": self.pos.epoch,
            "samples_in_epoch": self.pos.samples_in_epoch,
            "batch_size": self.plan.global_batch,
            "config": to_dict(cfg),
            "models": {k: m.state_dict() for k, m in self.stage.models.items()},
            "ema": self.ema.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "extra": self.stage.state(),
            "version": __version__,
            "world_size": env.world_size,
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Load a CPU checkpoint into models and optimizers that live on the training device."""
        if saved["stage"] != self.stage.name:
            raise checkpoint.CheckpointError(
                f"the run directory holds a {saved['stage']} checkpoint, not {self.stage.name}"
            )
        for name, model in self.stage.models.items():
            model.load_state_dict(saved["models"][name])
            self.optimizers[name].load_state_dict(saved["optimizers"][name])
        self.ema.load_state_dict(saved["ema"])
        self.stage.load_state(saved["extra"])
        self.pos = Position(saved["step"], saved["epoch"], saved["samples_in_epoch"])
