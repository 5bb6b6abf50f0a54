"""Shared fixtures: tiny OASIS-layout PNG folders built with PIL and numpy.

`make_oasis(...)` writes `keras_png_slices_{split}` and `keras_png_slices_seg_{split}`
folders of random 8-bit greyscale images and 0/85/170/255 masks, and returns the arrays it
wrote, so tests compare against pixels the code under test never produced.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MASK_VALUES = np.array([0, 85, 170, 255], dtype=np.uint8)


@dataclass
class OasisTree:
    """A folder in the OASIS layout and the exact arrays written into it."""

    root: Path
    images: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)  # (split, case, slice)
    masks: dict[tuple[str, int, int], np.ndarray] = field(default_factory=dict)

    def image_dir(self, split: str) -> Path:
        return self.root / f"keras_png_slices_{split}"

    def mask_dir(self, split: str) -> Path:
        return self.root / f"keras_png_slices_seg_{split}"

    def rows(self, split: str) -> list[tuple[int, int]]:
        """(case, slice) of a split in the numeric order the packed file must have."""
        return sorted((c, s) for (sp, c, s) in self.images if sp == split)


def write_tree(
    root: Path,
    cases: dict[str, list[int]] | None = None,
    slices: int = 3,
    size: int = 32,
    masks: bool = True,
    width: int = 3,
    seed: int = 0,
) -> OasisTree:
    """Write random slices; `width` is the zero-padding of case numbers (slices are unpadded)."""
    cases = cases if cases is not None else {"train": [1, 2], "validate": [3], "test": [4]}
    rng = np.random.default_rng(seed)
    tree = OasisTree(root)
    for split, numbers in cases.items():
        tree.image_dir(split).mkdir(parents=True, exist_ok=True)
        if masks:
            tree.mask_dir(split).mkdir(parents=True, exist_ok=True)
        for case in numbers:
            for k in range(slices):
                image = rng.integers(0, 256, (size, size), dtype=np.uint8)
                Image.fromarray(image).save(tree.image_dir(split) / f"case_{case:0{width}d}_slice_{k}.nii.png")
                tree.images[(split, case, k)] = image
                if masks:
                    mask = MASK_VALUES[rng.integers(0, 4, (size, size))]
                    Image.fromarray(mask).save(tree.mask_dir(split) / f"seg_{case:0{width}d}_slice_{k}.nii.png")
                    tree.masks[(split, case, k)] = mask
    return tree


@pytest.fixture
def make_oasis(tmp_path: Path):
    """Factory: make_oasis(name="src", **write_tree kwargs) -> OasisTree under tmp_path."""

    def make(name: str = "src", **kwargs) -> OasisTree:
        return write_tree(tmp_path / name, **kwargs)

    return make


def run_tool(script: str, *args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter, the repo importable, output captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "tools" / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
