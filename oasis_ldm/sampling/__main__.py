"""`python -m oasis_ldm.sampling --ckpt RUN --num-samples N --out DIR`: sharded generation.

Run it once for everything, or as many workers (`srun`, a job array, or --worker/--workers by
hand): each makes its share of the missing shards. With one worker the run ends by merging
into samples.h5, samples.npz and grid.png; with many, run `--merge-only` once they are done.
"""

from __future__ import annotations

import argparse
import sys

from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.sampling.shards import RequestMismatch, merge
from oasis_ldm.sampling.worker import (
    add_request_args,
    check_request_args,
    request_kwargs,
    sample_worker,
    worker_from_env,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m oasis_ldm.sampling", description=__doc__.splitlines()[0])
    add_request_args(p)
    p.add_argument("--worker", type=int, default=None, help="this worker's index (default: from SLURM/torchrun env)")
    p.add_argument("--workers", type=int, default=None, help="number of workers (default: from the environment)")
    p.add_argument("--merge-only", action="store_true", help="only merge the finished shards")
    args = p.parse_args(argv)
    check_request_args(args, p)
    worker, workers = worker_from_env()
    worker = worker if args.worker is None else args.worker
    workers = workers if args.workers is None else args.workers
    try:
        if not args.merge_only:
            sample_worker(args.ckpt, args.out, **request_kwargs(args), worker=worker, workers=workers)
        if args.merge_only or workers == 1:
            print(f"wrote {merge(args.out)}")
    except (CheckpointError, RequestMismatch, FileNotFoundError) as e:
        print(f"oasis_ldm.sampling: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
