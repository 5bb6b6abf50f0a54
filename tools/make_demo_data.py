"""Write a small OASIS-layout PNG folder cut from the MNI152 templates (needs the `demo` extra).

python tools/make_demo_data.py --out data/demo_png
python tools/pack_h5.py --src data/demo_png --out data/demo.h5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tqdm import tqdm

from oasis_ldm.data.demo import DemoError, DemoSpec, write_demo


def _counts(text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three integers, e.g. 12,3,3") from None
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three integers (train,validate,test)")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default = DemoSpec()
    parser = argparse.ArgumentParser(
        prog="make_demo_data",
        description="Write OASIS-like axial brain slices and tissue masks in the keras_png_slices layout.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to create (built as OUT.partial)")
    parser.add_argument("--seed", type=int, default=default.seed, help="random seed; same seed, same bytes")
    parser.add_argument(
        "--cases-per-split",
        type=_counts,
        default=default.cases,
        metavar="TRAIN,VALIDATE,TEST",
        help="cases (subjects) per split (default: %(default)s -> 384/96/96 slices)",
    )
    parser.add_argument(
        "--slices-per-case", type=int, default=default.slices_per_case, help="axial slices per case (default: 32)"
    )
    parser.add_argument("--size", type=int, default=default.size, help="image side in pixels (default: 256)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spec = DemoSpec(cases=args.cases_per_split, slices_per_case=args.slices_per_case, size=args.size, seed=args.seed)
    started = time.perf_counter()
    total = sum(spec.cases) * spec.slices_per_case
    try:
        with tqdm(total=total, desc="make_demo_data", unit="slice", disable=None) as bar:
            counts = write_demo(args.out, spec, overwrite=args.overwrite, progress=bar.update)
    except (DemoError, OSError) as e:
        print(f"make_demo_data: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make_demo_data: interrupted; nothing written", file=sys.stderr)
        return 130
    summary = ", ".join(f"{split} {n}" for split, n in counts.items())
    seconds = time.perf_counter() - started
    print(f"make_demo_data: wrote {args.out} ({summary} slices, seed {spec.seed}, {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
