"""The training path on a CUDA device: what the CPU suite can only stand in for.

Skipped where torch sees no CUDA device (conftest.py); `bench/gpu_check.py` runs them on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, final_state_of, train, watch_resume

from oasis_ldm.config import load_config
from oasis_ldm.loading import load_pipeline
from oasis_ldm.train import loop as loop_module

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
ON_CUDA = ["train.device=cuda", "train.precision=bf16"]


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_bf16_training_on_cuda_resumes_with_its_optimizer_steps_on_the_cpu(
    tmp_path, tiny_h5, tiny_vae, stage, monkeypatch
):
    run_dir = tmp_path / "run"
    sets = [*ON_CUDA, f"ldm.vae_ckpt={tiny_vae}", "vae.adv_weight=0.1", "vae.disc_start=2"]
    train(stage, run_dir, tiny_h5, *sets, "train.max_steps=4")
    saved = final_state_of(run_dir)
    assert all(v.device.type == "cpu" for m in saved["models"].values() for v in m.values())  # read on the CPU
    seen = watch_resume(monkeypatch)
    cfg = load_config(TINY, [f"data.path={tiny_h5}", *sets, "train.max_steps=6"], stage=stage)
    assert loop_module.train(stage, cfg, run_dir) == 6
    assert seen == {"params": {"cuda"}, "steps": {"cpu"}}
    assert all(torch.isfinite(v).all() for m in final_state_of(run_dir)["models"].values() for v in m.values())


def test_a_cuda_checkpoint_samples_on_the_cpu_and_on_the_gpu(tmp_path, tiny_h5, tiny_vae):
    run_dir = tmp_path / "ldm"
    train("ldm", run_dir, tiny_h5, *ON_CUDA, f"ldm.vae_ckpt={tiny_vae}", "train.max_steps=3")
    cpu, _ = load_pipeline(run_dir, "cpu")
    gpu, _ = load_pipeline(run_dir, "cuda")
    a, b = cpu.generate([1, 2], steps=4), gpu.generate([1, 2], steps=4)
    assert a.shape == b.shape == (2, 1, 32, 32)
    # Same per-image seeds (drawn on the CPU) and weights: the pictures agree up to kernel rounding.
    assert (a.float() - b.float()).abs().mean() < 2.0


def test_the_run_uses_the_visible_gpu_of_its_local_rank(tmp_path, tiny_h5, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")
    from oasis_ldm.distributed import pick_device

    device = pick_device("auto", local_rank=0)
    assert device.type == "cuda" and torch.cuda.current_device() == device.index
