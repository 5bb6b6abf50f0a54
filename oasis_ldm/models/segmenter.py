"""A small segmentation U-Net: a greyscale slice in, one logit per tissue class out.

It judges generated image-mask pairs ("train on synthetic, test on real"), so it only has
to be a fair, cheap, repeatable yardstick, not a state-of-the-art segmenter: plain double
3x3 convolutions with GroupNorm (per sample, so a slice's prediction never depends on the
rest of its batch), max-pool down, transposed-conv up, skip concatenation. Every operation
has a deterministic backward on CPU and CUDA (no bilinear upsampling, whose CUDA backward
is not), which seeded training relies on. The default widths 8/16/32/64 (0.12M parameters)
train 600 steps of 16 slices at 64x64 in about a minute on one CPU core.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn

from oasis_ldm.data.masks import NUM_CLASSES
from oasis_ldm.models.norm import group_norm

NORM_GROUPS = 8  # at most 8 groups: 1 channel a group at width 8, 8 channels at width 64


class ConvBlock(nn.Sequential):
    """(conv3x3 -> GroupNorm -> SiLU) twice; the convs have no bias (the norm has a shift)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        layers: list[nn.Module] = []
        for c_in in (in_channels, out_channels):
            layers += [
                nn.Conv2d(c_in, out_channels, 3, padding=1, bias=False),
                group_norm(out_channels, NORM_GROUPS),
                nn.SiLU(),
            ]
        super().__init__(*layers)


class Up(nn.Module):
    """x2 transposed conv, concatenate the skip of the same resolution, one ConvBlock."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.conv = ConvBlock(2 * out_channels, out_channels)

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.conv(torch.cat([skip, self.up(x)], dim=1))


class Segmenter(nn.Module):
    """U-Net over `len(widths)` resolutions: (B, in_channels, H, W) -> (B, num_classes, H, W) logits.

    H and W must be divisible by 2 ** (len(widths) - 1) (8 for the default widths).
    """

    def __init__(
        self, widths: tuple[int, ...] = (8, 16, 32, 64), in_channels: int = 1, num_classes: int = NUM_CLASSES
    ) -> None:
        super().__init__()
        if len(widths) < 2:
            raise ValueError(f"Segmenter needs at least two widths (one downsampling), got {widths}")
        self.widths = tuple(widths)
        self.inc = ConvBlock(in_channels, widths[0])
        self.down = nn.ModuleList(nn.Sequential(nn.MaxPool2d(2), ConvBlock(a, b)) for a, b in pairwise(widths))
        self.up = nn.ModuleList(Up(b, a) for a, b in pairwise(widths))
        self.out = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        factor = 2 ** (len(self.widths) - 1)
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"Segmenter: input {tuple(x.shape[-2:])} is not divisible by {factor}")
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in reversed(self.up):
            h = up(h, skips.pop())
        return self.out(h)
