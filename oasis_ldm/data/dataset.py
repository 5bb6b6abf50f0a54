"""`OasisH5Dataset`: the packed HDF5 file as a map-style torch Dataset.

Why it looks like this:
- The HDF5 handle is opened lazily in whichever process reads (each DataLoader worker gets
  its own) and is dropped when pickled: an h5py handle shared across fork is not safe.
  Files open read-only with `locking=False` because HDF5 file locks fail on NFS (errno 37).
- `__getitems__` serves a whole batch: rows are read in increasing order, consecutive rows
  as one slice, then resized and augmented as one tensor. (h5py's fancy indexing, one
  irregular selection over one-slice chunks, measured over ten times slower than reading
  the rows one by one: ~200 vs ~2,500 slices/s on gzip, single process.)
- `in_memory=True` reads the split once and serves from a tensor, which forked workers
  share copy-on-write and spawned workers receive through torch's shared memory.
- `raw=True` returns uint8 and leaves augmentation to the trainer, which augments batches
  on its device with a step-seeded generator so that a resumed run is exact.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from oasis_ldm.data import schema
from oasis_ldm.data.transforms import apply_params, check_mode, resize_batch, sample_params, to_float

Indices = int | slice | range | Sequence[int] | np.ndarray | torch.Tensor
RESIZE_BLOCK = 256  # rows resized at a time when loading a split into memory


def _as_indices(indices: Indices, n: int) -> np.ndarray:
    """Any index form -> int64 array in [0, n), negative indices counted from the end."""
    if isinstance(indices, slice):
        return np.arange(n)[indices]
    if isinstance(indices, torch.Tensor):
        indices = indices.cpu().numpy()
    idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
    if idx.size and (idx.min() < -n or idx.max() >= n):
        raise IndexError(f"index out of range for a split of {n} rows")
    return np.where(idx < 0, idx + n, idx)


def read_rows(dset: h5py.Dataset, indices: np.ndarray) -> np.ndarray:
    """Rows `indices` (any order, repeats allowed) of an (N, H, W) dataset, as (B, H, W).

    Unique rows are read in increasing order; each run of consecutive rows is one read.
    """
    unique, inverse = np.unique(indices, return_inverse=True)
    out = np.empty((len(unique), *dset.shape[1:]), dtype=dset.dtype)
    if len(unique):
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        starts = np.concatenate([[0], breaks])
        stops = np.concatenate([breaks, [len(unique)]])
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            first = int(unique[a])
            dset.read_direct(out, np.s_[first : first + b - a], np.s_[a:b])
    return out[inverse.reshape(-1)] if len(unique) != len(indices) or np.any(np.diff(indices) < 0) else out


class OasisH5Dataset(Dataset):
    """One split of a packed file. Items: float (1, S, S) in [-1, 1], or uint8 with `raw`.

    `with_mask` makes items (image, mask) with the mask uint8 (1, S, S), nearest-resized and
    given the same geometric augmentation as its image. `image_size` resizes (antialiased)
    to S x S on load; None keeps the stored size.
    """

    def __init__(
        self,
        path: str | Path,
        split: str = "train",
        *,
        in_memory: bool = False,
        with_mask: bool = False,
        augment: str = "none",
        image_size: int | None = None,
        raw: bool = False,
    ) -> None:
        self.path = Path(path)
        self.split = split
        self.augment = check_mode(augment)  # with raw=True: the mode the trainer should apply
        self.with_mask = with_mask
        self.raw = raw
        with schema.open_h5(self.path) as f:
            self.info = schema.read_info(f)
            if split not in self.info.splits:
                packed = ", ".join(self.info.splits)
                raise ValueError(f"{self.path}: no split {split!r} in this file (packed: {packed})")
            if with_mask and not self.info.splits[split].has_masks:
                raise ValueError(f"{self.path}: split {split!r} has no masks (with_mask=True)")
            self.case_id = f[split][schema.CASE_ID][:]
            self.slice_idx = f[split][schema.SLICE_IDX][:]
        stored = self.info.splits[split]
        self.size = (image_size, image_size) if image_size else (stored.height, stored.width)
        self._file: h5py.File | None = None
        self._pid: int | None = None
        self._memory: dict[str, torch.Tensor] = {}
        if in_memory:
            names = (schema.IMAGES, schema.MASKS) if with_mask else (schema.IMAGES,)
            self._memory = {name: self._load(name) for name in names}

    # -- file handling

    def _group(self) -> h5py.Group:
        """This process's read-only handle, opened on first use (so after any fork)."""
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r", locking=False)
            self._pid = os.getpid()
        return self._file[self.split]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # a pickled (worker) copy opens its own handle
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def _load(self, name: str) -> torch.Tensor:
        """The whole split in one read, resized once: (N, 1, S, S) uint8."""
        with schema.open_h5(self.path) as f:
            dset = f[self.split][name]
            data = np.empty(dset.shape, dtype=np.uint8)
            try:
                if len(data):
                    dset.read_direct(data)
            except OSError as e:  # a truncated or damaged file opens, then fails here
                problem = " ".join(str(e).split())
                raise schema.SchemaError(f"{self.path}: /{self.split}/{name} is unreadable ({problem})") from None
        rows = torch.from_numpy(data)[:, None]
        if tuple(rows.shape[-2:]) == self.size:
            return rows
        out = torch.empty((len(rows), 1, *self.size), dtype=torch.uint8)
        for a in range(0, len(rows), RESIZE_BLOCK):
            out[a : a + RESIZE_BLOCK] = resize_batch(
                rows[a : a + RESIZE_BLOCK], self.size, nearest=name == schema.MASKS
            )
        return out

    # -- reading

    def __len__(self) -> int:
        return len(self.case_id)

    def _rows(self, name: str, idx: np.ndarray) -> torch.Tensor:
        """uint8 (B, 1, S, S) of rows `idx`, from memory or the file, resized to S."""
        if name in self._memory:  # index_select copies whole rows; [idx] goes element by element
            return torch.index_select(self._memory[name], 0, torch.from_numpy(idx))
        rows = torch.from_numpy(read_rows(self._group()[name], idx))[:, None]
        return resize_batch(rows, self.size, nearest=name == schema.MASKS)

    def read_raw(self, indices: Indices, *, mask: bool = False) -> torch.Tensor:
        """uint8 (B, 1, S, S) images (or masks) at `indices`, never augmented (for evaluation)."""
        if mask and not self.info.splits[self.split].has_masks:
            raise ValueError(f"{self.path}: split {self.split!r} has no masks")
        return self._rows(schema.MASKS if mask else schema.IMAGES, _as_indices(indices, len(self)))

    def filenames(self) -> list[str]:
        """Original image file names, in row order."""
        return list(self._group()[schema.FILENAME].asstr()[:])

    def __getitem__(self, index: int):
        """One item, made as a batch of one: the same reading, resizing and augmentation."""
        return self.__getitems__([int(_as_indices(index, len(self))[0])])[0]

    def __getitems__(self, indices: Sequence[int]) -> list:
        """A batch for the DataLoader: one ordered read, one resize, one augmentation."""
        idx = _as_indices(list(indices), len(self))
        images = self._rows(schema.IMAGES, idx)
        masks = self._rows(schema.MASKS, idx) if self.with_mask else None
        if not self.raw:
            images = to_float(images)
            if self.augment != "none":
                params = sample_params(len(idx), *self.size, self.augment)
                images = apply_params(images, params)
                masks = apply_params(masks, params, nearest=True) if masks is not None else None
        if masks is not None:
            return list(zip(images.unbind(0), masks.unbind(0), strict=True))
        return list(images.unbind(0))
