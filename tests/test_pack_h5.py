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
from conftest import REPO, OasisTree, run_tool, write_tree
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
    assert (
        _pack(tree, out, "--splits", "test", "--workers", "0").returncode == 0
    )  # pack_h5's: --overwrite may replace it
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


def _mask_values(tree: OasisTree) -> str:
    path = tree.mask_dir("train") / "seg_002_slice_1.nii.png"
    mask = tree.masks[("train", 2, 1)].copy()
    mask[0, 0], mask[5, 7], mask[9, 9] = 100, 3, 100  # two values that are no tissue class
    _png(path, mask)
    return path.name


def _dangling_link(tree: OasisTree) -> str:
    path = tree.image_dir("validate") / "case_003_slice_1.nii.png"
    path.unlink()
    path.symlink_to(tree.root / "moved_away.png")
    return path.name


def _same_case_in_two_splits(tree: OasisTree) -> str:
    write_tree(tree.root, cases={"test": [3]}, width=1)  # case_3 of test is case_003 of validate
    return "case_3_slice_0.nii.png"


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
    "mask-values": _mask_values,
    "dangling-symlink": _dangling_link,
    "case-in-two-splits": _same_case_in_two_splits,
}

DECODE_ERRORS = ("truncated", "corrupt", "odd-size", "colour", "mask-values")


@pytest.mark.parametrize("workers", ["0", "2"])
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_cleanly(make_oasis, tmp_path, case, workers):
    if workers == "2" and case not in DECODE_ERRORS:
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
    out = tmp_path / "o.h5"
    partial = tmp_path / "o.h5.partial"
    proc = _start_pack(_hardlinked_split(tmp_path, cases=100), out, workers=2)  # seconds of work
    _wait_for_workers(proc, 2, out)
    proc.send_signal(signum)
    result = _finish(proc)
    assert result.returncode == 130, result.stderr
    assert "interrupted" in result.stderr
    assert not out.exists() and not partial.exists()


# ----------------------------------------------------------------------------- masks, leakage, links


def test_mask_values_outside_the_classes_are_named(make_oasis, tmp_path):
    tree = make_oasis()
    named = _mask_values(tree)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "0")
    _assert_failed(result, out, f"{tree.mask_dir('train') / named}: mask values 3, 100 ")
    assert ", ".join(map(str, schema.MASK_VALUES)) in result.stderr


def test_many_bad_mask_values_show_a_few(make_oasis, tmp_path):
    tree = make_oasis()
    path = tree.mask_dir("test") / "seg_004_slice_0.nii.png"
    _png(path, np.arange(32 * 32, dtype=np.uint16).reshape(32, 32).astype(np.uint8))  # all 256 values
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "0")
    _assert_failed(result, out, f"{path}: mask values 1, 2, 3, 4, 5, ... (252 values) ")


def test_case_in_two_splits_is_refused_before_any_pixel_is_read(make_oasis, tmp_path):
    tree = make_oasis()
    write_tree(tree.root, cases={"test": [3]}, width=1)
    _not_png(tree)  # a decoding error that would be found later, were pixels read
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "0")
    test_file = tree.image_dir("test") / "case_3_slice_0.nii.png"
    validate_file = tree.image_dir("validate") / "case_003_slice_0.nii.png"
    _assert_failed(result, out, f"{test_file}: case 3 is in split test and in split validate ({validate_file})")


def test_case_in_two_splits_matters_only_among_the_packed_splits(make_oasis, tmp_path):
    tree = make_oasis()
    write_tree(tree.root, cases={"test": [3]}, width=1)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "0", "--splits", "train,test")
    assert result.returncode == 0, result.stderr


def test_dangling_symlink_is_named_as_such(make_oasis, tmp_path):
    tree = make_oasis()
    named = _dangling_link(tree)
    out = tmp_path / "o.h5"
    result = _pack(tree, out, "--workers", "0")
    _assert_failed(result, out, f"{tree.image_dir('validate') / named}: dangling symbolic link")
    assert "moved_away.png" in result.stderr


def test_symlink_to_a_png_is_packed(make_oasis, tmp_path):
    tree = make_oasis()
    path = tree.image_dir("train") / "case_002_slice_1.nii.png"
    elsewhere = tmp_path / "elsewhere.png"
    path.rename(elsewhere)
    path.symlink_to(elsewhere)
    out = tmp_path / "o.h5"
    assert _pack(tree, out, "--workers", "0").returncode == 0
    with h5py.File(out, "r") as f:
        row = tree.rows("train").index((2, 1))
        assert f["train/filename"].asstr()[row] == path.name
        np.testing.assert_array_equal(f["train/images"][row], tree.images[("train", 2, 1)])


# ----------------------------------------------------------------------------- where OUT cannot go


def _read_only_mount_works(folder: Path) -> bool:
    """Whether this host lets us mount a read-only tmpfs in a private mount namespace."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o ro none "$1"', "sh", str(folder)],
        capture_output=True,
    )
    return probe.returncode == 0


@pytest.mark.parametrize("sub", ["o.h5", "new/o.h5"])
def test_out_on_a_read_only_mount(make_oasis, tmp_path, sub):
    tree = make_oasis(size=8)
    mount = tmp_path / "ro"
    mount.mkdir()
    # Fails, never skips: the project's machines run as root with unshare (a skip would hide
    # that the read-only case was never exercised).
    assert _read_only_mount_works(mount), "cannot mount a read-only tmpfs here (needs unshare and CAP_SYS_ADMIN)"
    out = mount / sub
    pack_cmd = [sys.executable, str(REPO / "tools" / "pack_h5.py"), "--src", str(tree.root), "--out", str(out)]
    script = 'mount -t tmpfs -o ro none "$1" && shift && exec "$@"'
    cmd = ["unshare", "--mount", "sh", "-c", script, "sh", str(mount), *pack_cmd, "--workers", "0"]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    _assert_failed(result, out, f"{out}: cannot write here (Read-only file system)")


def _under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path / "notes.txt" / "o.h5"


def _deep_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("a file, not a folder")
    return tmp_path / "notes.txt" / "sub" / "o.h5"


@pytest.mark.parametrize(
    "where,reason",
    [
        (_under_a_file, "Not a directory"),
        (_deep_under_a_file, "Not a directory"),
        (lambda tmp_path: Path("/proc/oasis_ldm_pack_test.h5"), "No such file or directory"),
    ],
)
def test_out_that_cannot_be_created_fails_before_decoding(make_oasis, tmp_path, where, reason):
    tree = make_oasis(size=8)
    _not_png(tree)  # the very first image: decoded first, so reported first were OUT not checked before
    out = where(tmp_path)
    result = _pack(tree, out, "--workers", "0")
    _assert_failed(result, out, f"{out}: cannot write here ({reason})")
    assert result.stderr.startswith(f"pack_h5: error: {out}:")


def test_write_failing_midway_is_one_line(make_oasis, tmp_path):
    """A real short write: the file-size limit (`ulimit -f`) ends the pack partway (EFBIG)."""
    import resource

    tree = make_oasis(size=64)
    out = tmp_path / "o.h5"
    limit = 16 * 1024  # far below the ~60 KiB the file needs

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, str(REPO / "tools" / "pack_h5.py"), "--src", str(tree.root), "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1")
    result = subprocess.run(
        [*cmd, "--workers", "0"], capture_output=True, text=True, env=env, timeout=120, preexec_fn=small_files
    )
    _assert_failed(result, out, f"{out}: write failed (File too large)")


# ----------------------------------------------------------------------------- worker lifetime


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, parent pid, start time, CPU ticks used) of a process from /proc, or None when gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces
    return fields[0], int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _wait_until_blocked(pids: list[int], timeout: float = 60) -> None:
    """Until none of `pids` uses CPU any more (for a worker with work queued: blocked sending)."""
    deadline = time.monotonic() + timeout
    before = [_proc_stat(p)[3] for p in pids]
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = [_proc_stat(p)[3] for p in pids]
        if now == before:
            return
        before = now
    raise AssertionError("the workers never stopped working")


def _children(pid: int) -> dict[int, int]:
    """pid -> start time of every live child of `pid` (a /proc scan: no psutil needed)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found[int(entry.name)] = stat[2]
    return found


def _alive(pid: int, started: int) -> bool:
    """Still running (a zombie awaiting its reaper counts as gone; a reused pid too)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] != "Z" and stat[2] == started


def _hardlinked_split(tmp_path: Path, cases: int) -> Path:
    """A train split of `cases` x 32 random 256x256 pairs, hard links of one pair: seconds to pack."""
    rng = np.random.default_rng(0)
    src = tmp_path / "src"
    images, masks = src / "keras_png_slices_train", src / "keras_png_slices_seg_train"
    images.mkdir(parents=True)
    masks.mkdir()
    _png(tmp_path / "i.png", rng.integers(0, 256, (256, 256), dtype=np.uint8))
    _png(tmp_path / "m.png", np.asarray(schema.MASK_VALUES, np.uint8)[rng.integers(0, 4, (256, 256))])
    for case in range(cases):
        for k in range(32):
            os.link(tmp_path / "i.png", images / f"case_{case:03d}_slice_{k}.nii.png")
            os.link(tmp_path / "m.png", masks / f"seg_{case:03d}_slice_{k}.nii.png")
    return src


def _start_pack(src: Path, out: Path, workers: int) -> subprocess.Popen:
    """The pack in a process group of its own (as srun starts it), so a test can signal all of it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(REPO / "tools" / "pack_h5.py"), "--src", str(src), "--out", str(out)]
    args = [*cmd, "--splits", "train", "--workers", str(workers)]
    return subprocess.Popen(args, env=env, stderr=subprocess.PIPE, start_new_session=True)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> subprocess.CompletedProcess:
    """Wait for the pack; a hang is a failure, and kills what is left of its process group."""
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the pack hung for {timeout} s") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr.decode())


def _wait_for_workers(proc: subprocess.Popen, n: int, out: Path) -> dict[int, int]:
    """The pack's `n` workers, once they exist and decoding has begun."""
    partial = out.with_name(out.name + ".partial")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= n and partial.exists():
            time.sleep(0.3)  # well into decoding
            return workers
        time.sleep(0.01)
    raise AssertionError("the pack ended before its workers could be seen")


@pytest.mark.slow
def test_workers_die_with_a_killed_parent(tmp_path):
    """SIGKILL (as the OOM killer sends) on the parent: no decoding worker stays behind."""
    out = tmp_path / "o.h5"
    proc = _start_pack(_hardlinked_split(tmp_path, cases=100), out, workers=2)
    workers = _wait_for_workers(proc, 2, out)
    try:
        proc.kill()
        proc.wait(timeout=30)  # not communicate(): surviving workers would hold its stderr open
        proc.stderr.close()
        deadline = time.monotonic() + 5
        while any(_alive(p, t) for p, t in workers.items()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p, t in workers.items() if _alive(p, t)], "workers outlived their parent"
    finally:
        for pid, started in workers.items():  # never leave our own strays running
            if _alive(pid, started):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])  # SIGKILL: OOM
def test_a_killed_worker_fails_the_pack_in_one_line(tmp_path, signum):
    out = tmp_path / "o.h5"
    proc = _start_pack(_hardlinked_split(tmp_path, cases=100), out, workers=2)
    workers = _wait_for_workers(proc, 2, out)
    victim = min(workers)
    os.kill(victim, signum)
    result = _finish(proc)
    named = f"{out}: not written: worker process {victim} was killed by {signal.Signals(signum).name}"
    _assert_failed(result, out, named)
    assert result.returncode == 1
    assert not _alive(victim, workers[victim])


@pytest.mark.slow
def test_worker_killed_halfway_through_an_answer(tmp_path):
    """A worker dies having sent part of a result (megabytes): the pack fails, it does not hang.

    The parent is stopped so that both workers fill their pipes and block mid-answer; one
    is killed, the parent resumes. (A shared result pipe, as ProcessPoolExecutor has, then
    leaves its reader waiting forever for the rest of the message.)
    """
    out = tmp_path / "o.h5"
    proc = _start_pack(_hardlinked_split(tmp_path, cases=100), out, workers=2)
    workers = _wait_for_workers(proc, 2, out)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        _wait_until_blocked(list(workers))
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    result = _finish(proc, timeout=30)
    _assert_failed(result, out, f"{out}: not written: worker process {victim} was killed by SIGKILL")


@pytest.mark.slow
def test_sigterm_to_the_whole_process_group_like_scancel(tmp_path):
    """scancel signals every process of the step: workers die mid-answer, the parent must not hang."""
    out = tmp_path / "o.h5"
    proc = _start_pack(_hardlinked_split(tmp_path, cases=100), out, workers=2)
    _wait_for_workers(proc, 2, out)
    os.killpg(proc.pid, signal.SIGTERM)
    result = _finish(proc, timeout=30)
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip() == "pack_h5: interrupted; nothing written"
    assert not out.exists() and not out.with_name(out.name + ".partial").exists()
