"""tools/evaluate.py: report keys, pictures, TensorBoard logging and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, quiet_env
from jobs import sample_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = pytest.mark.slow


def evaluate(*args: str | Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "tools" / "evaluate.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def tiny_samples(tmp_path_factory, tiny_ldm) -> Path:
    out = tmp_path_factory.mktemp("samples") / "s"
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", *sample_args(tiny_ldm, out, n=6), "--workers", "1"]
    subprocess.run(cmd, check=True, capture_output=True, env=quiet_env(), cwd=REPO, timeout=300)
    return out / "samples.h5"


def test_reconstruction_report(tmp_path, tiny_h5, tiny_vae):
    out = evaluate(
        "--data", tiny_h5, "--split", "test", "--vae-ckpt", tiny_vae, "--out", tmp_path / "r.json", "--tb", tiny_vae
    )
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"psnr", "ssim", "ms_ssim", "n"} <= set(report)
    assert report["n"] == 4 and 0 < report["ssim"] <= 1 and report["psnr"] > 0
    assert (tmp_path / "r.png").exists()
    events = EventAccumulator(str(tiny_vae / "tb"))
    events.Reload()
    assert "eval_reconstruction/psnr" in events.Tags()["scalars"]
    assert "eval_reconstruction/side_by_side" in events.Tags()["images"]


def test_samples_report(tmp_path, tiny_h5, tiny_samples):
    out = evaluate("--data", tiny_h5, "--split", "train", "--samples", tiny_samples, "--out", tmp_path / "s.json")
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "s.json").read_text())
    assert {"nn_ssim_mean", "nn_ssim_p10", "diversity_ms_ssim", "real_diversity_ms_ssim", "n"} <= set(report)
    assert report["n"] == 6 and len(report["neighbours"]) == 6
    assert report["nn_ssim_p10"] <= report["nn_ssim_mean"] <= 1
    assert {"case_id", "slice_idx", "ssim"} == set(report["neighbours"][0])
    assert "fid" not in report  # only with --inception-weights
    assert (tmp_path / "s.png").exists()


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
