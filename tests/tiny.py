"""Tiny random model configs shared by the tests (seconds on a CPU).

Widths follow the rules detection reads off shapes: CLIP 64 channels per head,
SD2 UNet 64 channels per head, 32 GroupNorm groups, so these files load through
the same path as released checkpoints.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import Bundle, new_bundle
from sdlab.families import FAMILIES, ModelConfig
from sdlab.models import storage
from sdlab.models.clip import CLIPTextConfig
from sdlab.models.unet import UNetConfig
from sdlab.models.vae import VAEConfig

TINY_VAE = VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=32)


def tiny_config(family: str = "sd1") -> ModelConfig:
    fam = FAMILIES[family]
    in_ch = 9 if fam.inpaint else 4
    if family.startswith("sd1"):
        te = CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128)
        unet = UNetConfig(in_channels=in_ch, model_channels=32, channel_mult=(1, 2), num_res_blocks=(1, 1),
                          transformer_depth=(1, 1), transformer_depth_middle=1, num_heads=8, context_dim=64)
    elif family.startswith("sdxl"):
        # CLIP-L (64) + bigG (64, projection 64): context 128; y = pooled 64 + 6 or 5 numbers x 256.
        te_l = CLIPTextConfig(layout="openai", width=64, layers=2, heads=1, mlp_width=128)
        te_g = CLIPTextConfig(layout="openclip", width=64, layers=3, heads=1, mlp_width=128, activation="gelu",
                              projection_dim=64)
        refiner = family == "sdxl-refiner"
        tes = (te_g,) if refiner else (te_l, te_g)
        unet = UNetConfig(in_channels=in_ch, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                          transformer_depth=(0, 2) if not refiner else (1, 1), transformer_depth_middle=2 if not refiner else 1,
                          num_heads=None, num_head_channels=64, context_dim=64 if refiner else 128,
                          use_linear_in_transformer=True, adm_in_channels=64 + (5 if refiner else 6) * 256)
        return ModelConfig(fam, unet, TINY_VAE, tes)
    else:
        te = CLIPTextConfig(layout="openclip", width=64, layers=3, heads=1, mlp_width=128, activation="gelu",
                            projection_dim=64)
        unet = UNetConfig(in_channels=in_ch, model_channels=64, channel_mult=(1, 2), num_res_blocks=(1, 1),
                          transformer_depth=(1, 1), transformer_depth_middle=1, num_heads=None,
                          num_head_channels=64, context_dim=64, use_linear_in_transformer=True)
    return ModelConfig(fam, unet, TINY_VAE, (te,))


def tiny_bundle(family: str = "sd1", seed: int = 0) -> Bundle:
    return new_bundle(tiny_config(family), seed=seed, init_std=0.05, name=f"tiny-{family}")


def rounded_through(bundle: Bundle, dtype: torch.dtype) -> Bundle:
    """The same bundle, changed in place: every weight `models.storage` may keep narrow rounded to
    `dtype` and kept in its own dtype (the reference for weights stored in `dtype`)."""
    with torch.no_grad():
        for net in (bundle.unet, *bundle.text_encoders):
            for module, attr in storage.narrowable(net, dtype).values():
                w = getattr(module, attr)
                w.copy_(w.to(dtype).to(w.dtype))
    return bundle


def save_native(bundle: Bundle, path: Path, metadata: dict[str, str] | None = None,
                dtype: torch.dtype | None = None) -> Path:
    """Save like a released single file: native keys, no sdlab metadata unless given."""
    sd = bundle.state_dict()
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    save_safetensors(sd, path, metadata)
    return path


def save_with_native_size(bundle: Bundle, path: Path, size: int) -> Path:
    """Save with sdlab's config saying the model was trained at `size` px (as the demo model's
    does), so that the page and /sdlab/v1/model-info open it at that size."""
    cfg = replace(bundle.config, family=replace(bundle.config.family, default_size=size))
    return save_native(bundle, path, metadata={"sdlab.config": cfg.to_json()})


def with_family(cfg: ModelConfig, family: str) -> ModelConfig:
    return replace(cfg, family=FAMILIES[family])


def euler_karras(pipe):
    """A diffusers pipeline's scheduler set to our "Euler" + "karras": Karras sigmas over the
    model's full sigma range (linspace spacing)."""
    from diffusers import EulerDiscreteScheduler

    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                        timestep_spacing="linspace")
    return pipe


def as_float_array(images):
    """PIL images -> (N, H, W, 3) floats in [0, 1], as diffusers' output_type="np"."""
    import numpy as np

    return np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images])


def diffusers_folder(tmp_path: Path, family: str, seed: int = 0) -> tuple[Bundle, Path]:
    """A tiny random model written as a diffusers folder."""
    from sdlab.checkpoints.diffusers_folder import write_diffusers_folder

    ref = tiny_bundle(family, seed=seed)
    folder = tmp_path / family
    write_diffusers_folder(ref.state_dict(), ref.config, folder)
    return ref, folder


def psnr(a, b) -> float:
    """Peak signal-to-noise ratio of two 8-bit images (PIL images or arrays), in dB."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
