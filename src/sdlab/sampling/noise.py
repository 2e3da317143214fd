"""Noise sources: every random draw of a generation comes from one of these, passed in.

No step seeds anything itself. A recipe picks the source its face promises:

- `PerImageNoise`: the web UIs' rule. Image i of a batch has its own generator seeded with
  `seeds[i]` (the CPU's, or the "NV" Philox numbers), so an image depends only on its own
  seed whatever the batch size; variation seeds are blended in by slerp. Its draws come in
  diffusers' order: the VAE's sample of an init image, the initial noise, then the sampler's.
- `BatchNoise`: ComfyUI's rule (`comfy/sample.py` `prepare_noise`). One CPU generator seeded
  with `seed` draws the whole batch's initial noise at once; the sampler's noise comes from a
  second generator seeded with the same seed (`k_diffusion/sampling.py` `default_noise_sampler`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .rng import ImageRNG, RngSource
from .samplers import NoiseSampler, brownian_tree_noise_sampler

__all__ = ["BatchNoise", "NoiseSource", "PerImageNoise"]


class NoiseSource:
    """What the steps ask of a noise source."""

    def initial(self) -> Tensor:
        """The noise a sampling pass starts from, (B, C, h, w) float32 on the CPU."""
        raise NotImplementedError

    def for_encoding(self, shape: tuple[int, ...]) -> Tensor:
        """Standard normal noise to sample a VAE's latent distribution (float32, CPU)."""
        raise NotImplementedError

    def sampler_noise(self, x: Tensor, sigmas: Tensor, brownian: bool) -> NoiseSampler:
        """The stochastic samplers' noise for a pass over `sigmas` starting at `x`; `brownian`:
        the Brownian-tree noise the web UIs give the SDE samplers."""
        raise NotImplementedError


class PerImageNoise(NoiseSource):
    """One generator per image: seeds, optional variation seeds, CPU or NV numbers.

    Args:
        shape: one image's latent shape (C, h, w).
        seeds, subseeds: one per image; `subseed_strength` 0 ignores the subseeds.
        source: "cpu" or "nv" (`rng.ImageRNG`).
    """

    def __init__(self, shape: tuple[int, ...], seeds: Sequence[int], source: RngSource = "cpu",
                 subseeds: Sequence[int] | None = None, subseed_strength: float = 0.0):
        self.seeds = list(seeds)
        self._rng = ImageRNG(tuple(shape), self.seeds, source, list(subseeds) if subseeds else None,
                             subseed_strength)

    def initial(self) -> Tensor:
        return self._rng.first()

    def for_encoding(self, shape: tuple[int, ...]) -> Tensor:
        # The first image's generator, as diffusers' pipelines draw the init image's latent sample
        # from the generator they are given.
        return self._rng.draw(self._rng.generators[0], tuple(shape))

    def sampler_noise(self, x: Tensor, sigmas: Tensor, brownian: bool) -> NoiseSampler:
        if brownian:
            return brownian_tree_noise_sampler(x, sigmas, self.seeds)
        return lambda sigma, sigma_next: self._rng.draw_like(x)


class BatchNoise(NoiseSource):
    """ComfyUI's noise: the whole batch from one CPU generator seeded with `seed`."""

    def __init__(self, shape: tuple[int, ...], seed: int):
        self.shape = tuple(shape)  # the whole batch's latent shape (B, C, h, w)
        self.seed = int(seed)
        self._encoding = torch.Generator("cpu").manual_seed(self.seed)

    def initial(self) -> Tensor:
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return torch.randn(self.shape, generator=generator, dtype=torch.float32)

    def for_encoding(self, shape: tuple[int, ...]) -> Tensor:
        return torch.randn(tuple(shape), generator=self._encoding, dtype=torch.float32)

    def sampler_noise(self, x: Tensor, sigmas: Tensor, brownian: bool) -> NoiseSampler:
        if brownian:
            return brownian_tree_noise_sampler(x, sigmas, self.seed)
        generator = torch.Generator("cpu").manual_seed(self.seed)
        return lambda sigma, sigma_next: torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
