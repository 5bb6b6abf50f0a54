"""tools/pack_h5.py: schema, ordering, round trip, every bad input, --splits/--verify/--overwrite."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import REPO, OasisTree, run_tool
from PIL import Image

import oasis_ldm
from oasis_ldm.data import schema
from oasis_ldm.data.oasis import list_splits
from oasis_ldm.data.pack import PackError, PackOptions, pack, read_png, verify_file


def _pack(tree: OasisTree, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return run_tool("pack_h5.py", "--src", tree.root, "--out", out, *flags)


def _assert_failed(result: subprocess.CompletedProcess, out: Path, names: str) -> None:
    """Non-zero exit, exactly one stderr line naming `names`, and nothing left behind."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pack_h5: error: ")
    assert names in lines[0]
    assert not out.exists()
    assert not out.with_name(out.name + ".partial").exists()


# ----------------------------------------------------------------------------- good input


def test_schema_names_dtypes_shapes_and_attrs(make_oasis, tmp_path):
    tree = make_oasis(slices=3, size=24)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        assert set(f) == {"train", "validate", "test"}
        for split in ("train", "validate", "test"):
            n = len(tree.rows(split))
            g = f[split]
            assert set(g) == {"images", "masks", "case_id", "slice_idx", "filename"}
            for name in ("images", "masks"):
                assert g[name].dtype == np.uint8 and g[name].shape == (n, 24, 24)
                assert g[name].chunks == (1, 24, 24)
                assert g[name].compression == "gzip"
            assert g["case_id"].dtype == np.int32 and g["case_id"].shape == (n,)
            assert g["slice_idx"].dtype == np.int32 and g["slice_idx"].shape == (n,)
            info = h5py.check_string_dtype(g["filename"].dtype)
            assert info.encoding == "utf-8" and info.length is None
            assert f.attrs[f"count_{split}"] == n
        assert f.attrs["schema_version"] == 1
        assert f.attrs["created_by"] == f"oasis-ldm pack_h5 {oasis_ldm.__version__}"
        assert f.attrs["compression"] == "gzip"
        train = np.stack([tree.images[("train", c, s)] for c, s in tree.rows("train")]).astype(np.float64)
        assert f.attrs["train_mean"] == pytest.approx(train.mean(), rel=1e-12)
        assert f.attrs["train_std"] == pytest.approx(train.std(), rel=1e-12)
    info = schema.inspect_file(out)
    assert info.splits["train"].count == 6 and info.splits["test"].has_masks


def test_rows_sorted_numerically_across_digit_widths(make_oasis, tmp_path):
    tree = make_oasis(cases={"train": [10, 9, 100]}, slices=12, size=8, width=1)
    # a second width for one case: case_0011 sorts after case_10 and before case_100
    make_oasis(cases={"train": [11]}, slices=2, size=8, width=4)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--splits", "train", "--workers", "0")
    assert result.returncode == 0, result.stderr
    with h5py.File(out, "r") as f:
        cases = f["train/case_id"][:].tolist()
        slices = f["train/slice_idx"][:].tolist()
        names = f["train/filename"].asstr()[:].tolist()
    expected = sorted([(c, s) for c in (9, 10, 100) for s in range(12)] + [(11, 0), (11, 1)])
    assert list(zip(cases, slices, strict=True)) == expected
    assert names[:3] == ["case_9_slice_0.nii.png", "case_9_slice_1.nii.png", "case_9_slice_2.nii.png"]
    assert names[11] == "case_9_slice_11.nii.png" and names[12] == "case_10_slice_0.nii.png"
    assert names[24] == "case_0011_slice_0.nii.png"


@pytest.mark.parametrize("compression", ["none", "lzf", "gzip"])
def test_round_trip_pixels(make_oasis, tmp_path, compression):
    tree = make_oasis(slices=4, size=20, seed=3)
    out = tmp_path / "o.h5"
    result = pack(tree.root, out, PackOptions(compression=compression, workers=0))
    assert result.counts == {"train": 8, "validate": 4, "test": 4}
    with h5py.File(out, "r") as f:
        for split in ("train", "validate", "test"):
            for row, (case, k) in enumerate(tree.rows(split)):
                np.testing.assert_array_equal(f[split]["images"][row], tree.images[(split, case, k)])
                np.testing.assert_array_equal(f[split]["masks"][row], tree.masks[(split, case, k)])


def test_split_without_seg_folder_has_no_masks(make_oasis, tmp_path):
    tree = make_oasis()
    shutil.rmtree(tree.mask_dir("test"))
    out = tmp_path / "o.h5"
    assert _pack(tree, out, "--workers", "0").returncode == 0
    with h5py.File(out, "r") as f:
        assert "masks" in f["train"] and "masks" not in f["test"]


def test_splits_subset(make_oasis, tmp_path):
    tree = make_oasis()
    shutil.rmtree(tree.image_dir("test"))  # not needed when not asked for
    out = tmp_path / "o.h5"
    assert _pack(tree, out, "--splits", "train,validate", "--workers", "0").returncode == 0
    with h5py.File(out, "r") as f:
        assert set(f) == {"train", "validate"}
        assert "count_test" not in f.attrs and "train_mean" in f.attrs
    only_val = tmp_path / "v.h5"
    assert _pack(tree, only_val, "--splits", "validate", "--workers", "0").returncode == 0
    with h5py.File(only_val, "r") as f:
        assert set(f) == {"validate"}
        assert "train_mean" not in f.attrs and "train_std" not in f.attrs


def test_verify_passes_and_detects_a_tampered_row(make_oasis, tmp_path):
    tree = make_oasis(size=16)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--verify", "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "verified" in result.stdout
    listings = list_splits(tree.root)
    crc = {}
    for listing in listings:
        rows = tree.rows(listing.split)
        crc[(listing.split, "images")] = np.array([zlib.crc32(tree.images[(listing.split, *r)]) for r in rows])
        crc[(listing.split, "masks")] = np.array([zlib.crc32(tree.masks[(listing.split, *r)]) for r in rows])
    verify_file(out, listings, crc)  # the untouched file passes
    with h5py.File(out, "r+") as f:
        f["validate/masks"][1, 3, 3] ^= 1
    with pytest.raises(PackError, match=r"seg_003_slice_1\.nii\.png: --verify"):
        verify_file(out, listings, crc)


def test_overwrite(make_oasis, tmp_path):
    tree = make_oasis(size=16)
    out = tmp_path / "o.h5"
    out.write_bytes(b"old")
    assert _pack(tree, out, "--overwrite", "--workers", "0").returncode == 0
    assert schema.inspect_file(out).splits["train"].count == 6
    # a failing run with --overwrite keeps the previous file
    (tree.image_dir("test") / "case_004_slice_0.nii.png").write_bytes(b"not a png")
    before = out.read_bytes()
    result = _pack(tree, out, "--overwrite", "--workers", "0")
    assert result.returncode != 0 and out.read_bytes() == before


def test_creates_missing_output_folders(make_oasis, tmp_path):
    tree = make_oasis(size=8)
    out = tmp_path / "a" / "b" / "o.h5"
    assert _pack(tree, out, "--workers", "0").returncode == 0 and out.is_file()
    bad = tmp_path / "c" / "d" / "o.h5"
    (tree.image_dir("train") / "case_001_slice_0.nii.png").write_bytes(b"")
    assert _pack(tree, bad, "--workers", "0").returncode != 0
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "mode,convert",
    [
        ("RGB", lambda g: np.stack([g, g, g], -1)),
        ("RGBA", lambda g: np.stack([g, g, g, np.full_like(g, 255)], -1)),
        ("LA", lambda g: np.stack([g, np.full_like(g, 255)], -1)),
        (None, lambda g: g.astype(np.uint16) * 257),  # 16-bit: the standard x257 expansion
        (None, lambda g: g.astype(np.uint16)),  # 16-bit holding values <= 255
    ],
)
def test_greyscale_in_other_png_modes_is_accepted(tmp_path, mode, convert):
    grey = np.random.default_rng(0).integers(0, 256, (9, 7), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(convert(grey), mode=mode).save(path)
    assert Image.open(path).mode == (mode or "I;16")
    np.testing.assert_array_equal(read_png(path), grey)


def test_palette_and_bilevel_pngs(tmp_path):
    grey = np.random.default_rng(1).integers(0, 256, (9, 7), dtype=np.uint8)
    Image.fromarray(grey).convert("P").save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_png(tmp_path / "p.png"), grey)
    Image.fromarray(grey > 127).save(tmp_path / "b.png")
    np.testing.assert_array_equal(read_png(tmp_path / "b.png"), np.where(grey > 127, 255, 0))


# ----------------------------------------------------------------------------- bad input


def _png(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    Image.fromarray(array, mode=mode).save(path)


def _colour(tree: OasisTree) -> str:
    path = tree.image_dir("validate") / "case_003_slice_2.nii.png"
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 200
    _png(path, rgb)
    return path.name


def _transparent(tree: OasisTree) -> str:
    path = tree.image_dir("train") / "case_002_slice_1.nii.png"
    _png(path, np.full((32, 32, 4), 100, np.uint8))
    return path.name


def _sixteen_bit(tree: OasisTree) -> str:
    path = tree.image_dir("test") / "case_004_slice_2.nii.png"
    _png(path, np.full((32, 32), 1000, np.uint16))
    return path.name


def _truncated(tree: OasisTree) -> str:
    path = tree.image_dir("test") / "case_004_slice_2.nii.png"  # the very last row: found while writing
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name


def _corrupt(tree: OasisTree) -> str:
    path = tree.mask_dir("validate") / "seg_003_slice_0.nii.png"
    data = bytearray(path.read_bytes())
    data[60:80] = b"\x00" * 20  # inside the compressed pixel data
    path.write_bytes(bytes(data))
    return path.name


def _not_png(tree: OasisTree) -> str:
    path = tree.image_dir("train") / "case_001_slice_0.nii.png"
    path.write_bytes(b"hello, not an image")
    return path.name


def _odd_size(tree: OasisTree) -> str:
    path = tree.image_dir("validate") / "case_003_slice_1.nii.png"
    _png(path, np.zeros((32, 31), np.uint8))
    return path.name


def _mask_size(tree: OasisTree) -> str:
    path = tree.mask_dir("train") / "seg_002_slice_2.nii.png"
    _png(path, np.zeros((16, 16), np.uint8))
    return path.name


def _no_mask(tree: OasisTree) -> str:
    (tree.mask_dir("validate") / "seg_003_slice_1.nii.png").unlink()
    return "case_003_slice_1.nii.png"


def _no_image(tree: OasisTree) -> str:
    (tree.image_dir("train") / "case_001_slice_2.nii.png").unlink()
    return "seg_001_slice_2.nii.png"


def _bad_name(tree: OasisTree) -> str:
    path = tree.image_dir("test") / "case_004_slice_x.nii.png"
    path.write_bytes(b"")
    return path.name


def _stray_file(tree: OasisTree) -> str:
    (tree.mask_dir("train") / "notes.txt").write_text("hi")
    return "notes.txt"


def _missing_split(tree: OasisTree) -> str:
    shutil.rmtree(tree.image_dir("validate"))
    return "keras_png_slices_validate"


def _empty_split(tree: OasisTree) -> str:
    for folder in (tree.image_dir("test"), tree.mask_dir("test")):
        shutil.rmtree(folder)
        folder.mkdir()
    return "keras_png_slices_test"


def _duplicate(tree: OasisTree) -> str:
    src = tree.image_dir("train") / "case_001_slice_0.nii.png"
    shutil.copy(src, tree.image_dir("train") / "case_1_slice_0.nii.png")
    return "case_1_slice_0.nii.png"


BAD_INPUTS = {
    "colour": _colour,
    "transparent": _transparent,
    "16-bit": _sixteen_bit,
    "truncated": _truncated,
    "corrupt": _corrupt,
    "not-png": _not_png,
    "odd-size": _odd_size,
    "mask-size": _mask_size,
    "image-without-mask": _no_mask,
    "mask-without-image": _no_image,
    "bad-name": _bad_name,
    "stray-file": _stray_file,
    "missing-split": _missing_split,
    "empty-split": _empty_split,
    "duplicate-case-slice": _duplicate,
}


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(make_oasis, tmp_path, case, workers):
    if workers == "2" and case not in ("truncated", "corrupt", "odd-size", "colour"):
        return  # listing errors never reach the workers; decode errors are run both ways
    tree = make_oasis()
    named = BAD_INPUTS[case](tree)
    out = tmp_path / "out.h5"
    _assert_failed(_pack(tree, out, "--workers", workers), out, named)


def test_existing_output_needs_overwrite(make_oasis, tmp_path):
    tree = make_oasis(size=8)
    out = tmp_path / "o.h5"
    out.write_bytes(b"keep me")
    result = _pack(tree, out)
    assert result.returncode != 0 and str(out) in result.stderr and "--overwrite" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert out.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--splits", "train,bogus"], "--splits"),
        (["--splits", "train,train"], "--splits"),
        (["--workers", "-1"], "--workers"),
    ],
)
def test_bad_flags(make_oasis, tmp_path, flags, named):
    tree = make_oasis(size=8)
    out = tmp_path / "o.h5"
    _assert_failed(_pack(tree, out, *flags), out, named)


def test_missing_src(tmp_path):
    out = tmp_path / "o.h5"
    result = run_tool("pack_h5.py", "--src", tmp_path / "nope", "--out", out)
    _assert_failed(result, out, str(tmp_path / "nope"))


def test_help_documents_every_flag():
    text = run_tool("pack_h5.py", "--help").stdout
    for flag in ("--src", "--out", "--splits", "--compression", "--workers", "--verify", "--overwrite"):
        assert flag in text


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_leaves_nothing(tmp_path, signum):
    """Ctrl-C or scancel while writing: no output and no partial file remain."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    images, masks = src / "keras_png_slices_train", src / "keras_png_slices_seg_train"
    images.mkdir(parents=True)
    masks.mkdir()
    _png(tmp_path / "i.png", rng.integers(0, 256, (256, 256), dtype=np.uint8))
    _png(tmp_path / "m.png", rng.integers(0, 256, (256, 256), dtype=np.uint8))
    for case in range(100):  # 3,200 hard-linked pairs: seconds of work, interrupted at once
        for k in range(32):
            os.link(tmp_path / "i.png", images / f"case_{case:03d}_slice_{k}.nii.png")
            os.link(tmp_path / "m.png", masks / f"seg_{case:03d}_slice_{k}.nii.png")
    out = tmp_path / "o.h5"
    partial = tmp_path / "o.h5.partial"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, str(REPO / "tools" / "pack_h5.py"), "--src", str(src), "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--splits", "train", "--workers", "2"], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not partial.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert partial.exists(), "packing finished before it could be interrupted"
    time.sleep(0.2)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert b"interrupted" in stderr
    assert not out.exists() and not partial.exists()
