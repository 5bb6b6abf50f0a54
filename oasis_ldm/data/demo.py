"""Demo data: an OASIS-layout folder of axial brain slices cut from the MNI152 templates.

The real OASIS set cannot be downloaded here, but the MNI ICBM152 2009 T1 and tissue
templates ship inside the `nilearn` wheel (the `demo` extra) and load offline. Each demo
"case" is the template seen through its own random 3D pose (rotation, anisotropic scale,
shift) and its own scanner look (contrast window, gamma, smooth bias field, noise), cut into
axial slices spanning the brain. Like OASIS, slices are skull-stripped (brain on a black
background) and come with masks 0 background / 85 CSF / 170 grey matter / 255 white matter.
Same seed, same bytes: every random draw comes from generators seeded by (seed, case).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from oasis_ldm.atomic import atomic_path
from oasis_ldm.data.oasis import IMAGE_DIR, MASK_DIR, SPLITS, image_name, mask_name

MASK_LEVELS = (85, 170, 255)  # CSF, grey matter, white matter (0 is background)
FIELD_OF_VIEW_MM = 222.0  # the brain (~175 mm long) fills most of the frame at any --size, as in OASIS
AXIAL_RANGE_MM = (-36.0, 66.0)  # from the temporal lobes to near the vertex, relative to MNI z=0


class DemoError(RuntimeError):
    """The demo data cannot be built (missing extra, bad arguments or output folder)."""


@dataclass(frozen=True)
class DemoSpec:
    """What to build; the defaults give 384/96/96 slices in about ten seconds."""

    cases: tuple[int, int, int] = (12, 3, 3)  # cases per split: train, validate, test
    slices_per_case: int = 32
    size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class Templates:
    """The template volumes, (1, 5, Z, Y, X) float32 in display order (anterior = low Y).

    Channels: T1, brain, GM, WM probabilities. `centre` is the sampling origin in
    (x, y, z) voxels: the brain's bounding-box centre in-plane and MNI z=0 axially.
    """

    volume: torch.Tensor
    centre: torch.Tensor


def load_templates() -> Templates:
    """Load the MNI152 templates from the nilearn wheel (no network)."""
    try:
        from nilearn import datasets
    except ImportError:
        raise DemoError("the demo data needs nilearn: pip install 'oasis-ldm[demo]'") from None

    def volume(loader: Callable) -> np.ndarray:
        data = np.asarray(loader(resolution=1).get_fdata(), dtype=np.float32)
        return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, :])  # (z, y flipped, x)

    t1 = volume(datasets.load_mni152_template)
    brain = volume(datasets.load_mni152_brain_mask)
    gm = volume(datasets.load_mni152_gm_template) * brain
    wm = volume(datasets.load_mni152_wm_template) * brain
    zyx = np.argwhere(brain > 0.5)
    lo, hi = zyx.min(0), zyx.max(0)
    z_origin = 72.0  # the 1 mm template's affine puts MNI z=0 at voxel 72
    centre = torch.tensor([(lo[2] + hi[2]) / 2, (lo[1] + hi[1]) / 2, z_origin], dtype=torch.float32)
    volume = torch.from_numpy(np.stack([t1, brain, gm, wm]))[None]
    return Templates(volume.contiguous(memory_format=torch.channels_last_3d), centre)


def _rotation(angles: np.ndarray) -> torch.Tensor:
    """3x3 rotation from (roll, pitch, yaw) in radians."""
    ax, ay, az = (float(a) for a in angles)
    rx = torch.tensor([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = torch.tensor([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = torch.tensor([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _case_grid(spec: DemoSpec, rng: np.random.Generator, tpl: Templates) -> torch.Tensor:
    """Sampling grid (1, slices, size, size, 3) for one case's random pose.

    Output pixels are first placed in millimetres (x right, y posterior, z up), then posed
    (scale, rotation, shift) into template voxels, then into grid_sample's [-1, 1]: all affine,
    so one `affine_grid` call builds the whole grid.
    """
    n, s = spec.slices_per_case, spec.size
    lo, hi = AXIAL_RANGE_MM[0] + rng.uniform(-4, 4), AXIAL_RANGE_MM[1] + rng.uniform(-4, 4)
    step = (hi - lo) / (n - 1) if n > 1 else 0.0
    half = FIELD_OF_VIEW_MM / 2
    out_to_mm = torch.diag(torch.tensor([half, half, step * n / 2], dtype=torch.float64))
    mm_offset = torch.tensor([0.0, 0.0, (lo + hi) / 2], dtype=torch.float64)
    scale = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.92, 1.08)
    rot = _rotation(np.deg2rad(rng.uniform(-6, 6, 3)) * np.array([1.0, 1.0, 1.5])).double()
    pose = rot @ torch.diag(torch.tensor(1 / scale, dtype=torch.float64))
    shift = torch.tensor([*rng.uniform(-6, 6, 2), 0.0], dtype=torch.float64) + tpl.centre.double()
    extent = torch.tensor(tpl.volume.shape[:1:-1], dtype=torch.float64)  # (x, y, z) voxels
    to_grid = torch.diag(2 / extent)
    offset = to_grid @ (pose @ mm_offset + shift) + 1 / extent - 1  # voxel centres at (v + 0.5)
    theta = torch.cat([to_grid @ pose @ out_to_mm, offset[:, None]], 1)
    return F.affine_grid(theta[None].float(), [1, 1, n, s, s], align_corners=False)


def _bias_field(rng: np.random.Generator, shape: tuple[int, int, int]) -> torch.Tensor:
    """Smooth multiplicative field: exp of a random quadratic in normalised coordinates."""
    n, s = shape[0], shape[1]
    z = torch.linspace(-1, 1, n)[:, None, None]
    y = torch.linspace(-1, 1, s)[None, :, None]
    x = torch.linspace(-1, 1, s)[None, None, :]
    terms = [x, y, z, x * y, x * x - 0.33, y * y - 0.33, y * z]
    coef = rng.uniform(-0.08, 0.08, len(terms))
    return torch.exp(sum(float(c) * t for c, t in zip(coef, terms, strict=True)))


def render_case(tpl: Templates, spec: DemoSpec, case_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images and masks (slices, size, size) uint8 of one case, deterministic in `case_seed`.

    CSF is the brain mask minus grey and white matter (ventricles and sulci); each voxel
    inside the brain gets the most probable tissue.
    """
    rng = np.random.default_rng([spec.seed, case_seed])
    grid = _case_grid(spec, rng, tpl)
    t1, brain, gm, wm = F.grid_sample(tpl.volume, grid, mode="bilinear", align_corners=False)[0]
    csf = brain - gm - wm
    inside = brain > 0.5
    lo, hi = rng.uniform(0.25, 0.33), rng.uniform(0.86, 0.95)
    x = ((t1 - lo) / (hi - lo)).clamp(0, 1) ** rng.uniform(0.8, 1.25)
    x = x * _bias_field(rng, tuple(x.shape)) * rng.uniform(0.88, 1.0)
    noise = torch.from_numpy(rng.standard_normal(x.shape, dtype=np.float32))
    x = x + noise * rng.uniform(0.01, 0.03)
    x = (x * brain.clamp(0, 1) * inside).clamp(0, 1)
    images = (x * 255).round().to(torch.uint8).numpy()
    wm_wins = (wm >= gm) & (wm >= csf)
    tissue = torch.where(wm_wins, MASK_LEVELS[2], torch.where(gm >= csf, MASK_LEVELS[1], MASK_LEVELS[0]))
    masks = (tissue * inside).to(torch.uint8).numpy()
    return images, masks


def _case_numbers(spec: DemoSpec) -> list[list[int]]:
    """Distinct case numbers per split, sorted within a split (no subject in two splits)."""
    total = sum(spec.cases)
    pool = max(457, 2 * total)  # OASIS-1 case numbers go up to 457
    picks = np.random.default_rng([spec.seed, 2**31]).choice(np.arange(1, pool + 1), total, replace=False)
    out, start = [], 0
    for n in spec.cases:
        out.append(sorted(int(c) for c in picks[start : start + n]))
        start += n
    return out


def _check_spec(spec: DemoSpec) -> None:
    if len(spec.cases) != len(SPLITS) or min(spec.cases) < 1:
        raise DemoError(f"--cases-per-split {spec.cases}: expected three counts >= 1 (train,validate,test)")
    if spec.slices_per_case < 1:
        raise DemoError(f"--slices-per-case {spec.slices_per_case}: must be >= 1")
    if spec.size < 16:
        raise DemoError(f"--size {spec.size}: must be >= 16")


def _save_png(array: np.ndarray, path: Path) -> None:
    Image.fromarray(array).save(path, format="PNG")  # uint8 (H, W) -> 8-bit greyscale


def write_demo(
    out: str | Path,
    spec: DemoSpec | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int], object] | None = None,
    templates: Templates | None = None,
) -> dict[str, int]:
    """Write the demo folder at `out` and return slices per split.

    Built in a temporary folder and renamed on success, so a failure leaves no half folder.
    `progress(n)` is called after each case; `templates` lets callers reuse loaded volumes.
    """
    spec = spec or DemoSpec()
    _check_spec(spec)
    out = Path(out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not overwrite:
        raise DemoError(f"{out}: already exists and is not empty (use --overwrite)")
    tpl = templates or load_templates()
    counts = {}
    with atomic_path(out) as partial:
        for split, numbers in zip(SPLITS, _case_numbers(spec), strict=True):
            image_dir = partial / IMAGE_DIR.format(split=split)
            mask_dir = partial / MASK_DIR.format(split=split)
            image_dir.mkdir(parents=True)
            mask_dir.mkdir(parents=True)
            for case in numbers:
                images, masks = render_case(tpl, spec, case)
                for k in range(spec.slices_per_case):
                    _save_png(images[k], image_dir / image_name(case, k))
                    _save_png(masks[k], mask_dir / mask_name(case, k))
                if progress is not None:
                    progress(spec.slices_per_case)
            counts[split] = len(numbers) * spec.slices_per_case
        if out.exists() and not out.is_dir():
            out.unlink()
    return counts
