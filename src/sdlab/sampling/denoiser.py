"""Denoisers: a network of any parameterisation seen as `x0 = denoiser(x, sigma)`.

Samplers work in k-diffusion's "sigma space" and only ever ask for the denoised estimate
x0. A `NetDenoiser` turns a network into that function through its `ModelSampling` (what
the net sees at sigma, at which timestep, and how its output becomes x0), so eps, v and
flow networks look the same to every sampler; `CFGDenoiser` adds classifier-free guidance
as one more wrapper. `model.py` holds the adapter of each architecture.

References: k-diffusion `k_diffusion/external.py` (`DiscreteEpsDDPMDenoiser`,
`CompVisVDenoiser`), ComfyUI `comfy/model_base.py` (`BaseModel.apply_model`), diffusers
`rescale_noise_cfg` (guidance rescale).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from sdlab.models.storage import compute_dtype
from sdlab.sampling.model_sampling import ModelSampling, discrete
from sdlab.sampling.schedules import DiscreteSchedule

__all__ = [
    "CFGDenoiser",
    "ConditionalDenoiser",
    "Conditioning",
    "DiscreteDenoiser",
    "NetDenoiser",
]

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
    # (B,) bool: the rows that are the negative prompt's half of a guided batch (`CFGDenoiser`);
    # None: all rows are the prompt's. Patches that treat the halves differently read it.
    negative_rows: Tensor | None = None


class ConditionalDenoiser(Protocol):
    """What `CFGDenoiser` wraps: `denoiser(x, sigma, cond) -> x0`, with its model sampling."""

    sampling: ModelSampling

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor: ...


class NetDenoiser:
    """A network as a conditional denoiser in sigma space: `x0 = denoiser(x, sigma, cond)`.

    The net sees `sampling.calculate_input(sigma, x)` (with the inpainting channels, which are
    not noise-scaled, concatenated after it) at the timestep `sampling.sigma_to_t(sigma)`, and
    its output becomes x0 by `sampling.to_x0`. Subclasses say how the net is called (`apply`).
    x and x0 are float32; the net runs in `dtype`. The timestep stays float32: half precision
    cannot hold fractional timesteps near 1000, and the timestep embedding upcasts anyway.
    """

    def __init__(self, sampling: ModelSampling, dtype: torch.dtype):
        self.sampling = sampling
        self.dtype = dtype

    def apply(self, x_in: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        """The network's raw output (eps, v, ...) for its input `x_in` at timesteps `t`."""
        raise NotImplementedError

    def __call__(self, x: Tensor, sigma: Tensor, cond: Conditioning) -> Tensor:
        return denoise_with(self.sampling, self.apply, x, sigma, cond)


def denoise_with(sampling: ModelSampling, apply: Callable[[Tensor, Tensor, Conditioning], Tensor], x: Tensor,
                 sigma: Tensor, cond: Conditioning) -> Tensor:
    """x0 from a network call `apply(x_in, t, cond)` through its model sampling (`NetDenoiser`)."""
    x = x.float()
    sigma = sigma.to(x.device, torch.float32)
    x_in = sampling.calculate_input(sigma, x)
    if cond.concat is not None:
        x_in = torch.cat([x_in, cond.concat.to(x_in)], dim=1)
    out = apply(x_in, sampling.sigma_to_t(sigma), cond).float()
    return sampling.to_x0(sigma, out, x)


class DiscreteDenoiser(NetDenoiser):
    """A UNet-shaped callable trained on discrete DDPM timesteps, as a denoiser in sigma space.

    Args:
        model: `model(x_in, t, context, y) -> Tensor`, e.g. our UNet's forward.
        schedule: the model's training schedule.
        prediction: what the network predicts, "eps" or "v".
        dtype: dtype to run the network in; by default the dtype of the model's first
            parameter (float32 for a plain callable). x0 is always returned in float32.
    """

    def __init__(self, model: UNetForward, schedule: DiscreteSchedule, prediction: str = "eps",
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(discrete(schedule, prediction), dtype if dtype is not None else _model_dtype(model))
        self.model = model
        self.schedule = schedule
        self.prediction = prediction

    def apply(self, x_in: Tensor, t: Tensor, cond: Conditioning) -> Tensor:
        y = cond.y.to(self.dtype) if cond.y is not None else None
        return self.model(x_in.to(self.dtype), t, cond.context.to(self.dtype), y)


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
        # `a` is the negative prompt's half (CFGDenoiser batches uncond first).
        negative_rows=torch.arange(a.context.shape[0] + b.context.shape[0], device=a.context.device)
        < a.context.shape[0],
    )


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser: `x0 = cfg(x, sigma)`.

    Conditional and unconditional halves run as one batch. With `scale == 1` the
    unconditional pass is skipped entirely (the Turbo/LCM models are sampled that way).

    Guidance rescale (Lin et al. 2023, "phi") is applied, as diffusers'
    `rescale_noise_cfg`, to the network's own output (eps, v or flow velocity, as the
    wrapped denoiser's `sampling` says) so pipelines agree with diffusers:
    `out = phi * out_cfg * std(out_cond) / std(out_cfg) + (1 - phi) * out_cfg`, with
    the standard deviations taken per sample.

    Args:
        denoiser: `denoiser(x, sigma, cond) -> x0`, e.g. a `DiscreteDenoiser`; guidance rescale
            reads its `sampling` (the model sampling of the network).
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
        if rescale > 0.0 and not hasattr(denoiser, "sampling"):
            # Rescale works on the net's own output; guessing its type would guide the wrong thing.
            raise ValueError("guidance rescale needs a denoiser with a `sampling` (its model sampling)")
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
        sampling = self.denoiser.sampling
        out_cfg = sampling.from_x0(sigma, x0_cfg, x)
        out_cond = sampling.from_x0(sigma, x0_cond, x)
        dims = list(range(1, x.ndim))
        rescaled = out_cfg * (out_cond.std(dim=dims, keepdim=True) / out_cfg.std(dim=dims, keepdim=True))
        out = self.rescale * rescaled + (1.0 - self.rescale) * out_cfg
        return sampling.to_x0(sigma, out, x)
