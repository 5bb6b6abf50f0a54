"""Seeds derived from tuples of integers: the one source of randomness names in the project.

Training draws each step's numbers from generators seeded by (seed, step, micro-batch,
purpose) and sampling seeds image i of a request by (seed, i). Deriving them through
NumPy's SeedSequence mixes the parts well, so nearby tuples never give related streams.
"""

from __future__ import annotations

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed (fits int64) from integers."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def make_generator(device: torch.device | str, *parts: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen
