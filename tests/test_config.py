"""Typed configs: presets, YAML files, --set overrides, and the errors for bad keys and values."""

from __future__ import annotations

import re

import pytest

from oasis_ldm.config import ConfigError, dump_yaml, from_dict, load_config, presets, to_dict


def test_presets_load_and_the_full_model_has_the_seed_widths():
    assert {"demo", "oasis256"} <= set(presets())
    cfg = load_config("oasis256")
    assert cfg.unet.channels == (64, 128, 256, 256) and cfg.unet.bottleneck == 512
    assert cfg.vae.latent_channels == 3 and 2 ** (len(cfg.vae.channel_mult) - 1) == 4
    assert cfg.data.image_size == 256


def test_overrides_are_coerced_to_the_field_types():
    cfg = load_config(
        "demo", ["train.lr=3e-4", "train.max_steps=2e3", "unet.attention=false,true,true", "data.in_memory=no"]
    )
    assert cfg.train.lr == 3e-4 and cfg.train.max_steps == 2000
    assert cfg.unet.attention == (False, True, True) and cfg.data.in_memory is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.bogus=1", "unknown key train.bogus"),
        ("nosection.lr=1", "unknown section 'nosection'"),
        ("train.max_steps=1.5", "train.max_steps: expected int"),
        ("data.in_memory=maybe", "expected true or false"),
        ("data.augment=rotate", "data.augment='rotate': expected one of none, flip, crop"),
        ("train.lr", "expected section.key=value"),
        ("data.image_size=100", "data.image_size=100"),
        ("unet.heads=3", "unet.heads=3 must divide"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("demo", [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=-1e-3", "train.lr=-0.001: must be > 0"),
        ("train.lr=nan", "train.lr=nan: must be a finite number"),
        ("train.disc_lr=inf", "train.disc_lr=inf: must be a finite number"),
        ("diffusion.eta=nan", "diffusion.eta=nan: must be a finite number"),
        ("vae.kl_weight=-1e-6", "vae.kl_weight=-1e-06: must be >= 0"),
        ("train.ema_decay=1.5", "train.ema_decay=1.5: must be in [0, 1)"),
        ("train.betas=0.9,1.0", "train.betas[1]=1.0: must be in [0, 1)"),
        ("train.snapshot_every=0", "train.snapshot_every=0: must be >= 1"),
        ("train.image_every=0", "train.image_every=0: must be >= 1"),
        ("diffusion.sample_steps=2000", "diffusion.sample_steps=2000: must be in [1, 1000]"),
        ("diffusion.beta_end=1e-5", "diffusion.beta_start=0.0001 must be below diffusion.beta_end=1e-05"),
    ],
)
def test_numbers_that_would_train_nothing_or_crash_later_are_refused(override, message):
    """Each once trained silently wrong (a NaN or negative rate), crashed hours in
    (snapshot_every=0: ZeroDivisionError at the first save), or sampled black images."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo", [override])


def test_yaml_files_and_round_trip(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("train:\n  batch_size: 8\n  betas: [0.9, 0.95]\n")
    cfg = load_config(str(path))
    assert cfg.train.batch_size == 8 and cfg.train.betas == (0.9, 0.95)
    assert from_dict(to_dict(cfg)) == cfg
    assert "batch_size: 8" in dump_yaml(cfg)
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="not a file and not a preset"):
        load_config("no-such-preset")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- train\n- vae\n", "expected a mapping of sections at the top level, got list"),
        ("just a string\n", "expected a mapping of sections at the top level, got str"),
        ("stages: [vae, ldm]\n", "stages must be a mapping of vae/ldm to sections, got list"),
        ("stages:\n  vae: 3\n", "stages.vae: expected a mapping of sections, got int"),
        ("train: 5\n", "section 'train' must be a mapping"),
    ],
)
def test_a_yaml_file_of_the_wrong_shape_is_one_config_error(tmp_path, text, message):
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(str(path), stage="vae")
    assert "\n" not in str(caught.value)


def test_checkpoints_of_earlier_releases_keep_loading():
    values = to_dict(load_config("demo"))
    values["train"]["grad_accum"] = 1  # written by releases before the global batch
    values["ldm"]["scale_batches"] = 8
    assert from_dict(values) == load_config("demo")


def test_the_crop_augmentation_is_called_crop_and_seed_still_works():
    assert load_config("demo", ["data.augment=crop"]).data.augment == "crop"
    assert load_config("demo", ["data.augment=seed"]).data.augment == "crop"  # its earlier name
    values = to_dict(load_config("demo"))
    values["data"]["augment"] = "seed"  # a checkpoint written before the rename
    assert from_dict(values).data.augment == "crop"
