"""The steps every generation is made of, over plain values (DESIGN.md "Generation as
composable steps"). A recipe (`recipes/webui.py`, a node of a graph) is a sequence of calls of
these; none of them knows which face asked, and none draws a random number itself: noise is a
value passed in (`sampling.noise`).

    encode the prompts    text.conditioning.prompt_schedule  -> PromptSchedule per prompt
    encode_image(vae, pixels, family, noise)             -> latent
    noised(sampling, sigma, noise, latent)               -> the sampler's starting point
    sample(sampling, denoiser, x, sigmas, sampler, ...)  -> latent
    decode(vae, latent, family)                          -> pixels
"""

from __future__ import annotations

import torch
from torch import Tensor

from .families import Family
from .models.vae import AutoencoderKL
from .perf import decode_latents, encode_images
from .sampling.model_sampling import ModelSampling
from .sampling.noise import NoiseSource
from .sampling.patches import Denoiser
from .sampling.samplers import Callback, NoiseSampler, SamplerInfo, check_sampler

__all__ = ["decode", "encode_image", "noised", "sample"]


def encode_image(vae: AutoencoderKL, pixels: Tensor, family: Family, noise: NoiseSource) -> Tensor:
    """A sample of the images' latent distribution (its noise from `noise`), in the family's
    latent space: `(z - shift) * scale`. `pixels`: (B, 3, H, W) in [-1, 1]. Returns float32."""
    dist = encode_images(vae, pixels)  # tiled when large; fp16 overflow guarded
    eps = noise.for_encoding(tuple(dist.mean.shape)).to(dist.mean.device, dist.mean.dtype)
    z = (dist.mean + dist.std * eps).float()
    if family.latent_shift:
        z = z - family.latent_shift
    return z * family.latent_scale


def decode(vae: AutoencoderKL, latent: Tensor, family: Family) -> Tensor:
    """Images (B, 3, H, W) roughly in [-1, 1] from latents in the family's latent space."""
    z = latent / family.latent_scale
    if family.latent_shift:
        z = z + family.latent_shift
    return decode_latents(vae, z.to(next(vae.parameters()).dtype))


def noised(sampling: ModelSampling, sigma: Tensor, noise: Tensor, latent: Tensor | None = None) -> Tensor:
    """Where sampling starts: `latent` (none: an empty latent) noised to `sigma` as the model's
    sampling mixes noise in."""
    return sampling.noise_scaling(sigma, noise, torch.zeros_like(noise) if latent is None else latent)


def sample(sampling: ModelSampling, denoiser: Denoiser, x: Tensor, sigmas: Tensor, sampler: SamplerInfo,
           noise_sampler: NoiseSampler, eta: float | None = None, callback: Callback | None = None) -> Tensor:
    """Walk `sigmas` from `x` with `sampler`, asking `denoiser` (the guided, patched network) for
    x0. `eta` (None: the sampler's default) reaches only samplers that have one."""
    check_sampler(sampler, sampling)
    knobs = {"eta": eta} if eta is not None and sampler.default_eta is not None else {}
    return sampler.function(denoiser, x, sigmas, callback=callback, noise_sampler=noise_sampler,
                            model_sampling=sampling, **knobs)
