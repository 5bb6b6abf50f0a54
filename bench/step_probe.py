"""Real training steps, probed: host syncs per step by mode, and peak GPU memory of oasis256.

    python bench/step_probe.py syncs --data data/demo.h5 --device cuda
    python bench/step_probe.py memory --device cuda            # oasis256 at its preset micro-batches

`syncs` trains a few steps of each mode (`MODES`: the vae with each augmentation, paired, with
the discriminator; the ldm encoding on the fly, from the latent cache, paired) through the
trainer's own `loop.train_step`, two accumulation rounds a step, after one warm-up step. On
CUDA, torch's sync debug mode counts every synchronising call of the whole step (data, losses,
clipping, optimizer, guard). On the CPU, where nothing synchronises, `SyncSpy` counts the calls
that would on a GPU, in the stages' forward/backward and the guard: reads of a tensor's value,
tensors made from host data, blocking copies of host tensors. The trainer promises one per step
(the guard's read) in every mode.

`memory` builds oasis256's vae (with its discriminator active) and ldm (encoding on the fly)
with random weights on synthetic 256x256 slices and reports the peak memory of one rank's
steps at the preset's micro-batches (8 and 32), eager (no compile). Each prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from oasis_ldm import checkpoint
from oasis_ldm.config import Config, load_config
from oasis_ldm.distributed import DistEnv
from oasis_ldm.train import loop
from oasis_ldm.train.order import plan_batches
from oasis_ldm.train.signals import StopRequest
from oasis_ldm.train.state import TrainState

# name -> (stage, overrides): every augmentation and data path a training step can take.
MODES: dict[str, tuple[str, list[str]]] = {
    "vae_none": ("vae", ["data.augment=none"]),
    "vae_flip": ("vae", ["data.augment=flip"]),
    "vae_crop": ("vae", ["data.augment=crop"]),
    "vae_crop_disc": ("vae", ["data.augment=crop", "vae.adv_weight=0.1", "vae.disc_start=0"]),
    "vae_paired_flip": ("vae", ["data.augment=flip", "data.masks=true"]),
    "vae_paired_crop": ("vae", ["data.augment=crop", "data.masks=true"]),
    "ldm_flip": ("ldm", ["data.augment=flip", "ldm.latent_cache=false"]),
    "ldm_crop": ("ldm", ["data.augment=crop", "ldm.latent_cache=false"]),
    "ldm_cache_flip": ("ldm", ["data.augment=flip", "ldm.latent_cache=true"]),
    "ldm_paired_crop": ("ldm", ["data.augment=crop", "data.masks=true", "ldm.latent_cache=false"]),
}

_READS = {
    torch.Tensor.__bool__,
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.unique,
    torch.masked_select,
}
_MAKES = {torch.tensor, torch.as_tensor, torch.from_numpy, torch.Tensor.new_tensor}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda, torch.Tensor.copy_}


class SyncSpy(TorchFunctionMode):
    """Counts, on the CPU, the calls that would make the host wait for a GPU.

    Reads of a value (bool, item, tolist, ..., boolean indexing); tensors made from host data
    (torch.tensor of Python values, ...): on a device these are blocking copies; and blocking
    copies (`.to`, `.cuda`, `copy_` without non_blocking=True, `as_tensor(t, device=...)`) of a
    tensor that no op inside the spied code made: those live on the host while the step runs
    on the device (module constants, lookup tables).
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self._made: dict[int, weakref.ref] = {}  # id -> tensor (tensors compare element-wise: no set)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._syncs(func, args, kwargs):
            self.calls.append(getattr(func, "__name__", str(func)))
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            # `.to(cpu)` of a CPU tensor returns the tensor itself: a host tensor stays one.
            if isinstance(t, torch.Tensor) and not (args and t is args[0]):
                self._made[id(t)] = weakref.ref(t)
        return out

    def _was_made(self, t: torch.Tensor) -> bool:
        ref = self._made.get(id(t))
        return ref is not None and ref() is t

    def _syncs(self, func: Callable, args: tuple, kwargs: dict) -> bool:
        if func in _MAKES and args and isinstance(args[0], torch.Tensor):  # as_tensor(t): t itself, or a copy
            return "device" in kwargs and not self._was_made(args[0])
        if func in _READS or func in _MAKES:
            return True
        if func is torch.Tensor.__getitem__:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if func in _MOVES and not kwargs.get("non_blocking", False):
            source = args[1] if func is torch.Tensor.copy_ else args[0]
            moves = func is not torch.Tensor.to or _names_a_device(args[1:], kwargs)
            return moves and isinstance(source, torch.Tensor) and not self._was_made(source)
        return False


def _names_a_device(args: tuple, kwargs: dict) -> bool:
    """Whether a `Tensor.to` call names a target device (not only a dtype)."""
    if "device" in kwargs:
        return True
    return bool(args) and isinstance(args[0], (torch.device, str, int, torch.Tensor))


@contextmanager
def counting(device: torch.device) -> Iterator[list[str]]:
    """The synchronising calls made inside the block: torch's own count on CUDA."""
    calls: list[str] = []
    if device.type != "cuda":
        yield calls
        return
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield calls
        finally:
            torch.cuda.set_sync_debug_mode("default")
    calls += [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]


def random_vae(cfg: Config, path: Path, device: torch.device) -> Path:
    """A vae checkpoint with random weights for `cfg` (what an ldm stage encodes with)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    stage = loop.build_stage("vae", cfg, env, path.parent)
    state = TrainState.create(stage, plan_batches(cfg.train.batch_size, 1, cfg.train.micro_batch), cfg)
    checkpoint.atomic_save(state.state_dict(cfg, env), path)
    return path


def build(stage: str, cfg: Config, device: torch.device, run_dir: Path) -> tuple[TrainState, Iterator[Any]]:
    """The trainer's state and micro-batches for `cfg`, built as loop.train builds them (one rank)."""
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    torch.manual_seed(cfg.train.seed)
    plan = plan_batches(cfg.train.batch_size, 1, cfg.train.micro_batch)
    state = TrainState.create(loop.build_stage(stage, cfg, env, run_dir), plan, cfg)
    state.stage.initialise()
    state.wrap(env, cfg)
    data, sampler = loop.make_loader(state.stage, plan, cfg, env)
    return state, loop.micro_batches(data, sampler, state.pos, plan)


@contextmanager
def spied(state: TrainState, device: torch.device) -> Iterator[SyncSpy | None]:
    """On the CPU, the spy around the stage's forward/backward and the guard; else nothing."""
    if device.type == "cuda":
        yield None
        return
    spy, backward, guard = SyncSpy(), state.stage.backward, loop.guard_flags

    def wrap(fn: Callable) -> Callable:
        def run(*args, **kwargs):
            with spy:
                return fn(*args, **kwargs)

        return run

    state.stage.backward, loop.guard_flags = wrap(backward), wrap(guard)
    try:
        yield spy
    finally:
        state.stage.backward, loop.guard_flags = backward, guard


def syncs_of(stage: str, cfg: Config, device: torch.device, run_dir: Path, steps: int) -> tuple[float, list[str]]:
    """Host syncs per training step of `cfg` (after one warm-up step), and what they were."""
    state, batches = build(stage, cfg, device, run_dir)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device)
    stop = StopRequest()
    with spied(state, device) as spy:
        loop.train_step(state, batches, 1, cfg, env, stop)  # lazy set-up: tables, caches, kernels
        first = len(spy.calls) if spy else 0
        with counting(device) as calls:
            for step in range(2, 2 + steps):
                loop.train_step(state, batches, step, cfg, env, stop)
        calls = calls if spy is None else spy.calls[first:]
    return len(calls) / steps, calls


def count_syncs(
    data: Path, device: str = "cpu", config: str = "demo", sets: list[str] | None = None, steps: int = 2,
    modes: list[str] | None = None,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    """{mode: {"per_step": syncs per step, "calls": what synchronised}} for each of `modes`."""
    dev = torch.device(device)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in modes or list(MODES):
            stage, mode_sets = MODES[name]
            common = [f"data.path={data}", f"train.device={device}", "train.batch_size=4", "train.micro_batch=2"]
            common.append("ldm.scale_samples=8")  # measured once, before any step
            overrides = [*common, *(sets or []), *mode_sets]
            if stage == "ldm":
                vae_cfg = load_config(config, [o for o in overrides if not o.startswith("ldm.")], stage="vae")
                vae = random_vae(vae_cfg, Path(tmp) / f"{name}_vae.pt", dev)
                overrides.append(f"ldm.vae_ckpt={vae}")
            cfg = load_config(config, overrides, stage=stage)
            run_dir = Path(tmp) / name
            run_dir.mkdir()
            per_step, calls = syncs_of(stage, cfg, dev, run_dir, steps)
            out[name] = {"per_step": per_step, "calls": sorted(set(calls))}
    return out


# --- memory ----------------------------------------------------------------------------------------


def synthetic_h5(out: Path, n: int = 64, size: int = 256) -> Path:
    """A packed file of `n` ellipse slices with four-class masks, at `size` px."""
    from PIL import Image

    from oasis_ldm.data.pack import PackOptions, pack

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    for split, count in (("train", n), ("validate", 8)):
        images, masks = out / "png" / f"keras_png_slices_{split}", out / "png" / f"keras_png_slices_seg_{split}"
        images.mkdir(parents=True)
        masks.mkdir(parents=True)
        for i in range(count):
            r = ((yy - rng.uniform(-0.1, 0.1)) / rng.uniform(0.25, 0.4)) ** 2 + (xx / rng.uniform(0.2, 0.35)) ** 2
            label = np.select([r < 0.15, r < 0.5, r < 1.0], [3, 2, 1], 0)
            name = f"{(1 if split == 'train' else 500) + i // 32:03d}_slice_{i % 32}.nii.png"
            Image.fromarray(np.choose(label, [0, 60, 130, 220]).astype(np.uint8)).save(images / f"case_{name}")
            Image.fromarray((label * 85).astype(np.uint8)).save(masks / f"seg_{name}")
    pack(out / "png", out / "data.h5", PackOptions(splits=("train", "validate"), workers=0, progress=False))
    return out / "data.h5"


def peak_memory(stage: str, cfg: Config, device: torch.device, run_dir: Path, steps: int = 2) -> dict[str, float]:
    """Peak allocated and reserved GiB over `steps` training steps of one rank."""
    state, batches = build(stage, cfg, device, run_dir)
    env, stop = DistEnv(rank=0, world_size=1, local_rank=0, device=device), StopRequest()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    for step in range(1, steps + 1):
        loop.train_step(state, batches, step, cfg, env, stop)
        state.ema.update(state.stage.models[state.stage.main])
    torch.cuda.synchronize()
    gib = 2**30
    return {
        "micro_batch": state.plan.micro,
        "allocated_gib": round(torch.cuda.max_memory_allocated(device) / gib, 2),
        "reserved_gib": round(torch.cuda.max_memory_reserved(device) / gib, 2),
    }


def memory(device: str = "cuda", config: str = "oasis256") -> dict[str, Any]:
    """Peak memory of the preset's vae (discriminator on) and ldm steps at their micro-batches."""
    dev = torch.device(device)
    out: dict[str, Any] = {"config": config}
    with tempfile.TemporaryDirectory() as tmp:
        data = synthetic_h5(Path(tmp) / "data")
        common = [f"data.path={data}", f"train.device={device}", "data.in_memory=true"]
        vae_cfg = load_config(config, [*common, "vae.disc_start=0"], stage="vae")
        (Path(tmp) / "vae").mkdir()
        out["vae"] = peak_memory("vae", vae_cfg, dev, Path(tmp) / "vae")
        torch.cuda.empty_cache()
        vae = random_vae(load_config(config, common, stage="vae"), Path(tmp) / "vae.pt", dev)
        ldm_cfg = load_config(config, [*common, f"ldm.vae_ckpt={vae}", "ldm.scale_samples=32"], stage="ldm")
        (Path(tmp) / "ldm").mkdir()
        out["ldm"] = peak_memory("ldm", ldm_cfg, dev, Path(tmp) / "ldm")
    out["device_gib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**30, 1)
    return out


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("syncs", help="host syncs per training step, by mode")
    s.add_argument("--data", type=Path, required=True, help="a packed file with masks (paired modes need them)")
    s.add_argument("--config", default="demo", help="preset or YAML file the modes change")
    s.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    s.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    s.add_argument("--steps", type=int, default=2, help="steps counted per mode, after one warm-up step")
    m = sub.add_parser("memory", help="peak memory of the preset's steps (CUDA)")
    m.add_argument("--config", default="oasis256")
    m.add_argument("--device", default="cuda", choices=("cuda",))
    args = p.parse_args()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    if args.what == "syncs":
        result = count_syncs(args.data, args.device, args.config, args.sets, args.steps)
        for name, r in result.items():
            print(f"{name:18s} {r['per_step']:.1f} syncs/step  {', '.join(r['calls'])}")
        print(json.dumps({"syncs_per_step": {k: r["per_step"] for k, r in result.items()}}))
    else:
        print(json.dumps({"peak_memory": memory(args.device, args.config)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
