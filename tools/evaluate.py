"""Evaluate a VAE's reconstructions or a set of samples against a split of the packed data.

    python tools/evaluate.py --data data/oasis.h5 --split test --vae-ckpt runs/vae256 --out vae.json
    python tools/evaluate.py --data data/oasis.h5 --split train --samples samples/ldm256/samples.h5 \\
        --out samples.json [--inception-weights pt_inception-2015-12-05-6726825d.pth] [--tb runs/ldm256]
    python tools/evaluate.py --data data/oasis.h5 --split train --samples samples/paired/samples.h5 \\
        --out paired.json --segmentation      # samples of a paired model: train on synthetic, test on real

Writes the report (JSON) and a side-by-side PNG next to it (real | reconstruction, or
sample | its nearest slice of the split); with --tb, logs the figures to that run's TensorBoard.
Neither output ever replaces an input or a file evaluate did not write: both carry its mark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from oasis_ldm import __version__, outputs
from oasis_ldm.atomic import atomic_path, write_text
from oasis_ldm.checkpoint import LAST, CheckpointError
from oasis_ldm.data.oasis import SPLITS
from oasis_ldm.distributed import pick_device
from oasis_ldm.evaluation import (
    EvaluationError,
    SampleChecks,
    check_segmentation_inputs,
    evaluate_reconstruction,
    evaluate_sample_segmentation,
    evaluate_samples,
)
from oasis_ldm.segmentation import SegmenterTraining
from oasis_ldm.threads import configure_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The flags; every optional flag's help ends with its default."""
    p = argparse.ArgumentParser(prog="evaluate", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, type=Path, help="the packed HDF5 file (tools/pack_h5.py)")
    p.add_argument(
        "--split", default="test", help=f"the split to compare with: {', '.join(SPLITS)} (default: %(default)s)"
    )
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--vae-ckpt", help="a vae run directory or checkpoint: reconstruction metrics over the split")
    what.add_argument("--samples", type=Path, help="a samples.h5 (launch/sample.py): sample metrics against the split")
    p.add_argument("--out", required=True, type=Path, help="report JSON; the PNG goes beside it (OUT with .png)")
    p.add_argument(
        "--inception-weights",
        type=Path,
        default=None,
        help="local Inception-v3 weights (pytorch-fid pt_inception or torchvision format) to add FID and KID "
        "(default: none, no FID or KID)",
    )
    p.add_argument(
        "--tb", type=Path, default=None, help="a run directory: also log the figures to RUN/tb (default: none)"
    )
    p.add_argument(
        "--batch-size", type=int, default=32, help="images per forward pass (reconstruction) (default: %(default)s)"
    )
    p.add_argument(
        "--max-pairs",
        type=int,
        default=2000,
        help="random pairs for the MS-SSIM diversity figures (default: %(default)s)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=16,
        help="nearest-slice candidates kept by the fast prefilter (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the real subset, the pairs and the KID subsets (default: %(default)s)",
    )
    p.add_argument(
        "--segmentation",
        action="store_true",
        help="with --samples of a paired model: train segmenters on the samples' image-mask pairs and on real "
        "pairs of --split, test them on the real test split (tstr_ratio, mask_agreement); minutes on a CPU",
    )
    p.add_argument(
        "--seg-steps",
        type=int,
        default=SegmenterTraining.steps,
        help="training steps of each segmenter (default: %(default)s)",
    )
    p.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to compute (default: %(default)s)"
    )
    args = p.parse_args(argv)
    if args.segmentation and args.samples is None:
        p.error("--segmentation needs --samples (of a paired model)")
    if args.segmentation and args.split == "test":
        p.error(
            "--segmentation --split test: the segmenters are tested on the real test split, so their real "
            "training slices must come from another: use --split train (or validate)"
        )
    if args.seg_steps < 1:
        p.error("--seg-steps must be >= 1")
    return args


def fail(message: str) -> int:
    print(f"evaluate: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


MARK = "oasis-ldm evaluate"  # in every report (`made_by`) and picture (PNG text `Software`) it writes


def ours(path: Path, report: Path) -> bool:
    """Whether `path` is a report or picture evaluate wrote (a report of an earlier release: a
    JSON object with a split and a checkpoint or samples; its picture: beside such a report)."""
    if path.suffix == ".png":
        from PIL import Image

        try:
            with Image.open(path) as im:
                marked = str(im.info.get("Software", "")).startswith(MARK)
        except Exception:  # not an image at all
            return False
        return marked or (path != report and ours(report, report))
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(found, dict):
        return False
    return str(found.get("made_by", "")).startswith(MARK) or (
        "split" in found and ("checkpoint" in found or "samples" in found)
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: OUT and its picture are no input, replace only what evaluate wrote, and
    can be written (OutputError, one line)."""
    out, png = args.out, args.out.with_suffix(".png")
    if png == out:
        raise outputs.OutputError(
            f"--out {out}: the picture goes to OUT with .png, here the report itself: give the report a .json name"
        )
    vae = None if args.vae_ckpt is None else Path(args.vae_ckpt)
    inputs = {
        "--data": args.data,
        "--samples": args.samples,
        "--vae-ckpt": vae / "checkpoints" / LAST if vae is not None and vae.is_dir() else vae,
        "--inception-weights": args.inception_weights,
    }
    for path, what in ((out, "--out"), (png, "--out's picture")):
        outputs.check_not_input(path, inputs, what)
        if path.exists() and not ours(path, out):
            raise outputs.OutputError(
                f"{what} {path}: exists and is not a report or picture of evaluate; refusing to replace it "
                "(choose another --out)"
            )
    outputs.check_writable(out, "--out")


def write_outputs(report: dict, picture: torch.Tensor, out: Path) -> Path:
    from PIL import Image, PngImagePlugin

    write_text(out, json.dumps({**report, "made_by": f"{MARK} {__version__}"}, indent=2) + "\n")
    png = out.with_suffix(".png")
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"{MARK} {__version__}")
    with atomic_path(png) as tmp:
        Image.fromarray(picture.permute(1, 2, 0).contiguous().numpy()).save(tmp, format="png", pnginfo=info)
    return png


def numbers(report: dict, prefix: str = "") -> dict[str, float]:
    """The report's numeric figures, nested ones (seg_dice_per_class) as `outer/inner` keys."""
    out = {}
    for key, value in report.items():
        if isinstance(value, dict):
            out.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def log_to_tensorboard(run_dir: Path, report: dict, picture: torch.Tensor, kind: str) -> None:
    from torch.utils.tensorboard import SummaryWriter

    step = int(report.get("checkpoint_step", 0))
    with SummaryWriter(str(run_dir / "tb")) as writer:
        for key, value in numbers(report).items():
            if key != "checkpoint_step":
                writer.add_scalar(f"eval_{kind}/{key}", value, step)
        writer.add_image(f"eval_{kind}/side_by_side", picture, step)


def main(argv: list[str] | None = None) -> int:
    threads = configure_threads()  # the job's CPUs, not the host's (unless OMP_NUM_THREADS is set)
    args = parse_args(argv)
    if args.split not in SPLITS:
        return fail(f"--split {args.split!r}: expected one of {', '.join(SPLITS)}")
    if not args.data.is_file():
        return fail(f"--data {args.data}: no such file")
    if args.tb is not None and not args.tb.is_dir():
        return fail(f"--tb {args.tb}: not a run directory")
    try:
        check_outputs(args)
    except outputs.OutputError as e:
        return fail(str(e))
    device = pick_device(args.device)
    try:
        if args.vae_ckpt:
            report, picture = evaluate_reconstruction(
                args.vae_ckpt, args.data, args.split, batch_size=args.batch_size, device=device
            )
            kind = "reconstruction"
        else:
            if args.segmentation:  # its inputs fail in a second, before the minutes of the other report
                check_segmentation_inputs(args.samples, args.data, args.split)
            report, picture = evaluate_samples(
                args.samples,
                args.data,
                args.split,
                checks=SampleChecks(max_pairs=args.max_pairs, top_k=args.top_k, seed=args.seed),
                inception_weights=args.inception_weights,
                device=device,
            )
            kind = "samples"
            if args.segmentation:
                report.update(
                    evaluate_sample_segmentation(
                        args.samples, args.data, args.split, steps=args.seg_steps, seed=args.seed, device=device
                    )
                )
    except (EvaluationError, CheckpointError, FileNotFoundError, ValueError) as e:
        return fail(str(e))
    report["torch_threads"] = threads
    if report["data_image_size"] != report["image_size"]:
        size, data = report["image_size"], report["data_image_size"]
        how = "upsampled" if data < size else "downsampled"
        note = f"the {args.split} split's {data}x{data} slices were {how} to {size}x{size}, the model's resolution"
        print(f"evaluate: note: {note} (report: data_image_size, image_size)")
    try:
        with outputs.writing(args.out, "free space and run it again"):
            png = write_outputs(report, picture, args.out)
    except outputs.OutputError as e:
        return fail(str(e))
    if args.tb is not None:
        log_to_tensorboard(args.tb, report, picture, kind)
    shown = {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(json.dumps(shown))
    print(f"evaluate: wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
