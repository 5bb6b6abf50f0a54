"""The seed's latent U-Net: 3 encoder levels, a 3-block bottleneck and 3 decoder levels.

Names and wiring follow the seed (`ConvReluBlock`, `EncoderBlock`, `DecoderBlock`,
`AttentionBlock`, a sinusoidal timestep embedding projected into every level) so that its
reported widths 64/128/256/256 with a 512 bottleneck on the 64x64x3 latent are reproduced
exactly. All normalisation is per sample (GroupNorm, LayerNorm): an image's output never
depends on the rest of its batch, which the seeded, sharded sampler relies on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oasis_ldm.config import UNetConfig
from oasis_ldm.models.norm import group_norm


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) timesteps -> (B, dim) [sin | cos] features at frequencies 10000^(-2i/dim) (seed's form)."""
    half = dim // 2
    freqs = 1.0 / (10000 ** (torch.arange(0, half, device=t.device, dtype=torch.float32) * 2 / dim))
    angles = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))  # odd dim: one zero column


class ConvReluBlock(nn.Module):
    """conv3x3 -> GroupNorm -> GELU -> conv3x3 -> GroupNorm; residual form is GELU(x + block(x)).

    The convs have no bias: the GroupNorm right after each one has its own shift.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int | None = None,
        residual: bool = False,
        groups: int = 8,
    ) -> None:
        super().__init__()
        mid = mid_channels or out_channels
        if residual and in_channels != out_channels:
            raise ValueError(f"a residual ConvReluBlock needs in == out, got {in_channels} -> {out_channels}")
        self.residual = residual
        self.block = nn.Sequential(
            nn.Conv2d(in_channels, mid, 3, padding=1, bias=False),
            group_norm(mid, groups),
            nn.GELU(),
            nn.Conv2d(mid, out_channels, 3, padding=1, bias=False),
            group_norm(out_channels, groups),
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x + self.block(x)) if self.residual else self.block(x)


class EncoderBlock(nn.Module):
    """MaxPool2d(2), ConvReluBlock(in, in, residual), ConvReluBlock(in, out), + projected time emb."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, residual: bool):
        super().__init__()
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Sequential(
            ConvReluBlock(in_channels, in_channels, residual=residual, groups=groups),
            ConvReluBlock(in_channels, out_channels, groups=groups),
        )
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(self.pool(x)) + self.time(emb)[:, :, None, None]


class DecoderBlock(nn.Module):
    """Bilinear x2, concat [skip, x], ConvReluBlock(in, in, residual), ConvReluBlock(in, out, in//2),
    + projected time emb. `in_channels` counts the concatenation."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, groups: int, residual: bool):
        super().__init__()
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv = nn.Sequential(
            ConvReluBlock(in_channels, in_channels, residual=residual, groups=groups),
            ConvReluBlock(in_channels, out_channels, in_channels // 2, groups=groups),
        )
        self.time = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, out_channels))

    def forward(self, x: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
        x = torch.cat([skip, self.up(x)], dim=1)
        return self.conv(x) + self.time(emb)[:, :, None, None]


class AttentionBlock(nn.Module):
    """Pre-norm transformer layer over the H*W positions: multi-head self-attention + feed-forward."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"AttentionBlock: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm1 = nn.LayerNorm(channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)
        self.norm2 = nn.LayerNorm(channels)
        self.ff = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(self.norm1(tokens)).chunk(3, dim=-1)
        q, k, v = (y.reshape(b, h * w, self.heads, c // self.heads).transpose(1, 2) for y in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        tokens = tokens + self.proj(att)
        tokens = tokens + self.ff(self.norm2(tokens))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class UNet(nn.Module):
    """in_layer -> N x (EncoderBlock, AttentionBlock) -> 3 bottleneck blocks -> N x (DecoderBlock,
    AttentionBlock) -> 1x1 conv, with N = len(cfg.channels) - 1 (3 in the seed).

    `cfg.attention[i]` switches the attention after encoder level i *and* after the decoder level
    that mirrors it (the one going back between the same two resolutions): with 3 levels, entry 0
    pairs encoder 1 (H -> H/2) with the last decoder (H/2 -> H), the most expensive attention.
    """

    def __init__(self, cfg: UNetConfig, in_channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        ch, levels, g, res = cfg.channels, len(cfg.channels) - 1, cfg.groups, cfg.residual
        if levels < 1 or len(cfg.attention) != levels:
            raise ValueError(f"unet: {len(cfg.channels)} channels need {levels} attention flags")
        self.time_dim = cfg.time_dim
        self.in_layer = ConvReluBlock(in_channels, ch[0], groups=g)
        self.encoders = nn.ModuleList(EncoderBlock(ch[i], ch[i + 1], cfg.time_dim, g, res) for i in range(levels))
        self.enc_attention = nn.ModuleList(
            self._attention(ch[i + 1], on, cfg.heads) for i, on in enumerate(cfg.attention)
        )
        c, b = ch[-1], cfg.bottleneck
        self.bottleneck = nn.Sequential(
            ConvReluBlock(c, b, groups=g), ConvReluBlock(b, b, groups=g), ConvReluBlock(b, c, groups=g)
        )
        decoders, dec_attention = [], []
        for j in range(levels):
            skip = ch[levels - 1 - j]  # the encoder output at the resolution this level returns to
            out = ch[max(levels - 2 - j, 0)]  # the width of the next skip (ch[0] at the top)
            decoders.append(DecoderBlock(c + skip, out, cfg.time_dim, g, res))
            dec_attention.append(self._attention(out, cfg.attention[levels - 1 - j], cfg.heads))
            c = out
        self.decoders = nn.ModuleList(decoders)
        self.dec_attention = nn.ModuleList(dec_attention)
        self.out_layer = nn.Conv2d(c, out_channels or in_channels, 1)

    @staticmethod
    def _attention(channels: int, on: bool, heads: int) -> nn.Module:
        return AttentionBlock(channels, heads) if on else nn.Identity()

    def forward(self, x: Tensor, t: Tensor | float) -> Tensor:
        """x: (B, C, H, W) with H, W divisible by 2**levels; t: (B,) timesteps (int or float)."""
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = sinusoidal_embedding(t, self.time_dim).to(x.dtype)
        skips = [self.in_layer(x)]
        for enc, att in zip(self.encoders, self.enc_attention, strict=True):
            skips.append(att(enc(skips[-1], emb)))
        h = self.bottleneck(skips.pop())
        for dec, att in zip(self.decoders, self.dec_attention, strict=True):
            h = att(dec(h, skips.pop(), emb))
        return self.out_layer(h)
