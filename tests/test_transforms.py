"""oasis_ldm.data.transforms: scaling, resizing and the per-batch / per-sample augmentation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from oasis_ldm.data.transforms import (
    AugmentParams,
    apply_params,
    augment_batch,
    resize_batch,
    sample_params,
    to_float,
    to_uint8,
)


def _smooth(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images in [-1, 1]: interpolation schemes agree closely on them."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, 6, 6, generator=g) * 2 - 1
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True).clamp(-1, 1)


def test_to_float_to_uint8_round_trip():
    x = torch.arange(256, dtype=torch.uint8)
    y = to_float(x)
    assert y.dtype == torch.float32 and y[0] == -1 and y[-1] == 1
    assert torch.equal(to_uint8(y), x)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 5.0, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8))


def test_resize_batch():
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    assert resize_batch(x, 8) is x
    assert resize_batch(x, (4, 6)).shape == (2, 1, 4, 6)
    assert resize_batch(x, 16).dtype == torch.uint8
    # antialiasing: a one-pixel checkerboard shrinks to flat grey, not to an aliased pattern
    checker = ((torch.arange(16)[:, None] + torch.arange(16)) % 2).float()[None, None] * 2 - 1
    small = resize_batch(checker, 4)
    assert small.abs().max() < 0.15
    masks = torch.tensor([0, 85, 170, 255], dtype=torch.uint8)[torch.randint(0, 4, (1, 1, 9, 9))]
    assert set(resize_batch(masks, 5, nearest=True).unique().tolist()) <= {0, 85, 170, 255}


def test_none_is_identity():
    x = _smooth(3, 16)
    assert torch.equal(augment_batch(x, "none", torch.Generator().manual_seed(0)), x)


@pytest.mark.parametrize("mode", ["flip", "seed"])
def test_deterministic_for_a_generator_state(mode):
    x = _smooth(8, 32)
    a = augment_batch(x, mode, torch.Generator().manual_seed(7))
    b = augment_batch(x, mode, torch.Generator().manual_seed(7))
    c = augment_batch(x, mode, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_flip_flips_exactly_the_chosen_samples():
    x = _smooth(64, 16)
    params = sample_params(64, 16, 16, "flip", torch.Generator().manual_seed(3))
    y = apply_params(x, params)
    for i in range(64):
        assert torch.equal(y[i], x[i].flip(-1) if params.flip[i] else x[i])
    assert 16 < int(params.flip.sum()) < 48  # p = 0.5
    # augment_batch draws the same parameters from the same generator state
    assert torch.equal(augment_batch(x, "flip", torch.Generator().manual_seed(3)), y)


def test_seed_mode_shape_range_and_box_statistics():
    x = _smooth(256, 32)
    y = augment_batch(x, "seed", torch.Generator().manual_seed(0))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert y.min() >= -1 and y.max() <= 1
    params = sample_params(2000, 32, 32, "seed", torch.Generator().manual_seed(1))
    top, left, h, w = params.boxes.unbind(1)
    assert params.upscaled == (40, 40)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 40).all()
    area = h * w / 1600
    assert area.min() > 0.76 and area.max() <= 1.0  # scale (0.8, 1), up to integer rounding
    assert (w / h).min() > 0.74 and (w / h).max() < 1.36  # ratio (3/4, 4/3)
    assert len({tuple(b) for b in params.boxes.tolist()}) > 100  # per-sample boxes


def test_seed_mode_equals_a_crop_of_the_upscaled_image():
    """The recipe literally: resize to 1.25x, crop the box, resize back; one sampling step here.

    The literal recipe interpolates twice (and antialiases the shrink), so it is slightly
    blurrier; a box three pixels off must still be told apart clearly.
    """
    x = _smooth(3, 32, seed=5)
    boxes = torch.tensor([[3.0, 5.0, 35.0, 33.0], [6.0, 2.0, 30.0, 37.0], [0.0, 0.0, 40.0, 40.0]], dtype=torch.float64)
    y = apply_params(x, AugmentParams(boxes=boxes, upscaled=(40, 40)))
    upscaled = resize_batch(x, 40)

    def recipe(k: int, top: int, left: int, h: int, w: int) -> torch.Tensor:
        return resize_batch(upscaled[k : k + 1, :, top : top + h, left : left + w], 32)[0]

    for k, (top, left, h, w) in enumerate(boxes.long().tolist()):
        error = (y[k] - recipe(k, top, left, h, w)).abs()
        assert error.mean() < 0.015 and error.max() < 0.12
    for k, (top, left, h, w) in ((0, (3, 2, 35, 33)), (1, (3, 2, 30, 37))):
        assert (y[k] - recipe(k, top, left, h, w)).abs().mean() > 0.03


def test_seed_mode_moves_masks_with_nearest_values():
    masks = torch.tensor([0, 85, 170, 255], dtype=torch.uint8)[torch.randint(0, 4, (4, 1, 24, 24))]
    params = sample_params(4, 24, 24, "seed", torch.Generator().manual_seed(2))
    out = apply_params(masks, params, nearest=True)
    assert out.dtype == torch.uint8 and out.shape == masks.shape
    assert set(out.unique().tolist()) <= {0, 85, 170, 255}


def test_generator_none_uses_the_global_generator():
    x = _smooth(16, 16)
    torch.manual_seed(11)
    a = augment_batch(x, "seed")
    torch.manual_seed(11)
    assert torch.equal(augment_batch(x, "seed"), a)


def test_crop_params_match_torchvision_distribution():
    """Same RandomResizedCrop parameter distribution as torchvision (means and spreads)."""
    from torchvision.transforms import v2

    ours = sample_params(4000, 256, 256, "seed", torch.Generator().manual_seed(0)).boxes
    torch.manual_seed(0)
    image = torch.zeros(1, 320, 320)
    theirs = torch.tensor(
        [v2.RandomResizedCrop.get_params(image, scale=(0.8, 1.0), ratio=(3 / 4, 4 / 3)) for _ in range(4000)],
        dtype=torch.float64,
    )
    assert torch.allclose(ours.mean(0), theirs.mean(0), atol=1.5)
    assert torch.allclose(ours.std(0), theirs.std(0), rtol=0.1)
    assert math.isclose(ours[:, 2].max().item(), theirs[:, 2].max().item(), abs_tol=2)
