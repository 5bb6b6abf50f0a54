"""`python -m oasis_ldm.train --stage {vae,ldm} --config NAME|PATH --run-dir DIR [--set k=v ...]`.

The entry point every launcher calls: torchrun, a plain `srun` in an sbatch script, the
submitit launchers, or a single process on a laptop. Re-running the same command resumes
the run from RUN_DIR/checkpoints/last.pt.
"""

from __future__ import annotations

import argparse
import sys

from oasis_ldm.checkpoint import CheckpointError
from oasis_ldm.config import ConfigError, load_config, presets
from oasis_ldm.train.loop import NonFiniteLossError, train
from oasis_ldm.train.rundir import RunDirError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m oasis_ldm.train",
        description="Train the autoencoder (vae) or the latent diffusion U-Net (ldm); resumes RUN_DIR if it exists.",
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
    except (ConfigError, RunDirError, CheckpointError, NonFiniteLossError, FileNotFoundError) as e:
        print(f"oasis_ldm.train: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
