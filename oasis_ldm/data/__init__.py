"""OASIS data: names (`oasis`), the HDF5 schema (`schema`), the packer (`pack`), the reader
Dataset (`dataset`), augmentation (`transforms`) and the demo builder (`demo`).

Submodules are imported on first use, so packing PNGs never imports torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OasisH5Dataset": "oasis_ldm.data.dataset",
    "augment_batch": "oasis_ldm.data.transforms",
    "to_float": "oasis_ldm.data.transforms",
    "to_uint8": "oasis_ldm.data.transforms",
    "resize_batch": "oasis_ldm.data.transforms",
    "pack": "oasis_ldm.data.pack",
    "PackOptions": "oasis_ldm.data.pack",
    "write_demo": "oasis_ldm.data.demo",
    "DemoSpec": "oasis_ldm.data.demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
