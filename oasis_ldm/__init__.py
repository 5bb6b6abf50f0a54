"""oasis-ldm: latent diffusion of OASIS brain MRI slices on SLURM GPU clusters."""

__version__ = "0.1.0"
