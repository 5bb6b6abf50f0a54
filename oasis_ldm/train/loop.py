"""One training loop for both stages: DDP, accumulation, clipping, EMA, checkpoints, logging.

The loop owns everything that is the same for the autoencoder and the diffusion model; a
stage (vae_stage.py, ldm_stage.py) owns its models, data and losses. Every rank runs the
same sequence of collectives in the same order, so rank-0-only work (checkpoints, logging)
never leaves other ranks waiting inside a collective for long.
"""

from __future__ import annotations

import contextlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from oasis_ldm import __version__, checkpoint
from oasis_ldm.config import Config, to_dict
from oasis_ldm.distributed import DistEnv, all_reduce_max, all_reduce_mean, barrier, cleanup, init_distributed
from oasis_ldm.train import rundir
from oasis_ldm.train.context import Stage, StepContext
from oasis_ldm.train.ema import EMA
from oasis_ldm.train.order import ResumableSampler
from oasis_ldm.train.signals import StopRequest
from oasis_ldm.train.tblog import TrainLogger


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; training stops before the weights are touched."""


@dataclass
class Position:
    step: int = 0  # optimizer steps completed
    epoch: int = 0
    batch_in_epoch: int = 0  # global micro-batches of `epoch` already consumed


def build_stage(name: str, cfg: Config, env: DistEnv, run_dir: Path) -> Stage:
    if name == "vae":
        from oasis_ldm.train.vae_stage import VAEStage

        return VAEStage(cfg, env)
    if name == "ldm":
        from oasis_ldm.train.ldm_stage import LDMStage

        return LDMStage(cfg, env, run_dir)
    raise ValueError(f"--stage {name!r}: expected vae or ldm")


def train(stage: str, cfg: Config, run_dir: str | Path) -> int:
    """Train `stage` in `run_dir`, resuming from its last checkpoint; returns the final step."""
    env = init_distributed(cfg.train.device)
    try:
        return _train(stage, cfg, Path(run_dir), env)
    finally:
        cleanup()


def _train(stage_name: str, cfg: Config, run_dir: Path, env: DistEnv) -> int:
    rundir.check(run_dir, cfg, stage_name)
    barrier()
    if env.is_main:
        rundir.record(run_dir, cfg, stage_name, env.world_size)
    barrier()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    stage = build_stage(stage_name, cfg, env, run_dir)
    optimizers = {
        name: torch.optim.AdamW(
            model.parameters(),
            lr=stage.lr(name),
            betas=tuple(cfg.train.betas),
            weight_decay=cfg.train.weight_decay,
        )
        for name, model in stage.models.items()
    }
    ema = EMA(stage.models[stage.main], cfg.train.ema_decay)
    pos = Position()
    saved = checkpoint.load_latest(run_dir / "checkpoints", map_location=env.device)
    if saved is None:
        stage.initialise()
    else:
        pos = restore(saved, stage, optimizers, ema)
        if env.is_main:
            print(f"[oasis-ldm] resumed {stage_name} from step {pos.step} (epoch {pos.epoch})", flush=True)
    wrapped = wrap_models(stage.models, env, cfg)
    logger = TrainLogger(run_dir, enabled=env.is_main, first_step=pos.step + 1, max_steps=cfg.train.max_steps)
    stop = StopRequest().install()
    try:
        run_steps(stage, wrapped, optimizers, ema, pos, cfg, env, run_dir, logger, stop)
    finally:
        stop.restore()
        logger.close()
    return pos.step


def wrap_models(models: dict[str, nn.Module], env: DistEnv, cfg: Config) -> dict[str, nn.Module]:
    """DDP across ranks, then optionally torch.compile (CUDA only)."""
    wrapped = {}
    for name, model in models.items():
        if env.distributed:
            ids = [env.device.index] if env.device.type == "cuda" else None
            # No model here has buffers (GroupNorm only), so DDP's buffer sync is a no-op: leave
            # its default, whose keyword was renamed across torch releases.
            model = DistributedDataParallel(model, device_ids=ids)
        if cfg.train.compile and env.device.type == "cuda":
            model = torch.compile(model)
        wrapped[name] = model
    return wrapped


def make_loader(stage: Stage, cfg: Config, env: DistEnv) -> tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(len(stage.dataset), cfg.train.batch_size, env.rank, env.world_size, cfg.train.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(
        stage.dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return loader, sampler


def micro_batches(loader: DataLoader, sampler: ResumableSampler, pos: Position) -> Iterator[Any]:
    """Endless micro-batches from the saved position, keeping `pos` up to date."""
    while True:
        sampler.set_epoch(pos.epoch, pos.batch_in_epoch)
        for batch in loader:
            pos.batch_in_epoch += 1
            yield batch
        pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0


def set_lr(optimizers: dict[str, torch.optim.Optimizer], stage: Stage, step: int, warmup: int) -> float:
    factor = min(1.0, step / warmup) if warmup > 0 else 1.0
    for name, opt in optimizers.items():
        for group in opt.param_groups:
            group["lr"] = stage.lr(name) * factor
    return factor


def train_step(
    stage: Stage,
    wrapped: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    batches: Iterator[Any],
    step: int,
    cfg: Config,
    env: DistEnv,
    stop: StopRequest,
) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward/backward over the micro-batches, guard, clip and update; returns (logs, stop?)."""
    accum = cfg.train.grad_accum
    for opt in optimizers.values():
        opt.zero_grad(set_to_none=True)
    terms: dict[str, torch.Tensor] = {}
    for micro in range(accum):
        ctx = StepContext(step, micro, accum, env, cfg.train.seed, cfg.train.precision == "bf16")
        sync = micro == accum - 1
        with contextlib.ExitStack() as stack:
            if not sync:
                for model in wrapped.values():
                    if hasattr(model, "no_sync"):
                        stack.enter_context(model.no_sync())
            logs = stage.backward(wrapped, next(batches), ctx)
        for k, v in logs.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / accum
    norms = {}
    for name, opt in optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if params:
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            norms[f"grad_norm/{name}"] = torch.nn.utils.clip_grad_norm_(params, clip).detach()
    finite = torch.stack([torch.isfinite(v).all() for v in [*terms.values(), *norms.values()]]).all()
    flags = all_reduce_max(torch.tensor([float(not finite), float(stop.requested)], device=env.device))
    if flags[0] > 0:
        bad = ", ".join(k for k, v in {**terms, **norms}.items() if not torch.isfinite(v).all()) or "another rank"
        raise NonFiniteLossError(
            f"step {step}: non-finite values in {bad}; stopping before the update "
            "(the last checkpoint is untouched; lower train.lr or check the data)"
        )
    for opt in optimizers.values():
        opt.step()
    return {**terms, **norms}, bool(flags[1] > 0)


def run_steps(
    stage: Stage,
    wrapped: dict[str, nn.Module],
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA,
    pos: Position,
    cfg: Config,
    env: DistEnv,
    run_dir: Path,
    logger: TrainLogger,
    stop: StopRequest,
) -> None:
    t = cfg.train
    loader, sampler = make_loader(stage, cfg, env)
    batches = micro_batches(loader, sampler, pos)
    meter = Meter()
    for model in wrapped.values():
        model.train()
    while pos.step < t.max_steps:
        step = pos.step + 1
        lr_factor = set_lr(optimizers, stage, step, t.warmup_steps)
        logs, stop_now = train_step(stage, wrapped, optimizers, batches, step, cfg, env, stop)
        ema.update(stage.models[stage.main])
        pos.step = step
        meter.add(logs, t.batch_size * t.grad_accum * env.world_size)
        if step % t.log_every == 0 or step == t.max_steps:
            report = meter.report(env)
            report["train/lr"] = stage.lr(stage.main) * lr_factor
            report["train/epoch"] = pos.epoch + pos.batch_in_epoch / max(1, sampler.batches_per_epoch())
            if env.device.type == "cuda":
                report["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            logger.scalars(step, report)
            logger.console(step, report)
        if step % t.image_every == 0 or step == t.max_steps:
            stage.log_images(ema.model, logger, step)
        if stop_now or step % t.ckpt_every == 0 or step == t.max_steps:
            logger.flush()  # events up to a checkpoint survive a kill: a resume leaves no gap
            save(run_dir, stage, optimizers, ema, pos, cfg, env)
        if stop_now:
            logger.close()
            stop.finish()
    if meter.last:
        logger.hparams(_flat_hparams(cfg), {f"hparam/{k}": v for k, v in meter.last.items()})


class Meter:
    """Running means of the logged terms between two log points, and throughput."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}  # the latest report's losses, for the hparams summary
        self._reset()

    def _reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.images = 0
        self.t0 = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor], images: int) -> None:
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.count += 1
        self.images += images

    def report(self, env: DistEnv) -> dict[str, float]:
        """Means over the interval and over ranks (a collective: every rank calls it)."""
        keys = sorted(self.sums)
        means = all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.count).tolist()
        elapsed = time.perf_counter() - self.t0
        out = {(k if "/" in k else f"loss/{k}"): v for k, v in zip(keys, means, strict=True)}
        out["train/images_per_s"] = self.images / max(elapsed, 1e-9)
        self.last = {k: v for k, v in out.items() if k.startswith("loss/")}
        self._reset()
        return out


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    random.setstate(_tuples(state["python"]))


def _tuples(value: Any) -> Any:
    """weights_only loading gives lists where random.setstate wants tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def save(
    run_dir: Path,
    stage: Stage,
    optimizers: dict[str, torch.optim.Optimizer],
    ema: EMA,
    pos: Position,
    cfg: Config,
    env: DistEnv,
) -> None:
    """Rank 0 writes last.pt (and a snapshot when due); every rank waits for it."""
    if env.is_main:
        state = {
            "stage": stage.name,
            "step": pos.step,
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch,
            "config": to_dict(cfg),
            "models": {k: m.state_dict() for k, m in stage.models.items()},
            "ema": ema.state_dict(),
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": _rng_state(),
            "extra": stage.state(),
            "version": __version__,
            "world_size": env.world_size,
        }
        ckpt_dir = run_dir / "checkpoints"
        checkpoint.atomic_save(state, ckpt_dir / checkpoint.LAST)
        if pos.step % cfg.train.snapshot_every == 0 or pos.step == cfg.train.max_steps:
            checkpoint.atomic_save(state, ckpt_dir / checkpoint.snapshot_name(pos.step))
            checkpoint.prune_snapshots(ckpt_dir, cfg.train.keep_snapshots)
    barrier()


def restore(saved: dict[str, Any], stage: Stage, optimizers: dict[str, torch.optim.Optimizer], ema: EMA) -> Position:
    if saved["stage"] != stage.name:
        raise checkpoint.CheckpointError(f"the run directory holds a {saved['stage']} checkpoint, not {stage.name}")
    for name, model in stage.models.items():
        model.load_state_dict(saved["models"][name])
        optimizers[name].load_state_dict(saved["optimizers"][name])
    ema.load_state_dict(saved["ema"])
    stage.load_state(saved["extra"])
    _set_rng_state(saved["rng"])
    return Position(step=saved["step"], epoch=saved["epoch"], batch_in_epoch=saved["batch_in_epoch"])


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = str(value) if isinstance(value, list) else value
    return flat
