"""KL autoencoder (CompVis LDM style) that maps greyscale slices to a small latent and back.

The diffusion model works on the latent, so the autoencoder decides how much anatomy survives:
residual conv stacks with GroupNorm, a single self-attention at the lowest resolution, and a
diagonal Gaussian posterior whose KL term (weighted ~1e-6) only keeps the latent scale tame.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oasis_ldm.config import VAEConfig
from oasis_ldm.models.norm import group_norm


def _norm(channels: int) -> nn.GroupNorm:
    return group_norm(channels, max_groups=32, eps=1e-6)  # CompVis's autoencoder norm


class ResnetBlock(nn.Module):
    """norm-SiLU-conv twice plus a skip; a 1x1 conv on the skip when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1x1 q/k/v/out projections (CompVis `AttnBlock`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        # (B, 1, HW, C): one head over all spatial positions; SDPA scales by 1/sqrt(C).
        q, k, v = (proj(y).reshape(b, 1, c, h * w).transpose(2, 3) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


def mid_block(channels: int, attention: bool) -> nn.Sequential:
    """Resnet-Attn-Resnet at the lowest resolution (attention replaced by identity when off)."""
    attn = AttnBlock(channels) if attention else nn.Identity()
    return nn.Sequential(ResnetBlock(channels, channels), attn, ResnetBlock(channels, channels))


class Encoder(nn.Module):
    """Image -> 2*latent_channels moments at 1/f resolution (f = 2 ** (levels - 1))."""

    def __init__(self, cfg: VAEConfig, in_channels: int) -> None:
        super().__init__()
        ch, mults = cfg.base_channels, cfg.channel_mult
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        levels: list[nn.Module] = []
        block_in = ch
        for i, mult in enumerate(mults):
            block_out = ch * mult
            blocks: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i != len(mults) - 1:  # strided conv halves the resolution between levels
                blocks.append(nn.Conv2d(block_in, block_in, 3, stride=2, padding=1))
            levels.append(nn.Sequential(*blocks))
        self.down = nn.Sequential(*levels)
        self.mid = mid_block(block_in, cfg.attention)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(self.down(self.conv_in(x)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv: avoids the checkerboard of transposed convs."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Decoder(nn.Module):
    """Latent -> image, mirroring the encoder with one extra ResnetBlock per level (CompVis)."""

    def __init__(self, cfg: VAEConfig, out_channels: int) -> None:
        super().__init__()
        ch, mults = cfg.base_channels, cfg.channel_mult
        block_in = ch * mults[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, block_in, 3, padding=1)
        self.mid = mid_block(block_in, cfg.attention)
        levels: list[nn.Module] = []
        for i in reversed(range(len(mults))):
            block_out = ch * mults[i]
            blocks: list[nn.Module] = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out))
                block_in = block_out
            if i != 0:
                blocks.append(Upsample(block_in))
            levels.append(nn.Sequential(*blocks))
        self.up = nn.Sequential(*levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.up(self.mid(self.conv_in(z)))
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """Posterior N(mean, exp(logvar)) per latent element; parameters are (B, 2C, H, W) moments."""

    def __init__(self, moments: Tensor) -> None:
        # float32 even under bf16 autocast: exp(logvar) and the summed KL need the range.
        self.mean, logvar = moments.float().chunk(2, dim=1)
        # The clamp keeps exp() finite early in training, when the encoder outputs are wild.
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
        """mean + std * noise. With a generator the noise is drawn on the generator's device (so a
        CPU generator gives the same numbers on any machine) and moved to the mean's device; a
        caller with its own random stream passes `noise` (the mean's shape) instead."""
        if noise is not None:
            noise = noise.to(self.mean.device, self.mean.dtype)
        elif generator is None:
            noise = torch.randn_like(self.mean)
        else:
            noise = torch.randn(self.mean.shape, generator=generator, device=generator.device)
            noise = noise.to(self.mean.device, self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over C, H, W: shape (B,)."""
        kl = 0.5 * (self.mean.pow(2) + self.var - 1.0 - self.logvar)
        return kl.sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """Encoder + 1x1 quant conv -> DiagonalGaussian; 1x1 post-quant conv + Decoder back to pixels.

    Outputs are unbounded (no tanh): the data is scaled to [-1, 1] and the L1/SSIM losses keep the
    reconstruction there, while a tanh would saturate gradients at the bright white matter.
    A paired model (`oasis_ldm.data.masks`) reads a slice and its one-hot mask and decodes the
    slice and one logit per class: `out_channels` defaults to `in_channels`.
    """

    def __init__(self, cfg: VAEConfig, in_channels: int = 1, out_channels: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        z = cfg.latent_channels
        self.encoder = Encoder(cfg, in_channels)
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)
        self.decoder = Decoder(cfg, self.out_channels)

    @property
    def factor(self) -> int:
        """Spatial downsampling factor between image and latent."""
        return 2 ** (len(self.cfg.channel_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.cfg.latent_channels

    @property
    def last_layer(self) -> Tensor:
        """The decoder's output weight, for the adaptive adversarial weight (grad-norm ratio)."""
        return self.decoder.conv_out.weight

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | None = None,
        sample_posterior: bool = True,
        noise: Tensor | None = None,
    ) -> tuple[Tensor, DiagonalGaussian]:
        """(reconstruction, posterior); the latent is a posterior sample (from `generator` or the
        given `noise`) or, with sample_posterior=False, its mean."""
        posterior = self.encode(x)
        z = posterior.sample(generator, noise) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
