"""One training loop for both stages: DDP, accumulation, clipping, EMA, checkpoints, logging.

The loop owns everything that is the same for the autoencoder and the diffusion model; a
stage (vae_stage.py, ldm_stage.py) owns its models, data and losses. Every rank runs the
same sequence of collectives in the same order, so rank-0-only work (checkpoints, logging)
never leaves other ranks waiting inside a collective for long, and decisions all ranks must
share (the lock, which checkpoint to resume) are made on rank 0 and broadcast.

A start writes nothing until every check has passed (preflight.py), so a failed start never
blocks its corrected rerun.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from oasis_ldm import checkpoint, outputs
from oasis_ldm.config import Config, canonical, to_dict
from oasis_ldm.distributed import (
    DistEnv,
    all_reduce_max,
    all_reduce_mean,
    barrier,
    broadcast_bytes,
    cleanup,
    init_distributed,
    on_every_rank,
    on_rank0,
)
from oasis_ldm.lr import lr_factor
from oasis_ldm.threads import configure_threads
from oasis_ldm.train import inputs, preflight, rundir
from oasis_ldm.train.context import Stage, StepContext
from oasis_ldm.train.lock import RunLock
from oasis_ldm.train.order import BatchPlan, ResumableSampler, plan_batches
from oasis_ldm.train.signals import StopRequest
from oasis_ldm.train.state import Position, TrainState
from oasis_ldm.train.tblog import TrainLogger


class NonFiniteLossError(RuntimeError):
    """A loss or gradient became NaN/inf; training stops before the weights are touched."""


def say(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(f"[oasis-ldm] {message}", flush=True)


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
    threads = configure_threads()
    env = init_distributed(cfg.train.device)
    try:
        return _train(stage, cfg, Path(run_dir), env, threads)
    finally:
        cleanup()


def _train(stage_name: str, cfg: Config, run_dir: Path, env: DistEnv, threads: int) -> int:
    # Rank 0 alone checks the autoencoder of an ldm run: it reads it for every rank (ldm_stage.py).
    checked = on_every_rank(
        lambda: preflight.check_start(stage_name, cfg, run_dir, world_size=env.world_size, vae_ready=env.is_main)
    )
    for line in checked.notes:
        say(env, line)
    created = not run_dir.exists()
    lock = RunLock(run_dir) if env.is_main else None
    note = on_rank0(lambda: lock.acquire())
    if note:
        say(env, note)
    try:
        return _locked_train(stage_name, checked.cfg, run_dir, env, threads, checked.given)
    finally:
        if lock is not None:
            lock.release()
            if created and not (run_dir / "run.json").exists():
                with contextlib.suppress(OSError):
                    run_dir.rmdir()  # a failed first start leaves no empty run directory behind


def _locked_train(
    stage_name: str, cfg: Config, run_dir: Path, env: DistEnv, threads: int, given: dict[str, str]
) -> int:
    # Build the stage and what its steps change.
    plan = plan_batches(cfg.train.batch_size, env.world_size, cfg.train.micro_batch)
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    stage = on_every_rank(lambda: build_stage(stage_name, cfg, env, run_dir))
    state = TrainState.create(stage, plan, cfg)
    # Resume from the newest good checkpoint, or start afresh.
    changes, replaced = resume_or_start(state, cfg, run_dir, env)
    pos = state.pos
    if pos.step >= cfg.train.max_steps:
        say(env, f"{stage_name}: already at step {pos.step} (train.max_steps={cfg.train.max_steps}); nothing to do")
        return pos.step
    if pos.step == 0:
        stage.initialise()
    # Record the start, then train.
    start = rundir.Start(stage_name, env.world_size, pos.step, threads, changes, replaced)
    on_rank0(lambda: record_start(run_dir, cfg, start, stage, given))
    say(env, f"{stage_name}: {run_dir} | {plan.describe()} | steps {pos.step + 1}..{cfg.train.max_steps}")
    state.wrap(env, cfg)
    logger = TrainLogger(run_dir, enabled=env.is_main, first_step=pos.step + 1, max_steps=cfg.train.max_steps)
    for change in changes:
        say(env, f"from step {pos.step + 1}: {change}")
    logger.config_changes(pos.step + 1, changes)
    stop = StopRequest().install()
    try:
        run_steps(state, cfg, env, run_dir, logger, stop)
    finally:
        stop.restore()
        logger.close()
    return state.pos.step


def record_start(run_dir: Path, cfg: Config, start: rundir.Start, stage: Stage, given: dict[str, str]) -> None:
    """Rank 0: config.yaml, and this start in run.json with its inputs' paths and identities
    (the autoencoder's checksum is the one the stage encodes with)."""
    held = inputs.record_of(start.stage, cfg, given, vae_sha256=getattr(stage, "vae_sha256", None))
    with outputs.writing(run_dir / "run.json"):
        rundir.record(run_dir, cfg, dataclasses.replace(start, inputs=held))


def resume_or_start(
    state: TrainState, cfg: Config, run_dir: Path, env: DistEnv
) -> tuple[list[preflight.Change], list[preflight.Change]]:
    """Load the checkpoint rank 0 chose into `state`, or clear a fresh start's stale outputs.

    Returns (the changes this resume makes, how a fresh start's config differs from the one
    its run directory held), for run.json.
    """
    found = resume_point(run_dir / "checkpoints", env)
    if found is None:
        return [], on_rank0(lambda: fresh_start(run_dir, cfg, env))
    if found.note:
        say(env, f"warning: {found.note}")
    changes = on_every_rank(lambda: resume_changes(state.stage.name, found.state, cfg, run_dir))
    state.load_state_dict(found.state)
    say(env, f"resumed {state.stage.name} from step {state.pos.step} of {found.path.name}")
    return changes, []


def fresh_start(run_dir: Path, cfg: Config, env: DistEnv) -> list[preflight.Change]:
    """Rank 0, no checkpoint to resume: say what an earlier run left and clear its outputs.

    Returns how this config differs from the one the directory held (recorded in run.json).
    """
    if (run_dir / "run.json").exists():
        removed = rundir.purge_outputs(run_dir)
        say(env, f"{run_dir} holds no checkpoint: starting at step 1 and removing the {removed} outputs "
                 "(TensorBoard events, image grids) that run.json lists for the run that was there")  # fmt: skip
    old = preflight.saved_config(run_dir)
    if old is None:
        return []
    allowed, refused = preflight.config_changes(canonical(old), to_dict(cfg), paths=True)
    return allowed + refused


def resume_point(ckpt_dir: Path, env: DistEnv) -> checkpoint.Found | None:
    """The checkpoint to resume: rank 0 chooses and reads it, every rank gets its bytes.

    One reader: a read glitch on one node can no longer send the ranks to different steps.
    """
    mine: list[checkpoint.Found | None] = [None]

    def choose() -> str | None:
        mine[0] = checkpoint.find_latest(ckpt_dir)
        return None if mine[0] is None else mine[0].path.name

    name = on_rank0(choose)
    if name is None:
        return None
    data = broadcast_bytes(mine[0].data if env.is_main else None)
    if env.is_main:
        return mine[0]
    path = ckpt_dir / name
    return checkpoint.Found(path, data, checkpoint.parse(data, path))


def resume_changes(stage: str, saved: dict[str, Any], cfg: Config, run_dir: Path) -> list[preflight.Change]:
    """The checkpoint's own config decides what this resume may change (config.yaml may be gone);
    an ldm checkpoint's autoencoder checksum is the one a moved ldm.vae_ckpt must have."""
    old = canonical(saved["config"])
    allowed, refused = preflight.config_changes(old, to_dict(cfg))
    preflight.refuse_changes(run_dir, refused)
    vae_sha256 = (saved.get("extra") or {}).get("vae_sha256")
    return allowed + preflight.input_changes(stage, old, cfg, run_dir, vae_sha256)


def make_loader(stage: Stage, plan: BatchPlan, cfg: Config, env: DistEnv) -> tuple[DataLoader, ResumableSampler]:
    sampler = ResumableSampler(len(stage.dataset), plan, env.rank, cfg.train.seed)
    workers = cfg.data.num_workers
    loader = DataLoader(
        stage.dataset,
        batch_size=plan.micro,
        sampler=sampler,
        num_workers=workers,
        pin_memory=env.device.type == "cuda",
        persistent_workers=workers > 0,
        drop_last=True,
    )
    return loader, sampler


def micro_batches(loader: DataLoader, sampler: ResumableSampler, pos: Position, plan: BatchPlan) -> Iterator[Any]:
    """Endless micro-batches from the saved position, keeping `pos` (in global samples) up to date."""
    while True:
        sampler.set_epoch(pos.epoch, pos.samples_in_epoch)
        for batch in loader:
            pos.samples_in_epoch += plan.round_rows
            yield batch
        pos.epoch, pos.samples_in_epoch = pos.epoch + 1, 0


def set_lr(state: TrainState, step: int, t: Any) -> float:
    factor = lr_factor(step, t.warmup_steps, t.max_steps, t.lr_schedule, t.lr_min_factor)
    for name, opt in state.optimizers.items():
        for group in opt.param_groups:
            group["lr"] = state.stage.lr(name) * factor
    return factor


def train_step(
    state: TrainState, batches: Iterator[Any], step: int, cfg: Config, env: DistEnv, stop: StopRequest
) -> tuple[dict[str, torch.Tensor], bool]:
    """Forward/backward over the rounds, guard, clip and update; returns (logs, stop?)."""
    plan = state.plan
    for opt in state.optimizers.values():
        opt.zero_grad(set_to_none=True)
    # Accumulate the gradients of the step's rounds; DDP all-reduces them once, in the last.
    terms: dict[str, torch.Tensor] = {}
    for micro in range(plan.rounds):
        ctx = StepContext(step, micro, plan.rounds, env, cfg.train.seed, cfg.train.precision == "bf16")
        with contextlib.ExitStack() as stack:
            if micro < plan.rounds - 1:
                for model in state.wrapped.values():
                    if hasattr(model, "no_sync"):
                        stack.enter_context(model.no_sync())
            logs = state.stage.backward(state.wrapped, next(batches), ctx)
        for k, v in logs.items():
            terms[k] = terms.get(k, 0.0) + v.detach().float() / plan.rounds
    # Clip, and check everything is finite on every rank before touching the weights.
    norms = {}
    for name, opt in state.optimizers.items():
        params = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if params:
            clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
            norms[f"grad_norm/{name}"] = torch.nn.utils.clip_grad_norm_(params, clip).detach()
    bad, stop_now = guard_flags({**terms, **norms}, stop)
    if bad:
        found = ", ".join(k for k, v in {**terms, **norms}.items() if not torch.isfinite(v).all()) or "another rank"
        raise NonFiniteLossError(
            f"step {step}: non-finite values in {found}; stopping before the update (the last checkpoint is "
            "untouched; resume with a lower rate, e.g. --set train.lr=..., or check the data)"
        )
    # Update the weights.
    for opt in state.optimizers.values():
        opt.step()
    return {**terms, **norms}, stop_now


def guard_flags(values: dict[str, torch.Tensor], stop: StopRequest) -> tuple[bool, bool]:
    """(any value non-finite on any rank, a stop asked for on any rank): built on the device and
    read back once, one host sync per step."""
    finite = torch.stack([torch.isfinite(v).all() for v in values.values()]).all()
    asked = torch.full((), float(stop.requested), device=finite.device)
    bad, stop_now = all_reduce_max(torch.stack([(~finite).float(), asked])).tolist()
    return bad > 0, stop_now > 0


def run_steps(
    state: TrainState, cfg: Config, env: DistEnv, run_dir: Path, logger: TrainLogger, stop: StopRequest
) -> None:
    t, pos = cfg.train, state.pos
    loader, sampler = make_loader(state.stage, state.plan, cfg, env)
    batches = micro_batches(loader, sampler, pos, state.plan)
    meter = Meter()
    for model in state.wrapped.values():
        model.train()
    while pos.step < t.max_steps:
        step = pos.step + 1
        # One optimizer step, then the EMA.
        factor = set_lr(state, step, t)
        logs, stop_now = train_step(state, batches, step, cfg, env, stop)
        state.ema.update(state.stage.models[state.stage.main])
        pos.step = step
        meter.add(logs, state.plan.global_batch)
        last = step == t.max_steps
        # Log: scalars (a collective), then images (rank 0).
        if step % t.log_every == 0 or last:
            report = meter.report(env)
            report["train/lr"] = state.stage.lr(state.stage.main) * factor
            report["train/epoch"] = pos.epoch + pos.samples_in_epoch / sampler.samples_per_epoch()
            if env.device.type == "cuda":
                report["train/gpu_mem_gib"] = torch.cuda.max_memory_allocated(env.device) / 2**30
            logger.scalars(step, report)
            logger.console(step, report)
        if step % t.image_every == 0 or last:
            state.stage.log_images(state.ema.model, logger, step)
        # Checkpoint, and stop where a signal asked to.
        if stop_now or step % t.ckpt_every == 0 or last:
            logger.flush()  # events up to a checkpoint survive a kill: a resume leaves no gap
            save(run_dir, state, cfg, env)
            if stop_now or last:
                say(env, f"saved last.pt at step {step}")
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


def save(run_dir: Path, state: TrainState, cfg: Config, env: DistEnv) -> None:
    """Rank 0 writes last.pt (and a snapshot when due); every rank waits for it, and gets its
    error: a failed save (a full disk) stops every rank with rank 0's one line, none hangs."""

    def write() -> None:
        content = state.state_dict(cfg, env)
        ckpt_dir, step = run_dir / "checkpoints", state.pos.step
        # A full disk: one line, the temp file removed, the previous last.pt whole; the same
        # command resumes from it once there is space.
        advice = "free space and rerun the same command (it resumes from the last checkpoint, which is whole)"
        names = [checkpoint.LAST]
        if step % cfg.train.snapshot_every == 0 or step == cfg.train.max_steps:
            names.append(checkpoint.snapshot_name(step))
        for name in names:
            with outputs.writing(ckpt_dir / name, advice):
                checkpoint.atomic_save(content, ckpt_dir / name)
        checkpoint.prune_snapshots(ckpt_dir, cfg.train.keep_snapshots)

    on_rank0(write)
    barrier()


def _flat_hparams(cfg: Config) -> dict[str, Any]:
    flat = {}
    for section, values in to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = str(value) if isinstance(value, list) else value
    return flat
