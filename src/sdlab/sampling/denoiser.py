"""Denoisers: a network of any parameterisation seen as `x0 = denoiser(x, sigma)`.

Samplers work in k-diffusion's "sigma space": `x = x0 + sigma * noise`, and only ever
ask for the denoised estimate x0. The wrappers here turn a UNet trained on discrete
timesteps (eps or v prediction) into that function, and add classifier-free guidance
as one more wrapper, so no sampler knows about either.

References: k-diffusion `k_diffusion/external.py` (`DiscreteEpsDDPMDenoiser`,
`CompVisVDenoiser`), diffusers `rescale_noise_cfg` (guidance rescale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from sdlab.models.storage import compute_dtype
from sdlab.sampling.schedules import DiscreteSchedule

__all__ = [
    "CFGDenoiser",
    "ConditionalDenoiser",
    "Conditioning",
    "DiscreteDenoiser",
    "Prediction",
    "prediction_to_x0",
    "x0_to_prediction",
]

Prediction = Literal["eps", "v"]

# `unet(x, timesteps, context, y=None)`: the forward signature of our UNet.
UNetForward = Callable[..., Tensor]


@dataclass
class Conditioning:
    """What the network is conditioned on, for one batch."""

    context: Tensor  # (B, T, D) cross-attention context (text encoder hidden states)
    y: Tensor | None = None  # (B, adm_in_channels) SDXL's pooled text + size/crop embedding
    # (B, C', H, W) extra input channels of inpainting UNets (mask, masked-image latent),
    # concatenated after the noisy latent on the channel axis.
    concat: Tensor | None = None


class ConditionalDenoiser(Protocol):
    """What `CFGDenoiser` wraps: `denoiser(x, sigma, cond) -> x0`."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor: ...


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _v_scalings(sigma: Tensor) -> tuple[Tensor, Tensor]:
    # x0 = c_skip * x + c_out * v for x = x0 + sigma * eps (k-diffusion CompVisVDenoiser).
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / (sigma**2 + 1.0) ** 0.5
    return c_skip, c_out


def prediction_to_x0(prediction: Prediction, out: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The denoised x0 from a network output of the given type; `sigma` is (B,)."""
    s = _append_dims(sigma, x.ndim)
    if prediction == "eps":
        return x - s * out
    c_skip, c_out = _v_scalings(s)
    return c_skip * x + c_out * out


def x0_to_prediction(prediction: Prediction, x0: Tensor, x: Tensor, sigma: Tensor) -> Tensor:
    """The network output of the given type that gives `x0`; the inverse of `prediction_to_x0`."""
    s = _append_dims(sigma, x.ndim)
    if prediction == "eps":
        return (x - x0) / s
    c_skip, c_out = _v_scalings(s)
    return (x0 - c_skip * x) / c_out


class DiscreteDenoiser:
    """A UNet trained on discrete DDPM timesteps, as a denoiser in sigma space.

    The network sees `x / sqrt(sigma**2 + 1)` (the DDPM-scaled sample) at the fractional
    timestep `schedule.sigma_to_t(sigma)`; its eps or v output is turned into x0.

    Args:
        model: `model(x_in, t, context, y) -> Tensor`, e.g. our UNet's forward.
        schedule: the model's training schedule.
        prediction: what the network predicts, "eps" or "v".
        dtype: dtype to run the network in; by default the dtype of the model's first
            parameter (float32 for a plain callable). x0 is always returned in float32.
    """

    def __init__(
        self,
        model: UNetForward,
        schedule: DiscreteSchedule,
        prediction: Prediction = "eps",
        dtype: torch.dtype | None = None,
    ) -> None:
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")
        self.model = model
        self.schedule = schedule
        self.prediction: Prediction = prediction
        self.dtype = dtype if dtype is not None else _model_dtype(model)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        x = x.float()
        sigma = sigma.to(x.device, torch.float32)
        c_in = _append_dims((sigma**2 + 1.0) ** -0.5, x.ndim)
        x_in = x * c_in
        if cond.concat is not None:
            # The inpainting UNet's extra channels are not noise-scaled: they go in as is.
            x_in = torch.cat([x_in, cond.concat.to(x_in)], dim=1)
        # The timestep stays float32: half precision cannot hold fractional timesteps
        # near 1000, and the timestep embedding upcasts anyway.
        t = self.schedule.sigma_to_t(sigma)
        y = cond.y.to(self.dtype) if cond.y is not None else None
        out = self.model(x_in.to(self.dtype), t, cond.context.to(self.dtype), y).float()
        return prediction_to_x0(self.prediction, out, x, sigma)


def _model_dtype(model: object) -> torch.dtype:
    if isinstance(model, torch.nn.Module) and any(True for _ in model.parameters()):
        return compute_dtype(model)
    owner = getattr(model, "__self__", None)  # a bound method such as `unet.forward`
    if isinstance(owner, torch.nn.Module):
        return _model_dtype(owner)
    return torch.float32


def _cat_conditioning(a: Conditioning, b: Conditioning) -> Conditioning:
    if a.context.shape != b.context.shape:
        raise ValueError(
            f"cond and uncond contexts differ in shape ({tuple(b.context.shape)} vs "
            f"{tuple(a.context.shape)}); pad the shorter prompt to the same number of chunks"
        )
    if (a.y is None) != (b.y is None):
        raise ValueError("cond and uncond must both have y or both not")
    # The image conditioning of inpainting models is the same for both halves unless the
    # caller says otherwise (A1111 passes the same image_cond to both).
    concat_a = a.concat if a.concat is not None else b.concat
    concat_b = b.concat if b.concat is not None else a.concat
    return Conditioning(
        context=torch.cat([a.context, b.context]),
        y=torch.cat([a.y, b.y]) if a.y is not None and b.y is not None else None,
        concat=torch.cat([concat_a, concat_b]) if concat_a is not None else None,
    )


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser: `x0 = cfg(x, sigma)`.

    Conditional and unconditional halves run as one batch. With `scale == 1` the
    unconditional pass is skipped entirely (the Turbo/LCM models are sampled that way).

    Guidance rescale (Lin et al. 2023, "phi") is applied, as diffusers'
    `rescale_noise_cfg`, to the network's own output (eps or v, per the wrapped
    denoiser's `prediction`; "eps" if it has none) so pipelines agree with diffusers:
    `out = phi * out_cfg * std(out_cond) / std(out_cfg) + (1 - phi) * out_cfg`, with
    the standard deviations taken per sample.

    Args:
        denoiser: `denoiser(x, sigma, cond) -> x0`, e.g. a `DiscreteDenoiser`.
        cond: the prompt's conditioning, batch B.
        uncond: the negative prompt's conditioning, same shapes as `cond`; may be None
            when `scale == 1`.
        scale: the guidance scale ("CFG scale").
        rescale: the guidance rescale factor phi in [0, 1].
    """

    def __init__(
        self,
        denoiser: ConditionalDenoiser,
        cond: Conditioning,
        uncond: Conditioning | None,
        scale: float,
        rescale: float = 0.0,
    ) -> None:
        if uncond is None and scale != 1.0:
            raise ValueError("uncond is needed unless scale == 1")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.cond = cond
        self.scale = float(scale)
        self.rescale = float(rescale)
        # Concatenated once here rather than at every step.
        self._batched = _cat_conditioning(uncond, cond) if uncond is not None and scale != 1.0 else None

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self._batched is None:
            return self.denoiser(x, sigma, self.cond)
        x0_uncond, x0_cond = self.denoiser(
            torch.cat([x, x]), torch.cat([sigma, sigma]), self._batched
        ).chunk(2)
        # The network output is affine in x0 (same x and sigma for both halves), so guiding
        # x0 equals guiding eps or v.
        x0 = x0_uncond + self.scale * (x0_cond - x0_uncond)
        if self.rescale > 0.0:
            x0 = self._rescale(x, sigma, x0, x0_cond)
        return x0

    def _rescale(self, x: Tensor, sigma: Tensor, x0_cfg: Tensor, x0_cond: Tensor) -> Tensor:
        prediction = getattr(self.denoiser, "prediction", "eps")
        out_cfg = x0_to_prediction(prediction, x0_cfg, x, sigma)
        out_cond = x0_to_prediction(prediction, x0_cond, x, sigma)
        dims = list(range(1, x.ndim))
        rescaled = out_cfg * (out_cond.std(dim=dims, keepdim=True) / out_cfg.std(dim=dims, keepdim=True))
        out = self.rescale * rescaled + (1.0 - self.rescale) * out_cfg
        return prediction_to_x0(prediction, out, x, sigma)
