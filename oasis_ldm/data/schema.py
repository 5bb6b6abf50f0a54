"""The packed HDF5 file: names, dtypes and attributes that readers depend on (schema version 1).

Layout, one group per packed split (`train`, `validate`, `test`):

    /{split}/images     uint8  (N, H, W)  chunks (1, H, W): one slice per chunk
    /{split}/masks      uint8  (N, H, W)  only when the split's seg folder was packed;
                                          0 background, 85 CSF, 170 grey matter, 255 white matter
    /{split}/case_id    int32  (N,)       the NNN of case_NNN_slice_K.nii.png
    /{split}/slice_idx  int32  (N,)       the K
    /{split}/filename   vlen UTF-8 (N,)   the image's original file name

Rows are sorted by (case_id, slice_idx) numerically. Root attributes:

    schema_version  int    1
    created_by      str    "oasis-ldm pack_h5 <version>"
    count_{split}   int    rows in that split, one attribute per packed split
    train_mean      float  mean pixel value of all train images, in [0, 255] units
    train_std       float  population std of the same pixels
    compression     str    none | lzf | gzip (how the image/mask chunks are stored)

`train_mean`/`train_std` exist only when the train split was packed: statistics of another
split under the train name would silently mislead whoever normalises with them.
All images of a file share one (H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
IMAGES = "images"
MASKS = "masks"
CASE_ID = "case_id"
SLICE_IDX = "slice_idx"
FILENAME = "filename"
ATTR_SCHEMA_VERSION = "schema_version"
ATTR_CREATED_BY = "created_by"
ATTR_TRAIN_MEAN = "train_mean"
ATTR_TRAIN_STD = "train_std"
ATTR_COMPRESSION = "compression"
SPLITS: tuple[str, ...] = ("train", "validate", "test")
STRING_DTYPE = h5py.string_dtype("utf-8")
MASK_VALUES: tuple[int, ...] = (0, 85, 170, 255)


def count_attr(split: str) -> str:
    """Root attribute holding the row count of `split` (e.g. `count_train`)."""
    return f"count_{split}"


class SchemaError(ValueError):
    """The file is not a packed OASIS file of this schema; the message names file and object."""


@dataclass(frozen=True)
class SplitInfo:
    name: str
    count: int
    height: int
    width: int
    has_masks: bool


@dataclass(frozen=True)
class FileInfo:
    path: str
    schema_version: int
    created_by: str
    splits: dict[str, SplitInfo]
    train_mean: float | None
    train_std: float | None


def open_h5(path: str | Path) -> h5py.File:
    """Open read-only without HDF5 file locking (locking fails on NFS with errno 37)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such HDF5 file")
    try:
        return h5py.File(path, "r", locking=False)
    except OSError as e:
        raise SchemaError(f"{path}: not a readable HDF5 file ({e})") from None


def _check_dataset(f: h5py.File, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> None:
    if name not in f:
        raise SchemaError(f"{f.filename}: missing dataset /{name}")
    dset = f[name]
    if not isinstance(dset, h5py.Dataset):
        raise SchemaError(f"{f.filename}: /{name} is not a dataset")
    if dtype == STRING_DTYPE:
        info = h5py.check_string_dtype(dset.dtype)
        if info is None or info.length is not None:
            raise SchemaError(f"{f.filename}: /{name} is not a variable-length string dataset")
    elif dset.dtype != dtype:
        raise SchemaError(f"{f.filename}: /{name} has dtype {dset.dtype}, expected {np.dtype(dtype)}")
    if dset.shape != shape:
        raise SchemaError(f"{f.filename}: /{name} has shape {dset.shape}, expected {shape}")


def _split_info(f: h5py.File, split: str) -> SplitInfo:
    images = f[split].get(IMAGES)
    if not isinstance(images, h5py.Dataset) or images.ndim != 3:
        raise SchemaError(f"{f.filename}: /{split}/{IMAGES} missing or not (N, H, W)")
    n, h, w = images.shape
    _check_dataset(f, f"{split}/{IMAGES}", np.dtype(np.uint8), (n, h, w))
    _check_dataset(f, f"{split}/{CASE_ID}", np.dtype(np.int32), (n,))
    _check_dataset(f, f"{split}/{SLICE_IDX}", np.dtype(np.int32), (n,))
    _check_dataset(f, f"{split}/{FILENAME}", STRING_DTYPE, (n,))
    has_masks = MASKS in f[split]
    if has_masks:
        _check_dataset(f, f"{split}/{MASKS}", np.dtype(np.uint8), (n, h, w))
    count = f.attrs.get(count_attr(split))
    if count is None or int(count) != n:
        raise SchemaError(f"{f.filename}: root attribute {count_attr(split)}={count} but {n} rows")
    return SplitInfo(split, n, h, w, has_masks)


def read_info(f: h5py.File) -> FileInfo:
    """Validate an open file against schema version 1 and summarise it (metadata only)."""
    version = f.attrs.get(ATTR_SCHEMA_VERSION)
    if version is None or int(version) != SCHEMA_VERSION:
        raise SchemaError(f"{f.filename}: schema_version={version}, expected {SCHEMA_VERSION}")
    splits = {s: _split_info(f, s) for s in SPLITS if s in f}
    if not splits:
        raise SchemaError(f"{f.filename}: no split groups ({', '.join(SPLITS)})")
    mean = f.attrs.get(ATTR_TRAIN_MEAN)
    std = f.attrs.get(ATTR_TRAIN_STD)
    return FileInfo(
        path=str(f.filename),
        schema_version=int(version),
        created_by=str(f.attrs.get(ATTR_CREATED_BY, "")),
        splits=splits,
        train_mean=None if mean is None else float(mean),
        train_std=None if std is None else float(std),
    )


def inspect_file(path: str | Path) -> FileInfo:
    """`read_info` on a path: opens, validates and closes again."""
    with open_h5(path) as f:
        return read_info(f)
