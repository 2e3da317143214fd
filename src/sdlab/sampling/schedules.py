"""Noise schedules: the model's discrete training schedule and the sigma sequences samplers walk.

Everything here is a pure function of its arguments. A sampler walks a decreasing
sequence of noise levels `sigmas` (float32, on the CPU, ending with a trailing 0);
`get_sigmas(name, steps, model_sampling)` builds one by the name the web UIs use
("karras", "exponential", "sgm_uniform", ...).

Every schedule reads the model through the few members of `SigmaTable`: a
`DiscreteSchedule`, or any `model_sampling.ModelSampling` (discrete eps/v, rectified flow).
Two notions of "timestep" meet here, the same for discrete models and not for flow. The
table index (0 .. T-1) is what "automatic" and "uniform" space evenly (k-diffusion's
`DiscreteSchedule.get_sigmas`, which A1111 also runs for SD3). The model's own timestep
(`sigma_to_t`: sigma * 1000 for flow) is what "normal" and "sgm_uniform" space evenly, as
ComfyUI does; for flow "normal" is then the double-shifted linspace of the SD3 reference
and diffusers' `FlowMatchEulerDiscreteScheduler`. (A1111 spaces these by table index for
SD3 too; we follow ComfyUI and the reference.) "simple" picks table entries as ComfyUI.

The definitions follow the references exactly, so that the same name and step count
give the same sigmas as there:

- k-diffusion `k_diffusion/sampling.py` (`get_sigmas_karras`, `get_sigmas_exponential`,
  `get_sigmas_polyexponential`) and `k_diffusion/external.py` (`DiscreteSchedule`:
  `sigma_to_t`, `t_to_sigma`, `get_sigmas`);
- AUTOMATIC1111 `modules/sd_schedulers.py` (uniform, sgm_uniform, simple, normal, ddim,
  beta; the names and labels of `SCHEDULES`);
- ComfyUI `comfy/samplers.py` (simple, ddim_uniform, normal/sgm_uniform agree with A1111).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from sdlab.errors import SdlabError

__all__ = [
    "DiscreteSchedule",
    "SCHEDULES",
    "ScheduleInfo",
    "SigmaTable",
    "ZTSNR_TERMINAL_ALPHA_CUMPROD",
    "beta_ppf",
    "discrete_schedule",
    "get_sigmas",
    "resolve_schedule",
    "sigmas_automatic",
    "sigmas_beta",
    "sigmas_ddim_uniform",
    "sigmas_exponential",
    "sigmas_karras",
    "sigmas_normal",
    "sigma_at_index",
    "sigmas_polyexponential",
    "sigmas_sgm_uniform",
    "sigmas_simple",
]

# With zero terminal SNR the last alphas_cumprod is exactly 0 and its sigma infinite.
# The web UIs (A1111 `rescale_zero_terminal_snr_abar`, ComfyUI
# `rescale_zero_terminal_snr_sigmas`) clamp it to this value, a sigma of about 4519;
# diffusers clamps to 2**-24 (sigma 4096). We follow the web UIs so images match theirs.
ZTSNR_TERMINAL_ALPHA_CUMPROD = 4.8973451890853435e-08


# ---------------------------------------------------------------------------------------
# The model's discrete schedule


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The noise levels of a model trained on `len(sigmas)` discrete timesteps.

    `sigmas[t] = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t])`, increasing in t.
    Build it with `discrete_schedule()` or `DiscreteSchedule.from_alphas_cumprod()`.
    """

    alphas_cumprod: Tensor  # (T,) float32, as the LDM/SGM `alphas_cumprod` buffer
    sigmas: Tensor  # (T,) float32, increasing
    log_sigmas: Tensor  # (T,) float32
    sigma_min: float = field(init=False)
    sigma_max: float = field(init=False)

    def __post_init__(self) -> None:
        if self.sigmas.ndim != 1 or self.sigmas.numel() < 2:
            raise ValueError("a discrete schedule needs at least 2 timesteps")
        object.__setattr__(self, "sigma_min", float(self.sigmas[0]))
        object.__setattr__(self, "sigma_max", float(self.sigmas[-1]))

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Tensor) -> DiscreteSchedule:
        """The schedule of a model from its `alphas_cumprod` (e.g. the checkpoint's buffer)."""
        # The checkpoints' buffer is float32, and k-diffusion (hence A1111) and diffusers
        # compute the sigmas from it in float32: SD's sigma_min is then 0.029167532920837402
        # and sigma_max 14.614642143249512, the values every k-diffusion user has seen.
        # (ComfyUI computes in float64 and gets 0.0291671585 and 14.6146412.)
        ac = alphas_cumprod.detach().to("cpu", torch.float32)
        sigmas = ((1 - ac) / ac) ** 0.5
        return cls(alphas_cumprod=ac, sigmas=sigmas, log_sigmas=sigmas.log())

    @property
    def num_timesteps(self) -> int:
        return self.sigmas.numel()

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """The (fractional) timestep of each sigma: log sigma interpolated between the
        two nearest training timesteps, clamped to [0, T-1] (k-diffusion `sigma_to_t`,
        diffusers `_sigma_to_t`)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        log_sigma = sigma.to(torch.float32).log()
        # Index of the last training log-sigma <= log_sigma, kept inside [0, T-2] so that
        # `high` exists; the clamp of w below extrapolates flat beyond both ends.
        low_idx = torch.searchsorted(log_sigmas, log_sigma.reshape(-1), right=True) - 1
        low_idx = low_idx.clamp(0, log_sigmas.numel() - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma.reshape(-1)) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * high_idx
        return t.view(sigma.shape)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """The sigma of each (fractional) timestep, interpolating log sigma (k-diffusion)."""
        return _interp_log_sigma(self.log_sigmas, t)


def _interp_log_sigma(log_sigmas: Tensor, index: Tensor) -> Tensor:
    # k-diffusion `DiscreteSchedule.t_to_sigma`: log sigma linear between table entries.
    index = index.to(torch.float32)
    log_sigmas = log_sigmas.to(index.device)
    low_idx, high_idx, w = index.floor().long(), index.ceil().long(), index.frac()
    log_sigma = (1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]
    return log_sigma.exp()


class SigmaTable(Protocol):
    """What the schedules read of a model: a `DiscreteSchedule` or any `ModelSampling`."""

    sigmas: Tensor  # (T,) float32, increasing: the training sigma table
    sigma_min: float
    sigma_max: float
    num_timesteps: int

    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...  # the model's own timestep
    def t_to_sigma(self, t: Tensor) -> Tensor: ...


def sigma_at_index(table: SigmaTable, index: Tensor) -> Tensor:
    """The sigma at each fractional index into the table (0 .. T-1), interpolating log sigma.

    For a discrete model the index is its timestep, so this is `t_to_sigma`, bit for bit;
    for a flow model (timestep sigma * 1000) it is not.
    """
    log_sigmas = getattr(table, "log_sigmas", None)
    if log_sigmas is None:
        log_sigmas = table.sigmas.to(torch.float32).log()
    return _interp_log_sigma(log_sigmas, index)


def discrete_schedule(
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    num_timesteps: int = 1000,
    zero_terminal_snr: bool = False,
) -> DiscreteSchedule:
    """The "scaled linear" DDPM schedule of Stable Diffusion 1.x, 2.x and SDXL.

    Args:
        beta_start: beta of the first timestep (`linear_start` in the LDM configs).
        beta_end: beta of the last timestep (`linear_end`).
        num_timesteps: number of training timesteps.
        zero_terminal_snr: rescale so the last timestep has zero signal (Lin et al. 2023,
            "Common Diffusion Noise Schedules and Sample Steps are Flawed"), as diffusers'
            `rescale_zero_terminal_snr`. The last `alphas_cumprod`, exactly 0 after the
            rescale, is clamped to `ZTSNR_TERMINAL_ALPHA_CUMPROD` as the web UIs do, so
            the largest sigma is about 4519 rather than infinite.
    """
    if num_timesteps < 2:
        raise ValueError("num_timesteps must be at least 2")
    # LDM `make_beta_schedule("linear")`: linear in sqrt(beta), in float64, then the
    # cumulative product stored as a float32 buffer.
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    if zero_terminal_snr:
        alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
    return DiscreteSchedule.from_alphas_cumprod(alphas_cumprod)


def rescale_zero_terminal_snr(alphas_cumprod: Tensor, terminal: float = ZTSNR_TERMINAL_ALPHA_CUMPROD) -> Tensor:
    """`alphas_cumprod` with its square root shifted so the last is 0 and scaled so the first is
    unchanged (A1111 `rescale_zero_terminal_snr_abar`; diffusers and kohya do the same on the
    betas), then the last set to `terminal`: the web UIs' clamp for sampling, 0 for training as
    kohya's `--zero_terminal_snr` trains."""
    sqrt_ac = alphas_cumprod.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    out = sqrt_ac**2
    out[-1] = terminal
    return out


# ---------------------------------------------------------------------------------------
# Sigma sequences. Each returns `steps` decreasing sigmas then a trailing 0 (float32, CPU),
# except ddim_uniform, which follows the web UIs in returning one more for step counts
# that do not divide the number of timesteps.


def _append_zero(sigmas: Tensor) -> Tensor:
    sigmas = sigmas.to("cpu", torch.float32)
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def sigmas_automatic(steps: int, schedule: SigmaTable) -> Tensor:
    """Table indices evenly spaced from T-1 down to 0 (k-diffusion `DiscreteSchedule.get_sigmas`).

    What A1111 runs for "Automatic" with a sampler that has no schedule of its own, and
    for "Uniform"; for step counts where the timesteps are integers it equals diffusers'
    "linspace" timestep spacing. Flow models get the same index spacing of their table
    (as A1111's SD3 denoiser, a k-diffusion `DiscreteSchedule` over the flow sigmas).
    """
    t = torch.linspace(schedule.num_timesteps - 1, 0, steps)
    return _append_zero(sigma_at_index(schedule, t))


def sigmas_normal(steps: int, schedule: SigmaTable) -> Tensor:
    """Model timesteps evenly spaced between those of sigma_max and sigma_min (A1111/ComfyUI "normal").

    For discrete models mathematically the same timesteps as `sigmas_automatic`; it differs
    only by the float32 round trip through `sigma_to_t`, exactly as in the web UIs. For flow
    models it is `linspace(1000, 1000 * sigma_min, steps)` shifted, the schedule of the SD3
    reference and diffusers (sigma_min, already shifted, is shifted again).
    """
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    t = torch.linspace(float(start), float(end), steps)
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_sgm_uniform(steps: int, schedule: SigmaTable) -> Tensor:
    """`steps + 1` evenly spaced timesteps from sigma_max to sigma_min, the last dropped
    (SGM's discretisation, A1111/ComfyUI "sgm_uniform").

    The "trailing" spacing of Lin et al.: it starts at T-1 and never samples the last
    training timestep, which the Turbo and LCM models need. It equals diffusers'
    `timestep_spacing="trailing"` for one step and lies within one timestep of it
    otherwise (diffusers rounds its timesteps to integers).
    """
    start = schedule.sigma_to_t(torch.tensor(schedule.sigma_max))
    end = schedule.sigma_to_t(torch.tensor(schedule.sigma_min))
    t = torch.linspace(float(start), float(end), steps + 1)[:-1]
    return _append_zero(schedule.t_to_sigma(t))


def sigmas_karras(
    steps: int, schedule: SigmaTable, rho: float = 7.0
) -> Tensor:
    """The schedule of Karras et al. (2022), eq. 5: evenly spaced in sigma**(1/rho)."""
    # float64 then float32, as diffusers `_convert_to_karras` (k-diffusion uses float32).
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    min_inv_rho = schedule.sigma_min ** (1 / rho)
    max_inv_rho = schedule.sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def sigmas_exponential(steps: int, schedule: SigmaTable) -> Tensor:
    """Evenly spaced in log sigma (k-diffusion `get_sigmas_exponential`)."""
    log_sigmas = torch.linspace(
        math.log(schedule.sigma_max), math.log(schedule.sigma_min), steps, dtype=torch.float64
    )
    return _append_zero(log_sigmas.exp())


def sigmas_polyexponential(
    steps: int, schedule: SigmaTable, rho: float = 1.0
) -> Tensor:
    """A polynomial in log sigma (k-diffusion `get_sigmas_polyexponential`); rho=1 is exponential."""
    ramp = torch.linspace(1, 0, steps, dtype=torch.float64) ** rho
    log_min, log_max = math.log(schedule.sigma_min), math.log(schedule.sigma_max)
    return _append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def sigmas_simple(steps: int, schedule: SigmaTable) -> Tensor:
    """Training sigmas taken at an even stride from the top (ComfyUI/A1111 "simple")."""
    stride = schedule.num_timesteps / steps
    index = [schedule.num_timesteps - 1 - int(i * stride) for i in range(steps)]
    return _append_zero(schedule.sigmas[index])


def sigmas_ddim_uniform(steps: int, schedule: SigmaTable) -> Tensor:
    """The timesteps of the original DDIM sampler: 1, 1+k, 1+2k, ... with k = T // steps
    (A1111 "DDIM" schedule, ComfyUI "ddim_uniform").

    Equal to diffusers' DDIM "leading" spacing with `steps_offset=1` when `steps` divides T.
    Otherwise the references walk up to T-1, so there can be one more step than asked;
    we keep that so the same settings give the same image as the web UIs.
    """
    stride = max(schedule.num_timesteps // steps, 1)
    index = list(range(1, schedule.num_timesteps, stride))[::-1]
    return _append_zero(schedule.sigmas[index])


def sigmas_beta(
    steps: int, schedule: SigmaTable, alpha: float = 0.6, beta: float = 0.6
) -> Tensor:
    """Sigmas at the quantiles of a Beta(alpha, beta) distribution, linear between
    sigma_min and sigma_max (Lee et al. 2024, "Beta Sampling is All You Need"; as A1111's
    "beta" and diffusers' `use_beta_sigmas`).

    ComfyUI's "beta" maps the same quantiles to training timesteps instead, so its
    sigmas differ.
    """
    quantiles = [1.0 - i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    ppf = torch.tensor([beta_ppf(q, alpha, beta) for q in quantiles], dtype=torch.float64)
    return _append_zero(schedule.sigma_min + ppf * (schedule.sigma_max - schedule.sigma_min))


# ---------------------------------------------------------------------------------------
# The Beta distribution's quantile function, without scipy.


def _betacf(a: float, b: float, x: float) -> float:
    # Continued fraction of the incomplete beta function, modified Lentz's method
    # (Numerical Recipes, 3rd ed., 6.4).
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c = 1.0
    d = 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only on one side of the mean; use symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def beta_ppf(q: float, alpha: float, beta: float) -> float:
    """Quantile function of Beta(alpha, beta) (scipy's `stats.beta.ppf`), by bisection."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    # The CDF is monotone, so bisection always converges; 100 halvings reach the
    # resolution of a double.
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if _betainc(alpha, beta, mid) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class ScheduleInfo:
    """A named sigma schedule: `function(steps, model_sampling) -> sigmas`."""

    name: str  # the canonical name, as A1111's `Scheduler.name`
    label: str  # what the web UI shows and writes in the infotext ("Schedule type")
    function: Callable[[int, SigmaTable], Tensor]
    aliases: tuple[str, ...] = ()


SCHEDULES: dict[str, ScheduleInfo] = {
    info.name: info
    for info in (
        # "automatic" means "the sampler's own default"; `samplers.sampler_sigmas` resolves
        # that. Called directly it is k-diffusion's default spacing.
        ScheduleInfo("automatic", "Automatic", sigmas_automatic, ("default",)),
        ScheduleInfo("uniform", "Uniform", sigmas_automatic),
        ScheduleInfo("karras", "Karras", sigmas_karras),
        ScheduleInfo("exponential", "Exponential", sigmas_exponential),
        ScheduleInfo("polyexponential", "Polyexponential", sigmas_polyexponential),
        ScheduleInfo("sgm_uniform", "SGM Uniform", sigmas_sgm_uniform, ("SGMUniform",)),
        ScheduleInfo("simple", "Simple", sigmas_simple),
        ScheduleInfo("normal", "Normal", sigmas_normal),
        ScheduleInfo("ddim_uniform", "DDIM", sigmas_ddim_uniform, ("ddim",)),
        ScheduleInfo("beta", "Beta", sigmas_beta),
    )
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace(" ", "_").replace("-", "_")


def resolve_schedule(name: str) -> ScheduleInfo:
    """The schedule called `name`: its name, label or an alias, in any case."""
    key = _normalise(name)
    for info in SCHEDULES.values():
        if key in {_normalise(n) for n in (info.name, info.label, *info.aliases)}:
            return info
    valid = ", ".join(info.label for info in SCHEDULES.values())
    raise SdlabError(f"unknown schedule {name!r}; choose one of: {valid}")


def get_sigmas(schedule_name: str, steps: int, model_sampling: SigmaTable) -> Tensor:
    """The sigmas of the named schedule for `steps` steps, with a trailing 0 (float32, CPU).

    Args:
        schedule_name: a name, label or alias from `SCHEDULES` ("karras", "SGM Uniform", ...).
        steps: number of sampling steps (denoiser calls for a first-order sampler).
        model_sampling: the model's `ModelSampling` or training `DiscreteSchedule`; its
            sigma table, sigma_min and sigma_max.
    """
    info = resolve_schedule(schedule_name)
    if steps < 1:
        raise SdlabError(f"steps must be at least 1, got {steps}")
    return info.function(steps, model_sampling)
