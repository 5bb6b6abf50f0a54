"""tools/evaluate.py: report keys, pictures, TensorBoard logging and one-line errors."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import REPO, blob_images, quiet_env
from jobs import sample_args
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from oasis_ldm.evaluation import OUTLINE_RGB, evaluate_samples, side_by_side

pytestmark = pytest.mark.slow
BRAIN_KEYS = {"ssim_brain", "psnr_brain", "brain_fraction", "n_brain", "region"}
NN_BRAIN_KEYS = {
    "nn_ssim_brain_mean",
    "nn_ssim_brain_p10",
    "nn_ssim_brain_p50",
    "nn_ssim_brain_p90",
    "nn_ssim_brain_frac_above_0.6",
    "nn_psnr_mean",
    "nn_psnr_brain_mean",
    "nn_brain_fraction",
    "nn_n_brain",
    "region",
}
MASK_LEVEL = 60  # masks of the fixture: brain where a blob is brighter than this (less than its foreground)


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory, tiny_ldm) -> Path:
    out = tmp_path_factory.mktemp("samples") / "s"
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", *sample_args(tiny_ldm, out, n=6), "--workers", "1"]
    subprocess.run(cmd, check=True, capture_output=True, env=quiet_env(), cwd=REPO, timeout=300)
    return out / "samples.h5"


@pytest.fixture(scope="module")
def masked_h5(tmp_path_factory) -> Path:
    """A packed file of smooth 32x32 blobs with masks (255 above MASK_LEVEL): 8 train, 4 validate, 4 test."""
    from oasis_ldm.data.pack import PackOptions, pack

    root = tmp_path_factory.mktemp("masked")
    for s, (split, n) in enumerate({"train": 8, "validate": 4, "test": 4}.items()):
        images, masks = root / "src" / f"keras_png_slices_{split}", root / "src" / f"keras_png_slices_seg_{split}"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i, image in enumerate(blob_images(n, 32, seed=10 + s)):
            name = f"{100 * s + i // 4:03d}_slice_{i % 4}.nii.png"
            Image.fromarray(image).save(images / f"case_{name}")
            Image.fromarray(np.where(image > MASK_LEVEL, 255, 0).astype(np.uint8)).save(masks / f"seg_{name}")
    pack(root / "src", root / "masked.h5", PackOptions(workers=0, progress=False))
    return root / "masked.h5"


def write_samples(path: Path, images: np.ndarray) -> Path:
    """A samples.h5 as the sampler writes it, minus the provenance: uint8 (N, H, W) images and their size."""
    with h5py.File(path, "w") as f:
        f["images"] = images
        f.attrs["image_size"] = images.shape[-1]
    return path


def test_reconstruction_report(tmp_path, tiny_h5, tiny_vae):
    out = evaluate(
        "--data", tiny_h5, "--split", "test", "--vae-ckpt", tiny_vae, "--out", tmp_path / "r.json", "--tb", tiny_vae
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"psnr", "ssim", "ms_ssim", "n"} <= set(report)
    assert report["n"] == 4 and 0 < report["ssim"] <= 1 and report["psnr"] > 0
    assert set(report) >= BRAIN_KEYS and report["region"] == "foreground"  # tiny_h5 has no masks
    assert report["n_brain"] == 4 and 0 < report["brain_fraction"] < 1 and 0 < report["ssim_brain"] <= 1
    assert (tmp_path / "r.png").exists()
    events = EventAccumulator(str(tiny_vae / "tb"))
    events.Reload()
    for key in ("psnr", "ssim_brain", "psnr_brain", "brain_fraction"):
        assert f"eval_reconstruction/{key}" in events.Tags()["scalars"]
    assert "eval_reconstruction/side_by_side" in events.Tags()["images"]


def test_reconstruction_brain_region_comes_from_the_masks(tmp_path, masked_h5, tiny_vae):
    out = evaluate("--data", masked_h5, "--split", "test", "--vae-ckpt", tiny_vae, "--out", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    with h5py.File(masked_h5, "r") as f:
        masks, images = f["test/masks"][:], f["test/images"][:]
    assert report["region"] == "masks"
    assert report["brain_fraction"] == pytest.approx((masks > 0).mean())
    assert report["brain_fraction"] < (images > 10).mean()  # the masks, not the (larger) foreground


def test_samples_report(tmp_path, tiny_h5, tiny_samples):
    out = evaluate("--data", tiny_h5, "--split", "train", "--samples", tiny_samples, "--out", tmp_path / "s.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert {"nn_ssim_mean", "nn_ssim_p10", "diversity_ms_ssim", "real_diversity_ms_ssim", "n"} <= set(report)
    assert report["n"] == 6 and len(report["neighbours"]) == 6
    assert report["nn_ssim_p10"] <= report["nn_ssim_mean"] <= 1
    assert {"case_id", "slice_idx", "ssim", "ssim_brain"} == set(report["neighbours"][0])
    assert set(report) >= NN_BRAIN_KEYS and report["region"] == "foreground"
    assert report["nn_ssim_brain_p10"] <= report["nn_ssim_brain_mean"] <= 1
    assert "fid" not in report  # only with --inception-weights
    assert (tmp_path / "s.png").exists()


def test_samples_that_differ_only_outside_the_brain_score_perfectly_inside(tmp_path, masked_h5):
    with h5py.File(masked_h5, "r") as f:
        train, masks = f["train/images"][:4], f["train/masks"][:4]
    brain = torch.from_numpy(masks > 0)[:, None].float()
    near = torch.nn.functional.max_pool2d(brain, 13, stride=1, padding=6)[:, 0].numpy() > 0  # SSIM's window reach
    copies = np.where(near, train, 200).astype(np.uint8)  # the same brains on a bright background
    samples = write_samples(tmp_path / "samples.h5", copies)
    out = evaluate("--data", masked_h5, "--split", "train", "--samples", samples, "--out", tmp_path / "s.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert report["region"] == "masks"
    assert [(n["case_id"], n["slice_idx"]) for n in report["neighbours"]] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert all(n["ssim_brain"] == 1.0 and n["ssim"] < 0.9 for n in report["neighbours"])
    assert report["nn_psnr_brain_mean"] == 100.0  # identical inside: the PSNR cap
    assert report["nn_psnr_mean"] < 20
    assert report["nn_brain_fraction"] == pytest.approx((masks > 0).mean())


def test_samples_report_with_inception_weights(tmp_path, tiny_h5, tiny_samples):
    import torch
    import torchvision

    weights = tmp_path / "inception.pth"
    net = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    torch.save(net.state_dict(), weights)  # random weights in torchvision's format: shapes only
    out = evaluate(
        "--data",
        tiny_h5,
        "--split",
        "train",
        "--samples",
        tiny_samples,
        "--out",
        tmp_path / "s.json",
        "--inception-weights",
        weights,
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert np.isfinite(report["fid"]) and np.isfinite(report["kid"])


def one_line_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_errors_are_one_line(tmp_path, tiny_h5, tiny_vae, tiny_ldm, tiny_samples):
    common = ["--data", tiny_h5, "--out", tmp_path / "x.json"]
    one_line_error(evaluate(*common, "--split", "tset", "--vae-ckpt", tiny_vae), "--split 'tset'")
    no_test = tmp_path / "no_test.h5"
    with h5py.File(tiny_h5, "r") as src, h5py.File(no_test, "w") as dst:
        for name in ("train", "validate"):
            src.copy(src[name], dst, name)
        dst.attrs.update(src.attrs)
    one_line_error(
        evaluate("--data", no_test, "--split", "test", "--vae-ckpt", tiny_vae, "--out", tmp_path / "x.json"),
        "no split 'test'",
    )
    one_line_error(evaluate(*common, "--split", "test", "--vae-ckpt", tiny_ldm), "the ldm stage's checkpoint")
    bigger = tmp_path / "big.h5"
    with h5py.File(bigger, "w") as f:
        f.create_dataset("images", data=np.zeros((4, 48, 48), np.uint8))  # no record of its model's size
    one_line_error(evaluate(*common, "--split", "train", "--samples", bigger), "samples are 48x48", "at 32x32")
    one_line_error(
        evaluate(
            *common, "--split", "train", "--samples", tiny_samples, "--inception-weights", tmp_path / "missing.pth"
        ),
        "--inception-weights",
    )
    assert not (tmp_path / "x.json").exists()


def test_help_documents_every_flag():
    out = evaluate("--help")
    assert out.returncode == 0
    for flag in (
        "--data",
        "--split",
        "--vae-ckpt",
        "--samples",
        "--out",
        "--inception-weights",
        "--tb",
        "--batch-size",
        "--max-pairs",
        "--top-k",
        "--seed",
        "--device",
    ):
        assert flag in out.stdout


def test_report_records_threads_sized_from_the_job(tmp_path, tiny_h5):
    samples = write_samples(tmp_path / "samples.h5", blob_images(4, 32, seed=3))
    slurm = {"SLURM_CPUS_PER_TASK": "1"}  # torch's default on this machine would be one thread per core
    for extra, expected in ((slurm, 1), ({**slurm, "OMP_NUM_THREADS": "2"}, 2)):  # the user's choice wins
        env = quiet_env(**extra)
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if name not in extra:
                env.pop(name, None)
        cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), "--data", str(tiny_h5), "--split", "train"]
        cmd += ["--samples", str(samples), "--out", str(tmp_path / "s.json")]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads((tmp_path / "s.json").read_text())["torch_threads"] == expected, extra


def test_help_shows_every_default():
    text = " ".join(evaluate("--help").stdout.split()).split(" options: ")[1]  # past the usage line
    entries = dict(re.findall(r"(--[a-z-]+) (?:[A-Z_]+|\{[a-z,]+\}) (.*?)(?= --[a-z]|$)", text))
    required = {"--data", "--out", "--vae-ckpt", "--samples"}  # --vae-ckpt or --samples is required
    optional = {flag: help for flag, help in entries.items() if flag not in required}
    assert len(optional) == 9, sorted(optional)
    for flag, help in optional.items():
        assert "(default: " in help, (flag, help)
    assert "(default: test)" in optional["--split"]
    assert "(default: auto)" in optional["--device"] and "(default: 16)" in optional["--top-k"]


def test_picture_enlarges_small_slices_and_outlines_the_real_brain():
    left = torch.from_numpy(blob_images(3, 32, seed=4))[:, None]
    right = (left.float() * 0.5).to(torch.uint8)
    region = torch.zeros(left.shape, dtype=torch.bool)
    region[:, :, 8:24, 10:20] = True
    picture = side_by_side(left, right, region, per_row=2)
    factor, tile = 8, 256  # 32 px slices are shown at 256 px; pairs 0 and 1 in the first row, 2 below
    assert picture.shape == (3, 2 * (tile + 2) + 2, 4 * (tile + 2) + 2) and picture.dtype == torch.uint8
    for row in range(3):
        for col in range(2):
            y0, x0 = 2 + (row // 2) * (tile + 2), 2 + (2 * (row % 2) + col) * (tile + 2)
            rgb = picture[:, y0 : y0 + tile, x0 : x0 + tile]
            amber = (rgb == torch.tensor(OUTLINE_RGB, dtype=torch.uint8)[:, None, None]).all(0)
            inside = region[row, 0].repeat_interleave(factor, 0).repeat_interleave(factor, 1)
            ring = torch.nn.functional.max_pool2d(inside[None].float(), 3, 1, 1)[0] > 0
            assert torch.equal(amber, ring & ~inside)  # a one-pixel line just outside, nothing hidden
            shown = right if col else left
            expected = shown[row, 0].repeat_interleave(factor, 0).repeat_interleave(factor, 1)
            assert torch.equal(rgb[0][~amber], expected[~amber])


@pytest.mark.cuda
def test_samples_report_is_the_same_on_cpu_and_gpu(tmp_path, masked_h5, tiny_h5):
    """cuDNN's default TF32 convolutions would move SSIM by up to 0.007 per image; the report must not move."""
    samples = write_samples(tmp_path / "samples.h5", blob_images(6, 32, seed=5))
    for data in (masked_h5, tiny_h5):  # masks and foreground
        cpu, cpu_picture = evaluate_samples(samples, data, "train", device="cpu")
        gpu, gpu_picture = evaluate_samples(samples, data, "train", device="cuda")
        assert cpu["neighbours"] == gpu["neighbours"]
        for key, value in cpu.items():
            if isinstance(value, float):
                assert gpu[key] == pytest.approx(value, abs=1e-5), key
        assert torch.equal(cpu_picture, gpu_picture)


def write_paired_samples(path: Path, images: np.ndarray, masks: np.ndarray) -> Path:
    """A paired model's samples.h5: images and masks, uint8 (N, H, W)."""
    write_samples(path, images)
    with h5py.File(path, "a") as f:
        f["masks"] = masks
        f.attrs["paired"] = True
    return path


def test_segmentation_report_of_paired_samples(tmp_path, tiny_paired_h5):
    """Real validate pairs stand in for samples: they teach a segmenter about as well as real train
    pairs; the same slices with shuffled masks teach it far less, and agree far less."""
    from oasis_ldm.data.dataset import OasisH5Dataset

    val = OasisH5Dataset(tiny_paired_h5, "validate", raw=True)
    images, masks = val.read_raw(range(len(val)))[:, 0].numpy(), val.read_raw(range(len(val)), mask=True)[:, 0].numpy()
    good = write_paired_samples(tmp_path / "good.h5", images, masks)
    bad = write_paired_samples(tmp_path / "bad.h5", images, masks[::-1].copy())
    reports = {}
    for name, samples in (("good", good), ("bad", bad)):
        out = evaluate("--data", tiny_paired_h5, "--split", "train", "--samples", samples, "--segmentation",
                       "--seg-steps", "120", "--out", tmp_path / f"{name}.json", "--tb", tmp_path)  # fmt: skip
        assert out.returncode == 0, out.stderr
        reports[name] = json.loads((tmp_path / f"{name}.json").read_text())
    good_report, bad_report = reports["good"], reports["bad"]
    keys = {"seg_dice_real", "seg_dice_real_full", "seg_dice_synthetic", "seg_dice_mixed", "seg_dice_per_class"}
    assert keys | {"tstr_ratio", "mask_agreement"} <= set(good_report)
    assert set(good_report["seg_dice_per_class"]["synthetic"]) == {"csf", "grey_matter", "white_matter"}
    assert good_report["tstr_ratio"] > 0.8 and good_report["mask_agreement"] > 0.6
    assert bad_report["tstr_ratio"] < good_report["tstr_ratio"] - 0.2
    assert bad_report["mask_agreement"] < good_report["mask_agreement"] - 0.2
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"eval_samples/tstr_ratio", "eval_samples/seg_dice_per_class/synthetic/csf"} <= set(events.Tags()["scalars"])


def test_segmentation_needs_paired_samples_and_says_so(tmp_path, tiny_paired_h5, tiny_h5):
    plain = write_samples(tmp_path / "plain.h5", np.zeros((2, 32, 32), np.uint8))
    out = evaluate(
        "--data", tiny_paired_h5, "--split", "train", "--samples", plain, "--segmentation", "--out", tmp_path / "r.json"
    )
    one_line_error(out, "holds no masks; --segmentation needs samples of a paired model")
    paired = write_paired_samples(tmp_path / "p.h5", np.zeros((2, 32, 32), np.uint8), np.zeros((2, 32, 32), np.uint8))
    out = evaluate(
        "--data", tiny_h5, "--split", "train", "--samples", paired, "--segmentation", "--out", tmp_path / "r.json"
    )
    one_line_error(out, "split 'train' has no masks")
    out = evaluate("--data", tiny_h5, "--vae-ckpt", "x", "--segmentation", "--out", tmp_path / "r.json")
    assert out.returncode == 2 and "--segmentation needs --samples" in out.stderr


def test_a_paired_autoencoder_is_judged_on_its_slices_and_masks(tmp_path, tiny_paired_h5, tiny_paired_ldm):
    """A paired VAE encodes slice + mask: the report scores its slices and its decoded masks."""
    vae = tiny_paired_ldm.parent / "vae"
    out = evaluate("--data", tiny_paired_h5, "--split", "test", "--vae-ckpt", vae, "--out", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["region"] == "masks" and 0 < report["ssim_brain"] <= 1
    assert 0 <= report["mask_dice"] <= 1
    assert (tmp_path / "r.png").exists()
