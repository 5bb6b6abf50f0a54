"""The GPU check: the project's CUDA paths in one command, under 8 minutes on one CUDA device.

    python bench/gpu_check.py                      # on a machine with a CUDA device
    python bench/gpu_check.py --device cpu --quick # the same steps on the CPU, to try the script

1. the CUDA-marked tests (`pytest -m cuda`);
2. demo data: MNI152 slices where nilearn is installed, else synthetic ellipses with masks;
3. vae, then ldm training with bf16 autocast and torch.compile for `--steps` steps each; the
   ldm run gets SIGUSR2 half-way and is resumed, and the step counter must continue;
4. `--samples` DDIM-50 samples in bf16 (`python -m oasis_ldm.sampling`);
5. `bench/train_step.py --bf16 --compile`: img/s and MFU of the oasis256 training steps.
Every figure goes into the last line, one JSON object; the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")


def run(name: str, cmd: list[str], results: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run one step, record its seconds and whether it passed, echo its tail on failure."""
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        out = subprocess.CompletedProcess(cmd, 124, "", f"timed out after {timeout} s")
    results[f"{name}_s"] = round(time.perf_counter() - t0, 1)
    results[f"{name}_ok"] = out.returncode == 0
    if out.returncode != 0:
        print((out.stdout + out.stderr)[-3000:], flush=True)
    return out


def synthetic_png_tree(root: Path, counts: dict[str, int], size: int = 64) -> None:
    """OASIS-layout ellipses with four-class masks, for machines without nilearn."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    case = 1
    for split, n in counts.items():
        images, masks = root / f"keras_png_slices_{split}", root / f"keras_png_slices_seg_{split}"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(n):
            r = ((yy - rng.uniform(-0.1, 0.1)) / rng.uniform(0.25, 0.4)) ** 2 + (xx / rng.uniform(0.2, 0.35)) ** 2
            label = np.select([r < 0.15, r < 0.5, r < 1.0], [3, 2, 1], 0)
            image = np.choose(label, [0, 60, 130, 220]) + rng.normal(0, 4, label.shape) * (label > 0)
            name = f"{case + i // 32:03d}_slice_{i % 32}.nii.png"
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(images / f"case_{name}")
            Image.fromarray((label * 85).astype(np.uint8)).save(masks / f"seg_{name}")
        case += n // 32 + 1


def make_data(out: Path, results: dict) -> Path:
    h5 = out / "demo.h5"
    if h5.exists():
        return h5
    png = out / "png"
    try:
        import nilearn  # noqa: F401

        run("data", [sys.executable, "tools/make_demo_data.py", "--out", str(png)], results, 300)
    except ImportError:
        synthetic_png_tree(png, {"train": 384, "validate": 96, "test": 96})
        results["data"] = "synthetic ellipses (no nilearn)"
    run("pack", [sys.executable, "tools/pack_h5.py", "--src", str(png), "--out", str(h5)], results, 300)
    return h5


def train_cmd(stage: str, run_dir: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "oasis_ldm.train", "--stage", stage, "--config", "demo", "--run-dir", str(run_dir)]
    return cmd + [f"--set={s}" for s in sets]


def images_per_s(log: str) -> float | None:
    values = [float(v) for v in re.findall(r"images_per_s ([0-9.]+)", log)]
    return values[-1] if values else None


def stop_and_resume(run_dir: Path, sets: list[str], steps: int, results: dict, timeout: float) -> None:
    """Train the ldm, SIGUSR2 it half-way, resume: the counter must continue, not restart."""
    cmd = train_cmd("ldm", run_dir, sets)
    print(f"== ldm (stopped half-way, then resumed): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"step\s+(\d+)/", line)
        if match and int(match.group(1)) >= steps // 2:
            proc.send_signal(signal.SIGUSR2)
            break
    lines += proc.communicate(timeout=timeout)[0].splitlines(keepends=True)
    saved = re.findall(r"saved last.pt at step (\d+)", "".join(lines))
    resumed = run("ldm_resume", cmd, results, timeout)
    again = re.findall(r"resumed ldm from step (\d+)", resumed.stdout)
    results["ldm_s"] = round(time.perf_counter() - t0, 1)
    results["ldm_stop_exit"] = proc.returncode
    results["ldm_saved_at"] = int(saved[0]) if saved else None
    results["ldm_resumed_from"] = int(again[0]) if again else None
    results["ldm_ok"] = bool(saved and again and saved[0] == again[0] and proc.returncode == 128 + signal.SIGUSR2)
    results["ldm_img_s"] = images_per_s(resumed.stdout)


def bench_step(results: dict, device: str, timeout: float) -> None:
    cmd = [sys.executable, "bench/train_step.py", "--device", device]
    cmd += ["--bf16", "--compile"] if device == "cuda" else ["--bf16"]
    out = run("train_step_bench", cmd, results, timeout)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if lines:
        results["train_step"] = json.loads(lines[-1])


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check", help="work folder")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only tries the script")
    p.add_argument("--steps", type=int, default=300, help="training steps of each stage")
    p.add_argument("--samples", type=int, default=256, help="samples drawn in bf16 at the end")
    p.add_argument("--quick", action="store_true", help="20 steps, 8 samples, no tests or bench (try the script)")
    args = p.parse_args()
    steps, samples = (20, 8) if args.quick else (args.steps, args.samples)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {"device": args.device}
    t0 = time.perf_counter()
    if not args.quick:
        run("cuda_tests", [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"], results, 240)
    h5 = make_data(args.out, results)
    common = [f"data.path={h5}", f"train.device={args.device}", "train.precision=bf16", f"train.max_steps={steps}"]
    common += [f"train.compile={args.device == 'cuda'}", f"train.log_every={max(1, steps // 10)}"]
    common += [f"train.ckpt_every={max(1, steps // 3)}", f"train.image_every={steps}"]
    vae_dir, ldm_dir = args.out / "runs" / "vae", args.out / "runs" / "ldm"
    vae = run("vae", train_cmd("vae", vae_dir, common), results, 240)
    results["vae_img_s"] = images_per_s(vae.stdout)
    stop_and_resume(ldm_dir, [*common, f"ldm.vae_ckpt={vae_dir}"], steps, results, 240)
    sampling = [sys.executable, "-m", "oasis_ldm.sampling", "--ckpt", str(ldm_dir), "--out", str(args.out / "samples")]
    sampling += ["--num-samples", str(samples), "--batch-size", str(min(samples, 256)), "--precision", "bf16"]
    sampling += ["--device", args.device]
    run("sampling", sampling, results, 240)
    if not args.quick:
        bench_step(results, args.device, 300)
    results["total_s"] = round(time.perf_counter() - t0, 1)
    failed = [k.removesuffix("_ok") for k, v in results.items() if k.endswith("_ok") and not v]
    results["failed"] = failed
    print(json.dumps(results))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
