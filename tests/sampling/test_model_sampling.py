"""ModelSampling: discrete eps/v against the formulas the denoiser has always used, rectified
flow against diffusers' FlowMatchEulerDiscreteScheduler and ComfyUI's flow samplers.

ComfyUI's samplers (`comfy/k_diffusion/sampling.py`: `sample_euler_ancestral_RF`,
`sample_dpm_2_ancestral_RF`, `sample_dpmpp_2s_ancestral_RF`, and the half-log-SNR forms of
`sample_dpmpp_sde`, `sample_dpmpp_2m_sde`, `sample_dpmpp_3m_sde`) are written out below as
plain loops over the same sigmas and the same noise, and ours must land on the same latents.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from sdlab.errors import SdlabError
from sdlab.sampling import samplers as S
from sdlab.sampling.model_sampling import (
    SIGMA_SPACE,
    DiscreteEps,
    DiscreteV,
    Flow,
    ModelSampling,
    discrete,
    time_snr_shift,
)
from sdlab.sampling.schedules import discrete_schedule, get_sigmas

diffusers = pytest.importorskip("diffusers")

SHAPE = (2, 4, 8, 8)
ATOL = 1e-5


def _randn(seed: int, shape=SHAPE) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _flow_scheduler(steps: int | None = None, shift: float = 3.0):
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    if steps is not None:
        scheduler.set_timesteps(steps)
    return scheduler


# ---------------------------------------------------------------------------------------
# Discrete eps / v: the denoiser's maths, bit for bit


@pytest.mark.parametrize("ztsnr", [False, True])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_discrete_equals_the_denoiser_formulas(prediction: str, ztsnr: bool) -> None:
    schedule = discrete_schedule(zero_terminal_snr=ztsnr)
    ms = discrete(schedule, prediction)
    assert type(ms) is (DiscreteEps if prediction == "eps" else DiscreteV)
    assert isinstance(ms, ModelSampling) and ms.prediction == prediction
    assert ms.sigmas is schedule.sigmas and ms.num_timesteps == 1000
    assert (ms.sigma_min, ms.sigma_max) == (schedule.sigma_min, schedule.sigma_max)

    x, out = _randn(1) * 3, _randn(2)
    sigma = torch.tensor([schedule.sigma_max, 0.5])  # ~4519 with ZTSNR
    s = sigma.view(-1, 1, 1, 1)
    # DiscreteDenoiser: c_in = (sigma**2 + 1)**-0.5 with dims appended; t = schedule.sigma_to_t.
    assert torch.equal(ms.calculate_input(sigma, x), x * ((sigma**2 + 1.0) ** -0.5).view(-1, 1, 1, 1))
    assert torch.equal(ms.sigma_to_t(sigma), schedule.sigma_to_t(sigma))
    t = torch.tensor([0.0, 10.5, 999.0])
    assert torch.equal(ms.t_to_sigma(t), schedule.t_to_sigma(t))
    # prediction_to_x0 / x0_to_prediction.
    if prediction == "eps":
        x0 = x - s * out
        assert torch.equal(ms.to_x0(sigma, out, x), x0)
        assert torch.equal(ms.from_x0(sigma, x0, x), (x - x0) / s)
    else:
        c_skip, c_out = 1.0 / (s**2 + 1.0), -s / (s**2 + 1.0) ** 0.5
        x0 = c_skip * x + c_out * out
        assert torch.equal(ms.to_x0(sigma, out, x), x0)
        assert torch.equal(ms.from_x0(sigma, x0, x), (x0 - c_skip * x) / c_out)
    torch.testing.assert_close(ms.from_x0(sigma, ms.to_x0(sigma, out, x), x), out, atol=1e-4, rtol=1e-4)
    # The pipeline's `x0 + noise * sigma` and the ancestral samplers' noise.
    noise, latent = _randn(3), _randn(4)
    assert torch.equal(ms.noise_scaling(sigma[0], noise, latent), latent + noise * sigma[0])
    assert torch.equal(ms.noise_scaling(sigma, noise, latent), latent + noise * s)
    assert torch.equal(ms.noise_scaling(2.5, noise, latent), latent + noise * 2.5)
    sigma_up = min(3.0, (3.0**2 * (5.0**2 - 3.0**2) / 5.0**2) ** 0.5)
    assert ms.ancestral_step(5.0, 3.0, 1.0) == ((3.0**2 - sigma_up**2) ** 0.5, sigma_up)
    assert ms.ancestral_step(5.0, 3.0, 0.0) == (3.0, 0.0)
    assert torch.equal(ms.renoise(x, 2.0, 3.0, noise * 1.5, 0.7), x + noise * 1.5 * 0.7)
    assert (ms.alpha(2.0), ms.ve_sigma(2.0), ms.sigma_from_ve(2.0)) == (1.0, 2.0, 2.0)


def test_discrete_rejects_unknown_prediction() -> None:
    with pytest.raises(ValueError, match="'eps' or 'v'"):
        discrete(discrete_schedule(), "flow")


def test_sigma_space_is_the_default_noise() -> None:
    x, noise = _randn(1), _randn(2)
    assert torch.equal(SIGMA_SPACE.noise_scaling(1.5, noise, x), x + noise * 1.5)
    assert SIGMA_SPACE.ancestral_step(5.0, 3.0, 1.0) == discrete(discrete_schedule(), "eps").ancestral_step(5.0, 3.0)


# ---------------------------------------------------------------------------------------
# Rectified flow against diffusers


def test_flow_table_equals_diffusers() -> None:
    ms = Flow()
    ref = _flow_scheduler()
    assert isinstance(ms, ModelSampling) and ms.prediction == "flow"
    assert ms.sigmas.dtype == torch.float32 and ms.sigmas.shape == (1000,)
    assert torch.equal(ms.sigmas, ref.sigmas.flip(0))  # diffusers holds it decreasing
    assert ms.sigma_max == 1.0 and ms.sigma_min == ref.sigma_min
    assert ms.sigma_min == pytest.approx(0.0029940, abs=1e-7)
    assert Flow(shift=1.0).sigma_min == pytest.approx(0.001)
    assert torch.equal(ms.sigma_to_t(ms.sigmas), ref.timesteps.flip(0))
    assert Flow() == Flow(3.0) and Flow() != Flow(1.0)


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
def test_flow_normal_equals_diffusers_set_timesteps(steps: int) -> None:
    ms = Flow()
    ref = _flow_scheduler(steps)
    sigmas = get_sigmas("normal", steps, ms)
    # diffusers takes the linspace in float64, the SD3 reference and ComfyUI (and we) in
    # float32: at most one float32 ulp apart.
    torch.testing.assert_close(sigmas, ref.sigmas, atol=1.2e-7, rtol=0)
    assert torch.equal(ms.sigma_to_t(sigmas[:-1]), sigmas[:-1] * 1000)
    torch.testing.assert_close(ms.sigma_to_t(sigmas[:-1]), ref.timesteps, atol=1.2e-7 * 1000 + 6.2e-5, rtol=0)
    # The reference's `get_sigmas` and ComfyUI's "normal", bit for bit.
    t = torch.linspace(ms.sigma_max * 1000, ms.sigma_min * 1000, steps)
    assert torch.equal(sigmas[:-1], time_snr_shift(3.0, t / 1000))


def test_flow_schedules_sd3_reference_numbers() -> None:
    # ../shared/reference/sd3.md 4.3, shift 3.
    ms = Flow()
    expect = {
        "normal": [1.0, 0.857692, 0.602151, 0.008929, 0.0],
        "simple": [1.0, 0.9, 0.75, 0.5, 0.0],
        "sgm_uniform": [1.0, 0.900359, 0.751121, 0.502985, 0.0],
    }
    for name, values in expect.items():
        torch.testing.assert_close(get_sigmas(name, 4, ms), torch.tensor(values), atol=1e-6, rtol=0)
    torch.testing.assert_close(get_sigmas("normal", 28, ms)[-3:], torch.tensor([0.110906, 0.008929, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(get_sigmas("simple", 28, ms)[-3:], torch.tensor([0.188811, 0.100746, 0.0]), atol=1e-6, rtol=0)


def test_flow_noise_scaling_equals_diffusers_scale_noise() -> None:
    ms = Flow()
    ref = _flow_scheduler(10)
    sample, noise = _randn(1), _randn(2)
    for k in (0, 3, 9):
        t = ref.timesteps[k]
        expected = ref.scale_noise(sample, t.expand(SHAPE[0]), noise)
        assert torch.equal(ms.noise_scaling(ref.sigmas[k].expand(SHAPE[0]), noise, sample), expected)
        assert torch.equal(ms.noise_scaling(ref.sigmas[k], noise, sample), expected)
    # sigma 1: pure noise, whatever the latent.
    assert torch.equal(ms.noise_scaling(1.0, noise, sample), noise)


def test_flow_maths() -> None:
    ms = Flow()
    x, out = _randn(1), _randn(2)
    sigma = torch.tensor([1.0, 0.3])
    s = sigma.view(-1, 1, 1, 1)
    assert ms.calculate_input(sigma, x) is x
    assert torch.equal(ms.to_x0(sigma, out, x), x - s * out)
    torch.testing.assert_close(ms.from_x0(sigma, ms.to_x0(sigma, out, x), x), out)
    # t_to_sigma shifts and sigma_to_t does not (as the reference and ComfyUI): they are not
    # inverses, which is the double shift of "normal". The table is t_to_sigma of 1 .. 1000.
    assert torch.equal(ms.t_to_sigma(torch.arange(1, 1001, dtype=torch.float32)), ms.sigmas)
    assert torch.equal(ms.sigma_to_t(torch.tensor([0.25, 1.0])), torch.tensor([250.0, 1000.0]))
    assert (ms.alpha(0.25), ms.ve_sigma(0.25), ms.sigma_from_ve(1 / 3)) == (0.75, 0.25 / 0.75, (1 / 3) / (4 / 3))
    assert ms.ve_sigma(1.0) == math.inf and ms.sigma_from_ve(math.inf) == 1.0
    assert ms.percent_to_sigma(0.0) == 1.0 and ms.percent_to_sigma(1.0) == 0.0
    assert ms.percent_to_sigma(0.5) == pytest.approx(0.75)
    # Rectified-flow ancestral step: sigma_down**2 * (alpha_to / alpha_down)**2 + sigma_up**2 = sigma_to**2.
    down, up = ms.ancestral_step(0.8, 0.5, 1.0)
    assert down == pytest.approx(0.5 * 0.5 / 0.8)
    assert down**2 * (0.5 / (1 - down)) ** 2 + up**2 == pytest.approx(0.25)
    assert ms.ancestral_step(0.8, 0.5, 0.0) == (0.5, 0.0) and ms.ancestral_step(0.8, 0.0, 1.0) == (0.0, 0.0)
    noise = _randn(3)
    torch.testing.assert_close(ms.renoise(x, down, 0.5, noise, up), (0.5 / (1 - down)) * x + noise * up)


# ---------------------------------------------------------------------------------------
# Samplers on a toy flow model


class ToyFlowNet:
    """A fixed smooth function `(x, t) -> v`, t the flow timestep sigma * 1000."""

    def __init__(self) -> None:
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 4, generator=gen) * 0.3
        self.b = torch.randn(4, generator=gen).view(1, 4, 1, 1) * 0.2

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        tt = (t.to(torch.float32) / 1000).view(-1, 1, 1, 1)
        mixed = torch.einsum("oc,bchw->bohw", self.w, x)
        return 0.9 * x + torch.tanh(mixed) * (0.5 + tt) + self.b * torch.cos(3 * tt)


def _denoiser(net: ToyFlowNet, ms: Flow = Flow()):
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        return ms.to_x0(sigma, net(ms.calculate_input(sigma, x), ms.sigma_to_t(sigma)), x)

    return denoise


def _batch_noise(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(SHAPE, generator=gen)


def _x0(den, x: Tensor, sigma: float) -> Tensor:
    return den(x, torch.full((x.shape[0],), sigma))


def test_euler_on_flow_equals_diffusers_flow_match_euler() -> None:
    net, ms = ToyFlowNet(), Flow()
    ref = _flow_scheduler(12)
    noise = _randn(1)
    sample = noise
    for t in ref.timesteps:
        sample = ref.step(net(sample, t.expand(SHAPE[0])), t, sample).prev_sample
    sigmas = get_sigmas("normal", 12, ms)
    x = ms.noise_scaling(sigmas[0], noise, torch.zeros(SHAPE))
    ours = S.sample_euler(_denoiser(net), x, sigmas, model_sampling=ms)
    torch.testing.assert_close(ours, sample, atol=ATOL, rtol=0)
    # Flow Euler, written out: prev = sample + (sigma_next - sigma) * v.
    sample = x
    for sigma, sigma_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sample = sample + (sigma_next - sigma) * net(sample, torch.full((2,), sigma * 1000))
    torch.testing.assert_close(ours, sample, atol=ATOL, rtol=0)


def _comfy_ancestral_rf(sigma: float, sigma_next: float, eta: float) -> tuple[float, float, float]:
    downstep_ratio = 1 + (sigma_next / sigma - 1) * eta
    sigma_down = sigma_next * downstep_ratio
    alpha_ip1, alpha_down = 1 - sigma_next, 1 - sigma_down
    renoise_coeff = (sigma_next**2 - sigma_down**2 * alpha_ip1**2 / alpha_down**2) ** 0.5
    return sigma_down, alpha_ip1 / alpha_down, renoise_coeff


def _comfy_euler_ancestral_rf(den, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        denoised = _x0(den, x, sig[i])
        if sig[i + 1] == 0:
            x = denoised
        else:
            sigma_down, alpha_ratio, renoise_coeff = _comfy_ancestral_rf(sig[i], sig[i + 1], eta)
            ratio = sigma_down / sig[i]
            x = ratio * x + (1 - ratio) * denoised
            if eta > 0:
                x = alpha_ratio * x + noise_sampler(sig[i], sig[i + 1]) * s_noise * renoise_coeff
    return x


def _comfy_dpm_2_ancestral_rf(den, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        denoised = _x0(den, x, sig[i])
        sigma_down, alpha_ratio, renoise_coeff = _comfy_ancestral_rf(sig[i], sig[i + 1], eta)
        d = (x - denoised) / sig[i]
        if sigma_down == 0:
            x = x + d * (sigma_down - sig[i])
        else:
            sigma_mid = math.exp(0.5 * (math.log(sig[i]) + math.log(sigma_down)))
            x_2 = x + d * (sigma_mid - sig[i])
            d_2 = (x_2 - _x0(den, x_2, sigma_mid)) / sigma_mid
            x = x + d_2 * (sigma_down - sig[i])
            x = alpha_ratio * x + noise_sampler(sig[i], sig[i + 1]) * s_noise * renoise_coeff
    return x


def _comfy_dpmpp_2s_ancestral_rf(den, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0):
    sig = sigmas.tolist()
    sigma_fn = lambda lbda: (math.exp(lbda) + 1) ** -1  # noqa: E731
    lambda_fn = lambda sigma: math.log((1 - sigma) / sigma)  # noqa: E731
    for i in range(len(sig) - 1):
        denoised = _x0(den, x, sig[i])
        sigma_down, alpha_ratio, renoise_coeff = _comfy_ancestral_rf(sig[i], sig[i + 1], eta)
        if sig[i + 1] == 0:
            x = x + (x - denoised) / sig[i] * (sigma_down - sig[i])
        else:
            if sig[i] == 1.0:
                sigma_s = 0.9999
            else:
                t_i, t_down = lambda_fn(sig[i]), lambda_fn(sigma_down)
                sigma_s = sigma_fn(t_i + 0.5 * (t_down - t_i))
            ratio = sigma_s / sig[i]
            d_i = _x0(den, ratio * x + (1 - ratio) * denoised, sigma_s)
            ratio = sigma_down / sig[i]
            x = ratio * x + (1 - ratio) * d_i
        if sig[i + 1] > 0 and eta > 0:
            x = alpha_ratio * x + noise_sampler(sig[i], sig[i + 1]) * s_noise * renoise_coeff
    return x


def _offset_first(sig: list[float], ms: Flow) -> list[float]:
    return [ms.percent_to_sigma(1e-4)] + sig[1:] if sig[0] >= 1 else sig


def _lam(sigma: float) -> float:
    return math.log((1 - sigma) / sigma)  # half-log-SNR of a flow sigma (ComfyUI: -logit)


def _comfy_dpmpp_sde_flow(den, x, sigmas, noise_sampler, ms, eta=1.0, s_noise=1.0, r=0.5):
    sig = _offset_first(sigmas.tolist(), ms)
    for i in range(len(sig) - 1):
        denoised = _x0(den, x, sig[i])
        if sig[i + 1] == 0:
            x = denoised
            continue
        lambda_s, lambda_t = _lam(sig[i]), _lam(sig[i + 1])
        h = lambda_t - lambda_s
        lambda_s_1 = lambda_s + r * h
        sigma_s_1 = 1 / (1 + math.exp(lambda_s_1))
        alpha_s, alpha_s_1, alpha_t = sig[i] * math.exp(lambda_s), sigma_s_1 * math.exp(lambda_s_1), sig[i + 1] * math.exp(lambda_t)
        sd, su = SIGMA_SPACE.ancestral_step(math.exp(-lambda_s), math.exp(-lambda_s_1), eta)
        h_ = -math.log(sd) - lambda_s
        x_2 = (alpha_s_1 / alpha_s) * math.exp(-h_) * x - alpha_s_1 * math.expm1(-h_) * denoised
        x_2 = x_2 + alpha_s_1 * noise_sampler(sig[i], sigma_s_1) * s_noise * su
        denoised_2 = _x0(den, x_2, sigma_s_1)
        sd, su = SIGMA_SPACE.ancestral_step(math.exp(-lambda_s), math.exp(-lambda_t), eta)
        h_ = -math.log(sd) - lambda_s
        denoised_d = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
        x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * denoised_d
        x = x + alpha_t * noise_sampler(sig[i], sig[i + 1]) * s_noise * su
    return x


def _comfy_dpmpp_multistep_sde_flow(den, x, sigmas, noise_sampler, ms, order, solver_type="midpoint", eta=1.0, s_noise=1.0):
    sig = _offset_first(sigmas.tolist(), ms)
    d_1 = d_2 = h = h_1 = h_2 = None
    for i in range(len(sig) - 1):
        denoised = _x0(den, x, sig[i])
        if sig[i + 1] == 0:
            x = denoised
        else:
            lambda_s, lambda_t = _lam(sig[i]), _lam(sig[i + 1])
            h = lambda_t - lambda_s
            h_eta = h * (eta + 1)
            alpha_t = sig[i + 1] * math.exp(lambda_t)
            x = sig[i + 1] / sig[i] * math.exp(-h * eta) * x + alpha_t * -math.expm1(-h_eta) * denoised
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if order == 3 and h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + (alpha_t * phi_2) * d1 - (alpha_t * (phi_2 / h_eta - 0.5)) * d2
            elif order == 3 and h_1 is not None:
                x = x + (alpha_t * phi_2) * ((denoised - d_1) / (h_1 / h))
            elif order == 2 and d_1 is not None:
                r = h_1 / h
                if solver_type == "heun":
                    x = x + alpha_t * (-math.expm1(-h_eta) / (-h_eta) + 1) * (1 / r) * (denoised - d_1)
                else:
                    x = x + 0.5 * alpha_t * -math.expm1(-h_eta) * (1 / r) * (denoised - d_1)
            x = x + noise_sampler(sig[i], sig[i + 1]) * sig[i + 1] * (-math.expm1(-2 * h * eta)) ** 0.5 * s_noise
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
    return x


def _comfy_lcm(den, x, sigmas, noise_sampler, ms):
    sig = sigmas.tolist()
    for i in range(len(sig) - 1):
        x = _x0(den, x, sig[i])
        if sig[i + 1] > 0:
            x = sig[i + 1] * noise_sampler(sig[i], sig[i + 1]) + (1 - sig[i + 1]) * x
    return x


_COMFY_FLOW = {
    "Euler a": _comfy_euler_ancestral_rf,
    "DPM2 a": _comfy_dpm_2_ancestral_rf,
    "DPM++ 2S a": _comfy_dpmpp_2s_ancestral_rf,
    "DPM++ SDE": lambda den, x, sig, ns: _comfy_dpmpp_sde_flow(den, x, sig, ns, Flow()),
    "DPM++ 2M SDE": lambda den, x, sig, ns: _comfy_dpmpp_multistep_sde_flow(den, x, sig, ns, Flow(), 2),
    "DPM++ 2M SDE Heun": lambda den, x, sig, ns: _comfy_dpmpp_multistep_sde_flow(den, x, sig, ns, Flow(), 2, "heun"),
    "DPM++ 3M SDE": lambda den, x, sig, ns: _comfy_dpmpp_multistep_sde_flow(den, x, sig, ns, Flow(), 3),
    "LCM": lambda den, x, sig, ns: _comfy_lcm(den, x, sig, ns, Flow()),
}


@pytest.mark.parametrize("name", sorted(_COMFY_FLOW))
@pytest.mark.parametrize("schedule", ["normal", "simple"])
def test_noisy_samplers_on_flow_equal_comfyui(name: str, schedule: str) -> None:
    net, ms = ToyFlowNet(), Flow()
    sigmas = get_sigmas(schedule, 8, ms)
    assert float(sigmas[0]) == 1.0  # the step from sigma 1 is where the flow forms differ most
    x = ms.noise_scaling(sigmas[0], _randn(1), torch.zeros(SHAPE))
    expected = _COMFY_FLOW[name](_denoiser(net), x, sigmas, _batch_noise(5))
    ours = S.SAMPLERS[name].function(_denoiser(net), x, sigmas, noise_sampler=_batch_noise(5), model_sampling=ms)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)
    # ...and the sigma-space step would be another sample altogether.
    if name != "LCM":
        ve = S.SAMPLERS[name].function(_denoiser(net), x, sigmas, noise_sampler=_batch_noise(5))
        assert (ve - expected).abs().max() > 1e-2


def test_ddim_eta_on_flow_is_the_rectified_flow_ancestral_step() -> None:
    net, ms = ToyFlowNet(), Flow()
    sigmas = get_sigmas("normal", 6, ms)
    x = _randn(1)
    expected = _comfy_euler_ancestral_rf(_denoiser(net), x, sigmas, _batch_noise(5), eta=0.6)
    ours = S.sample_ddim(_denoiser(net), x, sigmas, eta=0.6, noise_sampler=_batch_noise(5), model_sampling=ms)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_sigma_space_only_samplers_are_refused_on_flow() -> None:
    ms = Flow()
    sigmas = get_sigmas("normal", 4, ms)
    # Churn adds noise in sigma space.
    with pytest.raises(SdlabError, match="s_churn > 0 does not work on flow models"):
        S.sample_euler(_denoiser(ToyFlowNet()), _randn(1), sigmas, s_churn=1.0, model_sampling=ms)
    # A sampler flagged sigma-space only: one line naming those that do work.
    ve_only = dataclasses.replace(S.SAMPLERS["Euler"], name="VE only", flow=False)
    with pytest.raises(SdlabError, match=r"^sampler 'VE only' does not work on flow models \(SD3\); choose one of: DPM\+\+ 2M, "):
        S.get_sampler_sigmas(ve_only, "normal", 4, ms)
    assert S.check_sampler(ve_only, discrete(discrete_schedule(), "eps")) is ve_only
    assert S.check_sampler(ve_only, discrete_schedule()) is ve_only
    for name in S.SAMPLERS:
        assert S.check_sampler(name, ms).name == name
