"""bf16 autocast runs on the CPU too, so these tests take the code path of a bf16 GPU run.

What must stay fp32 does: the SSIM loss (its variances are differences of blurred moments)
and the frozen encoder whose latents the U-Net learns.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, blob_images, final_state_of, train

from oasis_ldm.config import load_config
from oasis_ldm.distributed import DistEnv
from oasis_ldm.train.context import StepContext
from oasis_ldm.train.loop import build_stage
from oasis_ldm.train.losses import ssim_loss

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def context(bf16: bool) -> StepContext:
    return StepContext(step=1, micro=0, accum=1, env=CPU, seed=0, bf16=bf16)


def test_bf16_autocast_runs_on_the_cpu():
    conv = torch.nn.Conv2d(1, 2, 3)
    with context(True).autocast():
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.bfloat16
    with context(False).autocast():
        assert conv(torch.randn(1, 1, 8, 8)).dtype == torch.float32


def test_the_ssim_loss_is_fp32_inside_bf16_autocast():
    x = torch.from_numpy(blob_images(2, 64, seed=1)).float()[:, None] / 127.5 - 1
    noisy = x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fp32 = ssim_loss(noisy, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = ssim_loss(noisy, x)
    assert bf16.dtype == torch.float32
    assert abs(float(bf16) - float(fp32)) < 1e-3, (float(bf16), float(fp32))


@pytest.mark.parametrize("stage_name", ["vae", "ldm"])
def test_bf16_and_fp32_loss_terms_agree_on_one_batch(tmp_path, tiny_h5, tiny_vae, stage_name):
    sets = [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", "data.augment=none"]
    cfg = load_config(TINY, sets, stage=stage_name)
    torch.manual_seed(0)
    stage = build_stage(stage_name, cfg, CPU, tmp_path)
    stage.initialise()
    batch = torch.stack([stage.dataset[i] for i in range(4)])
    terms = {bf16: stage.backward(stage.models, batch, context(bf16)) for bf16 in (False, True)}
    for key, fp32 in terms[False].items():
        low = terms[True][key]
        assert low.dtype == torch.float32 and math.isfinite(float(low))
        tolerance = 1e-3 if key == "ssim" else 0.05 * abs(float(fp32)) + 1e-3
        assert abs(float(low) - float(fp32)) < tolerance, (key, float(low), float(fp32))


def test_the_frozen_encoder_gives_the_same_latents_in_a_bf16_run(tmp_path, tiny_h5, tiny_vae):
    sets = [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", "data.augment=none", "ldm.latent_cache=false"]
    stage = build_stage("ldm", load_config(TINY, sets, stage="ldm"), CPU, tmp_path)
    stage.initialise()
    batch = torch.stack([stage.dataset[i] for i in range(4)])
    assert torch.equal(stage.latents(batch, context(True)), stage.latents(batch, context(False)))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_a_few_bf16_steps_of_each_stage(tmp_path, tiny_h5, tiny_vae, stage):
    sets = ["train.precision=bf16", "train.max_steps=4", f"ldm.vae_ckpt={tiny_vae}", "vae.adv_weight=0.1"]
    train(stage, tmp_path / "run", tiny_h5, *sets, "vae.disc_start=2")
    saved = final_state_of(tmp_path / "run")
    assert saved["step"] == 4 and saved["config"]["train"]["precision"] == "bf16"
    for model in saved["models"].values():
        assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in model.values())
