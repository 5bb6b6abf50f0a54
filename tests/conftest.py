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


def pytest_collection_modifyitems(config, items) -> None:
    """CUDA-marked tests run where torch sees a CUDA device and are skipped, saying so, elsewhere."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (bench/gpu_check.py runs these on a GPU)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def run_tool(script: str, *args: str | os.PathLike, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run tools/<script> with this interpreter, the repo importable, output captured."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(REPO / "tools" / script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)


# --- training fixtures -----------------------------------------------------------------------

TINY = str(REPO / "tests" / "tiny.yaml")


def blob_images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth bright ellipses on black: learnable in a few steps, unlike uniform noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    out = np.empty((n, size, size), dtype=np.uint8)
    for i in range(n):
        cy, cx = rng.uniform(-0.15, 0.15, 2)
        ry, rx = rng.uniform(0.15, 0.35, 2)
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        out[i] = np.clip(255 * np.exp(-2 * inside) * rng.uniform(0.6, 1.0), 0, 255).astype(np.uint8)
    return out


@pytest.fixture(scope="session")
def tiny_h5(tmp_path_factory) -> Path:
    """A packed file of 16 train / 8 validate / 4 test smooth 32x32 slices."""
    from oasis_ldm.data.pack import PackOptions, pack

    root = tmp_path_factory.mktemp("tiny")
    counts = {"train": 16, "validate": 8, "test": 4}
    for s, (split, n) in enumerate(counts.items()):
        folder = root / "src" / f"keras_png_slices_{split}"
        folder.mkdir(parents=True)
        for i, image in enumerate(blob_images(n, 32, seed=s)):
            Image.fromarray(image).save(folder / f"case_{100 * s + i // 4:03d}_slice_{i % 4}.nii.png")
    pack(root / "src", root / "tiny.h5", PackOptions(workers=0, progress=False))
    return root / "tiny.h5"


def blob_masks(images: np.ndarray) -> np.ndarray:
    """Tissue-like masks of blob images: bright core white matter, rim grey matter, edge CSF."""
    levels = np.select([images > 170, images > 90, images > 25], [255, 170, 85], 0)
    return levels.astype(np.uint8)


@pytest.fixture(scope="session")
def tiny_paired_h5(tmp_path_factory) -> Path:
    """`tiny_h5` with masks: 16 train / 8 validate / 4 test 32x32 slices and their masks."""
    from oasis_ldm.data.pack import PackOptions, pack

    root = tmp_path_factory.mktemp("tiny_paired")
    counts = {"train": 16, "validate": 8, "test": 4}
    for s, (split, n) in enumerate(counts.items()):
        images, masks = root / "src" / f"keras_png_slices_{split}", root / "src" / f"keras_png_slices_seg_{split}"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        slices = blob_images(n, 32, seed=s)
        for i, (image, mask) in enumerate(zip(slices, blob_masks(slices), strict=True)):
            name = f"{100 * s + i // 4:03d}_slice_{i % 4}.nii.png"
            Image.fromarray(image).save(images / f"case_{name}")
            Image.fromarray(mask).save(masks / f"seg_{name}")
    pack(root / "src", root / "tiny.h5", PackOptions(workers=0, progress=False))
    return root / "tiny.h5"


def train_cmd(stage: str, run_dir: Path, data: Path, *overrides: str) -> list[str]:
    sets = [f"--set={o}" for o in [f"data.path={data}", *overrides]]
    return [
        sys.executable,
        "-m",
        "oasis_ldm.train",
        "--stage",
        stage,
        "--config",
        TINY,
        "--run-dir",
        str(run_dir),
        *sets,
    ]


def quiet_env(**extra: str) -> dict[str, str]:
    """One thread per process (tests run several at once on 2 cores), loopback-only gloo, and
    this interpreter's environment first on PATH (jobs started by sbatch inherit it)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo", PYTHONPATH=str(REPO))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.update(extra)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def train(stage: str, run_dir: Path, data: Path, *overrides: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the training entry point to completion in a subprocess; fail loudly on error."""
    cmd = train_cmd(stage, run_dir, data, *overrides)
    out = subprocess.run(cmd, capture_output=True, text=True, env=quiet_env(), cwd=REPO, timeout=timeout)
    assert out.returncode == 0, f"training failed:\n{out.stdout}\n{out.stderr}"
    return out


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory, tiny_h5) -> Path:
    """A finished tiny vae run, for the ldm stage to encode with."""
    run_dir = tmp_path_factory.mktemp("vae") / "run"
    train("vae", run_dir, tiny_h5)
    return run_dir


@pytest.fixture(scope="session")
def tiny_ldm(tmp_path_factory, tiny_h5, tiny_vae) -> Path:
    run_dir = tmp_path_factory.mktemp("ldm") / "run"
    train("ldm", run_dir, tiny_h5, f"ldm.vae_ckpt={tiny_vae}", "train.max_steps=4")
    return run_dir


@pytest.fixture(scope="session")
def tiny_paired_ldm(tmp_path_factory, tiny_paired_h5) -> Path:
    """A finished tiny paired ldm run (data.masks): its samples are slice-mask pairs."""
    root = tmp_path_factory.mktemp("paired")
    train("vae", root / "vae", tiny_paired_h5, "data.masks=true", "train.max_steps=4")
    train("ldm", root / "ldm", tiny_paired_h5, "data.masks=true", f"ldm.vae_ckpt={root / 'vae'}", "train.max_steps=3")
    return root / "ldm"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cmds: list[list[str]], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run one command per rank as a torchrun-style gloo job on loopback; (returncode, stdout, stderr) each."""
    port, world = str(free_port()), str(len(cmds))
    procs = [
        subprocess.Popen(
            cmd,
            env=quiet_env(RANK=str(r), WORLD_SIZE=world, LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, cmd in enumerate(cmds)
    ]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def final_state_of(run_dir: Path) -> dict:
    """The last checkpoint of a finished run."""
    from oasis_ldm import checkpoint

    return checkpoint.load(run_dir / "checkpoints" / "last.pt")


def watch_resume(monkeypatch) -> dict:
    """After a resume loads its checkpoint: {"params": devices of the weights, "steps": devices
    of the optimizers' step counters} (TrainState.load_state_dict, watched)."""
    from oasis_ldm.train.state import TrainState

    seen: dict = {}
    real_load = TrainState.load_state_dict

    def spy(state, saved):
        real_load(state, saved)
        seen["params"] = {p.device.type for m in state.stage.models.values() for p in m.parameters()}
        seen["steps"] = {s["step"].device.type for o in state.optimizers.values() for s in o.state.values()}

    monkeypatch.setattr(TrainState, "load_state_dict", spy)
    return seen
