"""Sigma schedules against diffusers' schedulers and the web UIs' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdlab.errors import SdlabError
from sdlab.sampling.model_sampling import Flow, discrete
from sdlab.sampling.schedules import (
    SCHEDULES,
    ZTSNR_TERMINAL_ALPHA_CUMPROD,
    DiscreteSchedule,
    beta_ppf,
    discrete_schedule,
    get_sigmas,
    resolve_schedule,
    sigma_at_index,
)

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


@pytest.fixture(scope="module")
def sd() -> DiscreteSchedule:
    return discrete_schedule()


def _euler(steps: int, **config) -> "diffusers.EulerDiscreteScheduler":
    scheduler = diffusers.EulerDiscreteScheduler(**SD_BETAS, **config)
    scheduler.set_timesteps(steps)
    return scheduler


def _np_table(schedule: DiscreteSchedule) -> np.ndarray:
    return schedule.sigmas.double().numpy()


def _np_t_to_sigma(table: np.ndarray, t: np.ndarray) -> np.ndarray:
    # k-diffusion DiscreteSchedule.t_to_sigma, transcribed with numpy.
    log_sigmas = np.log(table)
    low, high = np.floor(t).astype(int), np.ceil(t).astype(int)
    w = t - np.floor(t)
    return np.exp((1 - w) * log_sigmas[low] + w * log_sigmas[high])


# ---------------------------------------------------------------------------------------
# The discrete schedule


def test_sd_schedule_known_values(sd: DiscreteSchedule) -> None:
    # The well-known SD 1.x/2.x/SDXL extremes (what A1111 reports as sigma min/max).
    assert sd.num_timesteps == 1000
    # Both are float32 results of a square root, which PyTorch's AVX2 kernel rounds to within one
    # ulp rather than correctly (sigma_min comes out as 0.02916753478348255 there, on k-diffusion's
    # and diffusers' side too, as `test_sd_schedule_matches_diffusers` checks exactly).
    assert abs(sd.sigma_min - 0.029167532920837402) <= np.spacing(np.float32(0.029167532920837402))
    assert abs(sd.sigma_max - 14.614642143249512) <= np.spacing(np.float32(14.614642143249512))
    assert sd.sigmas.dtype == torch.float32 and sd.alphas_cumprod.dtype == torch.float32
    assert torch.all(sd.sigmas[1:] > sd.sigmas[:-1])


def test_sd_schedule_matches_diffusers(sd: DiscreteSchedule) -> None:
    ref = diffusers.DDPMScheduler(**SD_BETAS)
    # diffusers accumulates the product in float32, we (like the LDM code) in float64.
    torch.testing.assert_close(sd.alphas_cumprod, ref.alphas_cumprod, rtol=1e-6, atol=0)
    ref_sigmas = ((1 - ref.alphas_cumprod) / ref.alphas_cumprod) ** 0.5
    assert float(sd.sigmas[0]) == float(ref_sigmas[0])
    assert float(sd.sigmas[-1]) == pytest.approx(float(ref_sigmas[-1]), rel=1e-6)


def test_zero_terminal_snr_matches_diffusers() -> None:
    ours = discrete_schedule(zero_terminal_snr=True)
    ref = diffusers.DDPMScheduler(**SD_BETAS, rescale_betas_zero_snr=True)
    torch.testing.assert_close(ours.alphas_cumprod[:-1], ref.alphas_cumprod[:-1], rtol=2e-5, atol=1e-9)
    assert float(ref.alphas_cumprod[-1]) == 0.0  # hence the clamp
    assert float(ours.alphas_cumprod[-1]) == pytest.approx(ZTSNR_TERMINAL_ALPHA_CUMPROD)
    assert ours.sigma_max == pytest.approx(4518.76, rel=1e-5)  # the web UIs' terminal sigma
    assert torch.isfinite(ours.log_sigmas).all()
    assert torch.all(ours.sigmas[1:] > ours.sigmas[:-1])
    assert float(ours.sigma_to_t(torch.tensor(ours.sigma_max))) == pytest.approx(999.0)


def test_sigma_to_t_matches_diffusers(sd: DiscreteSchedule) -> None:
    sigmas = torch.tensor([14.6146, 9.0, 3.3, 1.0, 0.5, 0.2, 0.05, 0.0292])
    ref = diffusers.EulerDiscreteScheduler(**SD_BETAS)
    log_table = np.log(((1 - ref.alphas_cumprod) / ref.alphas_cumprod).numpy() ** 0.5)
    expected = np.array([ref._sigma_to_t(np.array(s), log_table) for s in sigmas.double().numpy()])
    np.testing.assert_allclose(sd.sigma_to_t(sigmas).numpy(), expected, atol=2e-3)


def test_sigma_t_round_trip_and_clamp(sd: DiscreteSchedule) -> None:
    t = torch.tensor([0.0, 0.25, 1.5, 500.0, 998.75, 999.0])
    torch.testing.assert_close(sd.sigma_to_t(sd.t_to_sigma(t)), t, atol=2e-3, rtol=0)
    # Integer timesteps give the table entries.
    torch.testing.assert_close(sd.t_to_sigma(torch.tensor([0.0, 999.0])), sd.sigmas[[0, 999]])
    # Beyond the ends the timestep is clamped, as k-diffusion does.
    out = sd.sigma_to_t(torch.tensor([[1e-4, 100.0]]))
    assert out.shape == (1, 2)
    assert out.tolist() == [[0.0, 999.0]]


# ---------------------------------------------------------------------------------------
# Sigma sequences against diffusers


# One step is left out: diffusers' "linspace" spacing then has the single timestep 0, so its
# Karras range collapses to sigma_min.
@pytest.mark.parametrize("steps", [2, 4, 10, 25])
def test_karras_matches_diffusers(sd: DiscreteSchedule, steps: int) -> None:
    ref = _euler(steps, use_karras_sigmas=True, timestep_spacing="linspace")
    torch.testing.assert_close(get_sigmas("karras", steps, sd), ref.sigmas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [2, 4, 10, 25])
def test_exponential_matches_diffusers(sd: DiscreteSchedule, steps: int) -> None:
    ref = _euler(steps, use_exponential_sigmas=True, timestep_spacing="linspace")
    torch.testing.assert_close(get_sigmas("exponential", steps, sd), ref.sigmas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [2, 4, 10, 25])
def test_beta_matches_diffusers(sd: DiscreteSchedule, steps: int) -> None:
    pytest.importorskip("scipy")  # diffusers' use_beta_sigmas needs it; ours does not
    ref = _euler(steps, use_beta_sigmas=True, timestep_spacing="linspace")
    torch.testing.assert_close(get_sigmas("beta", steps, sd), ref.sigmas, rtol=1e-5, atol=0)


@pytest.mark.parametrize("steps", [4, 10, 28])  # 999 / (steps - 1) is an integer: no rounding
def test_automatic_matches_diffusers_linspace(sd: DiscreteSchedule, steps: int) -> None:
    ref = _euler(steps, timestep_spacing="linspace")
    for name in ("automatic", "uniform", "normal"):
        torch.testing.assert_close(get_sigmas(name, steps, sd), ref.sigmas, rtol=1e-5, atol=0)


def test_sgm_uniform_is_trailing(sd: DiscreteSchedule) -> None:
    # One step: exactly diffusers' "trailing" (SD-Turbo's single step at t = 999).
    ref = _euler(1, timestep_spacing="trailing")
    torch.testing.assert_close(get_sigmas("sgm_uniform", 1, sd), ref.sigmas, rtol=1e-5, atol=0)
    # More steps: diffusers rounds its trailing timesteps to integers, SGM does not.
    for steps in (2, 4, 8):
        ref = _euler(steps, timestep_spacing="trailing")
        ours_t = sd.sigma_to_t(get_sigmas("sgm_uniform", steps, sd)[:-1])
        assert (ours_t - ref.timesteps).abs().max() <= 1.0


def test_ddim_uniform_matches_diffusers_ddim(sd: DiscreteSchedule) -> None:
    ref = diffusers.DDIMScheduler(**SD_BETAS, steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(10)
    expected = torch.cat([sd.sigmas[ref.timesteps], torch.zeros(1)])
    assert ref.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    torch.testing.assert_close(get_sigmas("ddim_uniform", 10, sd), expected)


# ---------------------------------------------------------------------------------------
# Sigma sequences against the web UIs' formulas


def test_automatic_formula(sd: DiscreteSchedule) -> None:
    # k-diffusion get_sigmas: t = linspace(T-1, 0, n); fractional timesteps interpolate log sigma.
    t = np.linspace(999, 0, 7)
    expected = np.append(_np_t_to_sigma(_np_table(sd), t), 0.0)
    np.testing.assert_allclose(get_sigmas("automatic", 7, sd).numpy(), expected, rtol=1e-6)


def test_sgm_uniform_formula(sd: DiscreteSchedule) -> None:
    # A1111 sgm_uniform: linspace(t(sigma_max), t(sigma_min), n + 1)[:-1].
    t = np.linspace(999, 0, 5)[:-1]  # 999, 749.25, 499.5, 249.75
    expected = np.append(_np_t_to_sigma(_np_table(sd), t), 0.0)
    np.testing.assert_allclose(get_sigmas("sgm_uniform", 4, sd).numpy(), expected, rtol=1e-5)


def test_normal_equals_automatic(sd: DiscreteSchedule) -> None:
    for steps in (3, 7, 20):
        torch.testing.assert_close(get_sigmas("normal", steps, sd), get_sigmas("automatic", steps, sd), rtol=1e-5, atol=0)


def test_simple_formula(sd: DiscreteSchedule) -> None:
    # ComfyUI/A1111 simple: sigmas[-(1 + int(i * T / n))].
    assert get_sigmas("simple", 3, sd).tolist() == sd.sigmas[[999, 666, 333]].tolist() + [0.0]
    assert get_sigmas("simple", 8, sd).tolist() == sd.sigmas[[999, 874, 749, 624, 499, 374, 249, 124]].tolist() + [0.0]


def test_ddim_uniform_quirk(sd: DiscreteSchedule) -> None:
    # 1000 // 7 = 142 and the references step up to T-1, so 7 steps give 8 sigmas.
    expected = sd.sigmas[list(range(1, 1000, 142))[::-1]].tolist() + [0.0]
    assert get_sigmas("ddim_uniform", 7, sd).tolist() == expected
    assert len(expected) == 9


def test_karras_and_exponential_exact_numbers(sd: DiscreteSchedule) -> None:
    lo, hi = sd.sigma_min, sd.sigma_max
    ramp = np.linspace(0, 1, 5)
    karras = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    np.testing.assert_allclose(get_sigmas("karras", 5, sd).numpy(), np.append(karras, 0), rtol=1e-6)
    expo = np.exp(np.linspace(math.log(hi), math.log(lo), 5))
    np.testing.assert_allclose(get_sigmas("exponential", 5, sd).numpy(), np.append(expo, 0), rtol=1e-6)
    # Polyexponential with rho 1 is exponential.
    torch.testing.assert_close(get_sigmas("polyexponential", 5, sd), get_sigmas("exponential", 5, sd))
    # And the sigmas of the 5-step Karras schedule of SD, to 5 digits.
    assert get_sigmas("karras", 5, sd).tolist() == pytest.approx([14.6146, 4.7966, 1.2742, 0.24793, 0.029167, 0.0], rel=1e-4)


def test_beta_formula(sd: DiscreteSchedule) -> None:
    # A1111 beta: sigma_min + ppf(1 - i/(n-1)) * (sigma_max - sigma_min), alpha = beta = 0.6.
    sig = get_sigmas("beta", 3, sd)
    assert float(sig[0]) == pytest.approx(sd.sigma_max)
    assert float(sig[1]) == pytest.approx((sd.sigma_min + sd.sigma_max) / 2, rel=1e-6)  # symmetric: ppf(.5) = .5
    assert float(sig[2]) == pytest.approx(sd.sigma_min)


@pytest.mark.parametrize("alpha,beta", [(0.6, 0.6), (0.5, 0.7), (2.0, 3.0), (1.0, 1.0)])
def test_beta_ppf_matches_scipy(alpha: float, beta: float) -> None:
    stats = pytest.importorskip("scipy.stats")
    for q in (0.0, 1e-9, 0.01, 0.1, 0.3, 0.5, 0.77, 0.99, 1 - 1e-9, 1.0):
        # Near q = 1 the quantile of Beta(2, 3) has slope ~1e5, so 1e-16 in the CDF is 1e-11 in x.
        assert beta_ppf(q, alpha, beta) == pytest.approx(float(stats.beta.ppf(q, alpha, beta)), abs=1e-10)


# ---------------------------------------------------------------------------------------
# The registry


def test_registry_names_and_labels() -> None:
    labels = {info.name: info.label for info in SCHEDULES.values()}
    assert labels == {
        "automatic": "Automatic",
        "uniform": "Uniform",
        "karras": "Karras",
        "exponential": "Exponential",
        "polyexponential": "Polyexponential",
        "sgm_uniform": "SGM Uniform",
        "simple": "Simple",
        "normal": "Normal",
        "ddim_uniform": "DDIM",
        "beta": "Beta",
    }


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 9])
def test_every_schedule_is_well_formed(sd: DiscreteSchedule, name: str, steps: int) -> None:
    sig = get_sigmas(name, steps, sd)
    assert sig.dtype == torch.float32 and sig.device.type == "cpu" and sig.ndim == 1
    assert float(sig[-1]) == 0.0
    assert len(sig) == steps + 1 or (name == "ddim_uniform" and len(sig) == steps + 2)
    assert torch.all(sig[1:] < sig[:-1])
    assert float(sig[0]) <= sd.sigma_max * (1 + 1e-6)
    assert float(sig[-2]) >= sd.sigma_min * (1 - 1e-6)


def test_resolve_schedule_accepts_labels_and_aliases() -> None:
    assert resolve_schedule("SGM Uniform").name == "sgm_uniform"
    assert resolve_schedule("SGMUniform").name == "sgm_uniform"
    assert resolve_schedule("sgm-uniform").name == "sgm_uniform"
    assert resolve_schedule("DDIM").name == "ddim_uniform"
    assert resolve_schedule("KARRAS").name == "karras"


def test_unknown_schedule_lists_the_valid_ones(sd: DiscreteSchedule) -> None:
    with pytest.raises(SdlabError, match="unknown schedule 'cosine'.*Karras.*SGM Uniform"):
        get_sigmas("cosine", 10, sd)
    with pytest.raises(SdlabError, match="steps"):
        get_sigmas("karras", 0, sd)


# ---------------------------------------------------------------------------------------
# Any ModelSampling: discrete eps/v give the schedule's sigmas bit for bit; flow its own


@pytest.mark.parametrize("ztsnr", [False, True])
def test_model_sampling_gives_the_schedules_sigmas(ztsnr: bool) -> None:
    schedule = discrete_schedule(zero_terminal_snr=ztsnr)
    index = torch.tensor([0.0, 0.25, 17.5, 998.9, 999.0])
    assert torch.equal(sigma_at_index(schedule, index), schedule.t_to_sigma(index))
    for prediction in ("eps", "v"):
        ms = discrete(schedule, prediction)
        for name in SCHEDULES:
            for steps in (1, 4, 9):
                assert torch.equal(get_sigmas(name, steps, ms), get_sigmas(name, steps, schedule)), (name, steps)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
@pytest.mark.parametrize("steps", [1, 2, 9, 28])
def test_every_schedule_is_well_formed_on_flow(name: str, steps: int) -> None:
    ms = Flow()
    sig = get_sigmas(name, steps, ms)
    assert sig.dtype == torch.float32 and sig.ndim == 1 and float(sig[-1]) == 0.0
    assert len(sig) == steps + 1 or (name == "ddim_uniform" and len(sig) == steps + 2)
    assert torch.all(sig[1:] < sig[:-1])
    assert float(sig[0]) <= 1.0 and float(sig[-2]) >= ms.sigma_min * (1 - 1e-6)


def test_flow_automatic_spaces_the_table_index() -> None:
    # k-diffusion's DiscreteSchedule over the flow table (A1111's SD3 denoiser): indices
    # 999, 666, 333, 0, i.e. table entries 1000, 667, 334, 1 (timestep = index + 1).
    ms = Flow()
    expected = torch.cat([ms.sigmas[[999, 666, 333, 0]], torch.zeros(1)])
    torch.testing.assert_close(get_sigmas("automatic", 4, ms), expected, atol=0, rtol=1e-6)
    torch.testing.assert_close(get_sigmas("uniform", 4, ms), expected, atol=0, rtol=1e-6)
