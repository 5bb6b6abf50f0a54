"""Sharded sample generation: fixed shards, atomic shard files, rerun-safe, one merge.

A request (checkpoint, N, seed, sampler, steps, eta) is cut into shards of `shard_size`
consecutive image indices, and every shard is generated in the same batches whoever runs
it. Workers (ranks of one job, or tasks of a job array) take shards k, k + W, k + 2W, ...
and skip the ones already on disk, so a rerun after a kill or a failed task makes only the
missing shards. Shard files appear whole or not at all (temp file + rename). The merge step
checks that every shard is there and writes samples.h5, samples.npz and grid.png.
"""

from __future__ import annotations

import json
import os
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from oasis_ldm.sampling.pipeline import Pipeline, image_seed


@dataclass(frozen=True)
class Request:
    checkpoint: str
    checkpoint_sha256: str
    checkpoint_step: int
    image_size: int  # the resolution the model was trained at (and samples at)
    num_samples: int
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 32
    shard_size: int = 256

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))


def request_for(meta: dict, **params: object) -> Request:
    """A request for the checkpoint described by `meta` (see sampling.pipeline.read_checkpoint)."""
    return Request(
        checkpoint=meta["path"],
        checkpoint_sha256=meta["sha256"],
        checkpoint_step=meta["step"],
        image_size=meta["config"].data.image_size,
        **params,
    )


class RequestMismatch(ValueError):
    """The output folder holds samples of another request."""


def write_request(out: Path, req: Request) -> None:
    """Record the request in OUT/request.json, refusing to mix it with another one."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "request.json"
    if path.exists():
        old, new = json.loads(path.read_text()), asdict(req)
        # The checkpoint's path may move; its bytes (checksum) may not.
        diffs = [k for k in sorted(set(old) | set(new)) if k != "checkpoint" and old.get(k) != new.get(k)]
        if diffs:
            detail = ", ".join(diffs)
            raise RequestMismatch(f"{out} holds samples of another request ({detail} differ): use a new --out")
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(req), indent=2) + "\n")
    os.replace(tmp, path)


def read_request(out: Path) -> Request:
    return Request(**json.loads((out / "request.json").read_text()))


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:05d}.h5"


def _write_h5_atomic(path: Path, images: np.ndarray, seeds: np.ndarray, attrs: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("images", data=images, chunks=(1, *images.shape[1:]))
            f.create_dataset("seed", data=seeds)
            f.attrs.update(attrs)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def generate_shards(pipe: Pipeline, req: Request, out: Path, worker: int, workers: int, progress: bool = True) -> int:
    """Make this worker's missing shards; returns how many it made."""
    mine = [s for s in range(worker, req.num_shards, workers) if not shard_path(out, s).exists()]
    for shard in tqdm(mine, desc=f"shards (worker {worker}/{workers})", disable=not progress):
        path = shard_path(out, shard)
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed run; the shard is ours
            stale.unlink(missing_ok=True)
        indices = list(req.shard_range(shard))
        seeds = [image_seed(req.seed, i) for i in indices]
        batches = [
            pipe.generate(seeds[b : b + req.batch_size], req.sampler, req.steps, req.eta)
            for b in range(0, len(seeds), req.batch_size)
        ]
        images = torch.cat(batches)[:, 0].cpu().numpy()
        attrs = {"first_index": indices[0], "checkpoint_sha256": req.checkpoint_sha256}
        _write_h5_atomic(path, images, np.asarray(seeds, dtype=np.int64), attrs)
    return len(mine)


def missing_shards(req: Request, out: Path) -> list[int]:
    return [s for s in range(req.num_shards) if not shard_path(out, s).exists()]


def merge(out: Path, grid_size: int = 64) -> Path:
    """All shards -> OUT/samples.h5, OUT/samples.npz and OUT/grid.png, streaming shard by shard.

    samples.npz holds `arr_0`, N x H x W x 1 uint8, the layout the common FID tools read.
    """
    req = read_request(out)
    missing = missing_shards(req, out)
    if missing:
        raise FileNotFoundError(f"{out}: {len(missing)} of {req.num_shards} shards missing (first: {missing[0]})")
    with h5py.File(shard_path(out, 0), "r") as f:
        height, width = f["images"].shape[1:]
    n = req.num_samples
    h5_tmp, npz_tmp = out / ".samples.h5.tmp", out / ".samples.npz.tmp"
    grid_images = []
    try:
        with h5py.File(h5_tmp, "w") as dst, zipfile.ZipFile(npz_tmp, "w", allowZip64=True) as npz:
            images = dst.create_dataset("images", (n, height, width), dtype=np.uint8, chunks=(1, height, width))
            seeds = dst.create_dataset("seed", (n,), dtype=np.int64)
            dst.attrs.update({k: v for k, v in asdict(req).items() if k not in ("batch_size", "shard_size")})
            with npz.open("arr_0.npy", "w", force_zip64=True) as arr:
                header = {"descr": "|u1", "fortran_order": False, "shape": (n, height, width, 1)}
                np.lib.format.write_array_header_2_0(arr, header)
                for shard in range(req.num_shards):
                    rows = req.shard_range(shard)
                    with h5py.File(shard_path(out, shard), "r") as src:
                        block = src["images"][:]
                        images[rows.start : rows.stop] = block
                        seeds[rows.start : rows.stop] = src["seed"][:]
                    arr.write(block.tobytes())
                    if sum(len(g) for g in grid_images) < grid_size:
                        grid_images.append(block[: grid_size - sum(len(g) for g in grid_images)])
        os.replace(h5_tmp, out / "samples.h5")
        os.replace(npz_tmp, out / "samples.npz")
    finally:
        h5_tmp.unlink(missing_ok=True)
        npz_tmp.unlink(missing_ok=True)
    save_grid(np.concatenate(grid_images), out / "grid.png")
    return out / "samples.h5"


def save_grid(images: np.ndarray, path: Path, nrow: int = 8) -> None:
    """uint8 (B, H, W) -> one PNG grid, written atomically."""
    grid = make_grid(torch.from_numpy(images[:, None]).float() / 255, nrow=nrow, padding=2, pad_value=1)
    tmp = path.with_name(f".{path.name}.tmp")
    save_image(grid, tmp, format="png")
    os.replace(tmp, path)
