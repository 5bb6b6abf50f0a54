"""The whole pipeline on the embedded demo data, as a user would run it (`make demo`).

    python tools/demo.py --out demo_out            # make demo
    python tools/demo.py --out demo_out --paired   # make demo-paired: image-mask pairs
    python tools/demo.py --out demo_out --docs docs # make docs-pictures: the README's PNGs

demo data (MNI152 slices) -> pack_h5 -> train vae -> train ldm -> 64 samples + grid -> evaluation,
each step the project's own command, run locally (`--cluster local`). Every step is skipped
or resumed when its output already exists, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(title: str, cmd: list[str], done: Path | None = None) -> None:
    """Run one stage of the demo, echoing the command a user would type."""
    if done is not None and done.exists():
        print(f"== {title}: {done} exists, skipping", flush=True)
        return
    print(f"== {title}\n$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO)
    if result.returncode != 0:
        raise SystemExit(f"demo: '{title}' failed (exit {result.returncode}); rerun to continue from here")
    print(f"== {title}: {time.perf_counter() - t0:.0f} s", flush=True)


def copy_pictures(docs: Path, name: str, grid: Path, reconstructions: Path) -> None:
    """The README's pictures: the sample grid and the evaluator's real | reconstruction pairs."""
    docs.mkdir(parents=True, exist_ok=True)
    for src, dst in ((grid, docs / f"{name}_samples.png"), (reconstructions, docs / f"{name}_reconstructions.png")):
        shutil.copyfile(src, dst)
        print(f"== docs: {dst}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="Run the demo pipeline end to end on generated MNI152 slices.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="folder for everything the demo makes")
    p.add_argument("--samples", type=int, default=64, help="how many slices to generate at the end")
    p.add_argument(
        "--paired",
        action="store_true",
        help="the demo-paired preset: image-mask pairs, judged by train-on-synthetic segmentation",
    )
    p.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also copy the sample grid and the real-vs-reconstruction picture here (the README's PNGs)",
    )
    args = p.parse_args(argv)
    out = args.out.resolve()
    py = sys.executable
    config, name = ("demo-paired", "paired") if args.paired else ("demo", "demo")
    png, h5, runs = out / "png", out / "demo.h5", out / "runs" / name
    samples, reports = out / ("paired_samples" if args.paired else "samples"), out / "eval"
    t0 = time.perf_counter()
    step("demo data", [py, "tools/make_demo_data.py", "--out", str(png)], done=png)
    step("pack", [py, "tools/pack_h5.py", "--src", str(png), "--out", str(h5)], done=h5)
    train = [py, "launch/train.py", "--stage", "all", "--config", config, "--run-dir", str(runs)]
    step("train vae, then ldm", [*train, "--set", f"data.path={h5}", "--cluster", "local", "--time", "60"])
    sample = [py, "launch/sample.py", "--ckpt", str(runs / "ldm"), "--num-samples", str(args.samples)]
    step("sample", [*sample, "--out", str(samples), "--batch-size", "64", "--cluster", "local"])
    evaluate = [py, "tools/evaluate.py", "--data", str(h5)]
    vae_report, samples_report = reports / f"{name}_vae_test.json", reports / f"{name}_samples_vs_train.json"
    step("evaluate the vae", [*evaluate, "--split", "test", "--vae-ckpt", str(runs / "vae"), "--out", str(vae_report)])
    judge = [*evaluate, "--split", "train", "--samples", str(samples / "samples.h5"), "--out", str(samples_report)]
    judge += ["--tb", str(runs / "ldm"), *(["--segmentation"] if args.paired else [])]
    step("evaluate the samples" + (" (and segment with them)" if args.paired else ""), judge)
    if args.docs is not None:
        copy_pictures(args.docs, name, samples / "grid.png", vae_report.with_suffix(".png"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    print(f"  samples:      {samples / 'grid.png'}  (all of them: {samples / 'samples.h5'})")
    print(f"  training:     {runs}/vae/images and {runs}/ldm/images (PNG grids)")
    print(f"  evaluation:   {vae_report}, {samples_report} (and .png beside each)")
    print(f"  TensorBoard:  tensorboard --logdir {runs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
