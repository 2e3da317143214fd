"""Samplers: pure functions that walk a sigma schedule down to 0.

Every sampler has the signature

    sample_<name>(denoiser, x, sigmas, *, callback=None, noise_sampler=None, **knobs) -> x

in k-diffusion's conventions: `denoiser(x, sigma) -> x0` is the denoised estimate, with
`sigma` a (B,) float32 tensor; `x` is (B, C, H, W) and already holds the starting noise
scaled by the caller (A1111: `noise * sigmas[0]`; ComfyUI at full denoise and diffusers'
VP schedulers: `noise * sqrt(1 + sigmas[0]**2)`; img2img: `latent + noise * sigmas[0]`);
`sigmas` is a 1-D tensor, decreasing, usually ending with 0 (see `schedules.py`).
Multistep state lives in local variables, so a sampler can be interrupted and called
again without any reset.

`callback(i, total, x, denoised)` is called once per step, after the step's first
denoiser call; whatever it raises propagates, which is how the pipeline cancels.

Noise goes back into the sample through `model_sampling` (a `model_sampling.ModelSampling`;
None is k-diffusion's sigma space, `x = x0 + sigma * noise`, what discrete eps/v models
use): ancestral samplers (Euler a, DPM2 a, DPM++ 2S a, DDIM with eta) take its
`ancestral_step` and `renoise`, LCM its `noise_scaling`, and the exponential-integrator
SDE samplers its `alpha` and `ve_sigma`, so that on a flow model (SD3) each takes the
flow-correct step of ComfyUI's `*_RF` samplers and half-log-SNR SDE samplers. The ODE
samplers need nothing from it: dx/dsigma = (x - x0) / sigma holds for flow sigmas too.
A sampler never asks which family runs. `SamplerInfo.flow` marks a sampler that cannot run
on flow models (none today) and `check_sampler` refuses it; the one knob whose noise holds in
sigma space only, `s_churn` > 0 (Euler, Heun, DPM2), raises where the signal is scaled.

Randomness comes only from `noise_sampler(sigma, sigma_next) -> Tensor` (shaped like x).
The pipeline passes `default_noise_sampler(x, generators)` with one seeded CPU generator
per batch item, so each image depends only on its own seed; for the samplers flagged
`brownian_noise` it should pass `brownian_tree_noise_sampler(x, sigmas, seeds)` instead
(that needs torchsde), which is what the web UIs use for DPM++ SDE, 2M SDE and 3M SDE.

The algorithms are those of k-diffusion `k_diffusion/sampling.py` (Katherine Crowson,
MIT), rewritten; UniPC follows diffusers' `UniPCMultistepScheduler`, moved to sigma space.
Step coefficients are computed in float64 from the sigmas, then applied to the tensors.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sdlab.errors import SdlabError
from sdlab.optional import require
from sdlab.sampling.model_sampling import SIGMA_SPACE, ModelSampling
from sdlab.sampling.schedules import (
    SCHEDULES,
    ScheduleInfo,
    SigmaTable,
    _normalise,
    resolve_schedule,
)

__all__ = [
    "SAMPLERS",
    "SamplerInfo",
    "brownian_tree_noise_sampler",
    "check_sampler",
    "default_noise_sampler",
    "get_sampler_sigmas",
    "resolve_sampler",
    "sample_ddim",
    "sample_dpm_2",
    "sample_dpm_2_ancestral",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2m_sde_heun",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_lcm",
    "sample_lms",
    "sample_unipc",
]

Denoiser = Callable[[Tensor, Tensor], Tensor]  # (x, sigma (B,)) -> x0
NoiseSampler = Callable[[float, float], Tensor]  # (sigma, sigma_next) -> noise shaped like x
Callback = Callable[[int, int, Tensor, Tensor], None]  # (i, total, x, denoised)


# ---------------------------------------------------------------------------------------
# Noise


def default_noise_sampler(
    x: Tensor, generators: torch.Generator | Sequence[torch.Generator] | None = None
) -> NoiseSampler:
    """Standard normal noise shaped like `x`, drawn on the generators' device (the CPU for
    CPU generators) and moved to x's device and dtype.

    Args:
        x: the latent the noise is for; only its shape, device and dtype are used.
        generators: one generator per batch item (each item drawn from its own, so an
            image depends only on its own seed, whatever the batch size); or a single
            generator that draws the whole batch at once (as diffusers does); or None for
            torch's global CPU generator.
    """
    shape, device, dtype = x.shape, x.device, x.dtype
    if generators is None or isinstance(generators, torch.Generator):
        gen = generators
        gen_device = gen.device if gen is not None else torch.device("cpu")

        def sample_batch(sigma: float, sigma_next: float) -> Tensor:
            noise = torch.randn(shape, generator=gen, device=gen_device, dtype=torch.float32)
            return noise.to(device, dtype)

        return sample_batch

    gens = list(generators)
    if len(gens) != shape[0]:
        raise ValueError(f"need one generator per batch item: {len(gens)} for a batch of {shape[0]}")

    def sample_items(sigma: float, sigma_next: float) -> Tensor:
        noise = torch.stack(
            [torch.randn(shape[1:], generator=g, device=g.device, dtype=torch.float32) for g in gens]
        )
        return noise.to(device, dtype)

    return sample_items


def brownian_tree_noise_sampler(
    x: Tensor, sigmas: Tensor, seeds: int | Sequence[int]
) -> NoiseSampler:
    """Noise from a Brownian tree over [sigma_min, sigma_max] (torchsde), as the web UIs use
    for the SDE samplers (k-diffusion `BrownianTreeNoiseSampler`).

    The noise of an interval is the normalised Brownian increment over it, so it is
    consistent across step counts and substeps. Given a list of seeds, each batch item has
    its own tree (A1111 passes the image seeds); a single seed builds one tree for the whole
    batch. The trees live on the CPU, in float32, so results do not depend on the device.
    Requires `pip install torchsde`.
    """
    # A dependency of sdlab's, but only these samplers import it: a broken install fails here, in one line.
    torchsde = require("torchsde", extra=None, purpose="Brownian noise for the SDE samplers")

    positive = sigmas[sigmas > 0]
    t0, t1 = float(positive.min()), float(sigmas.max())
    shape, device, dtype = x.shape, x.device, x.dtype
    batched = not isinstance(seeds, int)
    seed_list = list(seeds) if batched else [seeds]
    if batched and len(seed_list) != shape[0]:
        raise ValueError(f"need one seed per batch item: {len(seed_list)} for a batch of {shape[0]}")
    w0 = torch.zeros(shape[1:] if batched else shape, dtype=torch.float32)
    trees = [
        torchsde.BrownianTree(torch.tensor(t0), w0, torch.tensor(t1), entropy=seed)
        for seed in seed_list
    ]

    def sample(sigma: float, sigma_next: float) -> Tensor:
        a, b = torch.tensor(float(sigma)), torch.tensor(float(sigma_next))
        lo, hi, sign = (a, b, 1.0) if a < b else (b, a, -1.0)
        with warnings.catch_warnings():
            # torchsde rounds the tree's start time and warns (then clamps) when a query
            # hits sigma_min exactly; the references get the same clamped values.
            warnings.filterwarnings("ignore", message="Should have (ta|tb)")
            w = torch.stack([tree(lo, hi) for tree in trees]) * sign
        w = w if batched else w[0]
        return (w / (b - a).abs().sqrt()).to(device, dtype)

    return sample


# ---------------------------------------------------------------------------------------
# Shared pieces


def _sigma_list(sigmas: Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-D tensor of at least 2 noise levels")
    return [float(s) for s in sigmas.detach().cpu().tolist()]


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device))


# Sigma-space ancestral step (k-diffusion `get_ancestral_step`): DPM++ SDE takes it between
# the sigma-space images of its sigmas, whatever the model.
_ancestral_step = SIGMA_SPACE.ancestral_step


def _sampling(model_sampling: ModelSampling | None) -> ModelSampling:
    return SIGMA_SPACE if model_sampling is None else model_sampling  # type: ignore[return-value]


def _offset_first_sigma(sig: list[float], ms: ModelSampling) -> list[float]:
    # A first sigma with no signal left (flow at sigma 1) has an infinite half-log-SNR; the
    # SDE samplers start just below it, as ComfyUI's `offset_first_sigma_for_snr`.
    if sig and ms.alpha(sig[0]) <= 0:
        sig = [ms.percent_to_sigma(1e-4)] + sig[1:]
    return sig


def _churn(
    x: Tensor,
    sigma: float,
    sigma_next: float,
    steps: int,
    noise_sampler: NoiseSampler | None,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    ms: ModelSampling,
) -> tuple[Tensor, float]:
    # Karras et al. (2022), Algorithm 2: raise the noise level by gamma before the step.
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        if ms.alpha(sigma) != 1.0:
            # Churn adds noise on top of an unscaled signal: only right in sigma space.
            raise SdlabError("s_churn > 0 does not work on flow models (SD3); set s_churn to 0")
        noise_sampler = noise_sampler or default_noise_sampler(x)
        x = x + noise_sampler(sigma, sigma_next) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


# ---------------------------------------------------------------------------------------
# Samplers


@torch.no_grad()
def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Euler steps of the probability-flow ODE, Karras et al. (2022) Algorithm 2."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], n, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, ms)
        denoised = _denoise(denoiser, x, sigma_hat)
        if callback is not None:
            callback(i, n, x, denoised)
        d = (x - denoised) / sigma_hat
        x = x + d * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with Euler steps (k-diffusion "Euler a"; on flow models ComfyUI's
    `sample_euler_ancestral_RF`)."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        sigma_down, sigma_up = ms.ancestral_step(sig[i], sig[i + 1], eta)
        d = (x - denoised) / sig[i]
        x = x + d * (sigma_down - sig[i])
        if sig[i + 1] > 0:
            x = ms.renoise(x, sigma_down, sig[i + 1], noise_sampler(sig[i], sig[i + 1]) * s_noise, sigma_up)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's second-order method, Karras et al. (2022) Algorithm 2 (Euler on the last step)."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], n, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, ms)
        denoised = _denoise(denoiser, x, sigma_hat)
        if callback is not None:
            callback(i, n, x, denoised)
        d = (x - denoised) / sigma_hat
        dt = sig[i + 1] - sigma_hat
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = _denoise(denoiser, x_2, sig[i + 1])
            d_2 = (x_2 - denoised_2) / sig[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022) steps on Karras et al.'s Algorithm 2 (k-diffusion "DPM2")."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    for i in range(n):
        x, sigma_hat = _churn(x, sig[i], sig[i + 1], n, noise_sampler, s_churn, s_tmin, s_tmax, s_noise, ms)
        denoised = _denoise(denoiser, x, sigma_hat)
        if callback is not None:
            callback(i, n, x, denoised)
        d = (x - denoised) / sigma_hat
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sigma_hat)
        else:
            # Midpoint in log sigma.
            sigma_mid = math.exp(0.5 * (math.log(sigma_hat) + math.log(sig[i + 1])))
            x_2 = x + d * (sigma_mid - sigma_hat)
            denoised_2 = _denoise(denoiser, x_2, sigma_mid)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x = x + d_2 * (sig[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with DPM-Solver-2 steps (k-diffusion "DPM2 a"; on flow models
    ComfyUI's `sample_dpm_2_ancestral_RF`)."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        sigma_down, sigma_up = ms.ancestral_step(sig[i], sig[i + 1], eta)
        d = (x - denoised) / sig[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = math.exp(0.5 * (math.log(sig[i]) + math.log(sigma_down)))
            x_2 = x + d * (sigma_mid - sig[i])
            denoised_2 = _denoise(denoiser, x_2, sigma_mid)
            d_2 = (x_2 - denoised_2) / sigma_mid
            x = x + d_2 * (sigma_down - sig[i])
            x = ms.renoise(x, sigma_down, sig[i + 1], noise_sampler(sig[i], sig[i + 1]) * s_noise, sigma_up)
    return x


def _lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """Integral from t[i] to t[i+1] of the j-th Lagrange basis polynomial through
    t[i], t[i-1], ..., t[i-order+1]; exact, where k-diffusion uses scipy's quad."""
    poly = [1.0]  # coefficients, lowest degree first
    for k in range(order):
        if k == j:
            continue
        root, denom = t[i - k], t[i - j] - t[i - k]
        # poly *= (tau - root) / denom
        shifted = [0.0] + poly
        scaled = [c * root for c in poly] + [0.0]
        poly = [(a - b) / denom for a, b in zip(shifted, scaled)]

    def antiderivative(tau: float) -> float:
        return sum(c * tau ** (m + 1) / (m + 1) for m, c in enumerate(poly))

    return antiderivative(t[i + 1]) - antiderivative(t[i])


@torch.no_grad()
def sample_lms(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth) in sigma, k-diffusion "LMS"."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    ds: list[Tensor] = []  # derivatives, most recent last
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        ds.append((x - denoised) / sig[i])
        if len(ds) > order:
            ds.pop(0)
        if callback is not None:
            callback(i, n, x, denoised)
        cur_order = min(i + 1, order)
        coeffs = [_lms_coefficient(cur_order, sig, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral sampling with DPM-Solver++(2S) second-order steps (Lu et al. 2022); on flow
    models ComfyUI's `sample_dpmpp_2s_ancestral_RF`."""
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        sigma_down, sigma_up = ms.ancestral_step(sig[i], sig[i + 1], eta)
        if sigma_down == 0:
            d = (x - denoised) / sig[i]
            x = x + d * (sigma_down - sig[i])
        else:
            # In t = -log(ve_sigma), the half-log-SNR (-log sigma in sigma space), with the
            # intermediate point at the midpoint r = 1/2.
            t, t_next = -math.log(ms.ve_sigma(sig[i])), -math.log(ms.ve_sigma(sigma_down))
            h = t_next - t
            if math.isinf(t):
                # No signal at sig[i] (flow at sigma 1): the midpoint in t is undefined;
                # ComfyUI takes 0.9999 of the way, and exp(-0.5 h) is 0.
                sigma_s = 0.9999 * sig[i]
                x_2 = (sigma_s / sig[i]) * x + ms.alpha(sigma_s) * denoised
            else:
                sigma_s = ms.sigma_from_ve(math.exp(-(t + 0.5 * h)))
                x_2 = (sigma_s / sig[i]) * x - (ms.alpha(sigma_s) * math.expm1(-0.5 * h)) * denoised
            denoised_2 = _denoise(denoiser, x_2, sigma_s)
            x = (sigma_down / sig[i]) * x - (ms.alpha(sigma_down) * math.expm1(-h)) * denoised_2
        if sig[i + 1] > 0:
            x = ms.renoise(x, sigma_down, sig[i + 1], noise_sampler(sig[i], sig[i + 1]) * s_noise, sigma_up)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
) -> Tensor:
    """DPM-Solver++ (stochastic), the two-stage SDE sampler of k-diffusion ("DPM++ SDE").

    Both stages draw noise, over overlapping intervals, so the draws must be increments
    of one Brownian path (`brownian_tree_noise_sampler`, as the web UIs do). With
    independent draws the samples come out too narrow (std 0.456 instead of 0.5 on a
    Gaussian test problem at 30 steps).
    """
    ms = _sampling(model_sampling)
    sig = _offset_first_sigma(_sigma_list(sigmas), ms)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    fac = 1 / (2 * r)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sig[i + 1] == 0:
            d = (x - denoised) / sig[i]
            x = x + d * (sig[i + 1] - sig[i])
            continue
        # The steps are taken in sigma space (x / alpha at ve_sigma) and scaled back by the
        # alphas: ComfyUI's half-log-SNR form. In sigma space itself alpha is 1.
        s, s_next = ms.ve_sigma(sig[i]), ms.ve_sigma(sig[i + 1])
        a = ms.alpha(sig[i])
        t, t_next = -math.log(s), -math.log(s_next)
        h = t_next - t
        s_mid = math.exp(-(t + h * r))
        sigma_s = ms.sigma_from_ve(s_mid)
        # Stage 1: to the intermediate point s.
        a_s = ms.alpha(sigma_s)
        sd, su = _ancestral_step(s, s_mid, eta)
        t_s = -math.log(sd)
        x_2 = (a_s * (sd / s) / a) * x - (a_s * math.expm1(t - t_s)) * denoised
        x_2 = x_2 + noise_sampler(sig[i], sigma_s) * s_noise * (a_s * su)
        denoised_2 = _denoise(denoiser, x_2, sigma_s)
        # Stage 2: the full step with the combined estimate.
        a_next = ms.alpha(sig[i + 1])
        sd, su = _ancestral_step(s, s_next, eta)
        t_next_ = -math.log(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (a_next * (sd / s) / a) * x - (a_next * math.expm1(t - t_next_)) * denoised_d
        x = x + noise_sampler(sig[i], sig[i + 1]) * s_noise * (a_next * su)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
) -> Tensor:
    """DPM-Solver++(2M), the second-order multistep solver of Lu et al. (2022)."""
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    old_denoised: Tensor | None = None
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sig[i + 1] == 0:
            x = denoised  # the first-order step to sigma 0 lands on the estimate
        else:
            h = math.log(sig[i] / sig[i + 1])
            if old_denoised is None:
                denoised_d = denoised
            else:
                r = math.log(sig[i - 1] / sig[i]) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * denoised_d
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022), k-diffusion "DPM++ 2M SDE"."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    ms = _sampling(model_sampling)
    sig = _offset_first_sigma(_sigma_list(sigmas), ms)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    old_denoised: Tensor | None = None
    h_last: float | None = None
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sig[i + 1] == 0:
            x = denoised
        else:
            # h in half-log-SNR; the x0 terms scaled by alpha (ComfyUI's form; 1 in sigma space).
            h = math.log(ms.ve_sigma(sig[i]) / ms.ve_sigma(sig[i + 1]))
            a_next = ms.alpha(sig[i + 1])
            eta_h = eta * h
            phi = -math.expm1(-h - eta_h)
            x = (sig[i + 1] / sig[i] * math.exp(-eta_h)) * x + (a_next * phi) * denoised
            if old_denoised is not None and h_last is not None:
                r = h_last / h
                if solver_type == "heun":
                    coeff = (phi / (-h - eta_h) + 1) / r
                else:
                    coeff = 0.5 * phi / r
                x = x + (a_next * coeff) * (denoised - old_denoised)
            if eta:
                noise = noise_sampler(sig[i], sig[i + 1])
                x = x + noise * (sig[i + 1] * (-math.expm1(-2 * eta_h)) ** 0.5 * s_noise)
            h_last = h
        old_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (A1111 "DPM++ 2M SDE Heun")."""
    return sample_dpmpp_2m_sde(
        denoiser, x, sigmas, callback=callback, noise_sampler=noise_sampler,
        model_sampling=model_sampling, eta=eta, s_noise=s_noise, solver_type="heun",
    )


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE, k-diffusion "DPM++ 3M SDE" (with eta=0, DPM-Solver++(3M))."""
    ms = _sampling(model_sampling)
    sig = _offset_first_sigma(_sigma_list(sigmas), ms)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    denoised_1: Tensor | None = None
    denoised_2: Tensor | None = None
    h_1: float | None = None
    h_2: float | None = None
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        h: float | None = None
        if sig[i + 1] == 0:
            x = denoised
        else:
            # h in half-log-SNR; alpha scales (ComfyUI's form; 1 in sigma space).
            h = math.log(ms.ve_sigma(sig[i]) / ms.ve_sigma(sig[i + 1]))
            a, a_next = ms.alpha(sig[i]), ms.alpha(sig[i + 1])
            h_eta = h * (eta + 1)
            x = (a_next / a * math.exp(-h_eta)) * x + (a_next * -math.expm1(-h_eta)) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None and h_1 is not None and denoised_1 is not None and denoised_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + (a_next * phi_2) * d1 - (a_next * phi_3) * d2
            elif h_1 is not None and denoised_1 is not None:
                d = (denoised - denoised_1) / (h_1 / h)
                x = x + (a_next * phi_2) * d
            if eta:
                noise = noise_sampler(sig[i], sig[i + 1])
                x = x + noise * (sig[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise)
        denoised_1, denoised_2 = denoised, denoised_1
        h_1, h_2 = h, h_1
    return x


@torch.no_grad()
def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM (Song et al. 2021) in sigma space.

    With eta=0 this is the Euler step (Karras et al. 2022, sec. 3); DDIM's eta noise splits
    sigma_next exactly as an ancestral step does (the model sampling's: on flow models the
    rectified-flow one). Pair it with the "ddim_uniform" schedule
    for the original DDIM timesteps.
    """
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    if eta:
        noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        if sig[i + 1] == 0:
            x = denoised
            continue
        sigma_down, sigma_up = ms.ancestral_step(sig[i], sig[i + 1], eta)
        eps = (x - denoised) / sig[i]
        x = denoised + sigma_down * eps
        if sigma_up > 0 and noise_sampler is not None:
            x = ms.renoise(x, sigma_down, sig[i + 1], noise_sampler(sig[i], sig[i + 1]), sigma_up)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
) -> Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): jump to x0, re-noise.

    diffusers' LCMScheduler also blends in the sample by the consistency boundary
    condition c_skip = 0.25 / ((10 t)^2 + 0.25); for the usual LCM timesteps (t >= 250)
    that weight is below 1e-7, and we leave it out as k-diffusion and ComfyUI's sampler do.
    """
    ms = _sampling(model_sampling)
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x)
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if callback is not None:
            callback(i, n, x, denoised)
        x = denoised
        if sig[i + 1] > 0:
            x = ms.noise_scaling(sig[i + 1], noise_sampler(sig[i], sig[i + 1]), x)
    return x


def _unipc_update(
    x: Tensor,
    sigma_s0: float,
    sigma_t: float,
    history: list[Tensor],
    history_sigmas: list[float],
    order: int,
    variant: str,
    model_t: Tensor | None = None,
) -> Tensor:
    """One UniP predictor step (model_t None) or UniC corrector step from sigma_s0 to sigma_t.

    `history` holds the x0 estimates, most recent (at sigma_s0) last. This is diffusers'
    `multistep_uni_p_bh_update` / `multistep_uni_c_bh_update` with predict_x0=True,
    divided through by alpha_t: in sigma space x_t = x_vp / alpha_t and lambda = -log sigma.
    """
    m0 = history[-1]
    h = math.log(sigma_s0 / sigma_t)  # lambda_t - lambda_s0
    rks: list[float] = []
    d1s: list[Tensor] = []
    for k in range(1, order):
        rk = math.log(sigma_s0 / history_sigmas[-(k + 1)]) / h  # (lambda_sk - lambda_s0) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - m0) / rk)
    rks.append(1.0)

    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    rows: list[list[float]] = []
    b: list[float] = []
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial

    x_t = (sigma_t / sigma_s0) * x - h_phi_1 * m0
    if model_t is None:
        if d1s:
            if order == 2:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(
                    torch.tensor([r[:-1] for r in rows[:-1]], dtype=torch.float64),
                    torch.tensor(b[:-1], dtype=torch.float64),
                ).tolist()
            x_t = x_t - b_h * sum(rho * d for rho, d in zip(rhos, d1s))
        return x_t
    if order == 1:
        rhos_c = [0.5]
    else:
        rhos_c = torch.linalg.solve(
            torch.tensor(rows, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        ).tolist()
    corr = rhos_c[-1] * (model_t - m0)
    for rho, d in zip(rhos_c[:-1], d1s):
        corr = corr + rho * d
    return x_t - b_h * corr


@torch.no_grad()
def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    callback: Callback | None = None,
    noise_sampler: NoiseSampler | None = None,
    model_sampling: ModelSampling | None = None,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: Sequence[int] = (),
) -> Tensor:
    """UniPC (Zhao et al. 2023): multistep predictor UniP with the corrector UniC, data prediction.

    Defaults are diffusers' UniPCMultistepScheduler (order 2, B(h) variant "bh2", lower
    order on the final steps). The corrector reuses the next step's denoiser call, so it
    costs no extra evaluation. `disable_corrector` lists steps whose result is not corrected.
    The step to sigma 0 is always first order (it lands on the estimate).
    """
    if variant not in ("bh1", "bh2"):
        raise ValueError("variant must be 'bh1' or 'bh2'")
    if order < 1:
        raise ValueError("order must be at least 1")
    sig = _sigma_list(sigmas)
    n = len(sig) - 1
    history: list[Tensor] = []
    history_sigmas: list[float] = []
    x_last: Tensor | None = None
    last_order = 0
    for i in range(n):
        denoised = _denoise(denoiser, x, sig[i])
        if x_last is not None and (i - 1) not in disable_corrector:
            x = _unipc_update(
                x_last, sig[i - 1], sig[i], history, history_sigmas, last_order, variant, model_t=denoised
            )
        if callback is not None:
            callback(i, n, x, denoised)
        history = (history + [denoised])[-order:]
        history_sigmas = (history_sigmas + [sig[i]])[-order:]
        this_order = min(order, n - i) if lower_order_final else order
        this_order = min(this_order, len(history))
        x_last = x
        if sig[i + 1] == 0:
            x = denoised
        else:
            x = _unipc_update(x, sig[i], sig[i + 1], history, history_sigmas, this_order, variant)
        last_order = this_order
    return x


# ---------------------------------------------------------------------------------------
# The registry


SamplerFunction = Callable[..., Tensor]


@dataclass(frozen=True)
class SamplerInfo:
    """A named sampler and how the web UIs run it."""

    name: str  # the web UI's name, also what the infotext says ("Sampler: DPM++ 2M")
    function: SamplerFunction
    aliases: tuple[str, ...] = ()  # k-diffusion style names ("k_dpmpp_2m")
    second_order: bool = False  # two denoiser calls per step
    stochastic: bool = False  # draws noise with its default knobs (the noise_sampler matters)
    brownian_noise: bool = False  # the web UIs feed it `brownian_tree_noise_sampler`
    # A1111 computes steps + 1 sigmas and drops the next-to-last one: these samplers
    # otherwise spend their last steps at tiny sigmas.
    discard_next_to_last_sigma: bool = False
    # What the "Automatic" schedule means for this sampler (A1111 >= 1.9 `options['scheduler']`);
    # None: k-diffusion's default spacing.
    default_schedule: str | None = None
    # The sampler's `eta` knob and its default (A1111: "Eta" 1.0 for ancestral/SDE samplers,
    # "Eta for DDIM" 0.0); None: the sampler takes no eta.
    default_eta: float | None = None
    # Runs on flow models (SD3): False for a sampler whose noise maths holds in sigma space only.
    flow: bool = True


SAMPLERS: dict[str, SamplerInfo] = {
    info.name: info
    for info in (
        SamplerInfo("DPM++ 2M", sample_dpmpp_2m, ("k_dpmpp_2m",), default_schedule="karras"),
        SamplerInfo(
            "DPM++ SDE", sample_dpmpp_sde, ("k_dpmpp_sde",),
            second_order=True, stochastic=True, brownian_noise=True, default_eta=1.0, default_schedule="karras",
        ),
        SamplerInfo(
            "DPM++ 2M SDE", sample_dpmpp_2m_sde, ("k_dpmpp_2m_sde",),
            stochastic=True, brownian_noise=True, default_eta=1.0, default_schedule="exponential",
        ),
        SamplerInfo(
            "DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, ("k_dpmpp_2m_sde_heun",),
            stochastic=True, brownian_noise=True, default_eta=1.0, default_schedule="exponential",
        ),
        SamplerInfo(
            "DPM++ 2S a", sample_dpmpp_2s_ancestral, ("k_dpmpp_2s_a",),
            second_order=True, stochastic=True, default_eta=1.0, default_schedule="karras",
        ),
        SamplerInfo(
            "DPM++ 3M SDE", sample_dpmpp_3m_sde, ("k_dpmpp_3m_sde",),
            stochastic=True, brownian_noise=True, discard_next_to_last_sigma=True,
            default_eta=1.0, default_schedule="exponential",
        ),
        SamplerInfo(
            "Euler a", sample_euler_ancestral, ("k_euler_a", "k_euler_ancestral"),
            stochastic=True, default_eta=1.0,
        ),
        SamplerInfo("Euler", sample_euler, ("k_euler",)),
        SamplerInfo("LMS", sample_lms, ("k_lms",)),
        SamplerInfo("Heun", sample_heun, ("k_heun",), second_order=True),
        SamplerInfo(
            "DPM2", sample_dpm_2, ("k_dpm_2",),
            second_order=True, discard_next_to_last_sigma=True, default_schedule="karras",
        ),
        SamplerInfo(
            "DPM2 a", sample_dpm_2_ancestral, ("k_dpm_2_a",),
            second_order=True, stochastic=True, discard_next_to_last_sigma=True, default_eta=1.0, default_schedule="karras",
        ),
        SamplerInfo("DDIM", sample_ddim, ("ddim",), default_schedule="ddim_uniform", default_eta=0.0),
        SamplerInfo("UniPC", sample_unipc, ("unipc", "uni_pc")),
        # LCM and the Turbo models are distilled for "trailing" timesteps.
        SamplerInfo("LCM", sample_lcm, ("lcm", "k_lcm"), stochastic=True, default_schedule="sgm_uniform"),
    )
}

# Suffixes of the k-diffusion style aliases of the pre-1.9 combined names ("k_dpmpp_2m_ka").
_ALIAS_SCHEDULE_SUFFIXES = {"_ka": "karras", "_exp": "exponential"}


def _lookup(name: str) -> SamplerInfo | None:
    key = _normalise(name)
    for info in SAMPLERS.values():
        if key in {_normalise(n) for n in (info.name, *info.aliases)}:
            return info
    return None


def _split_schedule_suffix(name: str) -> tuple[SamplerInfo, ScheduleInfo] | None:
    # "DPM++ 2M SDE Karras" -> ("DPM++ 2M SDE", karras): any schedule label, name or alias
    # after a space, as A1111's `get_sampler_and_scheduler` parses them.
    stripped = name.strip()
    for schedule in SCHEDULES.values():
        for option in (schedule.label, schedule.name, *schedule.aliases):
            suffix = " " + option
            if stripped.lower().endswith(suffix.lower()):
                base = _lookup(stripped[: -len(suffix)])
                if base is not None:
                    return base, schedule
    for suffix, schedule_name in _ALIAS_SCHEDULE_SUFFIXES.items():
        if stripped.lower().endswith(suffix):
            base = _lookup(stripped[: -len(suffix)])
            if base is not None:
                return base, SCHEDULES[schedule_name]
    return None


def resolve_sampler(name: str) -> SamplerInfo:
    """The sampler called `name`: its web UI name or an alias, in any case.

    Also accepts the combined names of A1111 before 1.9 ("DPM++ 2M Karras",
    "k_dpmpp_2m_ka"): the sampler comes back with that schedule as its
    `default_schedule`, so the "automatic" schedule then picks it.
    """
    info = _lookup(name)
    if info is not None:
        return info
    split = _split_schedule_suffix(name)
    if split is not None:
        base, schedule = split
        return dataclasses.replace(base, default_schedule=schedule.name)
    valid = ", ".join(SAMPLERS)
    raise SdlabError(f"unknown sampler {name!r}; choose one of: {valid}")


def check_sampler(sampler: SamplerInfo | str, model_sampling: object) -> SamplerInfo:
    """The sampler, if it can run on the model; SdlabError (one line) if it cannot.

    Args:
        sampler: a `SamplerInfo` or a name `resolve_sampler` accepts.
        model_sampling: the model's `ModelSampling` (or a `DiscreteSchedule`, which is
            sigma space: every sampler runs on it).
    """
    info = resolve_sampler(sampler) if isinstance(sampler, str) else sampler
    if getattr(model_sampling, "prediction", None) == "flow" and not info.flow:
        valid = ", ".join(name for name, other in SAMPLERS.items() if other.flow)
        raise SdlabError(f"sampler {info.name!r} does not work on flow models (SD3); choose one of: {valid}")
    return info


def get_sampler_sigmas(
    sampler: SamplerInfo | str,
    schedule: str,
    steps: int,
    model_sampling: SigmaTable,
) -> Tensor:
    """The sigmas a sampler walks for `steps` steps, as the web UIs compute them.

    "automatic" becomes the sampler's `default_schedule` (k-diffusion's spacing if it has
    none), and for samplers flagged `discard_next_to_last_sigma` one more sigma is made and
    the next-to-last dropped, so the sampler still takes `steps` steps.

    Args:
        sampler: a `SamplerInfo` or a name `resolve_sampler` accepts.
        schedule: a schedule name `resolve_schedule` accepts, or "automatic".
        steps: number of sampling steps.
        model_sampling: the model's `ModelSampling`, or a `DiscreteSchedule`. A sampler
            that cannot run on it (`check_sampler`) raises SdlabError.
    """
    info = check_sampler(sampler, model_sampling)
    schedule_info = resolve_schedule(schedule)
    if schedule_info.name == "automatic" and info.default_schedule is not None:
        schedule_info = resolve_schedule(info.default_schedule)
    if steps < 1:
        raise SdlabError(f"steps must be at least 1, got {steps}")
    if info.discard_next_to_last_sigma:
        sigmas = schedule_info.function(steps + 1, model_sampling)
        return torch.cat([sigmas[:-2], sigmas[-1:]])
    return schedule_info.function(steps, model_sampling)
