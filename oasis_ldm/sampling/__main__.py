"""`python -m oasis_ldm.sampling --ckpt RUN --num-samples N --out DIR`: sharded generation.

Run it once for everything, or as many workers (`srun`, a job array, both, or --worker/--workers
by hand): each makes its share of the missing or bad shards. With one worker the run ends by
merging into samples.h5, samples.npz and grid.png; with many, run `--merge-only` once they are
done.
"""

from __future__ import annotations

import argparse
import sys

from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.outputs import OutputError
from oasis_ldm.sampling.shards import BadRequest, RequestMismatch, ShardError, merge
from oasis_ldm.sampling.worker import (
    DefaultsHelpFormatter,
    WorkerError,
    add_request_args,
    check_request_args,
    params_of,
    sample_worker,
    worker_from_env,
)
from oasis_ldm.threads import configure_threads


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m oasis_ldm.sampling",
        description=__doc__.splitlines()[0],
        formatter_class=DefaultsHelpFormatter,
    )
    add_request_args(p)
    where = "(default: from the SLURM or torchrun environment, else 0)"
    p.add_argument("--worker", type=int, default=None, help=f"this worker's index {where}")
    p.add_argument("--workers", type=int, default=None, help=f"number of workers {where.replace('0)', '1)')}")
    p.add_argument("--merge-only", action="store_true", help="only merge the finished shards")
    args = p.parse_args(argv)
    check_request_args(args, p)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_threads()  # torch would start one thread per core of the node, not of the job
    try:
        worker, workers = worker_from_env()
        worker = worker if args.worker is None else args.worker
        workers = workers if args.workers is None else args.workers
        if not args.merge_only:
            sample_worker(args.ckpt, args.out, params_of(args), worker=worker, workers=workers, device=args.device)
        if args.merge_only or workers == 1:
            print(f"wrote {merge(args.out)}")
    except (CheckpointError, RequestMismatch, BadRequest, ShardError, WorkerError, OutputError, FileNotFoundError) as e:
        print(f"oasis_ldm.sampling: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "oasis_ldm.sampling: interrupted; the finished shards are kept: rerun the same command to make the rest",
            file=sys.stderr,
        )
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
