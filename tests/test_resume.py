"""Resume where the GPU run differs from the CPU one: another device, another world size, one
reader for all ranks, damaged checkpoints. Each test reproduces its mechanism on the CPU."""

from __future__ import annotations

import shutil
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import TINY, run_ranks, train, train_cmd, watch_resume
from test_train import assert_same_outputs, assert_same_tensors, final_state, losses

from oasis_ldm import checkpoint
from oasis_ldm.config import load_config
from oasis_ldm.distributed import DistEnv
from oasis_ldm.train import loop as loop_module

pytestmark = pytest.mark.slow
COMMON = ["train.image_every=100", "train.batch_size=4", "train.ckpt_every=2", "train.snapshot_every=2"]


@pytest.mark.filterwarnings("ignore:.*to a meta parameter")  # meta weights are placeholders
@pytest.mark.parametrize("stage", ["vae", "ldm"])
def test_a_resume_onto_another_device_reads_the_checkpoint_on_the_cpu(tmp_path, tiny_h5, tiny_vae, stage, monkeypatch):
    """ "meta" stands in for a CUDA device: a checkpoint mapped there cannot give NumPy its RNG
    keys, and optimizer steps mapped there cost AdamW a host sync per parameter."""
    sets = [f"data.path={tiny_h5}", "train.max_steps=2", f"ldm.vae_ckpt={tiny_vae}"]
    run_dir = tmp_path / "run"
    train(stage, run_dir, tiny_h5, *sets[1:])
    assert "rng" not in final_state(run_dir)  # no per-device RNG state: nothing to restore on other GPUs
    elsewhere = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("meta"))
    monkeypatch.setattr(loop_module, "init_distributed", lambda device: elsewhere)
    seen = watch_resume(monkeypatch)
    assert loop_module.train(stage, load_config(TINY, sets, stage=stage), run_dir) == 2
    assert seen == {"params": {"meta"}, "steps": {"cpu"}}


def test_the_scale_factor_does_not_depend_on_the_batch(tmp_path, tiny_h5, tiny_vae):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    factors = []
    for batch in (1, 4):  # per-rank batches of 1 (4 ranks) and 4 (1 rank) measured different factors
        sets = [f"data.path={tiny_h5}", f"ldm.vae_ckpt={tiny_vae}", f"train.batch_size={batch}"]
        stage = loop_module.build_stage("ldm", load_config(TINY, sets, stage="ldm"), env, tmp_path)
        factors.append(stage.measure_scale_factor())
    assert factors[0] == factors[1]


def test_a_run_resumed_on_two_ranks_trains_the_one_rank_model(tmp_path, tiny_h5):
    """train.batch_size is the global batch: 1 rank for 3 steps, then 2 ranks, as 1 rank throughout."""
    train("vae", tmp_path / "straight", tiny_h5, *COMMON, "train.max_steps=6")
    moved = tmp_path / "moved"
    train("vae", moved, tiny_h5, *COMMON, "train.max_steps=3")
    results = run_ranks([train_cmd("vae", moved, tiny_h5, *COMMON, "train.max_steps=6")] * 2)
    assert all(r.returncode == 0 for r in results), "\n".join(r.stdout + r.stderr for r in results)
    assert "resumed vae from step 3" in results[0].stdout
    assert "global batch 4 (2 ranks x 2)" in results[0].stdout
    assert losses(moved) == pytest.approx(losses(tmp_path / "straight"), rel=1e-4)
    a, b = final_state(tmp_path / "straight"), final_state(moved)
    assert (a["step"], a["samples_in_epoch"], a["epoch"]) == (b["step"], b["samples_in_epoch"], b["epoch"])
    assert_same_outputs(a, b, tiny_h5)


def test_a_world_size_that_cannot_split_the_global_batch_is_refused(tmp_path, tiny_h5):
    results = run_ranks([train_cmd("vae", tmp_path / "run", tiny_h5, "train.batch_size=4")] * 3)
    for r in results:
        assert r.returncode == 1
        assert r.stderr.strip().splitlines() == [
            "oasis_ldm.train: error: train.batch_size=4 (the global batch) does not split over 3 ranks: "
            "use a multiple of 3 or another number of ranks"
        ]
    assert not (tmp_path / "run").exists()


def test_every_rank_resumes_the_checkpoint_rank0_read(tmp_path, tiny_h5):
    """Rank 1 sees the run directory through a read glitch (last.pt damaged, a snapshot missing):
    it still resumes rank 0's step, so the job trains what an undisturbed job trains."""
    first = tmp_path / "first"
    train("vae", first, tiny_h5, *COMMON, "train.max_steps=4", "train.keep_snapshots=3")
    glitch, control = tmp_path / "glitch", tmp_path / "control"
    shutil.copytree(first, glitch)
    shutil.copytree(first, control)
    last = glitch / "checkpoints" / "last.pt"
    last.write_bytes(bytes(len(last.read_bytes())))
    (glitch / "checkpoints" / "step_00000004.pt").unlink()  # rank 1 alone would fall back to step 2
    more = [*COMMON, "train.max_steps=6", "train.keep_snapshots=3"]
    mixed = run_ranks([train_cmd("vae", first, tiny_h5, *more), train_cmd("vae", glitch, tiny_h5, *more)], timeout=240)
    assert all(r.returncode == 0 for r in mixed), "\n".join(r.stdout + r.stderr for r in mixed)
    clean = run_ranks([train_cmd("vae", control, tiny_h5, *more)] * 2, timeout=240)
    assert all(r.returncode == 0 for r in clean)
    a, b = final_state(first), final_state(control)
    for name in a["models"]:
        assert_same_tensors(a["models"][name], b["models"][name])
    assert_same_tensors(a["ema"]["model"], b["ema"]["model"])


def flat(tree: object, prefix: str = "") -> dict[str, object]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix: tree}


def flip_a_bit_in_a_tensor(path: Path) -> str:
    """Flip one bit inside the largest tensor record of a torch zip file; the file keeps its size."""
    with zipfile.ZipFile(path) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x08
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size
    return info.filename


def test_a_bit_flipped_last_pt_is_caught_and_the_newest_good_snapshot_resumes(tmp_path, tiny_h5):
    run_dir = tmp_path / "run"
    train("vae", run_dir, tiny_h5, *COMMON, "train.max_steps=4")
    last = run_dir / "checkpoints" / "last.pt"
    good = torch.load(last, weights_only=True)
    record = flip_a_bit_in_a_tensor(last)
    damaged = torch.load(last, weights_only=True)  # what used to be trained on: it loads silently
    changed = [k for k, v in flat(good).items() if isinstance(v, torch.Tensor) and not torch.equal(v, flat(damaged)[k])]
    assert len(changed) == 1
    with pytest.raises(checkpoint.CheckpointError, match=f"damaged checkpoint .checksum mismatch in {record}"):
        checkpoint.load(last)
    out = train("vae", run_dir, tiny_h5, *COMMON, "train.max_steps=6")
    warnings = [line for line in out.stdout.splitlines() if "warning:" in line]
    assert len(warnings) == 1 and "resuming from step_00000004.pt (step 4) instead" in warnings[0]
    assert "resumed vae from step 4 of step_00000004.pt" in out.stdout
