"""Pack the OASIS "keras_png_slices" PNG folders into one HDF5 file.

    python tools/pack_h5.py --src data/keras_png_slices_data --out data/oasis.h5

The file layout is documented in oasis_ldm/data/schema.py. Errors print one line naming the
offending file, folder or flag and leave no output behind.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from oasis_ldm.data.oasis import SPLITS
from oasis_ldm.data.pack import COMPRESSIONS, DEFAULT_COMPRESSION, PackError, PackOptions, default_workers, pack


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pack_h5",
        description="Pack OASIS keras_png_slices folders (images and masks) into one HDF5 file.",
        epilog="Images must be 8-bit greyscale PNGs of one size (greyscale saved as RGB/RGBA/LA/palette "
        "is converted; colour, transparency and 16-bit data are refused). Layout of the output: "
        "oasis_ldm/data/schema.py.",
    )
    parser.add_argument(
        "--src",
        type=Path,
        required=True,
        help="folder holding keras_png_slices_{train,validate,test} and, optionally, "
        "keras_png_slices_seg_{train,validate,test}",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="HDF5 file to write (written as OUT.partial, renamed when done)"
    )
    parser.add_argument(
        "--splits",
        default=",".join(SPLITS),
        help=f"comma-separated splits to pack (default: {','.join(SPLITS)}); "
        "train_mean/train_std are stored only when train is packed",
    )
    parser.add_argument(
        "--compression",
        choices=COMPRESSIONS,
        default=DEFAULT_COMPRESSION,
        help=f"how image/mask chunks are stored (default: {DEFAULT_COMPRESSION}): gzip is deflate, "
        "readable by any HDF5 tool; lzf needs h5py's filter to read; none is ~5x larger",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="processes decoding PNGs in parallel; 0 decodes in this process (default: available CPUs, max 8)",
    )
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-read the finished file and check every image and mask against a checksum of its PNG",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once done)")
    return parser.parse_args(argv)


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM (e.g. scancel) unwinds like Ctrl-C, so the partial file is removed."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    # A process started in the background by a non-interactive shell inherits SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    options = PackOptions(
        splits=splits,
        compression=args.compression,
        workers=args.workers,
        verify=args.verify,
        overwrite=args.overwrite,
    )
    try:
        result = pack(args.src, args.out, options)
    except (PackError, OSError) as e:
        print(f"pack_h5: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pack_h5: interrupted; nothing written", file=sys.stderr)
        return 130
    counts = ", ".join(f"{s} {n}" for s, n in result.counts.items())
    stats = "" if result.train_mean is None else f"; train mean {result.train_mean:.3f} std {result.train_std:.3f}"
    print(
        f"pack_h5: wrote {result.path} ({counts} slices; masks: {','.join(result.mask_splits) or 'none'}; "
        f"{result.size_bytes / 2**20:.1f} MiB, {options.compression}, {result.seconds:.1f} s"
        f"{'; verified' if result.verified else ''}{stats})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
