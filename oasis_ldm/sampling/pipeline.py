"""The sampling pipeline of an ldm checkpoint (oasis_ldm/loading.py makes one from its file).

Image b is drawn from its own seed alone (oasis_ldm/rng.py, `ImageGenerators`). Convolutions
sum in an order that depends on the batch size, so another batch size may move a pixel by one
level: a sampling request fixes its batches, which makes workers agree bit for bit.

Precision: "bf16" runs the U-Net under bf16 autocast (the sampler's state stays float32, see
oasis_ldm.diffusion); the VAE decoder always runs in IEEE float32 (no TF32: oasis_ldm/precision.py),
because its output is the pixels that are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from oasis_ldm.data.masks import decode_mask, split_output
from oasis_ldm.data.transforms import to_uint8
from oasis_ldm.diffusion import GaussianDiffusion, autocast_model
from oasis_ldm.models import AutoencoderKL
from oasis_ldm.precision import ieee_float32
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
        with ieee_float32():
            out = self.vae.decode(z / self.scale_factor)
        if not self.paired:
            return to_uint8(out.clamp(-1, 1)), None
        image, logits = split_output(out)
        return to_uint8(image.clamp(-1, 1)), decode_mask(logits)

    def generate(self, seeds: Sequence[int], *args: Any, **kwargs: Any) -> torch.Tensor:
        """The images of `generate_pairs` alone."""
        return self.generate_pairs(seeds, *args, **kwargs)[0]
