"""The training and sampling paths on a CUDA device: what the CPU suite can only stand in for.

Skipped where torch sees no CUDA device (conftest.py); `bench/gpu_check.py` runs them on a GPU,
with OASIS_CUDA_TEST_LDM naming the demo ldm it has just trained (else the tiny test ldm).
Every assert here can fail: each compares a GPU run with something independent of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, final_state_of, run_ranks, train, watch_resume
from test_metrics import tf32_on  # noqa: F401 (a fixture)

from oasis_ldm.config import load_config
from oasis_ldm.loading import load_pipeline
from oasis_ldm.metrics.region import brain_region
from oasis_ldm.precision import ieee_float32
from oasis_ldm.rng import ImageGenerators, StepDraws, image_seed
from oasis_ldm.train import augment as augment_module
from oasis_ldm.train import loop as loop_module

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
ON_CUDA = ["train.device=cuda", "train.precision=bf16"]


def step_probe():
    spec = importlib.util.spec_from_file_location("step_probe", REPO / "bench" / "step_probe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_bf16_training_on_cuda_resumes_with_its_optimizer_steps_on_the_cpu(
    tmp_path, tiny_h5, tiny_vae, stage, monkeypatch
):
    run_dir = tmp_path / "run"
    sets = [*ON_CUDA, f"ldm.vae_ckpt={tiny_vae}", "vae.adv_weight=0.1", "vae.disc_start=2"]
    train(stage, run_dir, tiny_h5, *sets, "train.max_steps=4")
    seen = watch_resume(monkeypatch)
    cfg = load_config(TINY, [f"data.path={tiny_h5}", *sets, "train.max_steps=6"], stage=stage)
    assert loop_module.train(stage, cfg, run_dir) == 6
    assert seen == {"params": {"cuda"}, "steps": {"cpu"}}  # AdamW makes no host sync per parameter
    assert all(torch.isfinite(v).all() for m in final_state_of(run_dir)["models"].values() for v in m.values())


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_bf16_autocast_is_engaged_where_the_policy_says(tmp_path, tiny_paired_h5, stage):
    """The trained model's convolutions compute in bf16; the ldm's frozen encoder in float32."""
    probe = step_probe()
    sets = [f"data.path={tiny_paired_h5}", *ON_CUDA, "vae.adv_weight=0.1", "vae.disc_start=0"]
    if stage == "ldm":
        vae = probe.random_vae(load_config(TINY, sets, stage="vae"), tmp_path / "vae.pt", torch.device("cuda"))
        sets.append(f"ldm.vae_ckpt={vae}")
    cfg = load_config(TINY, sets, stage=stage)
    state, batches = probe.build(stage, cfg, torch.device("cuda"), tmp_path)
    dtypes: dict[str, set] = {"trained": set(), "frozen": set()}
    frozen = getattr(state.stage, "vae", None) if stage == "ldm" else None
    for kind, model in (("trained", state.stage.models[state.stage.main]), ("frozen", frozen)):
        for module in model.modules() if model is not None else ():
            if isinstance(module, torch.nn.Conv2d):
                module.register_forward_hook(lambda m, i, out, kind=kind: dtypes[kind].add(out.dtype))
    env = probe.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda"))
    loop_module.train_step(state, batches, 1, cfg, env, probe.StopRequest())
    assert dtypes["trained"] == {torch.bfloat16}
    assert dtypes["frozen"] == ({torch.float32} if stage == "ldm" else set())


def record_steps(monkeypatch, seen: dict) -> None:
    """Every step's batch and draws into `seen`, by (step, round, what), as the trainer hands them out."""
    real_build, real_randn, real_randint = loop_module.build_stage, StepDraws.randn, StepDraws.randint

    def build(*args, **kwargs):
        stage = real_build(*args, **kwargs)
        backward = stage.backward

        def spy(wrapped, batch, ctx):
            seen[(ctx.step, ctx.micro, "batch")] = batch.cpu().clone()
            return backward(wrapped, batch, ctx)

        stage.backward = spy
        return stage

    def draws(real):
        def spy(self, *args):
            out = real(self, *args)
            seen[(self.step, self.micro, args[-1].name)] = out.cpu().clone()
            return out

        return spy

    def augment(n, height, width, mode, ctx):
        params = real_augment(n, height, width, mode, ctx)
        drawn = [t.flatten().double().cpu() for t in (params.boxes, params.flip) if t is not None]
        seen[(ctx.step, ctx.micro, "augment")] = torch.cat(drawn)
        return params

    real_augment = augment_module.global_params
    monkeypatch.setattr(augment_module, "global_params", augment)
    monkeypatch.setattr(loop_module, "build_stage", build)
    monkeypatch.setattr(StepDraws, "randn", draws(real_randn))
    monkeypatch.setattr(StepDraws, "randint", draws(real_randint))


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_a_resumed_cuda_run_repeats_the_data_order_and_step_draws(tmp_path, tiny_h5, tiny_vae, stage, monkeypatch):
    """Stopped at step 3 and resumed, a CUDA run meets the same batches and the same random
    numbers (device-drawn, CUDA Philox) at every step as one that ran through."""
    sets = [f"data.path={tiny_h5}", *ON_CUDA, f"ldm.vae_ckpt={tiny_vae}", "train.micro_batch=2", "data.augment=crop"]
    whole, parts = {}, {}
    for seen, steps in ((whole, [6]), (parts, [3, 6])):
        with monkeypatch.context() as patch:
            record_steps(patch, seen)
            run_dir = tmp_path / f"run{len(steps)}"
            for max_steps in steps:
                cfg = load_config(TINY, [*sets, f"train.max_steps={max_steps}"], stage=stage)
                assert loop_module.train(stage, cfg, run_dir) == max_steps
    assert sorted(whole) == sorted(parts) and {k[0] for k in whole} == set(range(1, 7))
    assert {"batch", "augment", "POSTERIOR_NOISE"} <= {k[2] for k in whole}
    for key, value in whole.items():
        assert torch.equal(value, parts[key]), key


@pytest.fixture(scope="module")
def trained_ldm(tmp_path_factory, tiny_h5) -> Path:
    """The demo ldm gpu_check.py trained (OASIS_CUDA_TEST_LDM), else one trained here on the GPU
    long enough to draw its blobs (the 4-step test ldm draws almost flat grey)."""
    if os.environ.get("OASIS_CUDA_TEST_LDM"):
        return Path(os.environ["OASIS_CUDA_TEST_LDM"])
    root = tmp_path_factory.mktemp("trained")
    steps = ["train.max_steps=150", "train.image_every=1000", "train.ckpt_every=150", "train.log_every=50"]
    train("vae", root / "vae", tiny_h5, *ON_CUDA, *steps)
    train("ldm", root / "ldm", tiny_h5, *ON_CUDA, *steps, f"ldm.vae_ckpt={root / 'vae'}")
    return root / "ldm"


def test_cpu_and_gpu_samples_of_a_trained_checkpoint_agree_and_are_not_flat(trained_ldm):
    """In IEEE float32 the same seeds give the same pictures on both devices, and the pictures
    hold structure inside the slice (a flat or empty image would agree trivially)."""
    ckpt = trained_ldm
    seeds = [image_seed(3, i) for i in range(8)]
    with ieee_float32():
        cpu = load_pipeline(ckpt, "cpu")[0].generate(seeds, "ddim", 20, precision="fp32")
        gpu = load_pipeline(ckpt, "cuda")[0].generate(seeds, "ddim", 20, precision="fp32").cpu()
    diff = (cpu.float() - gpu.float()).abs()
    assert diff.mean() < 0.5 and (diff > 2).float().mean() < 0.01, (diff.mean(), diff.max())
    region = brain_region(cpu)
    for image, inside in zip(cpu.float(), region, strict=True):
        assert inside.float().mean() > 0.05 and image[inside].std() > 5.0  # a slice, with contrast inside
    assert len({bytes(image.numpy()) for image in cpu}) == len(seeds)  # each seed its own image


MAP_RANK = """
import json, sys, torch
from oasis_ldm import distributed as d
try:
    env = d.init_distributed("cuda")
except d.DeviceError as e:
    sys.exit(f"DeviceError: {e}")
uuid = str(torch.cuda.get_device_properties(env.device.index).uuid)
print(json.dumps({"local_rank": env.local_rank, "index": env.device.index, "uuid": uuid}))
d.barrier()
d.cleanup()
"""


def test_two_ranks_read_local_rank_and_take_distinct_gpus_or_both_refuse_in_one_line():
    """With two or more GPUs the ranks take GPUs 0 and 1 (their LOCAL_RANK) and join over NCCL;
    with one, both refuse, naming what they see, instead of NCCL's "Duplicate GPU detected"."""
    results = run_ranks([[sys.executable, "-c", MAP_RANK]] * 2, timeout=180)
    if torch.cuda.device_count() >= 2:
        assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results]
        seen = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
        assert [(s["local_rank"], s["index"]) for s in seen] == [(0, 0), (1, 1)]
        assert seen[0]["uuid"] != seen[1]["uuid"]
    else:
        for r in results:
            last = r.stderr.strip().splitlines()[-1]
            assert r.returncode == 1 and last.startswith("DeviceError: rank 1 (LOCAL_RANK=1)"), r.stderr[-2000:]
            assert "sees 1 GPU(s) (CUDA_VISIBLE_DEVICES=" in last and "all taken by ranks [0]" in last


def test_every_cuda_training_mode_makes_one_host_sync_per_step(tiny_paired_h5):
    """torch's own count (sync debug mode) over whole steps: data, losses, clipping, AdamW, guard."""
    result = step_probe().count_syncs(tiny_paired_h5, "cuda", TINY, ["train.precision=bf16"], steps=2)
    assert {mode: r["per_step"] for mode, r in result.items()} == {mode: 1.0 for mode in result}, result


def test_stochastic_sampling_steps_never_wait_for_the_host(tiny_ldm):
    """DDPM draws each step's noise on the CPU: its copy must not block (pinned, non-blocking)."""
    pipe, _ = load_pipeline(tiny_ldm, "cuda")
    x_T = torch.zeros(4, *pipe.latent_shape, device="cuda")
    noise = ImageGenerators([1, 2, 3, 4])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x = pipe.diffusion.sample(pipe.unet, x_T, "ddpm", noise=noise)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all()


def test_the_ssim_loss_on_a_gpu_is_the_cpus_with_tf32_allowed(tf32_on):  # noqa: F811 (the fixture)
    """The blurs run in IEEE float32 forward and backward, whatever the caller allowed."""
    from oasis_ldm.train.losses import ssim_loss

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(4, 1, 64, 64, generator=gen) * 2 - 1, torch.rand(4, 1, 64, 64, generator=gen) * 2 - 1
    b = (0.9 * a + 0.1 * b).requires_grad_()
    cpu = ssim_loss(b, a)
    (cpu_grad,) = torch.autograd.grad(cpu, b)
    b_gpu = b.detach().cuda().requires_grad_()
    gpu = ssim_loss(b_gpu, a.cuda())
    (gpu_grad,) = torch.autograd.grad(gpu, b_gpu)
    assert abs(float(cpu) - float(gpu)) < 1e-6
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, atol=1e-7, rtol=1e-4)
