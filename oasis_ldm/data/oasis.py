"""The OASIS "keras_png_slices" layout: split folders, file names, and their pairing.

A source directory holds `keras_png_slices_{split}` (images `case_NNN_slice_K.nii.png`) and,
optionally, `keras_png_slices_seg_{split}` (masks `seg_NNN_slice_K.nii.png`). Case and slice
numbers are parsed as integers of any width, so `slice_10` sorts after `slice_9` and the
packer does not depend on the zero-padding of one particular release. Images and masks pair
by (case, slice), never by string.

Everything here only lists and parses names: no pixel is read, so a bad layout is reported
before anything is written. That includes subject leakage: a case number in two of the
listed splits is refused (OASIS puts each subject in one split only).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SPLITS: tuple[str, ...] = ("train", "validate", "test")
IMAGE_DIR = "keras_png_slices_{split}"
MASK_DIR = "keras_png_slices_seg_{split}"
IMAGE_RE = re.compile(r"^case_([0-9]+)_slice_([0-9]+)\.nii\.png$")
MASK_RE = re.compile(r"^seg_([0-9]+)_slice_([0-9]+)\.nii\.png$")


class LayoutError(ValueError):
    """A folder or file name does not follow the OASIS layout; the message names the path."""


@dataclass(frozen=True)
class Slice:
    """One row of a split: where its image (and mask) live and what it is."""

    case_id: int
    slice_idx: int
    image: Path
    mask: Path | None


@dataclass(frozen=True)
class SplitListing:
    """The rows of one split, sorted by (case_id, slice_idx)."""

    split: str
    image_dir: Path
    mask_dir: Path | None
    rows: tuple[Slice, ...]

    @property
    def has_masks(self) -> bool:
        return self.mask_dir is not None


def image_name(case_id: int, slice_idx: int, width: int = 3) -> str:
    """`case_001_slice_7.nii.png`: the case zero-padded to `width`, the slice unpadded."""
    return f"case_{case_id:0{width}d}_slice_{slice_idx}.nii.png"


def mask_name(case_id: int, slice_idx: int, width: int = 3) -> str:
    return f"seg_{case_id:0{width}d}_slice_{slice_idx}.nii.png"


def parse_name(name: str, pattern: re.Pattern[str] = IMAGE_RE) -> tuple[int, int] | None:
    """(case_id, slice_idx) of a file name, or None when it does not match `pattern`."""
    match = pattern.match(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


FILE, FOLDER, DANGLING, SPECIAL = "file", "folder", "dangling symbolic link", "special file"


def _kind(entry: os.DirEntry) -> str:
    """What an entry is, following symbolic links: a link to a PNG is a file like any other."""
    if entry.is_file():
        return FILE
    if entry.is_dir():
        return FOLDER
    if entry.is_symlink() and not os.path.exists(entry.path):
        return DANGLING  # its target is gone (or the link loops)
    return SPECIAL  # a fifo, socket or device


def _scan(folder: Path, pattern: re.Pattern[str], example: str) -> dict[tuple[int, int], Path]:
    """Map (case, slice) -> path for every entry of `folder`; hidden files are ignored."""
    with os.scandir(folder) as it:
        entries = sorted((e.name, _kind(e)) for e in it if not e.name.startswith("."))
    found: dict[tuple[int, int], Path] = {}
    for name, kind in entries:
        path = folder / name
        if kind == DANGLING:
            raise LayoutError(f"{path}: dangling symbolic link (its target {os.readlink(path)} does not exist)")
        key = parse_name(name, pattern)
        if key is None or kind != FILE:
            raise LayoutError(f"{path}: unexpected {'file name' if kind == FILE else kind} (expected {example})")
        if key in found:
            raise LayoutError(f"{path}: same case and slice as {found[key].name}")
        found[key] = path
    return found


def _missing_split_hint(src: Path, folder_name: str) -> str:
    """Point at a nested copy of the layout (the zip extracts to keras_png_slices_data/)."""
    try:
        nested = [p for p in src.iterdir() if (p / folder_name).is_dir()]
    except OSError:
        nested = []
    if len(nested) == 1:
        return f" (did you mean --src {nested[0]}?)"
    return " (use --splits to pack a subset)"


def list_split(src: Path, split: str) -> SplitListing:
    """List, parse and pair one split; raise LayoutError naming the first bad path."""
    if split not in SPLITS:
        raise LayoutError(f"--splits: unknown split {split!r} (expected {', '.join(SPLITS)})")
    image_dir = src / IMAGE_DIR.format(split=split)
    if not image_dir.is_dir():
        raise LayoutError(f"{image_dir}: missing split folder{_missing_split_hint(src, image_dir.name)}")
    images = _scan(image_dir, IMAGE_RE, "case_NNN_slice_K.nii.png")
    if not images:
        raise LayoutError(f"{image_dir}: empty split (no case_NNN_slice_K.nii.png files)")
    mask_dir: Path | None = src / MASK_DIR.format(split=split)
    masks: dict[tuple[int, int], Path] = {}
    if mask_dir.is_dir():
        masks = _scan(mask_dir, MASK_RE, "seg_NNN_slice_K.nii.png")
        _check_pairs(images, masks, mask_dir)
    else:
        mask_dir = None
    rows = tuple(Slice(c, s, images[(c, s)], masks.get((c, s))) for c, s in sorted(images))
    return SplitListing(split, image_dir, mask_dir, rows)


def _check_pairs(images: dict[tuple[int, int], Path], masks: dict[tuple[int, int], Path], mask_dir: Path) -> None:
    """Every image needs its mask and every mask its image (first offender in sorted order)."""
    for key in sorted(images.keys() - masks.keys()):
        expected = "seg_" + images[key].name.removeprefix("case_")
        raise LayoutError(f"{images[key]}: image without a mask (expected {mask_dir / expected})")
    for key in sorted(masks.keys() - images.keys()):
        expected = "case_" + masks[key].name.removeprefix("seg_")
        raise LayoutError(f"{masks[key]}: mask without an image (expected {expected} in the image folder)")


def _check_no_leakage(listings: list[SplitListing]) -> None:
    """One subject in two splits leaks its anatomy from training into evaluation: refuse it.

    Only the listed splits are compared (those being packed); the case number identifies the
    subject, whatever its zero-padding.
    """
    seen: dict[int, tuple[str, Path]] = {}  # case -> (split, one image) from earlier splits
    for listing in listings:
        first: dict[int, Path] = {}
        for row in listing.rows:
            first.setdefault(row.case_id, row.image)
        for case, image in first.items():
            if case in seen:
                split, other = seen[case]
                raise LayoutError(
                    f"{image}: case {case} is in split {listing.split} and in split {split} ({other}); "
                    "a subject must be in one split only"
                )
        seen.update((case, (listing.split, image)) for case, image in first.items())


def list_splits(src: Path, splits: tuple[str, ...] = SPLITS) -> list[SplitListing]:
    """List every requested split, validating all names before any pixel is read."""
    if not src.is_dir():
        raise LayoutError(f"{src}: source folder not found")
    listings = [list_split(src, split) for split in splits]
    _check_no_leakage(listings)
    return listings
