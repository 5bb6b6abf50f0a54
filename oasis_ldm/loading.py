"""Models from checkpoints, for whoever needs them: training, sampling and evaluation.

`read_checkpoint` reads a checkpoint of a given stage (a file or a run directory) and what
outputs record about the model that made them; `load_frozen_vae` gives a vae checkpoint's
EMA autoencoder ready to encode (the ldm stage, evaluation); `load_pipeline` gives an ldm
checkpoint's sampling pipeline, which needs nothing but that checkpoint: it carries its
autoencoder's config and weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from oasis_ldm import checkpoint
from oasis_ldm.config import from_dict
from oasis_ldm.diffusion import GaussianDiffusion
from oasis_ldm.models import AutoencoderKL, UNet, build_vae
from oasis_ldm.sampling.pipeline import Pipeline


def read_bytes(path_or_run: str | Path) -> tuple[Path, bytes, str | None]:
    """(the checkpoint file, its bytes, a note) of a file or run directory: a run directory's
    newest good checkpoint, as a resume takes it, the note saying why newer ones were passed over."""
    path = Path(path_or_run)
    found = checkpoint.find_latest(path / "checkpoints") if path.is_dir() else None
    if found is not None:
        return found.path.resolve(), found.data, found.note and found.note.replace("; resuming from ", "; using ")
    path = checkpoint.resolve(path_or_run).resolve()
    return path, checkpoint.read(path), None


def read_checkpoint(
    path_or_run: str | Path, stage: str, data: bytes | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint of `stage` (file or run directory): (its content, metadata).

    The metadata {"path", "sha256", "step", "config", "note"} is what outputs record about the
    model that made them. A run directory whose last.pt is damaged gives its newest good
    snapshot, as a resume does, and `note` says so (None otherwise). The wrong stage is a
    CheckpointError naming both. The file is read once and hashed from the same bytes; `data`
    gives the bytes of `path_or_run` (a file) already read (`read_bytes`, another rank's).
    """
    if data is None:
        path, data, note = read_bytes(path_or_run)
    else:
        path, note = checkpoint.resolve(path_or_run), None
    saved = checkpoint.parse(data, path)
    if saved["stage"] != stage:
        found = saved["stage"]
        message = f"this is the {found} stage's checkpoint; the {stage} stage's is needed"
        raise checkpoint.CheckpointError(f"{path_or_run}: {message}")
    meta = {
        "path": str(path.resolve()),
        "sha256": checkpoint.sha256(data),
        "step": int(saved["step"]),
        "config": from_dict(saved["config"]),
        "note": note,
    }
    return saved, meta


def load_frozen_vae(
    path_or_run: str | Path, device: torch.device | str = "cpu", data: bytes | None = None
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The EMA weights of a vae checkpoint, in eval mode without gradients, and its metadata
    (`data`: the file's bytes, when already read)."""
    saved, meta = read_checkpoint(path_or_run, "vae", data)
    vae = build_vae(meta["config"])
    vae.load_state_dict(saved["ema"]["model"])
    return vae.to(device).eval().requires_grad_(False), meta


def load_pipeline(path_or_run: str | Path, device: torch.device | str = "cpu") -> tuple[Pipeline, dict[str, Any]]:
    """The pipeline of an ldm checkpoint (file or run directory) and the checkpoint's metadata.

    It samples in the precision the checkpoint trained in (`train.precision`).
    """
    saved, meta = read_checkpoint(path_or_run, "ldm")
    device = torch.device(device)
    cfg, extra = meta["config"], saved["extra"]
    vae = build_vae(from_dict(extra["vae_config"]))
    vae.load_state_dict(extra["vae_weights"])
    vae = vae.to(device).eval().requires_grad_(False)
    unet = UNet(cfg.unet, in_channels=vae.latent_channels)
    unet.load_state_dict(saved["ema"]["model"])
    unet = unet.to(device).eval().requires_grad_(False)
    size = cfg.data.image_size // vae.factor
    pipe = Pipeline(
        unet=unet,
        vae=vae,
        diffusion=GaussianDiffusion.from_config(cfg.diffusion).to(device),
        scale_factor=float(extra["scale_factor"]),
        latent_shape=(vae.latent_channels, size, size),
        precision=cfg.train.precision,
    )
    return pipe, meta
