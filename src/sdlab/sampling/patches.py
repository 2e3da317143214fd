"""Patches: small wrappers composed around a guided denoiser `x0 = denoiser(x, sigma)`.

Each takes a denoiser and returns one; none is a flag inside the network or the sampler.
Classifier-free guidance itself is `denoiser.CFGDenoiser`, which turns the conditional
network into the first of these.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

__all__ = ["Denoiser", "by_sigma", "inpaint_mask", "skip_layer_guidance"]

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


def skip_layer_guidance(guided: Denoiser, cond: Denoiser, skipped: Denoiser, scale: float, lower: float,
                        upper: float) -> Denoiser:
    """Skip-layer guidance (SD3.5's SLG): while `lower < sigma <= upper`, push the guided x0 away
    from what the conditional model gives with some layers left out:
    `x0 + scale * (cond(x) - skipped(x))` (linear, so the same in x0 as diffusers' in v).

    Args:
        guided: the CFG denoiser.
        cond: the conditional model alone, `skipped` the same with the layers skipped.
        lower, upper: the sigma window (`slg_window` turns diffusers' step fractions into one).
    """

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        x0 = guided(x, sigma)
        level = float(sigma.reshape(-1)[0])
        if lower < level <= upper:
            x0 = x0 + scale * (cond(x, sigma) - skipped(x, sigma))
        return x0

    return denoise


def slg_window(sigmas: Tensor, start: float, end: float, steps: int, offset: int = 0) -> tuple[float, float]:
    """The sigma window of the steps diffusers and the SD3.5 reference apply SLG at: step i (0-based,
    of `steps`) when `steps * start < i < steps * end`; `sigmas` walked from step `offset` on.
    Returns (lower, upper): the step's own sigma is in, the next step's is not."""
    chosen = [i for i in range(steps) if steps * start < i < steps * end and 0 <= i - offset < len(sigmas) - 1]
    if not chosen:
        return (1.0, 0.0)  # empty
    return float(sigmas[chosen[-1] - offset + 1]), float(sigmas[chosen[0] - offset])
