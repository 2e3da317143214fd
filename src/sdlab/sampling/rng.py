"""Noise sources: seeded, per image, device independent.

- "cpu": `torch.Generator("cpu").manual_seed(seed)`; the same numbers on every
  machine, and the same as diffusers pipelines given a CPU generator.
- "nv": the numbers CUDA's `torch.randn` gives for a seed (Philox 4x32-10 plus
  Box-Muller, as the AUTOMATIC1111 web UI's "NV" option reimplements it), so an
  image made on an NVIDIA GPU with the web UI's default GPU noise can be remade
  on any device.

Each image of a batch has its own generator (seed + i); the first draw is the
initial latent noise and later draws feed stochastic samplers.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

RngSource = Literal["cpu", "nv"]

_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)
_TWO_POW32_INV = np.float32(2.3283064e-10)
_TWO_POW32_INV_2PI = np.float32(2.3283064e-10 * 6.2831855)


def _mulhilo(a: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    prod = a.astype(np.uint64) * np.uint64(m)
    return (prod >> np.uint64(32)).astype(np.uint32), (prod & np.uint64(0xFFFFFFFF)).astype(np.uint32)


def _philox4_32(counter: np.ndarray, key: np.ndarray, rounds: int = 10) -> np.ndarray:
    """Philox 4x32 with `rounds` rounds over (4, N) counters and (2, N) keys (uint32)."""
    c, k = counter.copy(), key.copy()
    for r in range(rounds):
        hi0, lo0 = _mulhilo(c[0], _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c[2], _PHILOX_M[1])
        c = np.stack([hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0])
        if r < rounds - 1:
            k = np.stack([k[0] + np.uint32(_PHILOX_W[0]), k[1] + np.uint32(_PHILOX_W[1])])
    return c


def _box_muller(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32) * _TWO_POW32_INV + _TWO_POW32_INV / np.float32(2)
    v = y.astype(np.float32) * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / np.float32(2)
    s = np.sqrt(np.float32(-2.0) * np.log(u))
    return (s * np.sin(v)).astype(np.float32)


class PhiloxGenerator:
    """CUDA-compatible normal noise for one seed; each `randn` call advances the offset."""

    def __init__(self, seed: int):
        self.seed = seed & 0xFFFFFFFFFFFFFFFF
        self.offset = 0

    def randn(self, shape: tuple[int, ...]) -> Tensor:
        n = int(np.prod(shape))
        counter = np.zeros((4, n), dtype=np.uint32)
        counter[0] = self.offset
        counter[2] = np.arange(n, dtype=np.uint32)
        self.offset += 1
        key = np.stack([np.full(n, self.seed & 0xFFFFFFFF, dtype=np.uint32),
                        np.full(n, self.seed >> 32, dtype=np.uint32)])
        g = _philox4_32(counter, key)
        return torch.from_numpy(_box_muller(g[0], g[1]).reshape(shape))


class ImageRNG:
    """One generator per image of a batch, seeds `seeds[i]`; optional variation seeds."""

    def __init__(self, shape: tuple[int, ...], seeds: list[int], source: RngSource = "cpu",
                 subseeds: list[int] | None = None, subseed_strength: float = 0.0):
        self.shape = shape  # (C, h, w) of one image's latent
        self.source = source
        self.generators = [self._generator(s) for s in seeds]
        self.subseeds = subseeds if subseed_strength else None
        self.subseed_strength = subseed_strength

    def _generator(self, seed: int):
        return PhiloxGenerator(seed) if self.source == "nv" else torch.Generator("cpu").manual_seed(seed)

    @staticmethod
    def draw(gen, shape: tuple[int, ...]) -> Tensor:
        if isinstance(gen, PhiloxGenerator):
            return gen.randn(shape)
        return torch.randn(shape, generator=gen)

    def first(self) -> Tensor:
        """The initial noise, (B, C, h, w) on the CPU, with variation seeds blended in."""
        noises = []
        for i, gen in enumerate(self.generators):
            noise = self.draw(gen, self.shape)
            if self.subseeds is not None:
                sub = self.draw(self._generator(self.subseeds[i]), self.shape)
                noise = slerp(self.subseed_strength, noise, sub)
            noises.append(noise)
        return torch.stack(noises)

    def next(self) -> Tensor:
        """Further noise for stochastic samplers, continuing each image's generator."""
        return torch.stack([self.draw(g, self.shape) for g in self.generators])

    def draw_like(self, x: Tensor) -> Tensor:
        """`next()` shaped and placed like x (a sampler's noise_sampler)."""
        return self.next().to(device=x.device, dtype=x.dtype).reshape(x.shape)


def slerp(t: float, low: Tensor, high: Tensor) -> Tensor:
    """Spherical interpolation of two noise tensors, as the web UIs blend a variation
    seed into the main one (t = variation strength)."""
    low_n, high_n = low / low.norm(), high / high.norm()
    dot = (low_n * high_n).sum()
    if dot.abs() > 0.9995:
        return low * (1 - t) + high * t
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high
