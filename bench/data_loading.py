"""Data-loading throughput: the seed's PNG pipeline vs the packed HDF5 file, and pack_h5 itself.

    python bench/data_loading.py [--data OASIS_DIR] [--batch-size 32] [--workers 2] [--seconds 5]

All numbers come from one run on one machine. Rows:
  (a) the seed's pipeline: PNG decode (PIL, ImageFolder's RGB loader) + Grayscale, Resize(1.25x),
      RandomResizedCrop(scale 0.8-1), ToTensor, Normalize, per image in DataLoader workers;
  (b) OasisH5Dataset from the file, raw uint8 batches (what the trainer consumes: it augments on
      its device); the file is in the page cache after packing, as on a node that read it once;
  (c) OasisH5Dataset in RAM, raw uint8 batches; (c0) the same with 0 workers, which is how the
      in-RAM mode is best used (indexing RAM is cheaper than shipping batches between processes);
  (z) the DataLoader's own ceiling: workers that return a ready batch (no work), same settings;
  (d) augment_batch(mode="crop") on this CPU alone (on a GPU the trainer pays this on the device).
Then pack_h5 on an OASIS-sized input (9,664/1,120/544 pairs hard-linked from the demo slices
under new case numbers), run as a child process: seconds and peak RSS (RUSAGE_CHILDREN of a bare
interpreter that runs it: the largest single process; and the sum over its processes).
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler

from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.demo import write_demo
from oasis_ldm.data.oasis import IMAGE_DIR, MASK_DIR, image_name, list_splits, mask_name
from oasis_ldm.data.pack import COMPRESSIONS, DEFAULT_COMPRESSION, PackOptions, pack
from oasis_ldm.data.transforms import augment_batch, to_float

REPO = Path(__file__).resolve().parents[1]
OASIS_SIZES = {"train": 9664, "validate": 1120, "test": 544}


class SeedPngDataset(Dataset):
    """The seed's ImageFolder pipeline over one split's PNGs (label 0, as ImageFolder returns)."""

    def __init__(self, files: list[Path], size: int) -> None:
        from torchvision import transforms

        self.files = files
        self.transform = transforms.Compose(
            [
                transforms.Grayscale(),
                transforms.Resize(int(1.25 * size)),
                transforms.RandomResizedCrop(size, scale=(0.8, 1.0)),
                transforms.ToTensor(),
                transforms.Normalize((0.5,), (0.5,)),
            ]
        )

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from torchvision.datasets.folder import pil_loader

        return self.transform(pil_loader(str(self.files[i]))), 0


class ReadyBatch(Dataset):
    """No work at all: the same uint8 batch every time. Measures the DataLoader's own ceiling
    (moving batches from workers to the main process through shared memory)."""

    def __init__(self, n: int, size: int, batch_size: int) -> None:
        self.n, self.batch = n, torch.zeros(batch_size, 1, size, size, dtype=torch.uint8)

    def __len__(self) -> int:
        return self.n

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor]:
        return list(self.batch[: len(indices)].unbind(0))


def images_per_second(ds: Dataset, batch_size: int, workers: int, seconds: float, repeat: int) -> float:
    """Median over `repeat` runs of: batches from a shuffled DataLoader for `seconds`, counted
    after one warm-up batch (so worker start-up is excluded)."""
    rates = []
    for _ in range(repeat):
        sampler = RandomSampler(ds, num_samples=10**8)
        it = iter(DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers))
        next(it)
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            batch = next(it)
            count += len(batch[0] if isinstance(batch, (list, tuple)) else batch)
        rates.append(count / (time.perf_counter() - start))
        del it
    return float(np.median(rates))


def augment_rate(ds: OasisH5Dataset, batch_size: int, seconds: float) -> float:
    """augment_batch(mode="crop") on uint8 batches already in memory, in this process."""
    batch = ds.read_raw(np.arange(batch_size) % len(ds))
    g = torch.Generator().manual_seed(0)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        augment_batch(to_float(batch), "crop", g)
        count += batch_size
    return count / (time.perf_counter() - start)


def oasis_sized_tree(src: Path, dst: Path) -> int:
    """Hard-link src's pairs (cycled) into an OASIS-sized tree under new case numbers."""
    pairs = [(row.image, row.mask) for listing in list_splits(src) for row in listing.rows]
    k, case = 0, 1
    for split, n in OASIS_SIZES.items():
        image_dir, mask_dir = dst / IMAGE_DIR.format(split=split), dst / MASK_DIR.format(split=split)
        image_dir.mkdir(parents=True)
        mask_dir.mkdir(parents=True)
        for i in range(n):
            image, mask = pairs[k % len(pairs)]
            _link(image, image_dir / image_name(case + i // 32, i % 32))
            _link(mask, mask_dir / mask_name(case + i // 32, i % 32))
            k += 1
        case += n // 32 + 1
    return k


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem: copy instead
        shutil.copyfile(src, dst)


class TreeRss:
    """Peak summed RSS of a process and its children, sampled from /proc (Linux)."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self, pid: int) -> int:
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(c) for c in f.read().split()]
        except (OSError, StopIteration, ValueError):
            return 0
        return kb + sum(self._rss(c) for c in children)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss(self.pid))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1024


# A bare interpreter runs pack_h5 and reports RUSAGE_CHILDREN: Linux carries the memory high-water
# mark of the process a child was forked from across exec, so measured from this (torch-sized)
# process every child would look as large as the benchmark itself.
MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(json.dumps({"rc": proc.returncode, "seconds": seconds, "maxrss_kib": rss, "stderr": proc.stderr}))
"""


def time_pack(src: Path, out: Path, compression: str, workers: int) -> tuple[float, float, float]:
    """Run tools/pack_h5.py as a child: seconds, peak RSS of its largest process and of its
    process tree (summed, sampled every 50 ms), both in MiB."""
    cmd = [sys.executable, str(REPO / "tools" / "pack_h5.py"), "--src", str(src), "--out", str(out)]
    cmd += ["--compression", compression, "--workers", str(workers), "--overwrite"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", MEASURE, *cmd], env=env, stdout=subprocess.PIPE, text=True)
    tree = TreeRss(proc.pid)
    stdout, _ = proc.communicate()
    tree_mib = tree.stop()
    result = json.loads(stdout)
    if result["rc"]:
        raise SystemExit(f"data_loading: pack_h5 failed: {result['stderr'].strip()}")
    return result["seconds"], result["maxrss_kib"] / 1024, tree_mib


def read_rates(path: Path, batch_size: int, batches: int = 60) -> tuple[float, float]:
    """Random raw batches read per second in this process (images/s), and seconds to load
    the train split into RAM. The file was just written, so it is in the page cache."""
    ds = OasisH5Dataset(path, "train", raw=True)
    rng = np.random.default_rng(0)
    ds.__getitems__(rng.integers(0, len(ds), batch_size).tolist())
    start = time.perf_counter()
    for _ in range(batches):
        ds.__getitems__(rng.integers(0, len(ds), batch_size).tolist())
    rate = batches * batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    OasisH5Dataset(path, "train", raw=True, in_memory=True)
    return rate, time.perf_counter() - start


def compare_compression(demo: Path, big: Path, work: Path, workers: int, batch_size: int) -> None:
    """Write time, size and read speed of every --compression on the demo and OASIS-sized data."""
    print(f"\n{'compression':<12} {'data':<12} {'pack s':>6}  {'RSS MiB':>7}  {'size MiB':>8}  ", end="")
    print(f"{'random reads img/s':>18}  {'train->RAM s':>12}")
    for name, src in (("demo", demo), ("oasis-sized", big)):
        for compression in COMPRESSIONS:
            out = work / f"cmp-{name}-{compression}.h5"
            seconds, rss, _ = time_pack(src, out, compression, workers)
            rate, load = read_rates(out, batch_size)
            size = out.stat().st_size / 2**20
            print(f"{compression:<12} {name:<12} {seconds:6.1f}  {rss:7.0f}  {size:8.1f}  {rate:18.0f}  {load:12.2f}")
            out.unlink()


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, help="an OASIS-layout folder (default: generate the demo data)")
    p.add_argument("--batch-size", type=int, default=32, help="DataLoader batch size for every row (32)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for every row, and pack_h5's (2)")
    p.add_argument("--seconds", type=float, default=5.0, help="seconds per throughput measurement (5)")
    p.add_argument("--repeat", type=int, default=3, help="measurements per loader row; the median is shown (3)")
    p.add_argument("--compare-compression", action="store_true", help="also pack with none/lzf/gzip and compare")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="oasis-bench-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            started = time.perf_counter()
            data = work / "demo"
            write_demo(data)
            print(f"demo data: {data} ({time.perf_counter() - started:.1f} s)")
        big = work / "oasis-sized"
        pairs = oasis_sized_tree(data, big)
        pack_s, pack_rss, tree_mib = time_pack(big, work / "oasis.h5", DEFAULT_COMPRESSION, args.workers)
        (work / "oasis.h5").unlink()
        h5 = work / "demo.h5"
        pack(data, h5, PackOptions(workers=args.workers, splits=("train",)))
        train = [row.image for row in list_splits(data, ("train",))[0].rows]
        size = OasisH5Dataset(h5, "train").size[0]
        b, w, s, r = args.batch_size, args.workers, args.seconds, args.repeat
        rates = {
            "a": images_per_second(SeedPngDataset(train, size), b, w, s, r),
            "b": images_per_second(OasisH5Dataset(h5, "train", raw=True), b, w, s, r),
            "c": images_per_second(OasisH5Dataset(h5, "train", raw=True, in_memory=True), b, w, s, r),
            "c0": images_per_second(OasisH5Dataset(h5, "train", raw=True, in_memory=True), b, 0, s, r),
            "z": images_per_second(ReadyBatch(len(train), size, b), b, w, s, r),
            "d": augment_rate(OasisH5Dataset(h5, "train", raw=True, in_memory=True), b, s),
        }
        report(args, len(train), size, rates, pairs, pack_s, pack_rss, tree_mib)
        if args.compare_compression:
            compare_compression(data, big, work, args.workers, args.batch_size)
        summary = {
            "ram_vs_png": round(rates["c"] / rates["a"], 2),
            "disk_vs_png": round(rates["b"] / rates["a"], 2),
            "pack_s": round(pack_s, 2),
            "pack_rss_mib": round(pack_rss, 1),
            "png_img_s": round(rates["a"], 1),
            "disk_img_s": round(rates["b"], 1),
            "ram_img_s": round(rates["c"], 1),
            "ram_0_workers_img_s": round(rates["c0"], 1),
            "loader_ceiling_img_s": round(rates["z"], 1),
            "augment_crop_cpu_img_s": round(rates["d"], 1),
            "pack_tree_rss_mib": round(tree_mib, 1),
            "pack_pairs": pairs,
        }
    print(json.dumps(summary))


def report(args, n_train, size, rates, pairs, pack_s, pack_rss, tree_mib) -> None:
    print(
        f"\ntrain split: {n_train} slices {size}x{size}; batch {args.batch_size}, {args.workers} workers, "
        f"median of {args.repeat} x {args.seconds:g} s; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs"
    )
    rows = [
        ("(a) seed pipeline: PNG + PIL transforms, float", rates["a"]),
        ("(b) OasisH5Dataset on disk, raw uint8 batches", rates["b"]),
        ("(c) OasisH5Dataset in RAM, raw uint8 batches", rates["c"]),
        ("(c0) the same in RAM with 0 workers (no IPC)", rates["c0"]),
        ("(z) DataLoader ceiling: ready uint8 batches, no work", rates["z"]),
        ("(d) augment_batch('crop') on this CPU, float", rates["d"]),
    ]
    print(f"{'pipeline':<50} {'images/s':>10} {'vs (a)':>8}")
    for name, rate in rows:
        print(f"{name:<50} {rate:10.0f} {rate / rates['a']:7.1f}x")
    print(f"ratio (c)/(a) = {rates['c'] / rates['a']:.1f}  (target >= 20)")
    print(f"ratio (b)/(a) = {rates['b'] / rates['a']:.1f}  (target >= 3)")
    print(
        f"pack_h5 {pairs} pairs, {DEFAULT_COMPRESSION}, {args.workers} workers: {pack_s:.1f} s (target <= 30), "
        f"peak RSS {pack_rss:.0f} MiB largest process (target <= 1024), {tree_mib:.0f} MiB summed over its processes"
    )


if __name__ == "__main__":
    main()
