"""Sharded sample generation: fixed shards, atomic shard files, checked reruns, one merge.

A request (checkpoint, N, seed, sampler, steps, eta, precision) is cut into shards of
`shard_size` consecutive image indices, and every shard is generated in the same batches
whoever runs it. Workers (ranks of one job, tasks of a job array, or both) take shards
k, k + W, k + 2W, ... and skip the good ones already on disk, so a rerun after a kill or a
failed task makes only what is missing or bad. Shard files appear whole or not at all (a temp
file per process + rename), and a rerun still checks each one (readable, the right images of
the right request: a disk that filled up or a copy cut short leaves a shorter file behind).
The merge checks every shard the same way and writes samples.h5, samples.npz and grid.png.
A request is checked whole before request.json is written (`check_request`), and a folder
that holds a request but no shards yet takes a new one.

A full disk: HDF5 cannot survive a failed write (closing the file, or freeing it at exit,
dereferences freed memory: a segmentation fault, h5py issue #914), so a shard is built in
memory and written to disk by Python, where ENOSPC is an ordinary error (`_write_h5_atomic`),
and the merge checks the free space before it starts.

A paired model (data.masks) decodes a tissue mask with every slice: its shards, samples.h5 and
samples.npz hold `masks` beside the images, and its grid shows each slice beside its mask in
colour. An image-only request writes exactly the files it wrote before the paired mode.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import shutil
import socket
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from oasis_ldm import outputs
from oasis_ldm.atomic import atomic_path, write_text
from oasis_ldm.data.masks import CLASS_NAMES, to_labels
from oasis_ldm.data.schema import MASK_VALUES
from oasis_ldm.diffusion import PRECISIONS, SAMPLERS
from oasis_ldm.rng import image_seed
from oasis_ldm.sampling.pipeline import Pipeline


@dataclass(frozen=True)
class SamplingParams:
    """What a user asks of a sampling run (its flags); with the checkpoint's facts, a `Request`."""

    num_samples: int
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    batch_size: int = 32
    shard_size: int = 256
    precision: str | None = None  # None: the checkpoint's train.precision


@dataclass(frozen=True)
class Request:
    """A sampling run as request.json records it: the checkpoint, and what was asked of it."""

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
    precision: str = "fp32"  # the U-Net's autocast; request.json files older than the flag were fp32
    paired: bool = False  # the model decodes a mask with each slice (data.masks); older files: image-only

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        start = shard * self.shard_size
        return range(start, min(start + self.shard_size, self.num_samples))


def request_for(meta: dict, params: SamplingParams) -> Request:
    """A request of `params` for the checkpoint described by `meta` (see read_checkpoint).

    A `precision` of None means the checkpoint's `train.precision`: a model trained under bf16
    autocast samples the same way unless told otherwise.
    """
    precision = params.precision or meta["config"].train.precision
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    check_request(params, meta)
    return Request(
        checkpoint=meta["path"],
        checkpoint_sha256=meta["sha256"],
        checkpoint_step=meta["step"],
        image_size=meta["config"].data.image_size,
        **{**asdict(params), "precision": precision},
        paired=meta["config"].data.masks,  # the trainer refuses an ldm whose autoencoder disagrees
    )


class RequestMismatch(ValueError):
    """The output folder holds samples of another request."""


class BadRequest(ValueError):
    """A sampling parameter this checkpoint cannot take; one line naming the flag."""


def check_request(params: SamplingParams, meta: dict) -> None:
    """Every parameter, against the checkpoint, before anything is written (request.json of a
    request that cannot run would block its corrected rerun)."""
    timesteps = meta["config"].diffusion.timesteps
    counts = {"--num-samples": params.num_samples, "--batch-size": params.batch_size, "--shard-size": params.shard_size}
    for flag, value in counts.items():
        if value < 1:
            raise BadRequest(f"{flag} {value}: must be >= 1")
    if params.sampler not in SAMPLERS:
        raise BadRequest(f"--sampler {params.sampler!r}: expected one of {', '.join(SAMPLERS)}")
    if params.sampler == "ddim" and not 1 <= params.steps <= timesteps:
        raise BadRequest(
            f"--steps {params.steps}: DDIM takes 1 to {timesteps} steps with this model (diffusion.timesteps)"
        )
    if not math.isfinite(params.eta) or params.eta < 0:
        raise BadRequest(f"--eta {params.eta}: must be a finite number >= 0")


OUR_NAMES = ("request.json", "shards", "samples.h5", "samples.npz", "grid.png")


def check_out(out: Path) -> None:
    """Fail before any work where OUT cannot take this run's files: a file, a folder of someone
    else's files (samples.h5 and the like without the request.json this project writes), a
    folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise RequestMismatch(f"--out {out}: exists and is not a folder")
    if out.is_dir() and not (out / "request.json").exists():
        ours = [name for name in OUR_NAMES[1:] if (out / name).exists()]
        if ours:
            raise RequestMismatch(
                f"--out {out}: holds {ours[0]} but no request.json: not a sampling folder of this project; "
                "use a new --out"
            )
    if (out / "request.json").exists() and not (out / "request.json").is_file():
        raise RequestMismatch(f"--out {out}: its request.json is not a file")
    try:
        outputs.check_writable(out, "--out")
    except outputs.OutputError as e:
        raise RequestMismatch(str(e)) from None


def has_shards(out: Path) -> bool:
    """Whether any shard (or the merged samples) of a request is on disk."""
    return (out / "samples.h5").exists() or any((out / "shards").glob("shard_*.h5"))


class ShardError(RuntimeError):
    """A shard the merge needs is missing or bad: one line naming it and what to do."""


def _identity(req: Request) -> dict:
    """What makes two requests the same: everything but the checkpoint's path, which may move
    (its bytes, the checksum, may not)."""
    return {k: v for k, v in asdict(req).items() if k != "checkpoint"}


def write_request(out: Path, req: Request) -> None:
    """Record the request in OUT/request.json, refusing to mix it with another one.

    The file is created with a hard link from this process's temp file, which fails if it
    exists: of several tasks starting at once one creates it and the others compare with it.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "request.json"
    if not path.exists():
        try:
            write_text(path, json.dumps(asdict(req), indent=2) + "\n", exclusive=True)
            return
        except FileExistsError:
            pass  # another task was first: compare with what it wrote
    try:
        old = _identity(read_request(out))
    except ShardError as e:
        raise RequestMismatch(str(e)) from None
    new = _identity(req)
    diffs = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if diffs and not has_shards(out):  # nothing made for the old request: this one replaces it
        print(f"{path}: replacing a request no shard was made for ({', '.join(diffs)} differ)", flush=True)
        write_text(path, json.dumps(asdict(req), indent=2) + "\n")
    elif diffs:
        detail = ", ".join(diffs)
        raise RequestMismatch(f"{out} holds samples of another request ({detail} differ): use a new --out")


def read_request(out: Path) -> Request:
    """OUT/request.json; ShardError in one line when there is none (nothing was sampled here)."""
    path = out / "request.json"
    try:
        return Request(**json.loads(path.read_text()))
    except FileNotFoundError:
        raise ShardError(f"{out}: no sampling request here ({path.name}): sample first, then merge") from None
    except (OSError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: unreadable ({' '.join(str(e).split())}); use a new --out") from None


def shard_path(out: Path, shard: int) -> Path:
    return out / "shards" / f"shard_{shard:05d}.h5"


def _sha256(images: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(images).tobytes()).hexdigest()


@dataclass(frozen=True)
class Block:
    """The samples of one shard: uint8 images (n, H, W) and, from a paired model, their masks."""

    images: np.ndarray
    masks: np.ndarray | None = None


def _write_h5_atomic(path: Path, block: Block, seeds: np.ndarray, attrs: dict) -> None:
    """The shard file, built in memory (HDF5 never meets a full disk, see the module docstring)
    and written atomically; a failed write is one OutputError line naming the shard."""
    buffer = io.BytesIO()
    with h5py.File(buffer, "w", locking=False) as f:  # in memory; the flag keeps the one rule
        f.create_dataset("images", data=block.images, chunks=(1, *block.images.shape[1:]))
        f.create_dataset("seed", data=seeds)
        f.attrs.update({**attrs, "images_sha256": _sha256(block.images)})
        if block.masks is not None:
            f.create_dataset("masks", data=block.masks, chunks=(1, *block.masks.shape[1:]))
            f.attrs["masks_sha256"] = _sha256(block.masks)
    advice = "free space and rerun the same command (the finished shards are kept)"
    with outputs.writing(path, advice), atomic_path(path) as tmp:
        tmp.write_bytes(buffer.getbuffer())


MISSING = "missing"


def _check_masks(req: Request, images: np.ndarray, masks: np.ndarray | None, attrs: dict) -> str | None:
    """Why a shard's masks do not fit `req` (present exactly when its model is paired, one per
    image, only the stored class values, intact), or None."""
    if masks is None:
        return "no masks, expected a mask per image (the model is paired)" if req.paired else None
    if not req.paired:
        return "holds masks, expected none (the model is image-only)"
    if masks.dtype != np.uint8 or masks.shape != images.shape:
        found = "x".join(map(str, masks.shape)) or "?"
        return f"masks of {found} {masks.dtype}, expected {'x'.join(map(str, images.shape))} uint8"
    if not np.isin(masks, MASK_VALUES).all():
        return f"mask values outside {MASK_VALUES}"
    if attrs.get("masks_sha256") != _sha256(masks):
        return "masks damaged (checksum mismatch)"
    return None


def read_shard(req: Request, out: Path, shard: int) -> tuple[Block | None, str | None]:
    """(its samples, None) if shard `shard` of `req` is on disk whole and belongs to `req`,
    else (None, why not): "missing", or one phrase naming what is wrong."""
    path = shard_path(out, shard)
    if not path.exists():
        return None, MISSING
    try:
        with h5py.File(path, "r", locking=False) as f:
            images, seeds, attrs = f["images"][:], f["seed"][:], dict(f.attrs)
            masks = f["masks"][:] if "masks" in f else None
    except (OSError, KeyError, ValueError, TypeError) as e:
        return None, f"unreadable ({' '.join(str(e).split()) or type(e).__name__})"
    rows, size = req.shard_range(shard), req.image_size
    if images.dtype != np.uint8 or images.shape != (len(rows), size, size):
        found = "x".join(map(str, images.shape[1:])) or "?"
        return None, f"{len(images)} images of {found}, expected {len(rows)} of {size}x{size}"
    if attrs.get("first_index") != rows.start:
        return None, f"first index {attrs.get('first_index')}, expected {rows.start}"
    if attrs.get("checkpoint_sha256") != req.checkpoint_sha256:
        found = str(attrs.get("checkpoint_sha256"))[:12]
        return None, f"made by checkpoint {found}, expected {req.checkpoint_sha256[:12]}"
    if attrs.get("precision", "fp32") != req.precision:
        return None, f"made in {attrs.get('precision')}, expected {req.precision}"
    if not np.array_equal(seeds, [image_seed(req.seed, i) for i in rows]):
        return None, f"seeds of another request (expected seed {req.seed})"
    if "images_sha256" in attrs and attrs["images_sha256"] != _sha256(images):
        return None, "images damaged (checksum mismatch)"
    why = _check_masks(req, images, masks, attrs)
    return (None, why) if why else (Block(images, masks), None)


def bad_shards(req: Request, out: Path, shards: Iterable[int]) -> dict[int, str]:
    """{shard: why it must be made} for the shards among `shards` that are missing or bad."""
    problems = {shard: read_shard(req, out, shard)[1] for shard in shards}
    return {shard: why for shard, why in problems.items() if why is not None}


def report_bad(req: Request, out: Path, shards: Iterable[int]) -> list[int]:
    """The shards among `shards` to make, saying in one line each why an existing one is remade."""
    bad = bad_shards(req, out, shards)
    for shard, why in bad.items():
        if why != MISSING:
            print(f"{shard_path(out, shard)}: {why}; remaking it", flush=True)
    return sorted(bad)


def generate_shards(pipe: Pipeline, req: Request, out: Path, worker: int, workers: int, progress: bool = True) -> int:
    """Make this worker's missing or bad shards; returns how many it made."""
    if pipe.paired != req.paired:  # its shards would never pass `read_shard`
        does = "does" if pipe.paired else "does not"
        raise ShardError(f"{req.checkpoint}: its autoencoder {does} decode masks, but its data.masks is {req.paired}")
    mine = range(worker, req.num_shards, workers)
    todo = report_bad(req, out, mine)
    host = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    kind = f"{req.precision}, with masks" if req.paired else req.precision
    where = f"{host} ({pipe.device}, {kind}, torch threads: {torch.get_num_threads()})"
    print(f"worker {worker}/{workers} on {where}: {len(todo)} of {len(mine)} shards to make", flush=True)
    for shard in tqdm(todo, desc=f"shards (worker {worker}/{workers})", disable=not progress):
        path = shard_path(out, shard)
        for stale in path.parent.glob(f".{path.name}.*tmp*"):  # left by a killed run; the shard is ours
            stale.unlink(missing_ok=True)
        indices = list(req.shard_range(shard))
        seeds = [image_seed(req.seed, i) for i in indices]
        attrs = {"first_index": indices[0], "checkpoint_sha256": req.checkpoint_sha256, "precision": req.precision}
        attrs |= {"worker": worker, "workers": workers}  # who made it: shows that workers' shares are disjoint
        _write_h5_atomic(path, make_block(pipe, req, seeds), np.asarray(seeds, dtype=np.int64), attrs)
    return len(todo)


def make_block(pipe: Pipeline, req: Request, seeds: list[int]) -> Block:
    """The samples of `seeds`, in the request's fixed batches (so every worker makes the same bytes)."""
    images, masks = [], []
    for b in range(0, len(seeds), req.batch_size):
        batch = seeds[b : b + req.batch_size]
        image, mask = pipe.generate_pairs(batch, req.sampler, req.steps, req.eta, precision=req.precision)
        images.append(image[:, 0].cpu().numpy())
        masks.append(None if mask is None else mask[:, 0].cpu().numpy())
    return Block(np.concatenate(images), np.concatenate(masks) if req.paired else None)


def missing_shards(req: Request, out: Path) -> list[int]:
    """The shards a run still has to make: not on disk, or bad (see `read_shard`)."""
    return sorted(bad_shards(req, out, range(req.num_shards)))


def check_all_shards(req: Request, out: Path) -> None:
    """Raise ShardError naming the first missing or bad shard unless every one is good."""
    bad = bad_shards(req, out, range(req.num_shards))
    missing = [s for s, why in bad.items() if why == MISSING]
    if missing:
        raise ShardError(f"{out}: {len(missing)} of {req.num_shards} shards missing (first: {missing[0]})")
    if bad:
        first, why = next(iter(bad.items()))
        more = f" ({len(bad) - 1} more bad shards)" if len(bad) > 1 else ""
        raise ShardError(f"{shard_path(out, first)}: {why}; rerun the same sampling command to remake it{more}")


def merge(out: Path, grid_size: int = 64) -> Path:
    """All shards -> OUT/samples.h5, OUT/samples.npz and OUT/grid.png, streaming shard by shard.

    Every shard is checked first, so a bad one stops the merge with one line naming it before
    anything is written. samples.npz holds `arr_0`, N x H x W x 1 uint8, the layout the common
    FID tools read, and for a paired model `masks`, N x H x W uint8 as in samples.h5.
    """
    req = read_request(out)
    check_all_shards(req, out)
    check_merge_space(req, out)
    advice = "free space and run the merge again (the shards are kept)"
    with (
        outputs.writing(out / "samples.h5", advice),
        atomic_path(out / "samples.h5") as h5_tmp,
        atomic_path(out / "samples.npz") as npz_tmp,
        h5py.File(h5_tmp, "w", locking=False) as dst,
        zipfile.ZipFile(npz_tmp, "w", allowZip64=True) as npz,
    ):
        shown = _merge_shards(req, out, dst, npz, grid_size)
        if req.paired:  # a zip takes one member at a time: the masks follow, read back from samples.h5
            _stream_npy(npz, "masks", req, lambda shard: dst["masks"][_rows(req, shard)])
    with outputs.writing(out / "grid.png", advice):
        save_grid(shown.images, out / "grid.png", masks=shown.masks)
    return out / "samples.h5"


def check_merge_space(req: Request, out: Path) -> None:
    """Refuse a merge the disk cannot hold, before HDF5 writes a byte (see the module docstring):
    samples.h5 and samples.npz each take the pixels once, twice with masks."""
    pixels = req.num_samples * req.image_size**2 * (2 if req.paired else 1)
    needed = 2 * pixels + 64 * req.num_samples + (1 << 20)  # seeds, chunk index and headers
    free = shutil.disk_usage(out).free
    if free < needed:
        raise outputs.OutputError(
            f"{out}: the merge needs about {needed / 2**20:.1f} MiB and {outputs.free_space(out)} is free on its "
            "disk: free space and run the merge again (the shards are kept)"
        )


def _provenance(req: Request) -> dict:
    """samples.h5's attributes: the request but its batching. `paired` is written only when true,
    so an image-only file stays exactly what it was before the paired mode (read it with
    attrs.get("paired", False), which files made before it need anyway)."""
    attrs = {k: v for k, v in asdict(req).items() if k not in ("batch_size", "shard_size", "paired")}
    return attrs | ({"paired": True} if req.paired else {})


def _merge_shards(req: Request, out: Path, dst: h5py.File, npz: zipfile.ZipFile, grid_size: int) -> Block:
    """Copy every shard into samples.h5 (and its images into the npz's arr_0); returns the first
    `grid_size` samples, for the grid."""
    n, size = req.num_samples, req.image_size
    images = dst.create_dataset("images", (n, size, size), dtype=np.uint8, chunks=(1, size, size))
    seeds = dst.create_dataset("seed", (n,), dtype=np.int64)
    dst.attrs.update(_provenance(req))
    if req.paired:
        masks = dst.create_dataset("masks", (n, size, size), dtype=np.uint8, chunks=(1, size, size))
        masks.attrs.update({"values": np.asarray(MASK_VALUES, np.uint8), "classes": CLASS_NAMES})
    shown: list[Block] = []

    def shard_images(shard: int) -> np.ndarray:
        block, why = read_shard(req, out, shard)
        if block is None:  # changed since the check
            raise ShardError(f"{shard_path(out, shard)}: {why}; rerun the same sampling command")
        rows = req.shard_range(shard)
        images[rows.start : rows.stop] = block.images
        seeds[rows.start : rows.stop] = [image_seed(req.seed, i) for i in rows]
        if block.masks is not None:
            masks[rows.start : rows.stop] = block.masks
        if rows.start < grid_size:
            shown.append(block)
        return block.images

    _stream_npy(npz, "arr_0", req, shard_images, channel=True)
    return _first(shown, grid_size)


def _stream_npy(
    npz: zipfile.ZipFile, name: str, req: Request, rows_of: Callable[[int], np.ndarray], channel: bool = False
) -> None:
    """Write npz member `name`, uint8 (N, H, W[, 1]), one shard's rows at a time (`rows_of(shard)`)."""
    n, size = req.num_samples, req.image_size
    with npz.open(f"{name}.npy", "w", force_zip64=True) as arr:
        shape = (n, size, size, 1) if channel else (n, size, size)
        np.lib.format.write_array_header_2_0(arr, {"descr": "|u1", "fortran_order": False, "shape": shape})
        for shard in range(req.num_shards):
            arr.write(np.ascontiguousarray(rows_of(shard)).tobytes())


def _rows(req: Request, shard: int) -> slice:
    """The rows of shard `shard` as h5py indexes them (a slice, not a range)."""
    rows = req.shard_range(shard)
    return slice(rows.start, rows.stop)


def _first(blocks: list[Block], count: int) -> Block:
    """The first `count` samples of consecutive blocks, as one block."""
    images = np.concatenate([b.images for b in blocks])[:count]
    masks = np.concatenate([b.masks for b in blocks])[:count] if blocks[0].masks is not None else None
    return Block(images, masks)


# The grid's mask colours, by class (data.masks.CLASS_NAMES: background, CSF, grey matter, white
# matter): black, sky blue, vermillion, yellow. Okabe-Ito colours, told apart by colour-blind
# readers too; looked at on 64 and 256 pixel slices, where orange beside yellow (grey and white
# matter) blurred together and a darker blue hid the thin CSF.
MASK_COLOURS = np.array([(0, 0, 0), (86, 180, 233), (213, 94, 0), (240, 228, 66)], dtype=np.uint8)


def colour_masks(masks: np.ndarray) -> np.ndarray:
    """uint8 mask values (B, H, W) -> uint8 RGB (B, 3, H, W) in `MASK_COLOURS`."""
    labels = to_labels(torch.from_numpy(masks)).numpy()
    return MASK_COLOURS[labels].transpose(0, 3, 1, 2)


def save_grid(images: np.ndarray, path: Path, nrow: int = 8, masks: np.ndarray | None = None) -> None:
    """uint8 (B, H, W) -> one PNG grid, written atomically; with `masks`, each slice has its mask
    in colour at its right (`nrow` pairs a row)."""
    tiles = torch.from_numpy(images[:, None])
    if masks is not None:
        tiles = torch.cat([tiles.expand(-1, 3, -1, -1), torch.from_numpy(colour_masks(masks))], dim=3)
    grid = make_grid(tiles.float() / 255, nrow=nrow, padding=2, pad_value=1)
    with atomic_path(path) as tmp:
        save_image(grid, tmp, format="png")
