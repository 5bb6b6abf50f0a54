"""Stage `vae`: the KL autoencoder with L1 + SSIM + KL and an optional PatchGAN term.

In paired mode (`data.masks`) it encodes each slice with its tissue mask and decodes both; the
mask's class logits add a cross-entropy term (and optionally soft Dice), so the latent, and
the ldm trained on it, carry the anatomy's labels with its pixels.

No pretrained perceptual network can be downloaded, so SSIM stands in for LPIPS: it rewards
local structure (edges between grey and white matter) that L1 alone blurs away. The
adversarial term (hinge loss, fixed weight) switches on after `vae.disc_start` steps, once
the reconstructions are good enough for the discriminator's gradients to be useful.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from oasis_ldm.config import Config
from oasis_ldm.data.dataset import OasisH5Dataset
from oasis_ldm.data.masks import decode_mask, split_output, to_labels
from oasis_ldm.data.transforms import to_float, to_uint8
from oasis_ldm.distributed import DistEnv
from oasis_ldm.metrics.image import paired_figures
from oasis_ldm.metrics.region import brain_region
from oasis_ldm.models import build_discriminator, build_vae, generator_adv_loss, hinge_d_loss
from oasis_ldm.rng import Stream
from oasis_ldm.train.augment import Batch, prepare_batch
from oasis_ldm.train.context import StepContext
from oasis_ldm.train.losses import brain_weight, soft_dice_loss, ssim_loss, weighted_mean


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Let gradients flow through `module` to its input without touching its parameters."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)


class VAEStage:
    name = "vae"
    main = "vae"

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        self.models: dict[str, nn.Module] = {"vae": build_vae(cfg).to(env.device)}
        if cfg.vae.adv_weight > 0:
            self.models["disc"] = build_discriminator(cfg).to(env.device)
        d = cfg.data
        self.dataset = OasisH5Dataset(
            d.path, d.split, in_memory=d.in_memory, image_size=d.image_size, with_mask=d.masks, raw=True
        )
        self.log_batch, self.log_region = log_images_batch(cfg, self.dataset)

    def lr(self, model: str) -> float:
        return self.cfg.train.disc_lr if model == "disc" else self.cfg.train.lr

    def initialise(self) -> None:
        pass

    def backward(self, wrapped: dict[str, nn.Module], batch: Any, ctx: StepContext) -> dict[str, torch.Tensor]:
        v = self.cfg.vae
        b = prepare_batch(batch, self.cfg.data.augment, ctx)
        x = b.images
        f, c = self.models["vae"].factor, v.latent_channels
        noise = ctx.draws.randn((x.shape[0], c, x.shape[2] // f, x.shape[3] // f), Stream.POSTERIOR_NOISE)
        adversarial = "disc" in self.models and ctx.step > v.disc_start
        with ctx.autocast():
            out, posterior = wrapped["vae"](b.model_input(), noise=noise)
            recon, logits = split_output(out) if b.masks is not None else (out, None)
            w = brain_weight(x, v.brain_weight)
            terms = {
                "l1": weighted_mean((recon.float() - x).abs(), w),
                "ssim": ssim_loss(recon, x, w),
                "kl": posterior.kl().float().mean(),
            }
            loss = v.l1_weight * terms["l1"] + v.ssim_weight * terms["ssim"] + v.kl_weight * terms["kl"]
            if logits is not None:
                loss = loss + self.mask_terms(logits, b.masks, terms)
            if adversarial:
                with frozen(self.models["disc"]):
                    terms["g_adv"] = generator_adv_loss(self.models["disc"](recon).float())
                loss = loss + v.adv_weight * terms["g_adv"]
        (loss * ctx.loss_scale).backward()
        if adversarial:
            with ctx.autocast():
                # One forward over real and fake together: DDP allows one forward per backward.
                real_logits, fake_logits = wrapped["disc"](torch.cat([x, recon.detach()])).float().chunk(2)
                terms["d_hinge"] = hinge_d_loss(real_logits, fake_logits)
            (terms["d_hinge"] * ctx.loss_scale).backward()
        terms["total"] = loss
        return {k: t.detach() for k, t in terms.items()}

    def mask_terms(self, logits: torch.Tensor, masks: torch.Tensor, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Paired mode: cross-entropy (and soft Dice) of the decoded class logits, in fp32."""
        v, labels = self.cfg.vae, to_labels(masks, check=False)  # packed values: no host sync
        terms["mask_ce"] = F.cross_entropy(logits.float(), labels)
        loss = v.mask_ce_weight * terms["mask_ce"]
        if v.mask_dice_weight > 0:
            terms["mask_dice"] = soft_dice_loss(logits, labels)
            loss = loss + v.mask_dice_weight * terms["mask_dice"]
        return loss

    @torch.no_grad()
    def log_images(self, ema_model: nn.Module, logger: Any, step: int) -> None:
        """Inputs above their EMA reconstructions (and, paired, their masks); rank 0, milliseconds.

        Rows of 8: real slices, their reconstructions, then in paired mode the real masks and
        the decoded ones (mask values are grey levels: CSF dark, white matter white). Their
        whole-image and in-brain SSIM/PSNR go to TensorBoard as `held_out/*`.
        """
        if not logger.enabled:
            return
        b = Batch(*(t.to(self.env.device) if t is not None else None for t in self.log_batch))
        out = ema_model(b.model_input(), sample_posterior=False)[0]
        recon, logits = split_output(out) if b.masks is not None else (out, None)
        shown = [to_uint8(b.images), to_uint8(recon.clamp(-1, 1))]
        figures = paired_figures(shown[0].cpu(), shown[1].cpu(), self.log_region)
        logger.scalars(step, {f"held_out/{k}": float(v.nanmean()) for k, v in figures.items()})
        if logits is not None:
            shown += [b.masks, decode_mask(logits)]
        tiles = torch.stack(shown, dim=1)  # (B, kinds, 1, H, W)
        nrow = 8
        rows = [tiles[i : i + nrow].transpose(0, 1).flatten(0, 1) for i in range(0, len(tiles), nrow)]
        logger.images(step, "images/input_vs_reconstruction", torch.cat(rows), nrow=min(nrow, len(tiles)))

    def state(self) -> dict[str, Any]:
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        pass


def log_images_batch(
    cfg: Config, train_set: OasisH5Dataset
) -> tuple[tuple[torch.Tensor, torch.Tensor | None], torch.Tensor]:
    """Fixed slices (and masks, paired) for the reconstruction grid and its figures, held-out ones
    where the file has them, and their brain region (evaluation's rule: masks where packed)."""
    n = cfg.train.num_log_images
    try:
        held_out = OasisH5Dataset(
            cfg.data.path, "validate", image_size=cfg.data.image_size, with_mask=cfg.data.masks, raw=True
        )
    except (KeyError, ValueError):
        held_out = train_set
    step = max(1, len(held_out) // n)  # spread over cases and slice levels
    rows = list(range(0, step * n, step))[: len(held_out)]
    images = held_out.read_raw(rows)
    packed = held_out.info.splits[held_out.split].has_masks
    masks = held_out.read_raw(rows, mask=True) if packed else None
    return (to_float(images), masks if cfg.data.masks else None), brain_region(images, masks)
