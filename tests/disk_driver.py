"""Full and read-only disks, for tests/test_safety.py: run inside a private mount namespace.

    unshare --mount sh -c 'mount tmpfs FULL; mount -o ro tmpfs RO; exec python disk_driver.py \
        FULL RO DATA LDM_RUN VAE_RUN PNG_SRC'

One process runs every case by calling the commands' own `main` (a segmentation fault would
end it with status 139, which the test sees), and prints one JSON object: per case its exit
status, its stderr lines, and what it left on the small disk. FULL is nearly filled by a
filler file at each case and emptied again for the rerun that must then succeed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))


def call(main, argv: list[str]) -> dict:
    """Run a command's main in this process: exit status, stdout and stderr lines."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except Exception as e:  # a traceback instead of one line: recorded, and the next case runs
            rc = f"raised {type(e).__name__}: {e}"
    lines = [x for x in err.getvalue().splitlines() if x.strip() and "it/s]" not in x and "%|" not in x]
    return {"rc": rc, "stdout": out.getvalue(), "stderr": lines}


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves about `leave` bytes free on `disk`."""
    filler = disk / "filler"
    free = shutil.disk_usage(disk).free
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != "filler")


def training(full: Path, data: str) -> dict:
    from oasis_ldm import checkpoint
    from oasis_ldm.train.__main__ import main

    run = full / "run"
    argv = ["--stage", "vae", "--config", str(REPO / "tests" / "tiny.yaml"), "--run-dir", str(run)]
    argv += ["--set", f"data.path={data}", "--set", "train.image_every=100"]
    first = call(main, [*argv, "--set", "train.max_steps=2"])
    filler = fill(full, 200_000)  # a checkpoint of the tiny model is about 1.1 MB
    failed = call(main, [*argv, "--set", "train.max_steps=4"])
    kept = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    left = files(run / "checkpoints")
    filler.unlink()
    rerun = call(main, [*argv, "--set", "train.max_steps=4"])
    step = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    return {"first": first, "failed": failed, "kept_step": kept, "left": left, "rerun": rerun, "step": step}


def sampling(full: Path, ldm: str) -> dict:
    from oasis_ldm.sampling.__main__ import main

    out = full / "samples"
    argv = ["--ckpt", ldm, "--out", str(out), "--device", "cpu", "--num-samples", "4", "--shard-size", "2"]
    argv += ["--batch-size", "2", "--steps", "2"]
    filler = fill(full, 8192)  # room for request.json, not for a shard (11 KB): HDF5 on main segfaulted here
    failed = call(main, argv)
    left = files(out)
    filler.unlink()
    rerun = call(main, argv)
    return {"failed": failed, "left": left, "rerun": rerun, "merged": (out / "samples.h5").is_file()}


def packing(full: Path, src: str) -> dict:
    from pack_h5 import main

    filler = fill(full, 8192)
    failed = call(main, ["--src", src, "--out", str(full / "o.h5"), "--workers", "0", "--compression", "none"])
    left = files(full)
    filler.unlink()
    return {"failed": failed, "left": left}


def read_only(ro: Path, data: str, ldm: str, vae: str) -> dict:
    from evaluate import main as evaluate

    from oasis_ldm.sampling.__main__ import main as sample
    from oasis_ldm.train.__main__ import main as train

    config = str(REPO / "tests" / "tiny.yaml")
    run = ["--stage", "vae", "--config", config, "--run-dir", str(ro / "run"), "--set", f"data.path={data}"]
    samples = ["--ckpt", ldm, "--out", str(ro / "s"), "--num-samples", "2", "--device", "cpu"]
    report = ["--data", data, "--split", "test", "--vae-ckpt", vae, "--out", str(ro / "r.json")]
    return {"train": call(train, run), "sample": call(sample, samples), "evaluate": call(evaluate, report)}


def main() -> None:
    full, ro, data, ldm, vae, src = sys.argv[1:7]
    full, ro = Path(full), Path(ro)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {
        "training": training(full, data),
        "sampling": sampling(full, ldm),
        "packing": packing(full, src),
        "read_only": read_only(ro, data, ldm, vae),
    }
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
