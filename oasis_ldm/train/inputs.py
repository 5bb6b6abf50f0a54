"""A run's input files: where they are, and whether a file somewhere else is the same one.

A run reads two inputs: the packed data (`data.path`) and, in an ldm run, the autoencoder
(`ldm.vae_ckpt`). Each start resolves them to absolute paths, which config.yaml and the
checkpoints keep, and run.json records what identifies their content (`identity`): for the
data its size and the attributes pack_h5 wrote (schema, row counts and the train split's
pixel moments, which any other data would change; a checksum of hundreds of MB at every start
would cost more than it adds), for the autoencoder the sha256 that the ldm checkpoint keeps.

So a run no longer depends on the folder it was started from: a resume that names the same
relative path from elsewhere uses the path the run recorded, and one that names another path
to the same content (the data moved to fast scratch, the autoencoder's snapshot of the same
step) is accepted and recorded as a change (`moves`). Other content is refused.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oasis_ldm import checkpoint
from oasis_ldm.config import Config
from oasis_ldm.data import schema

KEYS = {"data.path": ("data", "path"), "ldm.vae_ckpt": ("ldm", "vae_ckpt")}
# What must agree for two data files to count as one: size and pack_h5's attributes.
SAME_DATA = ("size", "schema_version", "created_by", "counts", "train_mean", "train_std")


class InputMismatch(ValueError):
    """A resume names an input whose content is not the run's; the message is one line."""


def keys_of(stage: str) -> tuple[str, ...]:
    return ("data.path", "ldm.vae_ckpt") if stage == "ldm" else ("data.path",)


def value(cfg: Config | dict[str, Any], key: str) -> str:
    section, name = KEYS[key]
    if isinstance(cfg, dict):
        return str((cfg.get(section) or {}).get(name) or "")
    return str(getattr(getattr(cfg, section), name) or "")


def with_value(cfg: Config, key: str, new: str) -> Config:
    section, name = KEYS[key]
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **{name: new})})


def recorded(run_dir: Path) -> dict[str, dict[str, Any]]:
    """run.json's record of the inputs ({} for a new run, or one from before the record)."""
    try:
        info = json.loads((Path(run_dir) / "run.json").read_text())
    except (OSError, ValueError):
        return {}
    found = info.get("inputs") if isinstance(info, dict) else None
    return found if isinstance(found, dict) else {}


@dataclass(frozen=True)
class Resolved:
    cfg: Config  # with absolute input paths
    given: dict[str, str]  # what the command said, by key
    notes: tuple[str, ...] = ()


def resolve(stage: str, cfg: Config, run_dir: Path, resuming: bool) -> Resolved:
    """`cfg` with absolute input paths; a resume's relative path that does not exist from here
    but is the one the run was given takes the path the run recorded (and says so)."""
    rec = recorded(run_dir) if resuming else {}
    given, notes = {}, []
    for key in keys_of(stage):
        said = value(cfg, key)
        if not said:
            continue
        given[key] = said
        path = Path(said).expanduser()
        before = rec.get(key) or {}
        if not path.exists() and before.get("given") == said and Path(str(before.get("path"))).exists():
            notes.append(
                f"{key}={said} is not found from {Path.cwd()}: using the path this run recorded, {before['path']}"
            )
            path = Path(before["path"])
        cfg = with_value(cfg, key, str(path.resolve() if path.exists() else path.absolute()))
    return Resolved(cfg, given, tuple(notes))


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return checkpoint.file_sha256(Path(path))


def sha256(path: Path) -> str:
    """A file's sha256, computed once per version of the file in this process."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def data_identity(path: str | Path) -> dict[str, Any]:
    """What identifies a packed data file's content (`SAME_DATA`), and its mtime for people."""
    st, info = Path(path).stat(), schema.inspect_file(path)
    return {
        "size": st.st_size,
        "mtime": st.st_mtime,
        "schema_version": info.schema_version,
        "created_by": info.created_by,
        "counts": {split: s.count for split, s in info.splits.items()},
        "train_mean": info.train_mean,
        "train_std": info.train_std,
    }


def record_of(stage: str, cfg: Config, given: dict[str, str], vae_sha256: str | None = None) -> dict[str, Any]:
    """run.json's `inputs`: each input's given and resolved path and its identity. `vae_sha256`
    is the autoencoder the run trains with (its checkpoint's, even where the file changed)."""
    out: dict[str, Any] = {}
    data = value(cfg, "data.path")
    out["data.path"] = {"given": given.get("data.path", data), "path": data, **data_identity(data)}
    if stage == "ldm":
        vae = value(cfg, "ldm.vae_ckpt")
        file = checkpoint.resolve(vae)
        out["ldm.vae_ckpt"] = {
            "given": given.get("ldm.vae_ckpt", vae),
            "path": vae,
            "file": str(file.resolve()),
            "sha256": vae_sha256 or sha256(file),
        }
    return out


def same_path(a: str, b: str) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.absolute() == pb.absolute():
        return True
    try:
        return pa.exists() and pb.exists() and pa.samefile(pb)
    except OSError:
        return False


def moves(
    stage: str, old: dict[str, Any], cfg: Config, run_dir: Path, vae_sha256: str | None = None
) -> list[tuple[str, str, str, str]]:
    """(key, old path, new path, why it is the same content) for each input this resume names
    by another path; InputMismatch when the content differs or cannot be told apart."""
    rec, out = recorded(run_dir), []
    for key in keys_of(stage):
        before, now = value(old, key), value(cfg, key)
        if not before or not now or same_path(before, now):
            continue
        if key == "data.path":
            why = _same_data(before, now, rec.get(key))
        else:
            why = _same_vae(before, now, rec.get(key), vae_sha256)
        out.append((key, before, now, why))
    return out


def _same_data(before: str, now: str, rec: dict[str, Any] | None) -> str:
    if rec and all(k in rec for k in SAME_DATA):
        reference = rec
    elif Path(before).is_file():
        reference = data_identity(before)
    else:
        raise InputMismatch(
            f"data.path={now}: this run trained on {before}, which is gone, and its run.json records nothing "
            f"to compare {now} with; give data.path={before} or use a new --run-dir"
        )
    found = data_identity(now)
    differ = [k for k in SAME_DATA if found.get(k) != reference.get(k)]
    if differ:
        raise InputMismatch(
            f"data.path={now}: not the data this run trained on ({before}): {', '.join(differ)} differ; "
            f"give data.path={before} (or a copy of it), or use a new --run-dir"
        )
    return "moved: same size and schema attributes"


def _same_vae(before: str, now: str, rec: dict[str, Any] | None, vae_sha256: str | None) -> str:
    expected = vae_sha256 or (rec or {}).get("sha256")
    if expected is None:
        try:
            expected = sha256(checkpoint.resolve(before))
        except checkpoint.CheckpointError:
            raise InputMismatch(
                f"ldm.vae_ckpt={now}: this run encoded with {before}, which is gone, and its run.json records "
                f"no checksum to compare {now} with; give ldm.vae_ckpt={before} or use a new --run-dir"
            ) from None
    found = sha256(checkpoint.resolve(now))
    if found != expected:
        raise InputMismatch(
            f"ldm.vae_ckpt={now}: another autoencoder than this run's (sha256 {found[:12]}, not {expected[:12]}): "
            f"keep ldm.vae_ckpt={before} (a resume continues with the autoencoder its checkpoint holds, even "
            f"where that file was trained further), name a file with sha256 {expected[:12]}..., or use a new --run-dir"
        )
    return f"moved: same sha256 {expected[:12]}"
