"""ModelSampling: how one kind of model is sampled, as a plain value (one class per kind).

A sampler walks sigmas with an x0-denoiser and never asks which family runs; what differs
between families lives here:

- what the network sees and is called at (`calculate_input`, `sigma_to_t`), and how its
  output becomes x0 (`to_x0`; `from_x0` is the inverse, for guidance rescale);
- how noise is mixed into a clean latent (`noise_scaling`) and back into a sample after a
  deterministic step (`ancestral_step`, `renoise`);
- the training sigma table the schedules read (`sigmas`, `sigma_min`, `sigma_max`).

`SigmaSpace` is k-diffusion's sigma space, `x = x0 + sigma * noise`: what every sampler did
before flow models, and what it does when given no model sampling. `DiscreteEps` and
`DiscreteV` are the UNets trained on DDPM timesteps (SD 1.x, 2.x, SDXL), seen in that space
exactly as `sampling/denoiser.py` has always computed them. `Flow` is rectified flow (SD3):
`x = sigma * noise + (1 - sigma) * x0`, sigma in [0, 1], the network predicting
v = noise - x0 at timestep sigma * 1000.

The exponential-integrator samplers with noise (DPM++ SDE, 2M SDE, 3M SDE, 2S a) also read
`alpha(sigma)` (the signal's scale) and `ve_sigma(sigma)` (sigma / alpha = exp(-lambda), the
point's sigma in sigma space): for sigma-space models these are 1 and sigma, so their
results there do not move.

References: k-diffusion `k_diffusion/external.py`; ComfyUI `comfy/model_sampling.py`
(`EPS`, `V_PREDICTION`, `CONST`, `ModelSamplingDiscreteFlow`, `time_snr_shift`) and
`comfy/k_diffusion/sampling.py` (`sample_euler_ancestral_RF`); the SD3 reference
`sd3_impls.py` (`ModelSamplingDiscreteFlow`); diffusers `FlowMatchEulerDiscreteScheduler`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from sdlab.sampling.schedules import DiscreteSchedule

__all__ = [
    "SIGMA_SPACE",
    "DiscreteEps",
    "DiscreteV",
    "Flow",
    "ModelSampling",
    "SigmaSpace",
    "discrete",
    "time_snr_shift",
]


@runtime_checkable
class ModelSampling(Protocol):
    """How a kind of model is sampled. Sigmas are (B,) float32 tensors unless noted."""

    prediction: str  # "eps", "v" or "flow": what the network outputs
    sigmas: Tensor  # (T,) float32 CPU, increasing: the training sigma table the schedules read
    sigma_min: float
    sigma_max: float
    num_timesteps: int

    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...
    def t_to_sigma(self, t: Tensor) -> Tensor: ...
    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor: ...
    def to_x0(self, sigma: Tensor, out: Tensor, x: Tensor) -> Tensor: ...
    def from_x0(self, sigma: Tensor, x0: Tensor, x: Tensor) -> Tensor: ...
    def noise_scaling(self, sigma: Tensor | float, noise: Tensor, latent: Tensor) -> Tensor: ...
    def ancestral_step(self, sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]: ...
    def renoise(self, x: Tensor, sigma_down: float, sigma_to: float, noise: Tensor, sigma_up: float) -> Tensor: ...
    def alpha(self, sigma: float) -> float: ...
    def ve_sigma(self, sigma: float) -> float: ...
    def sigma_from_ve(self, ve_sigma: float) -> float: ...
    def percent_to_sigma(self, percent: float) -> float: ...
    def training_input(self, t: Tensor, noise: Tensor, latent: Tensor) -> Tensor: ...


def _append_dims(v: Tensor, ndim: int) -> Tensor:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def _per_item(sigma: Tensor | float, ndim: int) -> Tensor | float:
    # A (B,) sigma broadcasts over the sample's other dims; a float or 0-d tensor as it is.
    if isinstance(sigma, Tensor) and sigma.ndim == 1:
        return _append_dims(sigma, ndim)
    return sigma


def _v_scalings(sigma: Tensor) -> tuple[Tensor, Tensor]:
    # x0 = c_skip * x + c_out * v for x = x0 + sigma * eps (k-diffusion CompVisVDenoiser).
    c_skip = 1.0 / (sigma**2 + 1.0)
    c_out = -sigma / (sigma**2 + 1.0) ** 0.5
    return c_skip, c_out


# ---------------------------------------------------------------------------------------
# Sigma space: x = x0 + sigma * noise


@dataclass(frozen=True)
class SigmaSpace:
    """k-diffusion's sigma space (variance exploding), `x = x0 + sigma * noise`, with no table.

    What the samplers do when given no model sampling; the noise maths of `DiscreteEps`
    and `DiscreteV`. It has no network side (`sigma_to_t`, `to_x0`, ...): only noise.
    """

    def noise_scaling(self, sigma: Tensor | float, noise: Tensor, latent: Tensor) -> Tensor:
        """The sample at `sigma` of the clean `latent`: `latent + noise * sigma`."""
        return latent + noise * _per_item(sigma, noise.ndim)

    def ancestral_step(self, sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
        """The noise level to step down to (sigma_down) and the noise to add back (sigma_up),
        so that sigma_down**2 + sigma_up**2 = sigma_to**2 (k-diffusion `get_ancestral_step`)."""
        if not eta:
            return sigma_to, 0.0
        sigma_up = min(
            sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
        )
        sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
        return sigma_down, sigma_up

    def renoise(self, x: Tensor, sigma_down: float, sigma_to: float, noise: Tensor, sigma_up: float) -> Tensor:
        """The sample at `sigma_to` from one at `sigma_down`: `x + noise * sigma_up`."""
        return x + noise * sigma_up

    def alpha(self, sigma: float) -> float:
        """The scale of the signal in the sample at `sigma`: 1 in sigma space."""
        return 1.0

    def ve_sigma(self, sigma: float) -> float:
        """sigma / alpha(sigma), the point's sigma in sigma space: sigma itself here."""
        return sigma

    def sigma_from_ve(self, ve_sigma: float) -> float:
        """The inverse of `ve_sigma`."""
        return ve_sigma


SIGMA_SPACE = SigmaSpace()


# ---------------------------------------------------------------------------------------
# UNets trained on discrete DDPM timesteps


@dataclass(frozen=True)
class _Discrete(SigmaSpace):
    schedule: DiscreteSchedule

    prediction: ClassVar[str]

    @property
    def sigmas(self) -> Tensor:
        return self.schedule.sigmas

    @property
    def log_sigmas(self) -> Tensor:
        return self.schedule.log_sigmas

    @property
    def sigma_min(self) -> float:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.schedule.sigma_max

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The fractional DDPM timestep of each sigma (log-sigma interpolation)."""
        return self.schedule.sigma_to_t(sigma)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return self.schedule.t_to_sigma(t)

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """The DDPM-scaled sample the UNet sees, `x / sqrt(sigma**2 + 1)`."""
        sigma = sigma.to(x.device, torch.float32)
        return x * _append_dims((sigma**2 + 1.0) ** -0.5, x.ndim)

    def training_input(self, t: Tensor, noise: Tensor, latent: Tensor) -> Tensor:
        """What the net sees in training at integer timesteps `t` (B,): DDPM's
        `sqrt(a_t) * latent + sqrt(1 - a_t) * noise`, which is `calculate_input` of
        `noise_scaling` at the timestep's sigma, computed without sigma so that the last
        timestep of a zero-terminal-SNR schedule (a_t = 0, sigma infinite) stays finite."""
        a = self.schedule.alphas_cumprod.to(latent.device)[t].to(latent.dtype)
        return _append_dims(a, latent.ndim).sqrt() * latent + _append_dims(1 - a, latent.ndim).sqrt() * noise

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at a fraction of the way through sampling (ComfyUI `percent_to_sigma`)."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        return float(self.t_to_sigma(torch.tensor((1.0 - percent) * (self.num_timesteps - 1))))


@dataclass(frozen=True)
class DiscreteEps(_Discrete):
    """A UNet predicting the noise eps on a `DiscreteSchedule` (SD 1.x, 2.x base, SDXL)."""

    prediction: ClassVar[str] = "eps"

    def to_x0(self, sigma: Tensor, out: Tensor, x: Tensor) -> Tensor:
        return x - _append_dims(sigma, x.ndim) * out

    def from_x0(self, sigma: Tensor, x0: Tensor, x: Tensor) -> Tensor:
        return (x - x0) / _append_dims(sigma, x.ndim)


@dataclass(frozen=True)
class DiscreteV(_Discrete):
    """A UNet predicting v (Salimans & Ho 2022) on a `DiscreteSchedule`, which may have zero
    terminal SNR (SD 2.x 768, v-prediction fine-tunes)."""

    prediction: ClassVar[str] = "v"

    def to_x0(self, sigma: Tensor, out: Tensor, x: Tensor) -> Tensor:
        c_skip, c_out = _v_scalings(_append_dims(sigma, x.ndim))
        return c_skip * x + c_out * out

    def from_x0(self, sigma: Tensor, x0: Tensor, x: Tensor) -> Tensor:
        c_skip, c_out = _v_scalings(_append_dims(sigma, x.ndim))
        return (x0 - c_skip * x) / c_out


def discrete(schedule: DiscreteSchedule, prediction: str) -> DiscreteEps | DiscreteV:
    """The model sampling of a UNet on `schedule` predicting `prediction` ("eps" or "v")."""
    if prediction == "eps":
        return DiscreteEps(schedule)
    if prediction == "v":
        return DiscreteV(schedule)
    raise ValueError(f"prediction must be 'eps' or 'v', got {prediction!r}")


# ---------------------------------------------------------------------------------------
# Rectified flow


def time_snr_shift(shift: float, t: Tensor | float) -> Tensor | float:
    """sigma(t) = shift * t / (1 + (shift - 1) * t) (ComfyUI `time_snr_shift`, SD3 paper's shift)."""
    if shift == 1.0:
        return t
    # The op order of diffusers' FlowMatchEulerDiscreteScheduler, so the tables agree bit for bit.
    return shift * t / (1 + (shift - 1) * t)


@dataclass(frozen=True)
class Flow:
    """Rectified flow with a shifted schedule, as SD3 / SD3.5 are sampled.

    `x = sigma * noise + (1 - sigma) * x0`; the network predicts v = noise - x0 at timestep
    `sigma * multiplier`, so x0 = x - sigma * v. The table is
    `time_snr_shift(shift, arange(1, T + 1) / T)`: sigma_max 1, sigma_min 0.0029940 at shift 3.
    `t_to_sigma` shifts and `sigma_to_t` does not, so they are not inverses (as in the SD3
    reference and ComfyUI): the "normal" schedule, a linspace of `sigma_to_t` values passed
    through `t_to_sigma`, shifts twice, as every implementation does.

    Args:
        shift: the schedule's shift (3.0 for SD3 and SD3.5 in ComfyUI, diffusers and the
            reference, except the reference's config for SD3 medium, 1.0).
        multiplier: timestep = sigma * multiplier.
        num_timesteps: length of the table.
    """

    shift: float = 3.0
    multiplier: float = 1000
    num_timesteps: int = 1000
    sigmas: Tensor = field(init=False, repr=False, compare=False)
    log_sigmas: Tensor = field(init=False, repr=False, compare=False)
    sigma_min: float = field(init=False, compare=False)
    sigma_max: float = field(init=False, compare=False)

    prediction: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        if self.num_timesteps < 2:
            raise ValueError("num_timesteps must be at least 2")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive, got {self.shift}")
        steps = torch.arange(1, self.num_timesteps + 1, dtype=torch.float32)
        sigmas = time_snr_shift(self.shift, steps / self.num_timesteps)
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())
        object.__setattr__(self, "sigma_min", float(sigmas[0]))
        object.__setattr__(self, "sigma_max", float(sigmas[-1]))

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return sigma.to(torch.float32) * self.multiplier

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return time_snr_shift(self.shift, t.to(torch.float32) / self.multiplier)

    def calculate_input(self, sigma: Tensor, x: Tensor) -> Tensor:
        """The network sees the sample as it is."""
        return x

    def to_x0(self, sigma: Tensor, out: Tensor, x: Tensor) -> Tensor:
        return x - _append_dims(sigma, x.ndim) * out

    def from_x0(self, sigma: Tensor, x0: Tensor, x: Tensor) -> Tensor:
        return (x - x0) / _append_dims(sigma, x.ndim)

    def noise_scaling(self, sigma: Tensor | float, noise: Tensor, latent: Tensor) -> Tensor:
        """`sigma * noise + (1 - sigma) * latent` (diffusers `scale_noise`, ComfyUI `CONST`)."""
        s = _per_item(sigma, noise.ndim)
        return s * noise + (1.0 - s) * latent

    def ancestral_step(self, sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
        """ComfyUI's rectified-flow ancestral step (`sample_euler_ancestral_RF`): step down to
        sigma_to * (1 + (sigma_to / sigma_from - 1) * eta), then `renoise` to sigma_to with
        sigma_up = sqrt(sigma_to**2 - sigma_down**2 * alpha_to**2 / alpha_down**2)."""
        if not eta or sigma_to == 0:
            return sigma_to, 0.0
        sigma_down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
        alpha_to, alpha_down = 1 - sigma_to, 1 - sigma_down
        sigma_up = max(sigma_to**2 - sigma_down**2 * alpha_to**2 / alpha_down**2, 0.0) ** 0.5
        return sigma_down, sigma_up

    def renoise(self, x: Tensor, sigma_down: float, sigma_to: float, noise: Tensor, sigma_up: float) -> Tensor:
        """The sample at `sigma_to` from one at `sigma_down`: the signal scaled from
        alpha_down to alpha_to, plus `noise * sigma_up`."""
        return ((1 - sigma_to) / (1 - sigma_down)) * x + noise * sigma_up

    def alpha(self, sigma: float) -> float:
        return 1.0 - sigma

    def ve_sigma(self, sigma: float) -> float:
        alpha = 1.0 - sigma
        return sigma / alpha if alpha > 0 else math.inf

    def sigma_from_ve(self, ve_sigma: float) -> float:
        return 1.0 if math.isinf(ve_sigma) else ve_sigma / (1.0 + ve_sigma)

    def training_input(self, t: Tensor, noise: Tensor, latent: Tensor) -> Tensor:
        """What the net sees in training at timesteps `t` (B,) on the model's scale (sigma *
        multiplier): the noised latent, as sampling mixes noise in."""
        sigma = t.to(latent.device, torch.float32) / self.multiplier
        return self.noise_scaling(sigma, noise, latent)

    def percent_to_sigma(self, percent: float) -> float:
        """The sigma at a fraction of the way through sampling (ComfyUI `percent_to_sigma`)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(time_snr_shift(self.shift, 1.0 - percent))
