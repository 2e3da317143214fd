"""What a diffusers folder's config files say that the released models all say alike: read
where sdlab's networks and schedule can follow it, written back on conversion, and refused
with one line where they cannot (rather than sampled as if the folder said the default).
Images against diffusers' pipelines for such folders are in tests/test_sdxl.py."""

from __future__ import annotations

import json
import shutil

import pytest

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.checkpoints.loader import load_bundle, save_checkpoint
from sdlab.errors import SdlabError

from ..tiny import diffusers_folder, tiny_bundle


@pytest.fixture(scope="module")
def sd1_folder(tmp_path_factory):
    return diffusers_folder(tmp_path_factory.mktemp("sd1"), "sd1")[1]


def _edit(path, **changes):
    d = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None and key in d:
            del d[key]
        elif value is not None:
            d[key] = value
    path.write_text(json.dumps(d))


@pytest.mark.parametrize("file, changes, message", [
    ("unet/config.json", {"flip_sin_to_cos": False}, "flip_sin_to_cos"),
    ("unet/config.json", {"time_cond_proj_dim": 256}, "time_cond_proj_dim"),  # LCM's guidance embedding
    ("unet/config.json", {"down_block_types": ["SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]}, "blocks"),
    ("vae/config.json", {"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4}, "latents_mean"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "linear"}, "beta_schedule"),
    ("scheduler/scheduler_config.json", {"num_train_timesteps": 500}, "1000 timesteps"),
    ("scheduler/scheduler_config.json", {"prediction_type": "sample"}, "prediction_type"),
    ("text_encoder/config.json", {"layer_norm_eps": 1e-6}, "layer_norm_eps"),
    ("tokenizer/special_tokens_map.json", {"pad_token": "<|startoftext|>"}, "pad_token"),
])
def test_values_sdlab_cannot_follow_are_refused(tmp_path, sd1_folder, file, changes, message):
    folder = shutil.copytree(sd1_folder, tmp_path / "sd1")
    _edit(folder / file, **changes)
    with pytest.raises(SdlabError, match=message) as e:
        load_bundle(folder, device="cpu")
    assert "\n" not in str(e.value) and file in str(e.value)


def test_schedule_and_default_size_read_and_written_back(tmp_path, sd1_folder):
    """The betas the scheduler states sample the model (and train it); the UNet's sample_size
    gives the size generated when none is asked for, as in diffusers' pipelines."""
    folder = shutil.copytree(sd1_folder, tmp_path / "sd1")
    _edit(folder / "scheduler" / "scheduler_config.json", beta_start=0.0001, beta_end=0.02)
    _edit(folder / "unet" / "config.json", sample_size=24)  # latents of 24: 96 px with the tiny 4x VAE
    bundle = load_bundle(folder, device="cpu")
    fam = bundle.family
    assert (fam.beta_start, fam.beta_end, fam.default_size) == (0.0001, 0.02, 96)

    write_diffusers_folder(bundle.state_dict(), bundle.config, tmp_path / "again")
    sched = json.loads((tmp_path / "again" / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_start"], sched["beta_end"]) == (0.0001, 0.02)
    assert json.loads((tmp_path / "again" / "unet" / "config.json").read_text())["sample_size"] == 24
    save_checkpoint(bundle, tmp_path / "m.safetensors")  # sdlab's own file keeps them in its metadata
    assert load_bundle(tmp_path / "m.safetensors", device="cpu").config == bundle.config

    # A scheduler config that leaves them out means the released schedule (not diffusers'
    # per-class defaults, which no SD model was trained on).
    _edit(folder / "scheduler" / "scheduler_config.json", beta_start=None, beta_end=None, beta_schedule=None)
    fam = load_bundle(folder, device="cpu").family
    assert (fam.beta_start, fam.beta_end) == (0.00085, 0.012)


def test_sdxl_size_embedding_width_stated_derived_or_contradicted(tmp_path):
    _, folder = diffusers_folder(tmp_path, "sdxl")
    unet_json = folder / "unet" / "config.json"
    assert json.loads(unet_json.read_text())["addition_time_embed_dim"] == 256
    # Not stated (diffusers could not build that UNet): read off the widths, as for a single file.
    _edit(unet_json, addition_time_embed_dim=None)
    assert load_bundle(folder, device="cpu").config.unet == tiny_bundle("sdxl").config.unet
    # Stated, but y's width is not the pooled text plus 6 of them.
    _edit(unet_json, addition_time_embed_dim=16)
    with pytest.raises(SdlabError, match="configs disagree") as e:
        load_bundle(folder, device="cpu")
    assert "\n" not in str(e.value)
