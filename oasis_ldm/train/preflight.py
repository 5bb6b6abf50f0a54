"""Checks a training start makes before it writes anything; the launcher makes them too.

A start that failed after writing config.yaml and run.json used to block its corrected rerun
("holds a run with another config"). So everything that can be checked from the files is
checked first, by the trainer on every rank and by launch/train.py before it submits: the
data file and split, the autoencoder an ldm run encodes with, and whether the run directory
accepts this start. A run directory without a checkpoint accepts anything: nothing in it can
be resumed. One with a checkpoint accepts the same stage and config, except the keys in
`MAY_CHANGE`, which steer the run without changing the model it trains.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from oasis_ldm import checkpoint
from oasis_ldm.config import Config, canonical, to_dict
from oasis_ldm.data import schema
from oasis_ldm.train.order import BatchError, plan_batches

# (section, key) that a resume may change: rates (the NaN guard's advice is to lower train.lr),
# how far to train, how often to log and save, and how the work is spread; none of them
# changes the data, the model or the random numbers of a step.
MAY_CHANGE = frozenset(
    {
        ("train", "lr"),
        ("train", "disc_lr"),
        ("train", "max_steps"),
        ("train", "log_every"),
        ("train", "ckpt_every"),
        ("train", "snapshot_every"),
        ("train", "keep_snapshots"),
        ("train", "image_every"),
        ("train", "num_log_images"),
        ("train", "micro_batch"),
        ("train", "compile"),
        ("data", "num_workers"),
        ("data", "in_memory"),
    }
)


class StartError(ValueError):
    """This start cannot proceed; the message is one line naming the file, key or holder."""


@dataclass(frozen=True)
class Change:
    key: str  # section.key
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}"


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], list[Change]]:
    """(allowed, refused) differences between a run's saved config and this start's."""
    allowed, refused = [], []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                change = Change(f"{section}.{key}", a.get(key), b.get(key))
                (allowed if (section, key) in MAY_CHANGE else refused).append(change)
    return allowed, refused


def refuse_changes(run_dir: Path, refused: list[Change]) -> None:
    if refused:
        raise StartError(
            f"{run_dir} holds a run with another config: {'; '.join(map(str, refused))} "
            "(a resume may change only rates, max_steps, intervals and worker counts; use a new --run-dir)"
        )


def check_data(cfg: Config) -> None:
    """The packed file opens, follows the schema and holds the split."""
    path = Path(cfg.data.path)
    try:
        info = schema.inspect_file(path)
    except FileNotFoundError:
        raise StartError(f"data.path={path}: no such file (pack one with tools/pack_h5.py)") from None
    except schema.SchemaError as e:
        raise StartError(f"data.path={path}: {str(e).removeprefix(str(path) + ': ')}") from None
    if cfg.data.split not in info.splits:
        packed = ", ".join(info.splits)
        raise StartError(f"data.path={path}: no split {cfg.data.split!r} in this file (packed: {packed})")
    if cfg.data.masks and not info.splits[cfg.data.split].has_masks:
        raise StartError(
            f"data.path={path}: data.masks=true needs masks, and split {cfg.data.split!r} has none "
            "(pack the keras_png_slices_seg_* folders with it)"
        )


def check_vae(cfg: Config) -> None:
    """`ldm.vae_ckpt` names a readable vae checkpoint whose latent fits this run's U-Net."""
    from oasis_ldm.loading import read_checkpoint

    if not cfg.ldm.vae_ckpt:
        raise StartError("ldm.vae_ckpt is not set: pass --set ldm.vae_ckpt=<vae run dir or .pt>")
    try:
        _, meta = read_checkpoint(cfg.ldm.vae_ckpt, "vae")
    except checkpoint.CheckpointError as e:
        raise StartError(f"ldm.vae_ckpt={cfg.ldm.vae_ckpt}: {e}") from None
    vae_cfg = meta["config"]
    if vae_cfg.data.masks != cfg.data.masks:
        kind = "encodes slices with their masks" if vae_cfg.data.masks else "encodes slices alone"
        raise StartError(
            f"ldm.vae_ckpt={cfg.ldm.vae_ckpt} {kind}: set data.masks={str(vae_cfg.data.masks).lower()} "
            "for its ldm run too"
        )
    trained_at, size = vae_cfg.data.image_size, cfg.data.image_size
    if trained_at != size:
        raise StartError(
            f"ldm.vae_ckpt={cfg.ldm.vae_ckpt} was trained on {trained_at}x{trained_at} slices "
            f"but data.image_size={size}: train the ldm at the autoencoder's resolution"
        )
    latent = size // 2 ** (len(vae_cfg.vae.channel_mult) - 1)
    levels = len(cfg.unet.channels) - 1
    if latent % 2**levels:
        raise StartError(
            f"ldm.vae_ckpt={cfg.ldm.vae_ckpt}: its {latent}x{latent} latent does not halve {levels} times "
            f"for the U-Net (unet.channels has {levels} levels)"
        )


def recorded_stage(run_dir: Path) -> str | None:
    path = run_dir / "run.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text()).get("stage")
    except (OSError, ValueError):
        return None


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "config.yaml"
    if not path.exists():
        return None
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        problem = " ".join(str(e).split())
        raise StartError(f"{path}: unreadable ({problem}); restore it or use a new --run-dir") from None
    return values if isinstance(values, dict) else None


def check_run_dir(stage: str, cfg: Config, run_dir: Path) -> list[Change]:
    """Refuse a start the run directory cannot take; return the allowed changes it makes."""
    if run_dir.exists() and not run_dir.is_dir():
        raise StartError(f"--run-dir {run_dir}: exists and is not a directory")
    if not checkpoint.has_checkpoint(run_dir / "checkpoints"):
        return []  # nothing to resume: any stage and config may start here
    found = recorded_stage(run_dir)
    if found is not None and found != stage:
        raise StartError(f"{run_dir} holds a {found} run, not a {stage} run")
    old = saved_config(run_dir)
    if old is None:
        return []  # the checkpoint's own config is compared when it is loaded
    allowed, refused = config_changes(canonical(old), to_dict(cfg))
    refuse_changes(run_dir, refused)
    return allowed


def check_start(
    stage: str, cfg: Config, run_dir: str | Path, *, vae_ready: bool = True, world_size: int | None = None
) -> list[Change]:
    """Every check a start can make without writing: raises StartError; the allowed changes.

    `vae_ready=False` skips the autoencoder of an ldm run: one that a job still to run will train
    (launch/train.py --stage all), or on a trainer's ranks but 0, which use the bytes rank 0
    read (ldm_stage.py); `world_size`, when known, must split the global batch. The autoencoder's
    file is read once, and hashed from the same bytes (loading.read_checkpoint).
    """
    if stage not in ("vae", "ldm"):
        raise StartError(f"--stage {stage!r}: expected vae or ldm")
    if world_size is not None:
        try:
            plan_batches(cfg.train.batch_size, world_size, cfg.train.micro_batch)
        except BatchError as e:
            raise StartError(str(e)) from None
    check_data(cfg)
    if stage == "ldm" and vae_ready:
        check_vae(cfg)
    return check_run_dir(stage, cfg, Path(run_dir))
