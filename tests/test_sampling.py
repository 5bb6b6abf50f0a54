"""Sampling on this machine: worker placement, shard checks on a rerun, paired samples (masks),
precision, threads, --help."""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, quiet_env
from PIL import Image

from oasis_ldm.data.masks import to_labels
from oasis_ldm.data.schema import MASK_VALUES
from oasis_ldm.loading import load_pipeline
from oasis_ldm.rng import image_seed
from oasis_ldm.sampling.shards import (
    MASK_COLOURS,
    SamplingParams,
    ShardError,
    generate_shards,
    merge,
    read_request,
    read_shard,
    request_for,
    shard_path,
    write_request,
)
from oasis_ldm.sampling.worker import WorkerError, worker_from_env

REQUEST = {"num_samples": 6, "shard_size": 2, "batch_size": 2, "steps": 3, "eta": 1.0, "seed": 3}


def sample(ckpt: Path, out: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m oasis_ldm.sampling`: 6 images in 3 shards of 2, 3 DDIM steps with eta 1, CPU."""
    args = ["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", *extra]
    args += [arg for key, value in REQUEST.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or quiet_env(), cwd=REPO, timeout=120)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"sampling failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def samples(out: Path) -> np.ndarray:
    with h5py.File(out / "samples.h5", "r") as f:
        return f["images"][:]


@pytest.fixture(scope="module")
def done(tmp_path_factory, tiny_ldm) -> Path:
    """A finished fp32 run; tests copy it before they damage it."""
    out = tmp_path_factory.mktemp("done") / "s"
    ok(sample(tiny_ldm, out))
    return out


def copy_run(done: Path, to: Path) -> Path:
    subprocess.run(["cp", "-a", str(done), str(to)], check=True)
    return to


def mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "shards").glob("shard_*.h5")}


# --- where a worker sits ------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM_")] + ["RANK", "WORLD_SIZE"]:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_array_tasks_times_srun_tasks_are_distinct_workers(clean_env):
    seen = []
    for array_id in (4, 5, 6, 7):  # --array=4-7 --ntasks-per-node=2: 8 workers
        for procid in (0, 1):
            env = {"SLURM_ARRAY_TASK_ID": array_id, "SLURM_ARRAY_TASK_COUNT": 4, "SLURM_ARRAY_TASK_MIN": 4}
            env |= {"SLURM_ARRAY_TASK_MAX": 7, "SLURM_ARRAY_TASK_STEP": 1, "SLURM_PROCID": procid}
            env |= {"SLURM_NTASKS": 2, "SLURM_STEP_ID": 0, "SLURM_STEP_NUM_TASKS": 2}
            for key, value in env.items():
                clean_env.setenv(key, str(value))
            seen.append(worker_from_env())
    assert seen == [(w, 8) for w in range(8)]


def test_array_with_a_step_and_the_batch_script_alone(clean_env):
    # --array=1-5:2 --ntasks=4, run in the batch script itself (no srun): one process per array task.
    env = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    env |= {"SLURM_ARRAY_TASK_MAX": "5", "SLURM_ARRAY_TASK_STEP": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    for key, value in env.items():
        clean_env.setenv(key, value)
    assert worker_from_env() == (2, 3)


def test_an_irregular_array_is_refused_in_one_line(clean_env):
    # --array=0,3,7: SLURM reports step 1, so the ids cannot be turned into 0, 1, 2.
    env = {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}
    env |= {"SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "1"}
    for key, value in env.items():
        clean_env.setenv(key, value)
    with pytest.raises(WorkerError, match=r"^SLURM array 0-7 of 3 tasks is not evenly spaced") as e:
        worker_from_env()
    assert "\n" not in str(e.value)


def test_srun_tasks_and_torchrun_ranks(clean_env):
    assert worker_from_env() == (0, 1)
    for key, value in {"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_STEP_ID": "0"}.items():
        clean_env.setenv(key, value)
    clean_env.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert worker_from_env() == (2, 4)
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    assert worker_from_env() == (5, 8)  # torchrun's ranks inside one srun task


def _write_request_at_once(out: Path, barrier, trials: int, errors) -> None:
    """One task: write the same request into `trials` fresh folders, in step with the others."""
    from oasis_ldm.sampling.shards import Request, write_request

    req = Request("ckpt", "abc", 1, 32, 10)
    for trial in range(trials):
        barrier.wait()
        try:
            write_request(out / str(trial), req)
        except OSError as e:
            errors.put(f"{type(e).__name__}: {e}")


def test_request_written_by_many_tasks_at_once(tmp_path):
    """Every task of a job writes request.json at start-up, all at about the same moment."""
    tasks, trials = 8, 50
    ctx = multiprocessing.get_context("fork")
    barrier, errors = ctx.Barrier(tasks), ctx.Queue()
    procs = [ctx.Process(target=_write_request_at_once, args=(tmp_path, barrier, trials, errors)) for _ in range(tasks)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0] * tasks
    assert errors.empty(), errors.get()
    for trial in range(trials):
        assert json.loads((tmp_path / str(trial) / "request.json").read_text())["num_samples"] == 10
        assert sorted(p.name for p in (tmp_path / str(trial)).iterdir()) == ["request.json"]


def test_write_request_leaves_another_process_temp_file_alone(tmp_path, tiny_ldm):
    _, meta = load_pipeline(tiny_ldm)
    theirs = tmp_path / "request.json.tmp"  # the name every task used to share
    theirs.write_text("half of another task's request")
    write_request(tmp_path, request_for(meta, SamplingParams(num_samples=4)))
    assert theirs.read_text() == "half of another task's request"
    assert json.loads((tmp_path / "request.json").read_text())["num_samples"] == 4


# --- shard checks on a rerun and in the merge --------------------------------------------------------


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_rerun_remakes_a_truncated_shard(tmp_path, tiny_ldm, done):
    out = copy_run(done, tmp_path / "s")
    bad = shard_path(out, 1)
    truncate(bad)
    before = mtimes(out)
    log = ok(sample(tiny_ldm, out))
    assert f"{bad}: unreadable (" in log and "; remaking it" in log
    after = mtimes(out)
    assert after[bad.name] != before[bad.name]
    assert all(after[name] == t for name, t in before.items() if name != bad.name)
    assert np.array_equal(samples(out), samples(done))


def test_rerun_remakes_shards_of_another_request(tmp_path, tiny_ldm, done):
    out = copy_run(done, tmp_path / "s")
    subprocess.run(["cp", str(shard_path(out, 0)), str(shard_path(out, 1))], check=True)  # wrong images
    with h5py.File(shard_path(out, 2), "r+") as f:
        f.attrs["checkpoint_sha256"] = "0" * 64  # made by another checkpoint
    log = ok(sample(tiny_ldm, out))
    assert f"{shard_path(out, 1)}: first index 0, expected 2; remaking it" in log
    assert f"{shard_path(out, 2)}: made by checkpoint 000000000000, expected " in log
    assert np.array_equal(samples(out), samples(done))


def test_rerun_remakes_a_shard_with_the_wrong_image_count(tmp_path, tiny_ldm, done):
    out = copy_run(done, tmp_path / "s")
    path = shard_path(out, 0)
    with h5py.File(path, "r") as f:
        images, seeds, attrs = f["images"][:1], f["seed"][:1], dict(f.attrs)
    path.unlink()
    with h5py.File(path, "w") as f:
        f["images"], f["seed"] = images, seeds
        f.attrs.update(attrs)
    log = ok(sample(tiny_ldm, out))
    assert f"{path}: 1 images of 32x32, expected 2 of 32x32; remaking it" in log
    assert np.array_equal(samples(out), samples(done))


def test_merge_names_an_unreadable_shard_in_one_line(tmp_path, tiny_ldm, done):
    out = copy_run(done, tmp_path / "s")
    bad = shard_path(out, 2)
    truncate(bad)
    proc = sample(tiny_ldm, out, "--merge-only")
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"oasis_ldm.sampling: error: {bad}: unreadable (") and "\n" not in line
    assert line.endswith("; rerun the same sampling command to remake it")


# --- paired samples: masks beside the images ------------------------------------------------------


@pytest.fixture(scope="module")
def paired_done(tmp_path_factory, tiny_paired_ldm) -> Path:
    """A finished run of the tiny paired model; tests copy it before they damage it."""
    out = tmp_path_factory.mktemp("paired_done") / "s"
    ok(sample(tiny_paired_ldm, out))
    return out


def pairs(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(out / "samples.h5", "r") as f:
        return f["images"][:], f["masks"][:]


def test_paired_samples_carry_their_masks(paired_done, tiny_paired_ldm):
    images, masks = pairs(paired_done)
    assert masks.dtype == np.uint8 and masks.shape == images.shape == (6, 32, 32)
    assert set(np.unique(masks).tolist()) <= set(MASK_VALUES)
    with h5py.File(paired_done / "samples.h5", "r") as f:
        assert f.attrs["paired"] and tuple(f["masks"].attrs["values"]) == MASK_VALUES
    assert json.loads((paired_done / "request.json").read_text())["paired"] is True
    npz = np.load(paired_done / "samples.npz")
    assert sorted(npz.files) == ["arr_0", "masks"] and npz["masks"].shape == (6, 32, 32)
    assert np.array_equal(npz["arr_0"][..., 0], images) and np.array_equal(npz["masks"], masks)
    # Each pair is the one the model decodes from its image's seed: images 2 and 3 (shard 1).
    pipe, _ = load_pipeline(tiny_paired_ldm)
    seeds = [image_seed(REQUEST["seed"], i) for i in (2, 3)]
    image, mask = pipe.generate_pairs(seeds, "ddim", REQUEST["steps"], REQUEST["eta"])
    assert np.array_equal(image[:, 0].numpy(), images[2:4]) and np.array_equal(mask[:, 0].numpy(), masks[2:4])


def test_paired_samples_do_not_depend_on_the_number_of_workers(tmp_path, tiny_paired_ldm, paired_done):
    out = tmp_path / "two"
    for worker in (1, 0):
        ok(sample(tiny_paired_ldm, out, "--worker", str(worker), "--workers", "2"))
    merge(out)
    with h5py.File(shard_path(out, 1), "r") as f:
        assert (f.attrs["worker"], f.attrs["workers"]) == (1, 2)
    assert (out / "samples.h5").read_bytes() == (paired_done / "samples.h5").read_bytes()
    assert (out / "grid.png").read_bytes() == (paired_done / "grid.png").read_bytes()
    two, one = np.load(out / "samples.npz"), np.load(paired_done / "samples.npz")
    assert all(np.array_equal(two[key], one[key]) for key in ("arr_0", "masks"))


def test_rerun_remakes_shards_whose_masks_are_absent_cut_short_or_not_classes(tmp_path, tiny_paired_ldm, paired_done):
    out = copy_run(paired_done, tmp_path / "s")
    with h5py.File(shard_path(out, 0), "r+") as f:
        del f["masks"]  # written by a sampler that knew no masks
    with h5py.File(shard_path(out, 1), "r+") as f:
        first = f["masks"][:1]
        del f["masks"]
        f["masks"] = first  # one mask for two images
    with h5py.File(shard_path(out, 2), "r+") as f:
        f["masks"][0, 0, 0] = 3
    before = mtimes(out)
    log = ok(sample(tiny_paired_ldm, out))
    assert f"{shard_path(out, 0)}: no masks, expected a mask per image (the model is paired); remaking it" in log
    assert f"{shard_path(out, 1)}: masks of 1x32x32 uint8, expected 2x32x32 uint8; remaking it" in log
    assert f"{shard_path(out, 2)}: mask values outside (0, 85, 170, 255); remaking it" in log
    assert all(t != before[name] for name, t in mtimes(out).items())
    assert (out / "samples.h5").read_bytes() == (paired_done / "samples.h5").read_bytes()


def test_damaged_masks_and_masks_of_an_image_only_model_are_bad_shards(tmp_path, done, paired_done):
    paired = copy_run(paired_done, tmp_path / "paired")
    with h5py.File(shard_path(paired, 0), "r+") as f:
        f["masks"][0] = np.where(f["masks"][0] == 0, 85, 0)  # still four-class values
    assert read_shard(read_request(paired), paired, 0) == (None, "masks damaged (checksum mismatch)")
    with pytest.raises(ShardError, match=r"shard_00000\.h5: masks damaged \(checksum mismatch\); rerun the same"):
        merge(paired)  # and the merge refuses it
    image_only = copy_run(done, tmp_path / "image_only")
    with h5py.File(shard_path(image_only, 0), "r+") as f:
        f["masks"] = np.zeros((2, 32, 32), np.uint8)
    why = read_shard(read_request(image_only), image_only, 0)[1]
    assert why == "holds masks, expected none (the model is image-only)"


def test_a_model_whose_autoencoder_disagrees_with_its_config_is_refused(tmp_path, tiny_ldm):
    pipe, meta = load_pipeline(tiny_ldm)
    req = dataclasses.replace(request_for(meta, SamplingParams(num_samples=2)), paired=True)
    with pytest.raises(
        ShardError, match=r"last\.pt: its autoencoder does not decode masks, but its data\.masks is True$"
    ):
        generate_shards(pipe, req, tmp_path, 0, 1)
    assert not (tmp_path / "shards").exists()


def test_the_paired_grid_shows_each_slice_beside_its_mask_in_colour(paired_done):
    images, masks = pairs(paired_done)
    grid = np.asarray(Image.open(paired_done / "grid.png").convert("RGB"))
    size, pad = 32, 2  # one row of 6 pairs, each a slice and its mask side by side, 2 px apart
    assert grid.shape == (size + 2 * pad, 6 * (2 * size + pad) + pad, 3)
    for i in range(6):
        x = pad + i * (2 * size + pad)
        slice_tile, mask_tile = grid[pad : pad + size, x : x + size], grid[pad : pad + size, x + size : x + 2 * size]
        assert np.array_equal(slice_tile, np.repeat(images[i][..., None], 3, axis=-1))
        assert np.array_equal(mask_tile, MASK_COLOURS[to_labels(torch.from_numpy(masks[i])).numpy()])


def test_image_only_samples_stay_as_they_were(done):
    """No masks anywhere, no `paired` attribute, a greyscale grid: the files of before the paired mode."""
    with h5py.File(done / "samples.h5", "r") as f:
        assert sorted(f) == ["images", "seed"] and "paired" not in f.attrs
    with h5py.File(shard_path(done, 0), "r") as f:
        assert sorted(f) == ["images", "seed"] and "masks_sha256" not in f.attrs
    assert np.load(done / "samples.npz").files == ["arr_0"]
    grid = np.asarray(Image.open(done / "grid.png").convert("RGB")).astype(int)
    assert grid.shape == (32 + 4, 6 * 34 + 2, 3) and (grid == grid[..., :1]).all()
    assert json.loads((done / "request.json").read_text())["paired"] is False


# --- precision ------------------------------------------------------------------------------------


def test_precision_defaults_to_the_checkpoint_and_is_recorded(tmp_path, tiny_ldm, done):
    assert json.loads((done / "request.json").read_text())["precision"] == "fp32"  # tiny.yaml trains in fp32
    out = tmp_path / "bf16"
    ok(sample(tiny_ldm, out, "--precision", "bf16"))
    assert json.loads((out / "request.json").read_text())["precision"] == "bf16"
    with h5py.File(out / "samples.h5", "r") as f:
        assert f.attrs["precision"] == "bf16"
    with h5py.File(shard_path(out, 0), "r") as f:
        assert f.attrs["precision"] == "bf16"
    diff = np.abs(samples(out).astype(int) - samples(done).astype(int))
    assert 0 < diff.mean() < 2.0, diff.mean()  # bf16 really ran, and moved pixels by little


def test_bf16_sampling_is_close_to_fp32_and_independent_of_batch_size(tiny_ldm):
    pipe, _ = load_pipeline(tiny_ldm)
    seeds = [11, 12, 13, 14]

    def run(precision: str, batch: int) -> np.ndarray:
        parts = [pipe.generate(seeds[b : b + batch], "ddim", 5, 1.0, precision=precision) for b in range(0, 4, batch)]
        return torch.cat(parts).numpy().astype(int)

    bf16, fp32 = run("bf16", 4), run("fp32", 4)
    mean_abs = np.abs(bf16 - fp32).mean()
    assert 0 < mean_abs < 2.0, mean_abs  # out of 255
    # Convolutions sum in an order that depends on the batch size, in fp32 as in bf16, so a pixel
    # may round to the next level (measured on 16 images: 0 to 25 of 16,384 pixels). Shards fix
    # their batches, so workers agree bit for bit; other batch sizes agree to one level.
    for precision, whole in (("bf16", bf16), ("fp32", fp32)):
        diff = np.abs(run(precision, 1) - whole)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01, (precision, diff.max(), (diff > 0).mean())


# --- threads and --help -----------------------------------------------------------------------------


def one_cpu_env() -> dict[str, str]:
    env = quiet_env(SLURM_CPUS_PER_TASK="1")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(key, None)
    return env


def test_sampling_uses_the_cpus_slurm_gave_it(tmp_path, tiny_ldm):
    log = ok(sample(tiny_ldm, tmp_path / "s", env=one_cpu_env()))
    assert "torch threads: 1)" in log, log


def test_the_submitit_job_uses_the_cpus_slurm_gave_it(tmp_path, tiny_ldm):
    code = (
        "import sys; sys.path.insert(0, 'launch'); from sample import SampleJob, SamplingParams; "
        f"print(SampleJob({str(tiny_ldm)!r}, {str(tmp_path)!r}, "
        "SamplingParams(num_samples=2, steps=2), 'cpu', array_size=1)(0))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=one_cpu_env(), cwd=REPO, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "'threads': 1" in proc.stdout.splitlines()[-1], proc.stdout


def test_help_shows_every_default():
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", "--help"]
    text = " ".join(subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=True).stdout.split())
    for default in (
        "(default: 0)",
        "(default: ddim)",
        "(default: 50)",
        "(default: 0.0)",
        "(default: 32)",
        "(default: 256)",
        "(default: auto)",
        "(default: the checkpoint's train.precision)",
        "(default: from the SLURM or torchrun environment, else 0)",
    ):
        assert default in text, default
    assert "(default: None)" not in text
