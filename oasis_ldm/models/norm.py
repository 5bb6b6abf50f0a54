"""GroupNorm for every model of the project, with one rule for how many groups.

Every model normalises per sample (GroupNorm, never BatchNorm): an image's output must not
depend on the rest of its batch, which the seeded, sharded sampler and DDP without
SyncBatchNorm rely on. A layer asks for at most `max_groups` groups and gets the largest
count that divides its width (the seed's 8 for the U-Net, 32 for the autoencoder as in
CompVis): widths that are multiples of the cap get exactly the cap.
"""

from __future__ import annotations

from torch import nn


def norm_groups(channels: int, max_groups: int) -> int:
    """The largest group count <= `max_groups` that divides `channels`."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def group_norm(channels: int, max_groups: int, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(norm_groups(channels, max_groups), channels, eps=eps)
