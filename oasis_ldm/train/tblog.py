"""TensorBoard and console logging, rank 0 only.

Image grids also land in RUN_DIR/images/ as PNG files, for clusters where TensorBoard is
out of reach. A resumed run opens its writer with `purge_step` = the first step it will log again, so
whatever a killed process wrote past its last checkpoint is hidden by TensorBoard and the
curves neither repeat nor step backwards. Other ranks get a logger that does nothing. Every
file written is listed in run.json (`rundir.note_outputs`): the only files a later clean-up
may remove.
"""

from __future__ import annotations

import math
import os
import socket
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.tensorboard import SummaryWriter
from torchvision.utils import make_grid

from oasis_ldm.atomic import atomic_path
from oasis_ldm.train import rundir


class TrainLogger:
    def __init__(self, run_dir: Path, *, enabled: bool, first_step: int, max_steps: int) -> None:
        self.enabled = enabled
        self.max_steps = max_steps
        self.run_dir = run_dir
        self.image_dir = run_dir / "images"
        self.writer = None
        if enabled:
            # Also right for a fresh start over the events of a run killed before its first
            # checkpoint: everything from step 1 on is superseded.
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=first_step)
            self._note_events()
        self._t0 = time.perf_counter()
        self._step0 = first_step - 1

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def images(self, step: int, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
        """`images` are uint8 (B, 1, H, W)."""
        if self.writer:
            grid = make_grid(images, nrow=nrow, padding=2, pad_value=255)
            self.writer.add_image(tag, grid, step)
            self.image_dir.mkdir(exist_ok=True)
            name = f"{tag.replace('/', '_')}_{step:08d}.png"
            write_png(grid[0].cpu().numpy(), self.image_dir / name)
            rundir.note_outputs(self.run_dir, [self.image_dir / name])

    def console(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._t0
        done = step - self._step0
        eta = elapsed / max(done, 1) * (self.max_steps - step)
        parts = " | ".join(f"{k.removeprefix('loss/').removeprefix('train/')} {_fmt(v)}" for k, v in values.items())
        print(f"step {step:>7}/{self.max_steps} | {parts} | eta {_duration(eta)}", flush=True)

    def config_changes(self, step: int, changes: list) -> None:
        """A resume's config changes, as text at the step they take effect (TEXT tab)."""
        if self.writer and changes:
            lines = "\n".join(f"- `{c}`" for c in changes)
            self.writer.add_text("config/changes", f"from step {step}:\n{lines}", step)

    def hparams(self, hparams: dict[str, float | int | str | bool], metrics: dict[str, float]) -> None:
        if self.writer:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer:
            self.writer.flush()

    def close(self) -> None:
        if self.writer:
            self.writer.close()
            self._note_events()  # add_hparams wrote a file of its own

    def _note_events(self) -> None:
        """Record this process's event files (TensorBoard names them by host and pid)."""
        mine = f"events.out.tfevents.*.{socket.gethostname()}.{os.getpid()}.*"
        rundir.note_outputs(self.run_dir, sorted((self.run_dir / "tb").glob(f"**/{mine}")))


def write_png(grey: np.ndarray, path: Path) -> None:
    """uint8 (H, W) -> PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(grey).save(tmp, format="png")


def _fmt(value: float) -> str:
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.4g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
