"""Checks a training start makes before it writes anything; the launcher makes them too.

A start that failed after writing config.yaml and run.json used to block its corrected rerun
("holds a run with another config"). So everything that can be checked from the files is
checked first, by the trainer on every rank and by launch/train.py before it submits: the
data file and split, the autoencoder an ldm run encodes with, and whether the run directory
accepts this start: it is one of this project's run directories (or new, or empty), its fixed
paths have the right kind, it can be written, and no live trainer holds it. A run directory
without a checkpoint accepts anything: nothing in it can be resumed. One with a checkpoint
accepts the same stage and config, except the keys in `MAY_CHANGE`, which steer the run
without changing the model it trains, and input paths that name the same content elsewhere
(inputs.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from oasis_ldm import checkpoint, outputs
from oasis_ldm.config import Config, canonical, to_dict
from oasis_ldm.data import schema
from oasis_ldm.train import inputs
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
    why: str = ""  # why a change of this key is allowed here (an input moved: same content)

    def __str__(self) -> str:
        return f"{self.key}: {self.old!r} -> {self.new!r}" + (f" ({self.why})" if self.why else "")


def config_changes(
    old: dict[str, Any], new: dict[str, Any], *, paths: bool = False
) -> tuple[list[Change], list[Change]]:
    """(allowed, refused) differences between a run's saved config and this start's; the input
    paths are left to `input_changes`, which compares their content (`paths`: list them too)."""
    allowed, refused = [], []
    for section in sorted(set(old) | set(new)):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if f"{section}.{key}" in inputs.KEYS and not paths:
                continue
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


def input_changes(
    stage: str, old: dict[str, Any], cfg: Config, run_dir: Path, vae_sha256: str | None = None
) -> list[Change]:
    """The resume's input paths that name the same content elsewhere; StartError for other content."""
    try:
        moved = inputs.moves(stage, old, cfg, run_dir, vae_sha256)
    except inputs.InputMismatch as e:
        raise StartError(str(e)) from None
    except (OSError, schema.SchemaError, checkpoint.CheckpointError) as e:
        raise StartError(" ".join(str(e).split())) from None
    return [Change(key, before, now, why) for key, before, now, why in moved]


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


# Fixed paths of a run directory and their kind; what a start may leave before run.json exists
# (the launcher's submitit/ folder, a lock, the first files of `rundir.record`).
RUN_FOLDERS = ("checkpoints", "tb", "images", "submitit")
RUN_FILES = ("run.json", "config.yaml")
BEFORE_RUN_JSON = frozenset({"submitit", "lock", "checkpoints", "config.yaml"})


def _made_before_run_json(name: str) -> bool:
    temp = name.startswith(".") and name.endswith(".tmp")  # atomic.py's, of a start killed mid-write
    return name in BEFORE_RUN_JSON or name.startswith(("lock.stale.", ".oasis-ldm-probe.")) or temp


def check_layout(run_dir: Path) -> None:
    """Refuse a run directory this project did not make, or whose fixed paths have another kind.

    A folder without run.json that holds anything a start would not have left there is someone's
    own folder: a clean-up there could delete their files, so nothing in it is touched.
    """
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise StartError(f"--run-dir {run_dir}: exists and is not a directory")
    for name in RUN_FOLDERS:
        if (run_dir / name).exists() and not (run_dir / name).is_dir():
            raise StartError(
                f"--run-dir {run_dir}: {run_dir / name} is a file where the run keeps its {name}/ folder; move it away"
            )
    for name in RUN_FILES:
        if (run_dir / name).exists() and not (run_dir / name).is_file():
            raise StartError(f"--run-dir {run_dir}: {run_dir / name} is not the run's {name} file; move it away")
    run_json = run_dir / "run.json"
    if run_json.exists():
        try:
            info = json.loads(run_json.read_text())
            if not isinstance(info, dict) or not isinstance(info.get("starts"), list):
                raise ValueError("not a record of starts")
        except (OSError, ValueError) as e:
            problem = " ".join(str(e).split())
            raise StartError(f"{run_json}: unreadable ({problem}); restore it or use a new --run-dir") from None
    elif not checkpoint.has_checkpoint(run_dir / "checkpoints"):
        others = sorted(p.name for p in run_dir.iterdir() if not _made_before_run_json(p.name))
        if others:
            more = f" and {len(others) - 1} more" if len(others) > 1 else ""
            raise StartError(
                f"--run-dir {run_dir}: holds {others[0]!r}{more} but no run.json: not a run directory of this "
                "project (nothing in it was touched); use a new or empty --run-dir"
            )


def check_run_dir(stage: str, cfg: Config, run_dir: Path) -> list[Change]:
    """Refuse a start the run directory cannot take; return the allowed changes it makes."""
    from oasis_ldm.train.lock import check_free  # lock.py raises this module's StartError

    check_layout(run_dir)
    try:
        outputs.check_writable(run_dir, "--run-dir")
    except outputs.OutputError as e:
        raise StartError(str(e)) from None
    check_free(run_dir)
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
    return allowed + input_changes(stage, canonical(old), cfg, run_dir)


@dataclass(frozen=True)
class Checked:
    """A start that passed every check: its config with absolute input paths, what the command
    gave for them (run.json records both), the changes a resume makes, and notes to print."""

    cfg: Config
    given: dict[str, str] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)
    notes: tuple[str, ...] = ()


def check_start(
    stage: str, cfg: Config, run_dir: str | Path, *, vae_ready: bool = True, world_size: int | None = None
) -> Checked:
    """Every check a start can make without writing: raises StartError, else the checked start.

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
    run_dir = Path(run_dir)
    check_layout(run_dir)  # before anything in it is read
    resolved = inputs.resolve(stage, cfg, run_dir, resuming=checkpoint.has_checkpoint(run_dir / "checkpoints"))
    cfg = resolved.cfg
    check_data(cfg)
    if stage == "ldm" and vae_ready:
        check_vae(cfg)
    changes = check_run_dir(stage, cfg, run_dir)
    return Checked(cfg, resolved.given, changes, resolved.notes)
