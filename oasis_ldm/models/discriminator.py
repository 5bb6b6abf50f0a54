"""PatchGAN discriminator (pix2pix `NLayerDiscriminator`) and hinge losses for the VAE stage.

Each output logit judges one overlapping patch, which pushes the decoder towards sharp local
texture (sulci, grey/white boundaries) that L1 + SSIM alone blur.

Normalisation is GroupNorm, not BatchNorm: under DDP each rank would compute its own batch
statistics (SyncBatchNorm costs an all-reduce per layer), DDP re-broadcasts rank 0's running
buffers every step, and the real and fake batches would be normalised with different statistics.
GroupNorm works per sample, so a logit depends only on its own image on any number of ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oasis_ldm.config import VAEConfig
from oasis_ldm.models.norm import group_norm


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, max_groups=32)


class NLayerDiscriminator(nn.Module):
    """conv4x4/2 + LeakyReLU, (disc_layers - 1) x [conv4x4/2 + norm + LeakyReLU],
    conv4x4/1 + norm + LeakyReLU, conv4x4/1 -> one logit per patch.

    An H x W input gives an (H / 2**disc_layers - 2)-sided logit map.
    """

    def __init__(self, cfg: VAEConfig, in_channels: int = 1) -> None:
        super().__init__()
        ndf, n = cfg.disc_channels, cfg.disc_layers
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = ndf
        for i in range(1, n + 1):
            out = ndf * min(2**i, 8)
            stride = 2 if i < n else 1  # the last normalised layer keeps the resolution
            layers += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _norm(out), nn.LeakyReLU(0.2)]
            width = out
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    """pix2pix initialisation: N(0, 0.02) convs, N(1, 0.02) norm scales, zero norm shifts."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.GroupNorm):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def hinge_d_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: 0.5 * (E[relu(1 - D(real))] + E[relu(1 + D(fake))])."""
    real = F.relu(1.0 - real_logits.float()).mean()
    fake = F.relu(1.0 + fake_logits.float()).mean()
    return 0.5 * (real + fake)


def generator_adv_loss(fake_logits: Tensor) -> Tensor:
    """The decoder's adversarial loss: -E[D(fake)]."""
    return -torch.mean(fake_logits.float())
