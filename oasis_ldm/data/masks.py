"""Tissue masks as the paired models see them: class labels, one-hot channels, decoded logits.

A packed mask stores each pixel's class as one of `schema.MASK_VALUES` (0 background, 85 CSF,
170 grey matter, 255 white matter). A paired autoencoder reads a slice together with its mask
as 1 + `NUM_CLASSES` channels, the image in [-1, 1] and the one-hot mask scaled to {-1, 1}
(the same range, so no channel dominates the first convolution), and decodes 1 +
`NUM_CLASSES` channels: the image and one logit per class. A mask is read back as the most
likely class of each pixel, so a generated mask holds exactly the four stored values.

Training calls these every step on the device, so they make no host sync there: the lookup
tables are copied to a device once (`_tables`), and the training step skips the check of the
mask values (`check=False`, which would read the batch back): its masks come from a packed
file, whose values the packer checked.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from oasis_ldm.data.schema import MASK_VALUES

NUM_CLASSES = len(MASK_VALUES)
CLASS_NAMES = ("background", "csf", "grey_matter", "white_matter")
_VALUES = torch.tensor(MASK_VALUES, dtype=torch.uint8)
_LABEL_OF_VALUE = torch.full((256,), -1, dtype=torch.long)
_LABEL_OF_VALUE[_VALUES.long()] = torch.arange(NUM_CLASSES)


@functools.cache
def _tables(device: torch.device) -> tuple[Tensor, Tensor]:
    """(label of each value, value of each label) on `device`, copied there once."""
    return _LABEL_OF_VALUE.to(device), _VALUES.to(device)


def to_labels(mask: Tensor, check: bool = True) -> Tensor:
    """uint8 mask values (B, 1, H, W) -> long class labels (B, H, W) in 0..NUM_CLASSES-1.

    `check`: values outside the classes are a ValueError (a read of the result: a host sync on
    a device); unchecked they become -1, which one_hot and cross-entropy refuse.
    """
    labels = _tables(mask.device)[0][mask.long()]
    if check and bool((labels < 0).any()):
        raise ValueError(f"mask values outside {MASK_VALUES}: {sorted(set(mask[labels < 0].tolist()))[:5]}")
    return labels[:, 0] if labels.dim() == 4 else labels


def to_values(labels: Tensor) -> Tensor:
    """long class labels (B, H, W) -> uint8 mask values (B, 1, H, W), as packed files store them."""
    return _tables(labels.device)[1][labels][:, None]


def one_hot(labels: Tensor) -> Tensor:
    """Class labels (B, H, W) -> float (B, NUM_CLASSES, H, W) in {-1, 1}: the paired model's input."""
    hot = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2)
    return hot.to(torch.float32) * 2 - 1


def pair_input(image: Tensor, mask: Tensor, check: bool = True) -> Tensor:
    """float image (B, 1, H, W) in [-1, 1] + uint8 mask (B, 1, H, W) -> (B, 1 + NUM_CLASSES, H, W)
    (`check`: as in `to_labels`)."""
    return torch.cat([image, one_hot(to_labels(mask, check)).to(image.dtype)], dim=1)


def split_output(out: Tensor) -> tuple[Tensor, Tensor]:
    """A paired decoder's (B, 1 + NUM_CLASSES, H, W) -> (image (B, 1, H, W), logits (B, NUM_CLASSES, H, W))."""
    return out[:, :1], out[:, 1:]


def decode_mask(logits: Tensor) -> Tensor:
    """Class logits (B, NUM_CLASSES, H, W) -> uint8 mask values (B, 1, H, W): each pixel's likeliest class."""
    return to_values(logits.argmax(dim=1))
