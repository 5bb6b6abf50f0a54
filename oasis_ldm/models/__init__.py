"""The networks: KL autoencoder, the seed's latent U-Net, the PatchGAN discriminator, and the
small segmentation U-Net that judges paired samples (tools/evaluate.py --segmentation)."""

from __future__ import annotations

from torch import nn

from oasis_ldm.config import Config
from oasis_ldm.models.discriminator import NLayerDiscriminator, generator_adv_loss, hinge_d_loss
from oasis_ldm.models.segmenter import Segmenter
from oasis_ldm.models.unet import (
    AttentionBlock,
    ConvReluBlock,
    DecoderBlock,
    EncoderBlock,
    UNet,
    sinusoidal_embedding,
)
from oasis_ldm.models.vae import AutoencoderKL, DiagonalGaussian

__all__ = [
    "AttentionBlock",
    "AutoencoderKL",
    "ConvReluBlock",
    "DecoderBlock",
    "DiagonalGaussian",
    "EncoderBlock",
    "NLayerDiscriminator",
    "Segmenter",
    "UNet",
    "build_discriminator",
    "build_unet",
    "build_vae",
    "count_parameters",
    "generator_adv_loss",
    "hinge_d_loss",
    "sinusoidal_embedding",
]


def build_vae(cfg: Config) -> AutoencoderKL:
    """The autoencoder of `cfg.vae`: greyscale slices, or slices with their masks (`data.masks`)."""
    from oasis_ldm.data.masks import NUM_CLASSES

    channels = 1 + NUM_CLASSES if cfg.data.masks else 1
    return AutoencoderKL(cfg.vae, in_channels=channels)


def build_unet(cfg: Config) -> UNet:
    """The latent U-Net of `cfg.unet`, sized for the autoencoder's latent channels."""
    return UNet(cfg.unet, in_channels=cfg.vae.latent_channels)


def build_discriminator(cfg: Config) -> NLayerDiscriminator:
    """The PatchGAN of `cfg.vae` (disc_channels, disc_layers) for greyscale images."""
    return NLayerDiscriminator(cfg.vae, in_channels=1)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
