"""The training loop end to end on tiny models: resume, DDP, fallbacks, guards, TensorBoard."""

from __future__ import annotations

import itertools
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY, quiet_env, run_ranks, train, train_cmd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oasis_ldm import checkpoint
from oasis_ldm.config import from_dict, load_config
from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.models import build_vae
from oasis_ldm.train import NonFiniteLossError
from oasis_ldm.train import loop as loop_module

pytestmark = pytest.mark.slow


def final_state(run_dir: Path) -> dict:
    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


def assert_same_tensors(a: dict, b: dict, exact: bool = True, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"{key} differs")


def optimizer_tensors(state: dict) -> dict:
    return {
        f"{name}.{pid}.{k}": v
        for name, opt in state["optimizers"].items()
        for pid, s in opt["state"].items()
        for k, v in s.items()
    }


def kill_after_checkpoint(cmd: list[str], run_dir: Path, at_least: int, before: int) -> int:
    """Start training, SIGKILL it once last.pt holds a step >= `at_least`; return that step."""
    proc = subprocess.Popen(cmd, env=quiet_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run_dir / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if last.exists():
                step = checkpoint.load(last)["step"]
                if step >= at_least:
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    assert step < before, f"the run reached step {step} before it could be killed"
                    return step
            time.sleep(0.01)
        pytest.fail(f"no checkpoint >= {at_least} appeared (exit {proc.poll()}): {proc.stderr.read().decode()}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_sigkill_resume_is_bit_exact(tmp_path, tiny_h5, tiny_vae, stage):
    """A run killed with SIGKILL and restarted ends bit-identical to an uninterrupted one."""
    extra = ["train.max_steps=40", "train.ckpt_every=3", "train.image_every=20", f"ldm.vae_ckpt={tiny_vae}"]
    if stage == "vae":
        extra += ["vae.adv_weight=0.1", "vae.disc_start=5"]  # the adversarial path resumes too
    train(stage, tmp_path / "straight", tiny_h5, *extra)
    killed_at = kill_after_checkpoint(
        train_cmd(stage, tmp_path / "killed", tiny_h5, *extra), tmp_path / "killed", 6, 40
    )
    out = train(stage, tmp_path / "killed", tiny_h5, *extra)
    assert f"resumed {stage} from step" in out.stdout
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "killed")
    assert a["step"] == b["step"] == 40 and killed_at < 40
    for name in a["models"]:
        assert_same_tensors(a["models"][name], b["models"][name])
    assert_same_tensors(a["ema"]["model"], b["ema"]["model"])
    assert_same_tensors(optimizer_tensors(a), optimizer_tensors(b))
    # The resumed run's TensorBoard curves continue without repeating or going back.
    events = EventAccumulator(str(tmp_path / "killed" / "tb"))
    events.Reload()
    steps = [e.step for e in events.Scalars("loss/total" if stage == "vae" else "loss/mse")]
    assert steps == list(range(1, 41))


def test_two_rank_ddp_matches_one_process_with_the_same_global_batch(tmp_path, tiny_h5):
    common = ["train.max_steps=4", "train.image_every=100", "train.batch_size=4"]  # the global batch
    train("vae", tmp_path / "one", tiny_h5, *common)
    results = run_ranks([train_cmd("vae", tmp_path / "two", tiny_h5, *common)] * 2)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stdout + r.stderr for r in results)
    one, two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
    assert two["world_size"] == 2 and one["world_size"] == 1
    # Same samples, noise and augmentation in every step: only float summation order differs.
    # Compare what the models compute, not raw weights: Adam turns the rounding noise in the
    # (mathematically zero) gradient of a bias feeding a GroupNorm into lr-sized weight changes.
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), rel=1e-4)
    assert_same_outputs(one, two, tiny_h5)


def assert_same_outputs(a: dict, b: dict, data: Path, atol: float = 1e-4) -> None:
    """Two vae checkpoints reconstruct held-out slices alike."""
    x = OasisH5Dataset(data, "validate", raw=True).read_raw(range(8)).float() / 127.5 - 1
    outputs = []
    for state in (a, b):
        vae = build_vae(from_dict(state["config"]))
        vae.load_state_dict(state["models"]["vae"])
        with torch.no_grad():
            outputs.append(vae(x, sample_posterior=False)[0])
    torch.testing.assert_close(outputs[0], outputs[1], atol=atol, rtol=0)


def losses(run_dir: Path) -> list[float]:
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("loss/total")]


def test_corrupt_last_falls_back_to_newest_snapshot(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=4")
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # truncated by a crash mid-copy, say
    found = checkpoint.find_latest(run_dir / "checkpoints")
    assert "unreadable checkpoint" in found.note and "resuming from step_00000004.pt (step 4) instead" in found.note
    assert found.state["step"] == 4 and found.path.name == "step_00000004.pt"
    out = train("vae", run_dir, tiny_h5, "train.max_steps=6")
    assert "resumed vae from step 4" in out.stdout
    assert out.stdout.count("warning:") == 1 and "resuming from step_00000004.pt" in out.stdout
    assert final_state(run_dir)["step"] == 6


def test_snapshots_keep_the_newest_k(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=8")
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["last.pt", "step_00000006.pt", "step_00000008.pt"]


def test_nan_guard_stops_before_the_update_and_keeps_the_checkpoint(tmp_path, tiny_h5, monkeypatch):
    cfg = load_config(TINY, [f"data.path={tiny_h5}", "train.max_steps=6"])
    run_dir = tmp_path / "run"
    loop_module.train("vae", cfg, run_dir)  # a good run to step 6
    good = (run_dir / "checkpoints" / "last.pt").read_bytes()
    from oasis_ldm.train.vae_stage import VAEStage

    real_backward = VAEStage.backward

    def poisoned(self, wrapped, batch, ctx):
        logs = real_backward(self, wrapped, batch, ctx)
        if ctx.step == 8:
            next(self.models["vae"].parameters()).grad.fill_(float("nan"))
        return logs

    monkeypatch.setattr(VAEStage, "backward", poisoned)
    cfg = load_config(TINY, [f"data.path={tiny_h5}", "train.max_steps=10"])
    with pytest.raises(NonFiniteLossError, match="step 8: non-finite values in grad_norm/vae"):
        loop_module.train("vae", cfg, run_dir)
    assert (run_dir / "checkpoints" / "last.pt").read_bytes() == good


def test_tensorboard_has_scalar_and_image_tags(tmp_path, tiny_h5, tiny_vae):
    vae_events = EventAccumulator(str(tiny_vae / "tb"))
    vae_events.Reload()
    tags = vae_events.Tags()
    assert {"loss/l1", "loss/ssim", "loss/kl", "loss/total", "train/lr", "train/images_per_s", "train/epoch"} <= set(
        tags["scalars"]
    )
    assert {"grad_norm/vae", "held_out/ssim", "held_out/ssim_brain", "held_out/psnr_brain"} <= set(tags["scalars"])
    assert "images/input_vs_reconstruction" in tags["images"]
    run_dir = tmp_path / "ldm"
    train("ldm", run_dir, tiny_h5, f"ldm.vae_ckpt={tiny_vae}", "train.max_steps=3")
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert "loss/mse" in events.Tags()["scalars"]
    assert "images/ema_samples" in events.Tags()["images"]
    assert (run_dir / "images" / "images_ema_samples_00000003.png").exists()


def test_sigusr2_saves_the_current_step_and_exits(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    cmd = train_cmd("vae", run_dir, tiny_h5, "train.max_steps=5000", "train.ckpt_every=5000", "train.log_every=5")
    proc = subprocess.Popen(cmd, env=quiet_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for line in proc.stdout:  # wait until it has trained a little
            if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 10:
                break
        proc.send_signal(signal.SIGUSR2)
        rest = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGUSR2, rest
    saved = final_state(run_dir)
    assert 10 <= saved["step"] < 5000  # the step boundary after the signal: no periodic checkpoint was due
    assert "caught SIGUSR2" in rest


def test_ldm_checkpoint_is_self_contained(tmp_path, tiny_h5, tiny_vae):
    from oasis_ldm.loading import load_pipeline

    run_dir = tmp_path / "ldm"
    train(
        "ldm",
        run_dir,
        tiny_h5,
        f"ldm.vae_ckpt={tiny_vae}",
        "train.max_steps=2",
        "ldm.latent_cache=true",
        "data.augment=flip",
    )
    saved = final_state(run_dir)
    extra = saved["extra"]
    assert extra["vae_sha256"] == checkpoint.file_sha256(tiny_vae / "checkpoints" / "last.pt")
    assert extra["scale_factor"] > 0 and (run_dir / "latents.h5").exists()
    pipe, meta = load_pipeline(run_dir)
    images = pipe.generate([1, 2], steps=3)
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.uint8
    assert meta["step"] == 2


def test_restart_with_another_config_is_refused(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, "train.max_steps=2")
    cmd = train_cmd("vae", run_dir, tiny_h5, "train.max_steps=2", "vae.kl_weight=0.5")
    out = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=120)
    assert out.returncode == 1
    assert "holds a run with another config: vae.kl_weight: 1e-06 -> 0.5" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_grad_accumulation_matches_the_bigger_batch(tmp_path, tiny_h5):
    """A global batch of 4 in 2 rounds of 2 (train.micro_batch=2) trains the model of 4 at once."""
    common = ["train.max_steps=4", "train.image_every=100", "train.batch_size=4"]
    train("vae", tmp_path / "big", tiny_h5, *common)
    train("vae", tmp_path / "accum", tiny_h5, *common, "train.micro_batch=2")
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "accum"), rel=1e-4)


@pytest.mark.parametrize("stage_name", ["vae", "ldm"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tmp_path, tiny_h5, tiny_vae, stage_name):
    from oasis_ldm.distributed import DistEnv
    from oasis_ldm.train.context import StepContext
    from oasis_ldm.train.loop import build_stage

    torch.manual_seed(0)
    cfg = load_config(TINY, [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", "data.augment=none"])
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    stage = build_stage(stage_name, cfg, env, tmp_path)
    stage.initialise()
    model = stage.models[stage.main]
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = torch.stack([stage.dataset[i] for i in range(8)])
    ctx = StepContext(step=1, micro=0, accum=1, env=env, seed=0, bf16=False)  # the same noise every time
    first = None
    for _ in range(15):
        opt.zero_grad()
        logs = stage.backward(stage.models, batch, ctx)
        opt.step()
        loss = float(logs["total" if stage_name == "vae" else "mse"])
        first = loss if first is None else first
    assert loss < 0.8 * first


def test_lr_factor_warms_up_then_follows_the_schedule():
    from oasis_ldm.lr import lr_factor

    assert [lr_factor(s, 10, 100) for s in (1, 5, 10, 50, 100)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert lr_factor(5, 10, 110, "cosine", 0.2) == 0.5 and lr_factor(10, 10, 110, "cosine", 0.2) == 1.0
    assert abs(lr_factor(60, 10, 110, "cosine", 0.2) - 0.6) < 1e-12  # halfway: the mean of 1 and the floor
    assert abs(lr_factor(110, 10, 110, "cosine", 0.2) - 0.2) < 1e-12 and lr_factor(500, 10, 110, "cosine", 0.2) == 0.2
    values = [lr_factor(s, 10, 110, "cosine", 0.2) for s in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(values))


def test_the_trainer_sets_the_configured_schedule(tmp_path, tiny_h5):
    """train.lr_schedule reaches the optimiser: the rate at the last step is lr * lr_min_factor."""
    from oasis_ldm.train.loop import set_lr

    sets = [f"data.path={tiny_h5}", "train.lr_schedule=cosine", "train.lr_min_factor=0.25"]
    cfg = load_config(TINY, [*sets, "train.max_steps=8", "train.warmup_steps=2"], stage="vae")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    state = SimpleNamespace(optimizers={"vae": opt}, stage=SimpleNamespace(lr=lambda name: cfg.train.lr))
    assert set_lr(state, 1, cfg.train) == 0.5  # what set_lr reads of a TrainState
    assert set_lr(state, 8, cfg.train) == 0.25
    assert opt.param_groups[0]["lr"] == cfg.train.lr * 0.25


def test_latent_cache_flips_use_the_mirrored_slices_posterior(tmp_path, tiny_h5, tiny_vae):
    """A strided-conv encoder is not mirror-equivariant: a flipped row must take the cached
    posterior of the mirrored slice, not the mirror image of its own latent."""
    from oasis_ldm.data.transforms import to_float
    from oasis_ldm.distributed import DistEnv
    from oasis_ldm.train.augment import flip_rows
    from oasis_ldm.train.context import StepContext
    from oasis_ldm.train.loop import build_stage

    sets = [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", "data.augment=flip", "ldm.latent_cache=true"]
    cfg = load_config(TINY, sets, stage="ldm")
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    stage = build_stage("ldm", cfg, env, tmp_path)
    stage.initialise()
    cache = stage.dataset
    assert cache.has_flips
    images = to_float(stage.images.read_raw([0, 1]))
    with torch.no_grad():
        mirrored = stage.vae.encode(images.flip(-1)).mean
    _, _, flip_mean, _ = cache[[0, 1]]
    torch.testing.assert_close(flip_mean.float(), mirrored, atol=2e-2, rtol=2e-2)
    assert not torch.allclose(mirrored, stage.vae.encode(images).mean.flip(-1), atol=2e-2)  # why it is needed
    mean, std, fmean, _fstd = (t[:4] for t in cache.tensors)
    zero = torch.zeros_like(std)
    for step in range(1, 20):  # find a step that flips some rows and keeps others
        ctx = StepContext(step=step, micro=0, accum=1, env=env, seed=0, bf16=False)
        flips = flip_rows(4, "flip", ctx)
        if 0 < flips.sum() < 4:
            break
    z = stage.latents([mean, zero, fmean, zero], ctx) / stage.scale_factor
    expected = torch.where(flips[:, None, None, None], fmean.float(), mean.float())
    torch.testing.assert_close(z, expected)
