"""Shapes, parameter counts, attention maths, posterior KL and the PatchGAN of oasis_ldm.models."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from oasis_ldm.config import Config, UNetConfig, VAEConfig, load_config
from oasis_ldm.models import (
    AttentionBlock,
    AutoencoderKL,
    DiagonalGaussian,
    NLayerDiscriminator,
    UNet,
    build_discriminator,
    build_unet,
    build_vae,
    count_parameters,
    generator_adv_loss,
    hinge_d_loss,
)
from oasis_ldm.models.vae import AttnBlock

TINY_VAE = VAEConfig(base_channels=8, channel_mult=(1, 2, 4), num_res_blocks=1, latent_channels=3)
TINY_UNET = UNetConfig(channels=(8, 16, 16, 16), bottleneck=32, groups=4, heads=2, time_dim=16)


# -- parameter-count formulas, written out from the architecture ---------------------------------


def conv(cin: int, cout: int, k: int, bias: bool = True) -> int:
    return cin * cout * k * k + (cout if bias else 0)


def linear(fin: int, fout: int) -> int:
    return fin * fout + fout


def norm(c: int) -> int:  # GroupNorm or LayerNorm: a scale and a shift per channel
    return 2 * c


def conv_relu(cin: int, cout: int, mid: int | None = None) -> int:
    mid = mid or cout
    return conv(cin, mid, 3, bias=False) + norm(mid) + conv(mid, cout, 3, bias=False) + norm(cout)


def unet_params(c_in: int, c: tuple[int, int, int, int], bott: int, time_dim: int) -> int:
    """The seed's U-Net with every attention on, level by level."""

    def enc(i: int, o: int) -> int:
        return conv_relu(i, i) + conv_relu(i, o) + linear(time_dim, o)

    def dec(i: int, o: int) -> int:
        return conv_relu(i, i) + conv_relu(i, o, i // 2) + linear(time_dim, o)

    def attn(ch: int) -> int:
        return norm(ch) + linear(ch, 3 * ch) + linear(ch, ch) + norm(ch) + 2 * linear(ch, ch)

    c0, c1, c2, c3 = c
    total = conv_relu(c_in, c0)
    total += enc(c0, c1) + attn(c1) + enc(c1, c2) + attn(c2) + enc(c2, c3) + attn(c3)
    total += conv_relu(c3, bott) + conv_relu(bott, bott) + conv_relu(bott, c3)
    total += dec(c3 + c2, c1) + attn(c1) + dec(c1 + c1, c0) + attn(c0) + dec(c0 + c0, c0) + attn(c0)
    return total + conv(c0, c_in, 1)


def vae_params(cfg: VAEConfig, c_in: int = 1) -> int:
    """CompVis KL autoencoder: encoder, 1x1 quant convs, decoder with one extra block per level."""

    def res(i: int, o: int) -> int:
        return norm(i) + conv(i, o, 3) + norm(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

    ch, mults, n, z = cfg.base_channels, cfg.channel_mult, cfg.num_res_blocks, cfg.latent_channels
    top = ch * mults[-1]
    mid = 2 * res(top, top) + ((norm(top) + 4 * conv(top, top, 1)) if cfg.attention else 0)
    enc, block_in = conv(c_in, ch, 3), ch
    for i, m in enumerate(mults):
        for _ in range(n):
            enc, block_in = enc + res(block_in, ch * m), ch * m
        enc += conv(block_in, block_in, 3) if i < len(mults) - 1 else 0
    enc += mid + norm(top) + conv(top, 2 * z, 3)
    dec, block_in = conv(z, top, 3) + mid, top
    for i in reversed(range(len(mults))):
        for _ in range(n + 1):
            dec, block_in = dec + res(block_in, ch * mults[i]), ch * mults[i]
        dec += conv(block_in, block_in, 3) if i > 0 else 0
    dec += norm(ch * mults[0]) + conv(ch * mults[0], c_in, 3)
    return enc + conv(2 * z, 2 * z, 1) + conv(z, z, 1) + dec


# -- tests ----------------------------------------------------------------------------------------


def test_full_unet_parameter_count_matches_the_formula():
    cfg = UNetConfig()
    assert cfg.channels == (64, 128, 256, 256) and cfg.bottleneck == 512
    expected = unet_params(3, cfg.channels, cfg.bottleneck, cfg.time_dim)
    assert count_parameters(UNet(cfg, in_channels=3)) == expected


def test_full_vae_parameter_count_matches_the_formula():
    cfg = load_config("oasis256").vae
    expected = vae_params(cfg)
    assert count_parameters(AutoencoderKL(cfg)) == expected


def test_demo_preset_counts_match_the_formulas():
    cfg = load_config("demo")
    unet = build_unet(cfg)
    # The demo switches the first level's attention off: subtract those two blocks' parameters.
    c0, c1 = cfg.unet.channels[:2]
    full = unet_params(cfg.vae.latent_channels, cfg.unet.channels, cfg.unet.bottleneck, cfg.unet.time_dim)
    off = sum(norm(c) * 2 + linear(c, 3 * c) + 3 * linear(c, c) for c in (c1, c0))
    assert cfg.unet.attention == (False, True, True)
    assert count_parameters(unet) == full - off
    assert count_parameters(build_vae(cfg)) == vae_params(cfg.vae)


def test_no_model_has_buffers_for_ddp_to_sync():
    # The training loop leaves DDP's buffer sync at its default because there is nothing to sync.
    cfg = load_config("oasis256")
    for model in (build_vae(cfg), build_unet(cfg), build_discriminator(cfg)):
        assert list(model.buffers()) == [], type(model).__name__


def test_vae_shapes_and_factor():
    vae = AutoencoderKL(TINY_VAE)
    x = torch.randn(2, 1, 32, 32)
    recon, posterior = vae(x, generator=torch.Generator().manual_seed(0))
    f = vae.factor
    assert f == 4 and vae.latent_channels == 3
    assert posterior.mean.shape == (2, 3, 32 // f, 32 // f)
    assert vae.encode(x).sample().shape == (2, 3, 8, 8)
    assert recon.shape == x.shape and vae.decode(posterior.mode()).shape == x.shape
    assert vae.last_layer is vae.decoder.conv_out.weight


def test_vae_sampling_follows_the_generator():
    vae = AutoencoderKL(TINY_VAE).eval()
    x = torch.randn(1, 1, 16, 16)
    r1, _ = vae(x, torch.Generator().manual_seed(3))
    r2, _ = vae(x, torch.Generator().manual_seed(3))
    r3, _ = vae(x, torch.Generator().manual_seed(4))
    assert torch.equal(r1, r2) and not torch.allclose(r1, r3)
    noise = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(vae(x, noise=noise)[0], r1)  # the same draw, passed in
    posterior = vae.encode(x)
    torch.testing.assert_close(vae(x, sample_posterior=False)[0], vae.decode(posterior.mode()))


def test_vae_group_norm_picks_a_divisor_up_to_32():
    vae = AutoencoderKL(VAEConfig(base_channels=24, channel_mult=(1, 2), num_res_blocks=1, attention=False))
    groups = {(m.num_channels, m.num_groups) for m in vae.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {(24, 24), (48, 24)}


def test_unet_shape_and_time_dependence():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET, in_channels=3)
    x = torch.randn(2, 3, 16, 16)
    out1 = unet(x, torch.tensor([5, 5]))
    out2 = unet(x, torch.tensor([600, 600]))
    assert out1.shape == x.shape
    assert (out1 - out2).abs().max() > 1e-3
    assert UNet(TINY_UNET, in_channels=3, out_channels=6)(x, torch.tensor([1, 2])).shape == (2, 6, 16, 16)


def test_unet_outputs_are_independent_of_the_batch():
    torch.manual_seed(0)
    unet = UNet(TINY_UNET, in_channels=3).eval()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([10, 200, 999])
    with torch.no_grad():
        batched = unet(x, t)
        alone = unet(x[1:2], t[1:2])
    torch.testing.assert_close(batched[1:2], alone, rtol=0, atol=1e-5)


def test_unet_wiring_follows_the_seed():
    unet = UNet(UNetConfig(), in_channels=3)
    enc_out = [blk.conv[1].block[3].out_channels for blk in unet.encoders]
    dec_in = [blk.conv[0].block[0].in_channels for blk in unet.decoders]
    dec_out = [blk.conv[1].block[3].out_channels for blk in unet.decoders]
    assert enc_out == [128, 256, 256] and dec_in == [512, 256, 128] and dec_out == [128, 64, 64]
    assert unet.out_layer.out_channels == 3


def test_unet_attention_flags_pair_mirrored_levels():
    unet = UNet(dataclasses.replace(TINY_UNET, attention=(False, True, False)), in_channels=3)
    enc = [isinstance(m, AttentionBlock) for m in unet.enc_attention]
    dec = [isinstance(m, AttentionBlock) for m in unet.dec_attention]
    assert enc == [False, True, False] and dec == [False, True, False]
    unet = UNet(dataclasses.replace(TINY_UNET, attention=(True, False, False)), in_channels=3)
    dec = [isinstance(m, AttentionBlock) for m in unet.dec_attention]
    assert dec == [False, False, True]  # level 0 mirrors the last decoder (back to full size)


def test_unet_group_norm_falls_back_to_a_divisor():
    cfg = UNetConfig(channels=(12, 20, 20, 20), bottleneck=36, groups=8, heads=2, time_dim=16)
    unet = UNet(cfg, in_channels=3)
    norms = [m for m in unet.modules() if isinstance(m, nn.GroupNorm)]
    assert all(m.num_channels % m.num_groups == 0 for m in norms)
    # the largest count <= 8 that divides the width (oasis_ldm/models/norm.py, every model's rule)
    assert {(m.num_channels, m.num_groups) for m in norms} >= {(12, 6), (20, 5), (36, 6), (24, 8), (40, 8)}
    assert unet(torch.randn(1, 3, 16, 16), torch.tensor([3])).shape == (1, 3, 16, 16)


def test_attention_block_matches_manual_softmax():
    torch.manual_seed(0)
    c, heads = 16, 4
    block = AttentionBlock(c, heads)
    x = torch.randn(2, c, 3, 5)
    tokens = x.flatten(2).transpose(1, 2)
    h = F.layer_norm(tokens, (c,), block.norm1.weight, block.norm1.bias)
    qkv = h @ block.qkv.weight.T + block.qkv.bias
    d = c // heads
    q, k, v = (qkv[..., i * c : (i + 1) * c].reshape(2, 15, heads, d).transpose(1, 2) for i in range(3))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    att = (weights @ v).transpose(1, 2).reshape(2, 15, c)
    r = tokens + att @ block.proj.weight.T + block.proj.bias
    h2 = F.layer_norm(r, (c,), block.norm2.weight, block.norm2.bias)
    ff1, ff2 = block.ff[0], block.ff[2]
    r = r + F.gelu(h2 @ ff1.weight.T + ff1.bias) @ ff2.weight.T + ff2.bias
    expected = r.transpose(1, 2).reshape(2, c, 3, 5)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_vae_attention_matches_manual_softmax():
    torch.manual_seed(0)
    block = AttnBlock(8)
    x = torch.randn(2, 8, 4, 4)
    y = block.norm(x)
    q, k, v = (m(y).flatten(2) for m in (block.q, block.k, block.v))  # (B, C, HW)
    w = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(8), dim=-1)  # (B, HW, HW)
    out = (v @ w.transpose(1, 2)).reshape(2, 8, 4, 4)
    torch.testing.assert_close(block(x), x + block.proj_out(out), rtol=1e-5, atol=1e-5)


def test_posterior_kl_matches_closed_form():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    posterior = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(posterior.mode(), mean)


def test_posterior_clamps_logvar_and_samples_its_moments():
    moments = torch.cat([torch.full((1, 1, 1, 1), 100.0), torch.full((1, 1, 1, 1), -100.0)], dim=1)
    assert DiagonalGaussian(moments).logvar.item() == -30.0
    mean, logvar = torch.full((4000, 1, 2, 2), 1.5), torch.full((4000, 1, 2, 2), math.log(0.25))
    z = DiagonalGaussian(torch.cat([mean, logvar], dim=1)).sample(torch.Generator().manual_seed(0))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02


def test_discriminator_returns_a_patch_map_per_image():
    cfg = VAEConfig(disc_channels=8, disc_layers=3)
    disc = NLayerDiscriminator(cfg)
    x = torch.randn(3, 1, 64, 64)
    logits = disc(x)
    assert logits.shape == (3, 1, 64 // 2**3 - 2, 64 // 2**3 - 2)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    torch.testing.assert_close(disc(x[2:]), logits[2:], rtol=0, atol=1e-5)
    assert build_discriminator(Config()).main[0].in_channels == 1


def test_hinge_and_generator_losses():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # real: relu(1 - [2, .5]) = [0, .5] -> .25; fake: relu(1 + [-2, .5]) = [0, 1.5] -> .75
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    assert generator_adv_loss(fake).item() == pytest.approx(0.75)
