"""The training objective: how a UNet prediction's error becomes the loss (eps and v targets,
kohya's loss types and weightings), and kohya's multires noise. Pure functions of tensors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def min_snr_weight(snr: Tensor, gamma: float, prediction: str) -> Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR for eps
    prediction, min(SNR, gamma) / (SNR + 1) for v prediction (whose loss is already
    weighted by SNR + 1 relative to eps)."""
    clipped = snr.clamp(max=gamma)
    return clipped / (snr + 1) if prediction == "v" else clipped / snr


@dataclass(frozen=True)
class LossOptions:
    """How a prediction's error becomes the loss, with kohya's option names and formulas
    (`library/train_util.py` conditional_loss, `library/custom_train_functions.py`)."""

    prediction: str = "eps"  # "eps" or "v"
    loss_type: str = "l2"  # "l2", "l1", "huber" or "smooth_l1" (the pseudo-Huber loss, scaled two ways)
    huber_c: float = 0.1
    huber_schedule: str = "snr"  # the threshold over timesteps: "snr", "exponential" or "constant"
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    debiased_estimation_loss: bool = False


def huber_threshold(options: LossOptions, timesteps: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """(B,) pseudo-Huber thresholds: `huber_c` (times `huber_scale`) throughout, or falling from
    `huber_scale` at t = 0 to `huber_c * huber_scale` at t = 1000 ("exponential"), or from 1 to
    `huber_c` as the noise level sigma grows ("snr": (1 - c) / (1 + sigma)^2 + c)."""
    c = options.huber_c
    if options.huber_schedule == "exponential":
        return torch.exp(math.log(c) * timesteps.float() / 1000) * options.huber_scale
    if options.huber_schedule == "snr":
        sigma = ((1 - alphas_cumprod_t) / alphas_cumprod_t).sqrt()
        return (1 - c) / (1 + sigma) ** 2 + c
    return torch.full(timesteps.shape, c * options.huber_scale, device=timesteps.device)


def diffusion_loss(pred: Tensor, latents: Tensor, noise: Tensor, timesteps: Tensor, alphas_cumprod: Tensor,
                   options: LossOptions = LossOptions(), mask: Tensor | None = None,
                   weighting_alphas_cumprod: Tensor | None = None) -> Tensor:
    """Per-sample loss (B,) of a UNet prediction for `noisy = sqrt(a) x0 + sqrt(1 - a) eps`,
    `a = alphas_cumprod[timesteps]`. `mask`: (B, 1, H, W) pixel weights (kohya's masked_loss),
    averaged down to the latents' size; the mean is still over every latent element.
    `weighting_alphas_cumprod`: the schedule whose SNR the weightings (min-SNR, debiased, v as
    eps) read, if not `alphas_cumprod`: with zero terminal SNR kohya weights by the original
    schedule's SNR (computed before its rescale), which is never 0."""
    a_t = alphas_cumprod[timesteps].float()
    a = a_t.view(-1, 1, 1, 1)
    target = noise if options.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * latents
    pred, target = pred.float(), target.float()
    if options.loss_type == "l2":
        loss = F.mse_loss(pred, target, reduction="none")
    elif options.loss_type == "l1":
        loss = F.l1_loss(pred, target, reduction="none")
    else:
        c = huber_threshold(options, timesteps, a_t).view(-1, 1, 1, 1)
        loss = 2 * (torch.sqrt((pred - target) ** 2 + c ** 2) - c)
        if options.loss_type == "huber":
            loss = loss * c
    if mask is not None:
        loss = loss * F.interpolate(mask.to(loss), size=loss.shape[2:], mode="area")
    loss = loss.mean(dim=(1, 2, 3))
    if weighting_alphas_cumprod is not None:
        a_t = weighting_alphas_cumprod[timesteps].float()
    snr = a_t / (1 - a_t)
    if options.min_snr_gamma:
        loss = loss * min_snr_weight(snr, options.min_snr_gamma, options.prediction)
    snr = snr.clamp(max=1000)  # as kohya: the SNR of t = 0 is near 1e5
    if options.scale_v_pred_loss_like_noise_pred:
        loss = loss * snr / (snr + 1)
    if options.debiased_estimation_loss:
        loss = loss / (snr + 1) if options.prediction == "v" else loss / snr.sqrt()
    return loss


def pyramid_noise(noise: Tensor, iterations: int, discount: float, generator: torch.Generator) -> Tensor:
    """kohya's multires noise (`pyramid_noise_like`): noise plus `iterations` layers of coarser
    noise, each upscaled from a size 2-4x smaller than the last (drawn) and weighted by
    `discount ** i`, rescaled to unit spread. The first layer is full-size white noise."""
    b, c, h, w = noise.shape
    noise = noise.clone()
    for i in range(iterations):
        r = 2 + 2 * torch.rand((), generator=generator).item()
        hn, wn = max(1, int(h / r ** i)), max(1, int(w / r ** i))
        layer = torch.randn(b, c, hn, wn, generator=generator)
        noise += F.interpolate(layer, size=(h, w), mode="bilinear") * discount ** i
        if hn == 1 or wn == 1:
            break
    return noise / noise.std()
