"""Stage `ldm`: the seed's U-Net learns to denoise latents of the frozen autoencoder.

The latents are scaled by `1 / std(z)` so the diffusion sees unit variance whatever the
autoencoder's KL weight made of them. The factor is measured once, on rank 0, over a fixed
sample of training latents, broadcast, and kept in every checkpoint together with the VAE's
path, checksum, config and weights, so sampling needs nothing but the ldm checkpoint, and a
resume encodes with the autoencoder its checkpoint holds, even where the file at ldm.vae_ckpt
has since been trained further (`load_state`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from oasis_ldm import checkpoint
from oasis_ldm.config import Config, from_dict, to_dict
from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.transforms import to_float
from oasis_ldm.diffusion import GaussianDiffusion
from oasis_ldm.distributed import DistEnv, barrier, broadcast, read_on_rank0
from oasis_ldm.loading import load_frozen_vae, read_bytes
from oasis_ldm.models import DiagonalGaussian, UNet, build_vae
from oasis_ldm.precision import ieee_float32
from oasis_ldm.rng import Stream, generator, image_seed
from oasis_ldm.sampling.pipeline import Pipeline
from oasis_ldm.train.augment import Batch, flip_rows, prepare_batch
from oasis_ldm.train.context import StepContext
from oasis_ldm.train.latent_cache import LatentDataset, build_latent_cache

LOG_SEED = 1234  # fixed noise for the logged samples, so grids are comparable across steps
SCALE_CHUNK = 32  # slices encoded at once when measuring the scale factor


def _read_vae(vae_ckpt: str) -> tuple[tuple[Path, str | None], bytes]:
    """((the autoencoder's checkpoint file, a fallback note), its bytes), as read_on_rank0 takes them."""
    path, data, note = read_bytes(vae_ckpt)
    return (path, note), data


class LDMStage:
    name = "ldm"
    main = "unet"

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path) -> None:
        if not cfg.ldm.vae_ckpt:
            raise checkpoint.CheckpointError("ldm.vae_ckpt is not set: pass --set ldm.vae_ckpt=<vae run dir or .pt>")
        self.cfg, self.env, self.run_dir = cfg, env, run_dir
        # Rank 0 reads the autoencoder once for the job and shares its bytes (hashed, not re-read);
        # a run directory whose last.pt is damaged gives its newest good snapshot.
        (self.vae_path, note), data = read_on_rank0(lambda: _read_vae(cfg.ldm.vae_ckpt))
        if note and env.is_main:
            print(f"[oasis-ldm] warning: ldm.vae_ckpt: {note}", flush=True)
        self.vae, vae_meta = load_frozen_vae(self.vae_path, env.device, data)
        self.vae_sha256, self.vae_cfg = vae_meta["sha256"], vae_meta["config"]
        self.latent_size = cfg.data.image_size // self.vae.factor  # preflight checked that it fits the U-Net
        unet = UNet(cfg.unet, in_channels=self.vae.latent_channels).to(env.device)
        self.models: dict[str, nn.Module] = {"unet": unet}
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(env.device)
        d = cfg.data
        self.images = OasisH5Dataset(
            d.path, d.split, in_memory=d.in_memory, image_size=d.image_size, with_mask=d.masks, raw=True
        )
        self.scale_factor: float | None = None
        self._dataset: torch.utils.data.Dataset | None = None

    def lr(self, model: str) -> float:
        return self.cfg.train.lr

    @property
    def dataset(self) -> torch.utils.data.Dataset:
        """Images, or the latent cache (built on first use; every rank gets here together)."""
        if self._dataset is None:
            if self.cfg.ldm.latent_cache:
                made_by = {"vae_sha256": self.vae_sha256, "data_path": str(Path(self.cfg.data.path).resolve())}
                flips = self.cfg.data.augment == "flip"
                path = build_latent_cache(
                    self.run_dir / "latents.h5", self.images, self.encode_rows, self.env, made_by, flips
                )
                self._dataset = LatentDataset(path)
            else:
                self._dataset = self.images
        return self._dataset

    def initialise(self) -> None:
        """Measure the latent scale factor on rank 0 and share it."""
        value = torch.zeros(1, dtype=torch.float64, device=self.env.device)
        if self.env.is_main:
            value[0] = self.measure_scale_factor()
        self.scale_factor = float(broadcast(value)[0])
        if self.env.is_main:
            print(f"[oasis-ldm] latent scale factor 1/std(z) = {self.scale_factor:.5f}", flush=True)
        barrier()

    @torch.no_grad()
    def measure_scale_factor(self) -> float:
        """1 / std of posterior samples of a fixed set of `ldm.scale_samples` training slices.

        Fixed rows, encoded in fixed chunks with fixed noise: the factor depends on neither
        the number of ranks nor the batch size, so neither does the model trained with it.
        """
        n = min(len(self.images), self.cfg.ldm.scale_samples)
        gen = torch.Generator().manual_seed(self.cfg.train.seed)
        rows = torch.randperm(len(self.images), generator=gen)[:n].sort().values.tolist()
        dev_gen = generator(self.env.device, self.cfg.train.seed, Stream.SCALE_FACTOR)
        latents = []
        for i in range(0, n, SCALE_CHUNK):
            posterior = self.encode_rows(rows[i : i + SCALE_CHUNK])
            noise = torch.randn(posterior.mean.shape, generator=dev_gen, device=self.env.device)
            latents.append((posterior.mean + posterior.std * noise).double().flatten())
        return 1.0 / torch.cat(latents).std().item()

    @torch.no_grad()
    def encode_rows(self, rows: list[int], flip: bool = False) -> DiagonalGaussian:
        """Posteriors of rows of the training split (mirrored with `flip`), in fp32 (with masks, paired)."""
        masks = self.images.read_raw(rows, mask=True).to(self.env.device) if self.cfg.data.masks else None
        images = to_float(self.images.read_raw(rows).to(self.env.device))
        if flip:
            images, masks = images.flip(-1), None if masks is None else masks.flip(-1)
        with ieee_float32():
            return self.vae.encode(Batch(images, masks).model_input())

    def latents(self, batch: Any, ctx: StepContext) -> torch.Tensor:
        """Scaled posterior samples z * scale for this micro-batch.

        The frozen encoder runs in IEEE fp32 (no bf16, no TF32) even in a bf16 run: its latents
        are the data the U-Net learns, and the scale factor and the latent cache are measured so too.
        """
        if self.cfg.ldm.latent_cache:
            mean, std, *mirrored = (t.to(self.env.device, non_blocking=True).float() for t in batch)
            if mirrored:  # a flipped row takes the posterior of its mirrored slice (latent_cache.py)
                flip = flip_rows(mean.shape[0], self.cfg.data.augment, ctx)[:, None, None, None]
                mean, std = torch.where(flip, mirrored[0], mean), torch.where(flip, mirrored[1], std)
            z = mean + std * ctx.draws.randn(tuple(mean.shape), Stream.POSTERIOR_NOISE)
        else:
            b = prepare_batch(batch, self.cfg.data.augment, ctx)
            with torch.no_grad(), ieee_float32():
                posterior = self.vae.encode(b.model_input())
            mean, std = posterior.mean.float(), posterior.std.float()
            z = mean + std * ctx.draws.randn(tuple(mean.shape), Stream.POSTERIOR_NOISE)
        return z * self.scale_factor

    def backward(self, wrapped: dict[str, nn.Module], batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        z = self.latents(batch, ctx)
        t = ctx.draws.randint(self.diffusion.num_timesteps, z.shape[0], Stream.TIMESTEPS)
        noise = ctx.draws.randn(tuple(z.shape), Stream.DIFFUSION_NOISE)
        with ctx.autocast():
            loss = self.diffusion.training_loss(wrapped["unet"], z, t, noise)
        (loss * ctx.loss_scale).backward()
        return {"mse": loss.detach()}

    @torch.no_grad()
    def log_images(self, ema_model: nn.Module, logger: Any, step: int) -> None:
        """EMA samples from fixed noise (rank 0 only; a few seconds on a GPU); in paired mode
        each row of 8 slices is followed by the row of their masks."""
        if not logger.enabled:
            return
        pipe = self.pipeline(ema_model)
        seeds = [image_seed(LOG_SEED, i) for i in range(self.cfg.train.num_log_images)]
        d = self.cfg.diffusion
        images, masks = pipe.generate_pairs(seeds, d.sampler, d.sample_steps, d.eta)
        if masks is not None:
            rows = [torch.cat([images[i : i + 8], masks[i : i + 8]]) for i in range(0, len(images), 8)]
            images = torch.cat(rows)
        logger.images(step, "images/ema_samples", images, nrow=min(8, len(seeds)))

    def pipeline(self, unet: nn.Module) -> Pipeline:
        """The model as sampling sees it, in the precision of training (as load_pipeline does)."""
        c = self.vae.latent_channels
        shape = (c, self.latent_size, self.latent_size)
        scale = float(self.scale_factor)
        return Pipeline(unet, self.vae, self.diffusion, scale, shape, precision=self.cfg.train.precision)

    def state(self) -> dict[str, Any]:
        return {
            "scale_factor": self.scale_factor,
            "vae_path": str(self.vae_path),
            "vae_sha256": self.vae_sha256,
            "vae_config": to_dict(self.vae_cfg),
            "vae_weights": self.vae.state_dict(),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        """Resume with the checkpoint's scale factor and autoencoder: the latents the U-Net learnt.

        Where the file at ldm.vae_ckpt changed since (its vae run trained further), the weights
        the checkpoint holds replace the file's, so the run continues as it began.
        """
        if state["vae_sha256"] != self.vae_sha256:
            if self.env.is_main:
                print(
                    f"[oasis-ldm] {self.vae_path} is not the autoencoder this run trains with (sha256 "
                    f"{self.vae_sha256[:12]}, not {state['vae_sha256'][:12]}: trained further?): continuing with the "
                    f"one its checkpoint holds ({state['vae_path']})",
                    flush=True,
                )
            vae = build_vae(from_dict(state["vae_config"]))
            vae.load_state_dict(state["vae_weights"])
            self.vae = vae.to(self.env.device).eval().requires_grad_(False)
            self.vae_cfg, self.vae_sha256 = from_dict(state["vae_config"]), state["vae_sha256"]
            self.vae_path = Path(state["vae_path"])
        self.scale_factor = float(state["scale_factor"])
