"""Every random number of the project, and the one rule they follow.

The rule: a random number comes from a generator seeded by a tuple of integers that names
what it is for (a `Stream`), never from torch's, NumPy's or Python's global generators. So it
depends neither on how many ranks, GPUs, data workers or array tasks share the work nor on
whether the run was resumed, and a checkpoint needs no RNG state:

- training: the draws of a step are made for the step's whole global batch from a generator
  seeded by (seed, step, stream), and each rank keeps the rows of its own samples
  (`StepDraws`), so a sample's noise depends on its position in the global batch alone;
- the data order: epoch e is the permutation seeded by (seed, EPOCH_ORDER, e);
- sampling: image i of a request with seed S has its own generator, seeded by (S, i)
  (`image_seed`, `ImageGenerators`, after EDM's StackedRandomGenerator), which draws its
  starting noise and every later noise of its sampler, so a batch, a worker or an array task
  changes nothing;
- evaluation: subsets and segmenters are seeded by (seed, `EvalStream`).

Tuples are mixed through NumPy's SeedSequence, so nearby tuples never give related streams.
Per-image generators live on the CPU: a seed names the same image on any machine.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


class Stream(enum.IntEnum):
    """What a draw is for: part of its generator's seed, so no two purposes share numbers."""

    POSTERIOR_NOISE = 1  # z = mean + std * noise, both stages
    TIMESTEPS = 2  # the diffusion timestep of each sample (ldm)
    DIFFUSION_NOISE = 3  # the noise of q(x_t | x_0) (ldm)
    AUGMENT = 10  # flips and crop boxes
    EPOCH_ORDER = 0x5A3  # the permutation of an epoch
    SCALE_FACTOR = 0x5CA1E  # the posterior noise of the latent scale-factor estimate


class EvalStream(enum.IntEnum):
    """What an evaluation draw is for; seeds are (seed, stream), a tuple shape training never uses."""

    SEGMENTER_WEIGHTS = 0  # the segmenters' initial weights
    SEGMENTER_ORDER = 1  # their batch order
    SEGMENTER_FLIPS = 2  # their flips


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed (it fits int64) from integers."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def generator(device: torch.device | str, *parts: int) -> torch.Generator:
    """A generator on `device` seeded by the tuple `parts`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(*parts))
    return gen


def epoch_order(size: int, seed: int, epoch: int) -> Tensor:
    """The permutation of `size` rows that epoch `epoch` visits, the same on every rank."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(derive_seed(seed, Stream.EPOCH_ORDER, epoch)))


def step_rows(full: Tensor, micro: int, accum: int, rank: int, world_size: int) -> Tensor:
    """This rank's rows of round `micro`, from a tensor drawn for the step's whole batch.

    The step's rows are ordered round first, then position r + W*j within it, which is how
    the sampler hands out samples (train/order.py): so the draw for a sample depends on where
    it sits in the step's global batch, not on how ranks and rounds divide that batch.
    """
    per_round = full.shape[0] // accum
    return full[micro * per_round : (micro + 1) * per_round][rank::world_size]


@dataclass(frozen=True)
class StepDraws:
    """The random numbers of one round of one training step, on one rank."""

    seed: int
    step: int
    micro: int  # the accumulation round
    accum: int  # rounds per step
    rank: int
    world_size: int
    device: torch.device

    def generator(self, stream: Stream, device: torch.device | None = None) -> torch.Generator:
        return generator(device or self.device, self.seed, self.step, stream)

    def full_rows(self, local_rows: int) -> int:
        """Rows of the step's whole batch, for a micro-batch of `local_rows` on this rank."""
        return local_rows * self.world_size * self.accum

    def mine(self, full: Tensor) -> Tensor:
        """This round's rows on this rank, out of a draw for the whole step."""
        return step_rows(full, self.micro, self.accum, self.rank, self.world_size)

    def randn(self, local_shape: tuple[int, ...], stream: Stream) -> Tensor:
        n, *rest = local_shape
        full = torch.randn((self.full_rows(n), *rest), generator=self.generator(stream), device=self.device)
        return self.mine(full)

    def randint(self, high: int, n: int, stream: Stream) -> Tensor:
        full = torch.randint(0, high, (self.full_rows(n),), generator=self.generator(stream), device=self.device)
        return self.mine(full)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a sampling request with seed `seed`."""
    return derive_seed(seed, index)


class ImageGenerators:
    """One CPU generator per image: image b's numbers come from `seeds[b]` alone.

    `randn` draws each image's share from its own generator straight into one buffer, pinned
    when the device is a GPU, and moves it there in one non-blocking copy per sampler step: the
    host queues the next U-Net call instead of waiting for the copy, which a pageable copy
    would make it do (it waits for the whole stream). torch's pinned-memory cache keeps the
    buffer until the copy has finished, so a later step never overwrites noise in flight.
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(
        self, shape_per_image: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """(len(self), *shape_per_image) standard normals, drawn in float32 on the CPU."""
        device = torch.device(device)
        out = torch.empty((len(self), *shape_per_image), pin_memory=device.type == "cuda")
        for g, row in zip(self.generators, out, strict=True):
            torch.randn(tuple(shape_per_image), generator=g, out=row)
        return out.to(device, dtype, non_blocking=True)
