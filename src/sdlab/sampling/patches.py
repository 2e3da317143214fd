"""Patches: small wrappers composed around a guided denoiser `x0 = denoiser(x, sigma)`.

Each takes a denoiser and returns one; none is a flag inside the network or the sampler.
Classifier-free guidance itself is `denoiser.CFGDenoiser`, which turns the conditional
network into the first of these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["Denoiser", "by_sigma", "inpaint_mask"]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma (B,)) -> x0


def by_sigma(stages: Sequence[tuple[float, Denoiser]]) -> Denoiser:
    """Conditioning that changes during sampling (prompt editing, alternation): `stages[i] =
    (until, denoiser)`, where stage i answers while sigma > `until`; the first that does is
    used, the last answers below every bound. One stage is returned as it is."""
    if len(stages) == 1:
        return stages[0][1]

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        level = float(sigma.reshape(-1)[0])
        for until, denoiser in stages:
            if level > until:
                return denoiser(x, sigma)
        return stages[-1][1](x, sigma)

    return denoise


def inpaint_mask(denoiser: Denoiser, latent: Tensor, mask: Tensor) -> Denoiser:
    """Inpainting with an ordinary model: outside the mask (1 = repaint) x0 is the original
    latent at every step, so only the masked region is generated."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        return latent * (1 - mask) + denoiser(x, sigma) * mask

    return denoise
