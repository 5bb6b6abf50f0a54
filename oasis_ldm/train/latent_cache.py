"""Optional latent cache for the ldm stage: encode the training split once, train from RAM.

Encoding every batch with the frozen VAE costs a forward pass of the autoencoder per step;
the cache pays it once. It stores the posterior's mean and standard deviation (float16),
not a sample, so each epoch still draws fresh posterior samples as on-the-fly encoding does.
Ranks encode interleaved rows (r, r + W, ...) into part files and rank 0 merges them, so
building it is symmetric work that scales with the ranks. It lives in RUN_DIR, records what
made it (the autoencoder's checksum, the data file, split and size) and is rebuilt
(identically) when deleted or made by something else; rank 0 decides, so all ranks agree.
Geometric augmentation in latent space is limited to horizontal flips, and a flip is not
done on the latent: a strided-conv encoder is not mirror-equivariant (its stride-2 taps sit on
even columns, so a mirrored latent is the latent of a slice shifted by a pixel per level, and
the decoder turns it into edge stripes and mottle). With `flips=True` the cache also holds the
posteriors of the mirrored slices, and a flipped row uses those. Every open passes
`locking=False`, as every other reader and writer does: HDF5's file locks fail on NFS (errno 37),
and rank 0 alone writes each file anyway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from oasis_ldm.atomic import atomic_path
from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.distributed import DistEnv, barrier, on_rank0
from oasis_ldm.models import DiagonalGaussian

ENCODE_BATCH = 32


Encode = Callable[[list[int], bool], DiagonalGaussian]  # (rows of the split, mirrored?) -> posteriors
KEYS = ("mean", "std")
FLIP_KEYS = ("flip_mean", "flip_std")  # the posteriors of the mirrored slices


def stored_keys(flips: bool) -> tuple[str, ...]:
    """The datasets of a cache: the posteriors, and with `flips` those of the mirrored slices."""
    return KEYS + FLIP_KEYS if flips else KEYS


@torch.no_grad()
def _encode_part(path: Path, rows_total: int, encode: Encode, env: DistEnv, flips: bool) -> None:
    rows = list(range(env.rank, rows_total, env.world_size))
    with h5py.File(path, "w", locking=False) as f:
        for i in tqdm(range(0, len(rows), ENCODE_BATCH), desc="latent cache", disable=not env.is_main):
            for mirrored in (False, True) if flips else (False,):
                posterior = encode(rows[i : i + ENCODE_BATCH], mirrored)
                keys = FLIP_KEYS if mirrored else KEYS
                for key, t in zip(keys, (posterior.mean, posterior.std), strict=True):
                    value = t.half().cpu().numpy()
                    if key not in f:
                        f.create_dataset(key, (len(rows), *value.shape[1:]), dtype=np.float16)
                    f[key][i : i + len(value)] = value


def _merge(parts: list[Path], out: Path, n: int, made_by: dict[str, str | int]) -> None:
    """Interleave the parts back into row order: part r holds rows r, r + W, r + 2W, ..."""
    world = len(parts)
    with atomic_path(out) as tmp, h5py.File(tmp, "w", locking=False) as dst:
        dst.attrs.update(made_by)
        for rank, part in enumerate(parts):
            with h5py.File(part, "r", locking=False) as src:
                for key in src:
                    if key not in dst:
                        dst.create_dataset(key, (n, *src[key].shape[1:]), dtype=np.float16)
                    dst[key][rank::world] = src[key][:]


def fingerprint(images: OasisH5Dataset, made_by: dict[str, str], flips: bool = False) -> dict[str, str | int]:
    """What the cache's content depends on, stored as its attributes."""
    split, size, rows = images.split, int(images.size[0]), len(images)
    return {**made_by, "split": split, "image_size": size, "rows": rows, "flips": int(flips)}


def is_current(path: Path, expected: dict[str, str | int]) -> bool:
    """The cache exists, opens, and was made from these images by this autoencoder."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
            keys = stored_keys(bool(expected.get("flips")))
            complete = all(k in f and len(f[k]) == expected["rows"] for k in keys)
    except (OSError, KeyError):
        return False
    return complete and all(attrs.get(k) == v for k, v in expected.items())


def build_latent_cache(
    out: Path, images: OasisH5Dataset, encode: Encode, env: DistEnv, made_by: dict[str, str], flips: bool = False
) -> Path:
    """Every rank calls this together; returns the cache path once it is complete and current.

    `encode` maps rows of `images` to their posteriors (the slices, with their masks in
    paired mode), mirrored when asked; `made_by` names the autoencoder and data, checked against
    an existing cache. `flips` also stores the mirrored slices' posteriors.
    """
    expected = fingerprint(images, made_by, flips)
    if not on_rank0(lambda: is_current(out, expected)):
        part = out.with_name(f"{out.stem}.part{env.rank}.h5")
        _encode_part(part, len(images), encode, env, flips)
        barrier()
        if env.is_main:
            parts = [out.with_name(f"{out.stem}.part{r}.h5") for r in range(env.world_size)]
            _merge(parts, out, len(images), expected)
            for p in parts:
                p.unlink()
    barrier()
    return out


class LatentDataset(Dataset):
    """(mean, std) float16 pairs of the cached posteriors, read into RAM once; with the mirrored
    slices' posteriors stored, items are (mean, std, flip_mean, flip_std)."""

    def __init__(self, path: Path) -> None:
        with h5py.File(path, "r", locking=False) as f:
            keys = stored_keys(all(k in f for k in FLIP_KEYS))
            self.tensors = [torch.from_numpy(f[k][:]) for k in keys]

    @property
    def has_flips(self) -> bool:
        return len(self.tensors) == 4

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.tensors)
