"""Typed configuration: dataclasses, YAML presets shipped in the package, `--set` overrides.

A run is fully described by one `Config`. Presets (`oasis_ldm/presets/*.yaml`) and user
files only name the keys they change; everything else keeps the dataclass default, so the
resolved config written into each run directory is the single source of truth for that run.
A file may add a `stages:` mapping ({vae: {section: {key: value}}, ldm: ...}) for values that
differ between the two stages of one model, such as the learning rate and the step count, and
a `base:` preset or file that it changes (presets/demo-paired.yaml is presets/demo.yaml with masks).
Unknown sections or keys are errors: a typo must never silently train the wrong model.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).parent / "presets"


@dataclass
class DataConfig:
    path: str = "data/oasis.h5"  # the packed HDF5 file (tools/pack_h5.py)
    split: str = "train"
    image_size: int = 256  # slices are resized to this on load when it differs
    in_memory: bool = True  # read the split into RAM once (OASIS train is ~630 MB)
    augment: str = "flip"  # none | flip | crop (the seed report's resize + random crop; "seed" works too)
    num_workers: int = 2  # DataLoader workers for the on-disk mode
    # Paired mode: the autoencoder encodes each slice with its tissue mask and decodes both, so
    # the ldm's samples are image-mask pairs (oasis_ldm/data/masks.py). Needs packed masks.
    masks: bool = False


@dataclass
class VAEConfig:
    """KL autoencoder architecture and its stage's loss terms."""

    base_channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2, 4)  # downsampling factor f = 2 ** (len - 1)
    num_res_blocks: int = 2
    latent_channels: int = 3
    attention: bool = True  # self-attention at the lowest resolution
    l1_weight: float = 1.0
    ssim_weight: float = 0.5
    kl_weight: float = 1e-6
    brain_weight: float = 0.0  # L1 and SSIM weigh brain pixels (1 + this) : background 1
    mask_ce_weight: float = 1.0  # paired mode: cross-entropy of the decoded class logits
    mask_dice_weight: float = 0.0  # paired mode: 1 - mean soft Dice over the tissue classes
    adv_weight: float = 0.0  # 0 disables the PatchGAN term
    disc_start: int = 5000  # step at which the adversarial term starts
    disc_channels: int = 64
    disc_layers: int = 3


@dataclass
class UNetConfig:
    """The seed's latent U-Net: 3 encoder levels, a 3-block bottleneck, 3 decoder levels."""

    channels: tuple[int, ...] = (64, 128, 256, 256)  # in_layer width, then each level
    bottleneck: int = 512
    attention: tuple[bool, ...] = (True, True, True)  # after each encoder/decoder level
    heads: int = 4
    time_dim: int = 256
    groups: int = 8  # GroupNorm groups
    residual: bool = True


@dataclass
class DiffusionConfig:
    schedule: str = "linear"  # linear | cosine
    timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    target: str = "eps"  # eps | v
    sampler: str = "ddim"  # ddim | ddpm (used for logged samples and by default in sampling)
    sample_steps: int = 50
    eta: float = 0.0


@dataclass
class LDMConfig:
    vae_ckpt: str = ""  # the VAE checkpoint (or vae run directory) the ldm stage encodes with
    # Training slices whose latents estimate 1/std(z): a fixed count, so the factor (and so the
    # model) does not depend on how many ranks or how large a micro-batch measured it.
    scale_samples: int = 256
    latent_cache: bool = False  # encode the training split once into RUN_DIR/latents.h5


@dataclass
class TrainConfig:
    max_steps: int = 100_000
    # The global batch of one optimizer step: all ranks and accumulation rounds together, so the
    # same command trains the same model on 1, 2 or 8 GPUs, and a requeue onto another number of
    # nodes resumes exactly. It must split evenly over the ranks.
    batch_size: int = 16
    # A cap on what one rank computes at once (0 = its whole share, batch_size / ranks): memory
    # only. The accumulation rounds follow: share / micro_batch (the largest divisor of the share
    # that fits the cap).
    micro_batch: int = 0
    lr: float = 1e-4
    disc_lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, ...] = (0.9, 0.999)
    warmup_steps: int = 1000
    lr_schedule: str = "constant"  # constant | cosine (after warm-up, down to lr * lr_min_factor at max_steps)
    lr_min_factor: float = 0.1  # the cosine schedule's floor, as a fraction of lr
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    ckpt_every: int = 2000  # write checkpoints/last.pt every N steps
    snapshot_every: int = 10_000  # numbered snapshots, a multiple of ckpt_every
    keep_snapshots: int = 3
    log_every: int = 50
    image_every: int = 2000
    num_log_images: int = 16
    seed: int = 0
    precision: str = "bf16"  # fp32 | bf16 autocast (CUDA and CPU); see README "bf16 policy"
    compile: bool = False  # torch.compile on CUDA
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    ldm: LDMConfig = field(default_factory=LDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ConfigError(ValueError):
    """A config file or override names an unknown key or a value of the wrong type."""


# Earlier names of values, still accepted and read as today's: files, --set and checkpoints.
ALIASES: dict[tuple[str, str], dict[Any, Any]] = {("data", "augment"): {"seed": "crop"}}


def canonical(values: dict[str, Any]) -> dict[str, Any]:
    """A plain {section: {key: value}} mapping (a saved config) with earlier names replaced."""
    return {
        section: {k: ALIASES.get((section, k), {}).get(v, v) if isinstance(v, str) else v for k, v in body.items()}
        if isinstance(body, dict)
        else body
        for section, body in values.items()
    }


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _coerce(value: Any, kind: Any, where: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(kind) if a is not Ellipsis}
        if isinstance(value, str):
            value = [v for v in value.strip("()[] ").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(v, item, where) for v in value)
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    try:
        if kind is int and not isinstance(value, bool):
            number = float(value)  # accepts "2e4" from the command line
            if number.is_integer():
                return int(number)
        elif kind is float and not isinstance(value, bool):
            return float(value)
        elif kind is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{where}: expected {getattr(kind, '__name__', kind)}, got {value!r}")


def _section_types(section: Any) -> dict[str, Any]:
    hints = typing.get_type_hints(type(section))
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def apply_dict(cfg: Config, values: dict[str, Any], source: str) -> Config:
    """Overlay a nested {section: {key: value}} mapping onto `cfg` (new object)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(values).__name__}")
    out = {}
    sections = {f.name for f in dataclasses.fields(cfg)}
    for name, body in values.items():
        if name not in sections:
            raise ConfigError(f"{source}: unknown section {name!r} (known: {', '.join(sorted(sections))})")
        section = getattr(cfg, name)
        types_ = _section_types(section)
        body = body or {}
        if not isinstance(body, dict):
            raise ConfigError(f"{source}: section {name!r} must be a mapping")
        changes = {}
        for key, value in body.items():
            if key not in types_:
                raise ConfigError(f"{source}: unknown key {name}.{key} (known: {', '.join(sorted(types_))})")
            value = _coerce(value, types_[key], f"{source}: {name}.{key}")
            changes[key] = ALIASES.get((name, key), {}).get(value, value)
        out[name] = dataclasses.replace(section, **changes)
    return dataclasses.replace(cfg, **out)


def parse_overrides(items: list[str]) -> dict[str, dict[str, str]]:
    """`["train.lr=3e-4", ...]` -> {"train": {"lr": "3e-4"}} (values are coerced later)."""
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        out.setdefault(section, {})[name] = value.strip()
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (of sections, and optionally `stages`)."""
    try:
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(values).__name__}")
    return values


def resolve_config_path(name_or_path: str) -> Path:
    """A preset name (`demo`, `oasis256`) or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"--config {name_or_path}: no such file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(f"--config {name_or_path}: not a file and not a preset ({', '.join(presets())})")
    return preset


STAGES = ("vae", "ldm")


def _layers(path: Path, seen: frozenset[Path] = frozenset()) -> list[tuple[Path, dict, dict]]:
    """(path, values, per-stage values) of a file and of the `base:` files it builds on, base first.

    `base:` names a preset or a YAML file (relative to this file's folder): the file then holds
    only what it changes, as presets/demo-paired.yaml does on presets/demo.yaml.
    """
    values = load_yaml(path)
    base = values.pop("base", None)
    chain: list[tuple[Path, dict, dict]] = []
    if base is not None:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base must name a preset or a YAML file, got {base!r}")
        relative = path.parent / base
        base_path = resolve_config_path(str(relative) if relative.suffix in (".yaml", ".yml") else base)
        if base_path.resolve() in seen | {path.resolve()}:
            raise ConfigError(f"{path}: base {base!r} leads back to itself")
        chain = _layers(base_path, seen | {path.resolve()})
    per_stage = values.pop("stages", None) or {}
    if not isinstance(per_stage, dict):
        raise ConfigError(f"{path}: stages must be a mapping of vae/ldm to sections, got {type(per_stage).__name__}")
    unknown = set(per_stage) - set(STAGES)
    if unknown:
        raise ConfigError(f"{path}: unknown stage(s) {', '.join(sorted(unknown))} under stages (known: vae, ldm)")
    return [*chain, (path, values, per_stage)]


def load_config(name_or_path: str = "oasis256", overrides: list[str] | None = None, stage: str | None = None) -> Config:
    """Defaults <- each file of the `base:` chain (its values, then its `stages.<stage>`) <- `--set`."""
    cfg = Config()
    for path, values, per_stage in _layers(resolve_config_path(name_or_path)):
        cfg = apply_dict(cfg, values, str(path))
        if stage is not None:
            cfg = apply_dict(cfg, per_stage.get(stage) or {}, f"{path}: stages.{stage}")
    cfg = apply_dict(cfg, parse_overrides(overrides or []), "--set")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a typed field alone cannot express."""
    choices = {
        "data.augment": (cfg.data.augment, ("none", "flip", "crop")),
        "diffusion.schedule": (cfg.diffusion.schedule, ("linear", "cosine")),
        "diffusion.target": (cfg.diffusion.target, ("eps", "v")),
        "diffusion.sampler": (cfg.diffusion.sampler, ("ddim", "ddpm")),
        "train.precision": (cfg.train.precision, ("fp32", "bf16")),
        "train.lr_schedule": (cfg.train.lr_schedule, ("constant", "cosine")),
        "train.device": (cfg.train.device, ("auto", "cpu", "cuda")),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}={value!r}: expected one of {', '.join(allowed)}")
    if cfg.ldm.latent_cache and cfg.data.augment == "crop":
        raise ConfigError("ldm.latent_cache=true supports data.augment none or flip (crops need the pixels)")
    f = 2 ** (len(cfg.vae.channel_mult) - 1)
    latent = cfg.data.image_size // f
    levels = len(cfg.unet.channels) - 1
    if cfg.data.image_size % f or latent % (2**levels):
        raise ConfigError(
            f"data.image_size={cfg.data.image_size}: the latent ({latent}) must be divisible by "
            f"2**{levels} for the U-Net and the image by the VAE factor {f}"
        )
    if len(cfg.unet.attention) != levels:
        raise ConfigError(f"unet.attention needs {levels} entries, one per level")
    c = cfg.unet.channels
    for i, on in enumerate(cfg.unet.attention):
        for width in (c[i + 1], c[max(i - 1, 0)]):  # encoder level i and the decoder level mirroring it
            if on and width % cfg.unet.heads:
                raise ConfigError(f"unet.heads={cfg.unet.heads} must divide {width} (attention level {i})")
    positive = {
        "train.max_steps": cfg.train.max_steps,
        "train.batch_size": cfg.train.batch_size,
        "ldm.scale_samples": cfg.ldm.scale_samples,
        "train.ckpt_every": cfg.train.ckpt_every,
        "train.log_every": cfg.train.log_every,
        "diffusion.timesteps": cfg.diffusion.timesteps,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key}={value}: must be >= 1")
    if cfg.train.micro_batch < 0:
        raise ConfigError(f"train.micro_batch={cfg.train.micro_batch}: must be >= 0 (0 = each rank's whole share)")
    _check_numbers(cfg)


def _check_numbers(cfg: Config) -> None:
    """Every float finite, and each number in the range its code assumes.

    A NaN rate trains nothing and says nothing, a negative one climbs the loss, `--eta nan`
    samples black images, and a zero interval divides by zero hours into a run: refused here,
    so the trainer, the launcher (which validates before submitting) and a resume agree.
    """
    for section in dataclasses.fields(cfg):
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{section.name}.{key}={item}: must be a finite number")
    t, v, d = cfg.train, cfg.vae, cfg.diffusion
    ranges = {
        # key: (value, low, low included, high, high included)
        "train.lr": (t.lr, 0, False, None, False),
        "train.disc_lr": (t.disc_lr, 0, False, None, False),
        "train.weight_decay": (t.weight_decay, 0, True, None, False),
        "train.grad_clip": (t.grad_clip, 0, True, None, False),  # 0: no clipping
        "train.lr_min_factor": (t.lr_min_factor, 0, True, 1, True),
        "train.ema_decay": (t.ema_decay, 0, True, 1, False),
        "train.warmup_steps": (t.warmup_steps, 0, True, None, False),
        "train.snapshot_every": (t.snapshot_every, 1, True, None, False),
        "train.keep_snapshots": (t.keep_snapshots, 1, True, None, False),  # what a damaged last.pt falls back to
        "train.image_every": (t.image_every, 1, True, None, False),
        "train.num_log_images": (t.num_log_images, 1, True, None, False),
        "data.image_size": (cfg.data.image_size, 1, True, None, False),
        "data.num_workers": (cfg.data.num_workers, 0, True, None, False),
        "diffusion.beta_start": (d.beta_start, 0, False, 1, False),
        "diffusion.beta_end": (d.beta_end, 0, False, 1, False),
        "diffusion.eta": (d.eta, 0, True, None, False),
        "diffusion.sample_steps": (d.sample_steps, 1, True, d.timesteps, True),
        "vae.disc_start": (v.disc_start, 0, True, None, False),
    }
    ranges |= {f"train.betas[{i}]": (b, 0, True, 1, False) for i, b in enumerate(t.betas)}
    weights = (
        "l1_weight",
        "ssim_weight",
        "kl_weight",
        "brain_weight",
        "mask_ce_weight",
        "mask_dice_weight",
        "adv_weight",
    )
    ranges |= {f"vae.{w}": (getattr(v, w), 0, True, None, False) for w in weights}
    for key, (value, low, low_in, high, high_in) in ranges.items():
        if (
            value < low
            or (value == low and not low_in)
            or (high is not None and (value > high or (value == high and not high_in)))
        ):
            raise ConfigError(f"{key}={value}: must be {_range_text(low, low_in, high, high_in)}")
    if d.schedule == "linear" and d.beta_start >= d.beta_end:
        raise ConfigError(f"diffusion.beta_start={d.beta_start} must be below diffusion.beta_end={d.beta_end}")


def _range_text(low: float, low_in: bool, high: float | None, high_in: bool) -> str:
    if high is None:
        return f"{'>=' if low_in else '>'} {low}"
    return f"in {'[' if low_in else '('}{low}, {high}{']' if high_in else ')'}"


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML/JSON and checkpoints."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {k: {kk: plain(vv) for kk, vv in v.items()} for k, v in dataclasses.asdict(cfg).items()}


# Keys that earlier releases wrote into checkpoints and that no longer exist: dropped when a
# checkpoint's config is read, so old autoencoders and ldm checkpoints still load and sample.
RETIRED_KEYS = {("train", "grad_accum"), ("ldm", "scale_batches")}


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of `to_dict` (used when a checkpoint carries its config)."""
    values = {
        section: {k: v for k, v in (body or {}).items() if (section, k) not in RETIRED_KEYS}
        for section, body in values.items()
    }
    cfg = apply_dict(Config(), values, "checkpoint config")
    validate(cfg)
    return cfg


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
