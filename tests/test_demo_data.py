"""The demo builder: OASIS layout, mask values, distinct cases, determinism, and it packs."""

from __future__ import annotations

import os
import re

import h5py
import numpy as np
import pytest
from conftest import run_tool
from PIL import Image

from oasis_ldm.data.demo import DemoError, DemoSpec, load_templates, write_demo
from oasis_ldm.data.oasis import list_splits
from oasis_ldm.data.pack import PackOptions, pack

SPEC = DemoSpec(cases=(2, 1, 1), slices_per_case=6, size=64, seed=3)


@pytest.fixture(scope="module")
def templates():
    return load_templates()


def _files(root) -> dict[str, bytes]:
    return {
        os.path.relpath(os.path.join(d, n), root): open(os.path.join(d, n), "rb").read()
        for d, _, names in os.walk(root)
        for n in names
    }


def test_layout_masks_and_brain_on_black(tmp_path, templates):
    out = tmp_path / "demo"
    counts = write_demo(out, SPEC, templates=templates)
    assert counts == {"train": 12, "validate": 6, "test": 6}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temporary folder left
    listings = list_splits(out)  # parses and pairs every name
    cases = [{row.case_id for row in x.rows} for x in listings]
    assert [len(c) for c in cases] == [2, 1, 1]
    assert not (cases[0] & cases[1] or cases[0] & cases[2] or cases[1] & cases[2])
    for name in os.listdir(out / "keras_png_slices_train"):
        assert re.fullmatch(r"case_\d{3}_slice_\d+\.nii\.png", name)
    values = set()
    for row in listings[0].rows:
        image = Image.open(row.image)
        mask = np.asarray(Image.open(row.mask))
        assert image.mode == "L" and image.size == (64, 64)
        values |= set(np.unique(mask).tolist())
        pixels = np.asarray(image)
        assert (pixels[mask == 0] == 0).all()  # skull-stripped: black outside the brain
        assert pixels[0].max() == 0 and pixels[:, 0].max() == 0  # brain centred, black border
    assert values == {0, 85, 170, 255}
    mid = np.asarray(Image.open(listings[0].rows[3].image)).astype(float)
    mid_mask = np.asarray(Image.open(listings[0].rows[3].mask))
    # T1 contrast: white matter brighter than grey matter, grey brighter than CSF
    wm, gm, csf = (mid[mid_mask == v].mean() for v in (255, 170, 85))
    assert wm > gm > csf


def test_same_seed_same_bytes(tmp_path, templates):
    write_demo(tmp_path / "a", SPEC, templates=templates)
    write_demo(tmp_path / "b", SPEC, templates=templates)
    write_demo(tmp_path / "c", DemoSpec(cases=(2, 1, 1), slices_per_case=6, size=64, seed=4), templates=templates)
    a, b, c = (_files(tmp_path / x) for x in "abc")
    assert a == b
    assert a != c


def test_refuses_a_non_empty_output(tmp_path, templates):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(DemoError, match="--overwrite"):
        write_demo(out, SPEC, templates=templates)
    write_demo(out, SPEC, overwrite=True, templates=templates)
    assert not (out / "keep.txt").exists() and (out / "keras_png_slices_test").is_dir()
    with pytest.raises(DemoError, match="--cases-per-split"):
        write_demo(tmp_path / "x", DemoSpec(cases=(1, 0, 1)), templates=templates)


def test_demo_packs(tmp_path, templates):
    write_demo(tmp_path / "demo", SPEC, templates=templates)
    result = pack(tmp_path / "demo", tmp_path / "demo.h5", PackOptions(workers=0, verify=True))
    assert result.counts == {"train": 12, "validate": 6, "test": 6}
    with h5py.File(tmp_path / "demo.h5", "r") as f:
        assert set(np.unique(f["train/masks"][:]).tolist()) == {0, 85, 170, 255}
        assert 0 < f.attrs["train_mean"] < 128


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "d"
    args = ["--cases-per-split", "1,1,1", "--slices-per-case", "2", "--size", "32", "--seed", "1"]
    result = run_tool("make_demo_data.py", "--out", out, *args)
    assert result.returncode == 0, result.stderr
    assert "train 2, validate 2, test 2" in result.stdout
    again = run_tool("make_demo_data.py", "--out", out, *args)
    assert again.returncode != 0
    assert again.stderr.strip().count("\n") == 0 and str(out) in again.stderr
