"""The GPU check: the project's CUDA paths in one command, under 8 minutes on one CUDA device.

    python bench/gpu_check.py                      # on a machine with a CUDA device
    python bench/gpu_check.py --device cpu --quick # the same steps on the CPU, to try the script

Every run works in a fresh folder (OUT/run-<time>-<pid>), so a second run on a warm machine
is judged on its own outputs. Training runs as a process group of one rank through the
trainer's own `init_distributed` (OASIS_GROUP_OF_ONE=1: NCCL on a GPU, gloo on the CPU), so
DDP, `no_sync` (two accumulation rounds a step) and, on CUDA, torch.compile all run:
1. demo data: MNI152 slices where nilearn is installed, else synthetic ellipses with masks;
2. vae, discriminator on from a third of the way: once uninterrupted, once stopped with
   SIGUSR2 half-way and resumed; the resumed run's per-step losses must equal the
   uninterrupted run's (bit for bit on the CPU; within `GPU_LOSS_RTOL` on a GPU, whose
   backward kernels sum with atomics);
3. ldm on that autoencoder (latent cache; bf16 and compile on CUDA);
4. the CUDA-marked tests (`pytest -m cuda`), given that ldm as the trained demo checkpoint;
5. `--samples` DDIM-50 samples in bf16 (`python -m oasis_ldm.sampling`) and the sampling
   bench (DDIM-50 against DDPM, per-step noise: eta 1 against 0);
6. host syncs per training step of every mode (bench/step_probe.py syncs: one each);
7. peak memory of oasis256's vae and ldm steps at the preset's micro-batches (CUDA);
8. `bench/train_step.py --bf16 --compile`: img/s and MFU of the oasis256 training steps.
Each step is timed and bounded by what is left of `--budget`; a step that no longer fits is
skipped and named. The last line is one JSON object, also after a timeout, SIGTERM or Ctrl-C
(also written to the run folder as result.json); the exit status is 1 if a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue

import numpy as np

REPO = Path(__file__).resolve().parents[1]
GPU_LOSS_RTOL = 0.02  # a wrong batch or draw moves a step's loss by far more (timesteps, crops)
RESERVE_S = 15.0  # kept back from the budget for the last line
MIN_STEP_S = 20.0  # a step with less time than this left is skipped, not started


class Interrupted(Exception):
    """SIGTERM, SIGHUP or SIGINT reached the check: report what was done and stop."""


class Check:
    """The run folder, the budget, the results so far, and the one child process running."""

    def __init__(self, out: Path, budget_s: float, device: str) -> None:
        self.out, self.device = out, device
        self.deadline = time.monotonic() + budget_s
        # skipped: out of budget; not_run: not part of this kind of run (--quick, or no CUDA)
        self.results: dict = {"device": device, "out": str(out), "skipped": [], "not_run": []}
        self.child: subprocess.Popen | None = None
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.deadline - time.monotonic() - RESERVE_S

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        env.update(extra)
        return env

    def save(self) -> None:
        self.results["total_s"] = round(time.perf_counter() - self.t0, 1)
        self.results["failed"] = sorted(
            k.removesuffix("_ok") for k, v in self.results.items() if k.endswith("_ok") and not v
        )
        (self.out / "result.json").write_text(json.dumps(self.results, indent=1))

    def fits(self, name: str) -> bool:
        if self.left() < MIN_STEP_S:
            self.results["skipped"].append(name)
            print(f"== {name}: skipped ({self.left():.0f} s of the budget left)", flush=True)
            return False
        return True

    def run(self, name: str, cmd: list[str], cap_s: float, **env: str) -> subprocess.CompletedProcess:
        """Run one step within min(cap_s, what is left); record its seconds and whether it passed."""
        timeout = min(cap_s, self.left())
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        out = self.wait(subprocess.Popen(cmd, **self._popen(env)), timeout)
        self.results[f"{name}_s"] = round(time.perf_counter() - t0, 1)
        self.results[f"{name}_ok"] = out.returncode == 0
        if out.returncode != 0:
            print(out.stdout[-4000:], flush=True)
        self.save()
        return out

    def _popen(self, env: dict[str, str]) -> dict:
        return dict(
            env=self.env(**env), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True,  # its own process group: a timeout ends its workers too
        )  # fmt: skip

    def wait(self, proc: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
        self.child = proc
        try:
            stdout, _ = proc.communicate(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            self.kill()
            stdout = (proc.communicate()[0] or "") + f"\ntimed out after {timeout:.0f} s"
            proc.returncode = 124
        finally:
            self.child = None
        return subprocess.CompletedProcess(proc.args, proc.returncode, stdout or "", "")

    def kill(self) -> None:
        if self.child is not None and self.child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.child.pid, signal.SIGKILL)


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


def make_data(check: Check, quick: bool) -> Path:
    """MNI152 demo slices where nilearn is installed (synthetic ones for --quick or without it)."""
    png, h5 = check.out / "png", check.out / "demo.h5"
    try:
        if quick:
            raise ImportError
        import nilearn  # noqa: F401

        check.run("data", [sys.executable, "tools/make_demo_data.py", "--out", str(png)], 120)
        check.results["data"] = "MNI152 demo slices"
    except ImportError:
        synthetic_png_tree(png, {"train": 384, "validate": 96, "test": 96})
        check.results["data"] = "synthetic ellipses"
    check.run("pack", [sys.executable, "tools/pack_h5.py", "--src", str(png), "--out", str(h5)], 120)
    return h5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_of_one(device: str) -> dict[str, str]:
    """The variables of a one-rank process group through init_distributed (NCCL on CUDA)."""
    env = {"OASIS_GROUP_OF_ONE": "1", "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    if device == "cuda":
        env["NCCL_DEBUG"] = "VERSION"  # NCCL names itself once it has made the communicator
    return env


def train_cmd(stage: str, run_dir: Path, sets: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "oasis_ldm.train", "--stage", stage, "--config", "demo", "--run-dir", str(run_dir)]
    return cmd + [f"--set={s}" for s in sets]


def losses(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every logged loss/* scalar of a run, by tag and step (TensorBoard's events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {
        tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"] if tag.startswith("loss/")
    }


def largest_difference(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], steps: range) -> float:
    """The largest relative difference of two runs' losses over `steps` (inf where only one has a value)."""
    worst = 0.0
    for tag in a.keys() | b.keys():
        for step in steps:
            x, y = a.get(tag, {}).get(step), b.get(tag, {}).get(step)
            if x is None and y is None:  # a term that starts later (the discriminator's)
                continue
            if x is None or y is None:
                return float("inf")
            worst = max(worst, abs(x - y) / max(abs(x), abs(y), 1e-12))
    return worst


def stopped_half_way(check: Check, run_dir: Path, sets: list[str], steps: int, cap_s: float) -> int | None:
    """Train until step >= steps // 2, send SIGUSR2, and return the step last.pt was saved at.

    A thread reads the log, so a run that goes quiet cannot hold the check past its budget.
    """
    cmd = train_cmd("vae", run_dir, sets)
    print(f"== vae_stopped (SIGUSR2 half-way): {' '.join(cmd)}", flush=True)
    t0, deadline = time.perf_counter(), time.monotonic() + min(cap_s, check.left())
    proc = subprocess.Popen(cmd, **check._popen(group_of_one(check.device)))
    check.child, lines, signalled = proc, [], False
    queue = _lines_of(proc)
    while (left := deadline - time.monotonic()) > 0:
        try:
            line = queue.get(timeout=left)
        except Empty:
            break
        if line is None:
            break
        lines.append(line)
        match = re.match(r"step\s+(\d+)/", line)
        if not signalled and match and int(match.group(1)) >= steps // 2:
            proc.send_signal(signal.SIGUSR2)
            signalled = True
    try:
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    except subprocess.TimeoutExpired:
        check.kill()
        code = 124
    check.child = None
    log = "".join(lines)
    saved = re.findall(r"saved last.pt at step (\d+)", log)
    check.results["vae_stopped_s"] = round(time.perf_counter() - t0, 1)
    check.results["vae_stopped_ok"] = code == 128 + signal.SIGUSR2 and bool(saved)
    if not check.results["vae_stopped_ok"]:
        print(log[-4000:], flush=True)
    check.save()
    return int(saved[0]) if saved else None


def _lines_of(proc: subprocess.Popen) -> Queue:
    """The process's output lines as they come, then None."""
    lines: Queue = Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def vae_stop_and_resume(check: Check, sets: list[str], steps: int, cap_s: float) -> Path:
    """The vae uninterrupted, and stopped half-way then resumed: the same losses at every step."""
    whole, stopped = check.out / "runs" / "vae", check.out / "runs" / "vae_stopped"
    out = check.run("vae", train_cmd("vae", whole, sets), cap_s, **group_of_one(check.device))
    if check.device == "cuda":
        check.results["nccl_ok"] = "NCCL version" in out.stdout
    check.results["vae_rounds_ok"] = "x 2 rounds" in out.stdout  # two rounds: no_sync ran
    if not check.fits("vae_stopped"):
        return whole
    at = stopped_half_way(check, stopped, sets, steps, cap_s)
    if at is None or not check.fits("vae_resumed"):
        return whole
    resumed = check.run("vae_resumed", train_cmd("vae", stopped, sets), cap_s, **group_of_one(check.device))
    check.results["vae_resumed_from"] = (
        int(m[0]) if (m := re.findall(r"resumed vae from step (\d+)", resumed.stdout)) else None
    )
    a, b = losses(whole), losses(stopped)
    check.results["vae_loss_rel_diff_before_stop"] = largest_difference(a, b, range(1, at + 1))
    check.results["vae_loss_rel_diff_after_resume"] = largest_difference(a, b, range(at + 1, steps + 1))
    tolerance = 0.0 if check.device == "cpu" else GPU_LOSS_RTOL
    diffs = (check.results["vae_loss_rel_diff_before_stop"], check.results["vae_loss_rel_diff_after_resume"])
    check.results["vae_resume_ok"] = check.results["vae_resumed_from"] == at and max(diffs) <= tolerance
    return whole


def sampling(check: Check, ldm_dir: Path, samples: int, quick: bool) -> None:
    cmd = [sys.executable, "-m", "oasis_ldm.sampling", "--ckpt", str(ldm_dir), "--out", str(check.out / "samples")]
    precision = "bf16" if check.device == "cuda" else "fp32"
    cmd += ["--num-samples", str(samples), "--batch-size", str(min(samples, 256)), "--precision", precision]
    check.run("sampling", [*cmd, "--device", check.device], 180)
    if quick:  # its DDPM-1000 takes minutes on a CPU
        check.results["not_run"].append("sampling_bench")
    elif check.fits("sampling_bench"):
        images = "64" if check.device == "cuda" else "2"
        bench = [
            sys.executable,
            "bench/sampling.py",
            "--ckpt",
            str(ldm_dir),
            "--images",
            images,
            "--device",
            check.device,
        ]
        last_json(check, "sampling_bench", bench, 180)


def last_json(check: Check, name: str, cmd: list[str], cap_s: float) -> None:
    """Run a benchmark step and keep the JSON object its last line prints."""
    out = check.run(name, cmd, cap_s)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if lines:
        check.results[name.removesuffix("_bench")] = json.loads(lines[-1])


def syncs(check: Check, h5: Path) -> None:
    cmd = [sys.executable, "bench/step_probe.py", "syncs", "--data", str(h5), "--device", check.device]
    if check.device == "cpu":
        cmd += ["--set", "data.image_size=32", "--steps", "1"]
    last_json(check, "syncs_bench", cmd, 240)
    per_step = check.results.get("syncs", {}).get("syncs_per_step", {})
    check.results["one_sync_per_step_ok"] = bool(per_step) and all(v == 1.0 for v in per_step.values())


def run_checks(check: Check, args: argparse.Namespace) -> None:
    steps, samples = (12, 8) if args.quick else (args.steps, args.samples)
    h5 = make_data(check, args.quick)
    precision = "bf16" if check.device == "cuda" else "fp32"  # CPU bf16 is slow, and its own tests cover it
    common = [f"data.path={h5}", f"train.device={check.device}", f"train.precision={precision}"]
    common += [f"train.max_steps={steps}"]
    common += [f"train.compile={check.device == 'cuda'}", "train.log_every=1", f"train.image_every={steps}"]
    common += [f"train.ckpt_every={steps}", "train.micro_batch=8"]  # demo batches: 16 (vae), 32 (ldm)
    common += ["data.image_size=32"] if args.quick else []  # a busy 2-core machine runs it too
    vae_sets = [*common, "vae.adv_weight=0.1", f"vae.disc_start={steps // 3}"]
    vae_dir = vae_stop_and_resume(check, vae_sets, steps, 240)
    ldm_dir = check.out / "runs" / "ldm"
    if not check.fits("ldm"):
        return
    check.run("ldm", train_cmd("ldm", ldm_dir, [*common, f"ldm.vae_ckpt={vae_dir}"]), 240, **group_of_one(check.device))
    if args.quick:
        check.results["not_run"].append("cuda_tests")
    elif check.fits("cuda_tests"):
        tests = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", "tests"]
        check.run("cuda_tests", tests, 240, OASIS_CUDA_TEST_LDM=str(ldm_dir))
    if check.fits("sampling"):
        sampling(check, ldm_dir, samples, args.quick)
    if check.fits("syncs"):
        syncs(check, h5)
    if check.device != "cuda":
        check.results["not_run"].append("memory")
    elif check.fits("memory"):
        last_json(check, "memory_bench", [sys.executable, "bench/step_probe.py", "memory", "--device", "cuda"], 120)
    if args.quick:
        check.results["not_run"].append("train_step")
    elif check.fits("train_step"):
        last_json(
            check,
            "train_step_bench",
            [sys.executable, "bench/train_step.py", "--device", check.device, "--bf16", "--compile"],
            240,
        )


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "gpu_check", help="where run folders go")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu only tries the script")
    p.add_argument("--steps", type=int, default=200, help="training steps of each stage")
    p.add_argument("--samples", type=int, default=256, help="samples drawn in bf16")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for all steps, what no longer fits is skipped (default: 450 on cuda, 900 on cpu)",
    )
    p.add_argument(
        "--quick", action="store_true", help="12 steps at 32 px, 8 samples, no tests or step bench (try the script)"
    )
    args = p.parse_args()
    out = args.out / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    out.mkdir(parents=True)  # never an earlier run's folder: its outputs would pass for this run's
    check = Check(out, args.budget or (450.0 if args.device == "cuda" else 900.0), args.device)

    def interrupted(signum, frame):
        check.kill()
        raise Interrupted(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, interrupted)
    try:
        if args.device == "cuda" and not cuda_available():
            check.results["cuda_ok"] = False
            print("gpu_check: error: torch sees no CUDA device (use --device cpu --quick to try the script)")
        else:
            run_checks(check, args)
    except Interrupted as e:
        check.results["interrupted"] = str(e)
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        check.kill()
        check.save()
        print(json.dumps(check.results), flush=True)
    return 1 if check.results["failed"] or "interrupted" in check.results else 0


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
