"""`python -m oasis_ldm.train --stage {vae,ldm} --config NAME|PATH --run-dir DIR [--set k=v ...]`.

The entry point every launcher calls: torchrun, a plain `srun` in an sbatch script, the
submitit launchers, or a single process on a laptop. Re-running the same command resumes
the run from RUN_DIR/checkpoints/last.pt.
"""

from __future__ import annotations

import argparse
import sys

from oasis_ldm import outputs
from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.config import ConfigError, load_config, presets
from oasis_ldm.data.schema import SchemaError
from oasis_ldm.distributed import DeviceError, PeerError
from oasis_ldm.train.loop import NonFiniteLossError, train
from oasis_ldm.train.order import BatchError
from oasis_ldm.train.preflight import StartError

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS = (
    ConfigError,
    StartError,
    CheckpointError,
    NonFiniteLossError,
    SchemaError,
    BatchError,
    DeviceError,
    PeerError,
    FileNotFoundError,
    outputs.OutputError,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m oasis_ldm.train",
        description="Train the autoencoder (vae) or the latent diffusion U-Net (ldm); resumes RUN_DIR if it exists.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--stage", required=True, choices=("vae", "ldm"), help="which model to train")
    p.add_argument("--config", default="oasis256", help=f"a preset ({', '.join(presets())}) or a YAML file")
    p.add_argument("--run-dir", required=True, help="the run directory (created, or resumed when it exists)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a config value, e.g. --set train.lr=3e-4 (repeatable)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, stage=args.stage)
        train(args.stage, cfg, args.run_dir)
    except USER_ERRORS as e:
        print(f"oasis_ldm.train: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    except OSError as e:  # a write the loop does not name (TensorBoard's events): the disk, or the folder
        if e.errno not in outputs.DISK_ERRNOS:
            raise
        where = e.filename or args.run_dir
        print(f"oasis_ldm.train: error: {outputs.write_failed(where, e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # before the loop took over Ctrl-C: nothing was trained or written
        print("oasis_ldm.train: interrupted while starting", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
