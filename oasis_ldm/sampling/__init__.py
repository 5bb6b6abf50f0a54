"""Seeded, sharded generation from ldm checkpoints; `python -m oasis_ldm.sampling --help`."""

from oasis_ldm.sampling.pipeline import Pipeline
from oasis_ldm.sampling.shards import (
    Request,
    ShardError,
    generate_shards,
    merge,
    missing_shards,
    read_request,
    write_request,
)

__all__ = [
    "Pipeline",
    "Request",
    "ShardError",
    "generate_shards",
    "merge",
    "missing_shards",
    "read_request",
    "write_request",
]
