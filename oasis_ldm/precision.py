"""The one rule for arithmetic that must be plain IEEE float32 on every device.

cuDNN runs float32 convolutions in TF32 by default (a 10-bit mantissa), and a user may have
chosen TF32 for matmuls (`set_float32_matmul_precision("high")`) or oneDNN. Where a value is
a difference of nearly equal terms, or is data that something else learns from, TF32 makes it
depend on the device: SSIM's blur(x^2) - blur(x)^2 errs by about 1e-4 against C2 = 9e-4, and
per-image SSIM moved by up to 0.007. So these run inside `ieee_float32()`:
- every evaluation metric (oasis_ldm/metrics, oasis_ldm/evaluation.py);
- the SSIM loss of the vae stage, forward and backward (oasis_ldm/train/losses.py);
- the frozen encoder of the ldm stage: its latents, the scale factor and the latent cache;
- the sampling pipeline's VAE decoder (the pixels that are kept).
The caller's settings are restored afterwards, so the models' own layers keep theirs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def ieee_float32() -> Iterator[None]:
    """Plain float32 (no TF32, no bf16) in convolutions and matmuls for the block, then restore.

    torch >= 2.9 has one precision setting per backend; reading the older ``allow_tf32`` flags
    after those were set raises, so only the API the installed torch has is touched. Usable as
    a decorator too (``@ieee_float32()``).
    """
    if hasattr(torch.backends.cudnn, "conv"):
        switches = [
            (torch.backends.cudnn.conv, "fp32_precision", "ieee"),
            (torch.backends.cuda.matmul, "fp32_precision", "ieee"),
            (torch.backends.mkldnn.conv, "fp32_precision", "ieee"),
            (torch.backends.mkldnn.matmul, "fp32_precision", "ieee"),
        ]
    else:
        switches = [(torch.backends.cudnn, "allow_tf32", False), (torch.backends.cuda.matmul, "allow_tf32", False)]
    saved = [getattr(owner, name) for owner, name, _ in switches]
    for owner, name, plain in switches:
        setattr(owner, name, plain)
    try:
        yield
    finally:
        for (owner, name, _), value in zip(switches, saved, strict=True):
            setattr(owner, name, value)
