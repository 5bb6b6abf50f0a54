"""The sampling pipeline of an ldm checkpoint, and the per-image seeds it draws from.

Image i of a request with seed S starts from noise drawn by its own generator, seeded with
`image_seed(S, i)`, and every later random draw for it comes from that generator too. Its
pixels therefore depend on (S, i) and the checkpoint only: not on the batch it shared, the
rank or array task that ran it, or how many there were. Generators live on the CPU so a
given seed names the same starting noise on any machine. (Convolutions sum in an order that
depends on the batch size, so another batch size may move a pixel by one level; a sampling
request fixes its batches, which makes workers agree bit for bit.)

Precision: "bf16" runs the U-Net under bf16 autocast (the sampler's state stays float32, see
oasis_ldm.diffusion); the VAE decoder always runs in float32, once per image, because its
output is the pixels that are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oasis_ldm import checkpoint
from oasis_ldm.config import from_dict
from oasis_ldm.data.masks import decode_mask, split_output
from oasis_ldm.data.transforms import to_uint8
from oasis_ldm.diffusion import GaussianDiffusion, autocast_model
from oasis_ldm.models import AutoencoderKL, UNet, build_vae
from oasis_ldm.rng import ImageGenerators


@dataclass
class Pipeline:
    """A latent diffusion model ready to sample: U-Net (EMA weights), frozen VAE decoder, schedule."""

    unet: nn.Module
    vae: AutoencoderKL
    diffusion: GaussianDiffusion
    scale_factor: float
    latent_shape: tuple[int, int, int]  # (C, h, w)
    precision: str = "fp32"  # the U-Net's: "fp32" or "bf16" (autocast); `generate` may override it

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def paired(self) -> bool:
        """Whether the autoencoder decodes a tissue mask with each slice (data.masks)."""
        return self.vae.out_channels > 1

    @torch.no_grad()
    def generate_pairs(
        self,
        seeds: Sequence[int],
        sampler: str = "ddim",
        steps: int = 50,
        eta: float = 0.0,
        progress: bool = False,
        precision: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """uint8 images (B, 1, H, W), image b drawn from `seeds[b]` alone, and for a paired model
        their uint8 masks (B, 1, H, W) in `schema.MASK_VALUES` (else None); `precision` None:
        the pipeline's."""
        unet = autocast_model(self.unet, precision or self.precision)
        noise = ImageGenerators(seeds)
        x_T = noise.randn(self.latent_shape, self.device, torch.float32)
        z = self.diffusion.sample(unet, x_T, sampler, steps, eta, noise, progress)
        out = self.vae.decode(z / self.scale_factor)
        if not self.paired:
            return to_uint8(out.clamp(-1, 1)), None
        image, logits = split_output(out)
        return to_uint8(image.clamp(-1, 1)), decode_mask(logits)

    def generate(self, seeds: Sequence[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The images of `generate_pairs` alone."""
        return self.generate_pairs(seeds, *args, **kwargs)[0]


def read_checkpoint(path_or_run: str | Path, stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint of `stage` (file or run directory): (its content, metadata).

    The metadata {"path", "sha256", "step", "config"} is what outputs record about the
    model that made them. The wrong stage is a CheckpointError naming both.
    """
    path = checkpoint.resolve(path_or_run)
    saved = checkpoint.load(path)
    if saved["stage"] != stage:
        found = saved["stage"]
        message = f"this is the {found} stage's checkpoint; the {stage} stage's is needed"
        raise checkpoint.CheckpointError(f"{path_or_run}: {message}")
    meta = {
        "path": str(path.resolve()),
        "sha256": checkpoint.file_sha256(path),
        "step": int(saved["step"]),
        "config": from_dict(saved["config"]),
    }
    return saved, meta


def load_frozen_vae(
    path_or_run: str | Path, device: torch.device | str = "cpu"
) -> tuple[AutoencoderKL, dict[str, Any]]:
    """The EMA weights of a vae checkpoint, in eval mode without gradients, and its metadata."""
    saved, meta = read_checkpoint(path_or_run, "vae")
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
