"""Paired image + mask mode: mask encoding, the paired autoencoder, its loss, and paired ldm samples."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, train

from oasis_ldm.config import load_config
from oasis_ldm.data import masks as mask_codec
from oasis_ldm.data.schema import MASK_VALUES
from oasis_ldm.distributed import DistEnv
from oasis_ldm.loading import load_pipeline
from oasis_ldm.models import build_vae
from oasis_ldm.train.context import StepContext
from oasis_ldm.train.loop import build_stage
from oasis_ldm.train.preflight import StartError, check_start

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PAIRED = ["data.masks=true"]


def test_masks_go_to_labels_one_hot_and_back():
    values = torch.tensor(MASK_VALUES, dtype=torch.uint8)[torch.randint(0, 4, (2, 1, 5, 7))]
    labels = mask_codec.to_labels(values)
    assert labels.shape == (2, 5, 7) and labels.dtype == torch.long
    assert torch.equal(mask_codec.to_values(labels), values)
    hot = mask_codec.one_hot(labels)
    assert hot.shape == (2, 4, 5, 7) and set(hot.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(hot.argmax(1), labels)
    with pytest.raises(ValueError, match=r"mask values outside \(0, 85, 170, 255\): \[3\]"):
        mask_codec.to_labels(torch.tensor([[[[0, 3]]]], dtype=torch.uint8))


def test_decoded_masks_hold_only_the_four_classes():
    logits = torch.randn(3, 4, 8, 8)
    decoded = mask_codec.decode_mask(logits)
    assert decoded.shape == (3, 1, 8, 8) and decoded.dtype == torch.uint8
    assert set(decoded.unique().tolist()) <= set(MASK_VALUES)
    assert torch.equal(mask_codec.to_labels(decoded), logits.argmax(1))


def test_the_paired_autoencoder_reads_and_decodes_slice_and_mask(tiny_paired_h5):
    cfg = load_config(TINY, [f"data.path={tiny_paired_h5}", *PAIRED])
    vae = build_vae(cfg)
    assert (vae.in_channels, vae.out_channels) == (5, 5)
    out, posterior = vae(torch.randn(2, 5, 32, 32))
    image, logits = mask_codec.split_output(out)
    assert image.shape == (2, 1, 32, 32) and logits.shape == (2, 4, 32, 32)
    assert posterior.mean.shape == (2, cfg.vae.latent_channels, 8, 8)
    assert build_vae(load_config(TINY)).out_channels == 1  # image-only stays the default


@pytest.mark.parametrize("dice", [0.0, 0.5])
def test_the_paired_loss_adds_the_mask_terms_and_they_fall(tmp_path, tiny_paired_h5, dice):
    sets = [f"data.path={tiny_paired_h5}", *PAIRED, "data.augment=flip", f"vae.mask_dice_weight={dice}"]
    cfg = load_config(TINY, sets, stage="vae")
    torch.manual_seed(0)
    stage = build_stage("vae", cfg, CPU, tmp_path)
    images, masks = zip(*(stage.dataset[i] for i in range(8)), strict=True)
    batch = [torch.stack(images), torch.stack(masks)]
    opt = torch.optim.Adam(stage.models["vae"].parameters(), lr=3e-3)
    ctx = StepContext(step=1, micro=0, accum=1, env=CPU, seed=0, bf16=False)
    history = []
    for _ in range(25):
        opt.zero_grad()
        history.append(stage.backward(stage.models, batch, ctx))
        opt.step()
    first, last = history[0], history[-1]
    assert ("mask_dice" in first) == (dice > 0)
    expected = (
        first["l1"] + 0.5 * first["ssim"] + 1e-6 * first["kl"] + first["mask_ce"] + dice * first.get("mask_dice", 0)
    )
    assert float(first["total"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(last["mask_ce"]) < 0.6 * float(first["mask_ce"])


def test_a_paired_start_needs_masks_and_a_paired_autoencoder(tmp_path, tiny_h5, tiny_paired_h5, tiny_vae):
    with pytest.raises(StartError, match=r"data\.masks=true needs masks, and split .train. has none"):
        check_start("vae", load_config(TINY, [f"data.path={tiny_h5}", *PAIRED]), tmp_path / "a")
    cfg = load_config(TINY, [f"data.path={tiny_paired_h5}", *PAIRED, f"ldm.vae_ckpt={tiny_vae}"], stage="ldm")
    with pytest.raises(StartError, match=r"encodes slices alone: set data\.masks=false for its ldm run too"):
        check_start("ldm", cfg, tmp_path / "b")


@pytest.mark.slow
def test_paired_training_gives_samples_with_masks(tmp_path, tiny_paired_h5):
    vae_dir, ldm_dir = tmp_path / "vae", tmp_path / "ldm"
    train("vae", vae_dir, tiny_paired_h5, *PAIRED, "train.max_steps=4")
    train(
        "ldm",
        ldm_dir,
        tiny_paired_h5,
        *PAIRED,
        f"ldm.vae_ckpt={vae_dir}",
        "train.max_steps=3",
        "ldm.latent_cache=true",
        "data.augment=flip",
    )
    pipe, _ = load_pipeline(ldm_dir)
    assert pipe.paired
    images, masks = pipe.generate_pairs([1, 2, 3], steps=3)
    assert images.shape == masks.shape == (3, 1, 32, 32) and masks.dtype == torch.uint8
    assert set(masks.unique().tolist()) <= set(MASK_VALUES)
    assert torch.equal(pipe.generate([1, 2, 3], steps=3), images)
    assert (ldm_dir / "images" / "images_ema_samples_00000003.png").exists()
