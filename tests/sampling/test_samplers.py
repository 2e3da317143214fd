"""Samplers and denoisers against diffusers' schedulers, plus analytic and reproducibility checks.

Parity tests drive a diffusers scheduler loop and our sampler with the same tiny eps-model,
the same sigmas and the same noise, and compare the final latents. diffusers' VP-space
schedulers (DPM-Solver, DDIM, UniPC, LCM) hold `x_vp = x / sqrt(sigma**2 + 1)`; both agree
at sigma = 0, where the comparison is made. Unless a test says otherwise the final latents
(of magnitude ~3) agree to float32 round-off: ATOL below.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from sdlab.errors import SdlabError
from sdlab.sampling import samplers as S
from sdlab.sampling.denoiser import CFGDenoiser, Conditioning, DiscreteDenoiser
from sdlab.sampling.schedules import DiscreteSchedule, discrete_schedule, get_sigmas

diffusers = pytest.importorskip("diffusers")

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
ATOL = 1e-5
SHAPE = (2, 4, 8, 8)


class TinyEpsNet(nn.Module):
    """A fixed random conv net `(x, t, context, y) -> eps`, smooth in t, of unit scale.

    `0.8 * x` keeps eps the size of the (VP-scaled) input, so the sampled latents stay
    O(1) and absolute tolerances mean something.
    """

    def __init__(self, in_channels: int = 4) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.t_proj = nn.Linear(8, 16)
        self.ctx_proj = nn.Linear(3, 16)
        self.conv_out = nn.Conv2d(16, 4, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        self.register_buffer("freqs", torch.tensor([1.0, 3.0, 7.0, 13.0]))

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        t = t.to(torch.float32).reshape(-1).expand(x.shape[0]) / 1000
        emb = torch.cat([torch.sin(t[:, None] * self.freqs), torch.cos(t[:, None] * self.freqs)], 1)
        h = self.conv_in(x) + self.t_proj(emb.to(x.dtype))[:, :, None, None]
        if context is not None:
            h = h + self.ctx_proj(context.mean(1))[:, :, None, None]
        out = self.conv_out(nn.functional.silu(h))
        return 0.8 * x[:, :4] + 0.3 * torch.tanh(out)


class RoundedTimesteps(nn.Module):
    """The same net called at integer timesteps, as DPMSolverMultistepScheduler does with
    Karras sigmas (it rounds its timesteps but keeps the unrounded sigmas)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, y: Tensor | None = None) -> Tensor:
        return self.net(x, t.round(), context, y)


@pytest.fixture(scope="module")
def net() -> TinyEpsNet:
    return TinyEpsNet().eval()


@pytest.fixture(scope="module")
def noise() -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))


def _scheduler(cls: type, steps: int, **config) -> object:
    scheduler = cls(**SD_BETAS, **config)
    scheduler.set_timesteps(steps)
    return scheduler


def _schedule_of(scheduler: object) -> DiscreteSchedule:
    return DiscreteSchedule.from_alphas_cumprod(scheduler.alphas_cumprod)


def _context(x: Tensor) -> Tensor:
    return torch.zeros(x.shape[0], 1, 3)


def _run_diffusers(scheduler, model: nn.Module, sample: Tensor, seed: int | None = None, **step_kwargs) -> Tensor:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    extra = {"generator": gen} if gen is not None else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(sample, t), t.expand(sample.shape[0]), _context(sample))
            sample = scheduler.step(eps, t, sample, **extra, **step_kwargs).prev_sample
    return sample


def _run_ours(sampler, model: nn.Module, schedule: DiscreteSchedule, sigmas: Tensor, x: Tensor, prediction: str = "eps", **kwargs) -> Tensor:
    denoiser = DiscreteDenoiser(model, schedule, prediction)
    cond = Conditioning(context=_context(x))
    return sampler(lambda x, sigma: denoiser(x, sigma, cond), x, sigmas, **kwargs)


def _batch_noise_sampler(seed: int, shape=SHAPE) -> S.NoiseSampler:
    # Draws the whole batch from one generator, as diffusers' `randn_tensor` does, so both
    # sides consume the same noise in the same order.
    gen = torch.Generator().manual_seed(seed)
    return lambda sigma, sigma_next: torch.randn(shape, generator=gen)


def _unique(sigmas: Tensor) -> Tensor:
    # The second-order diffusers schedulers repeat each sigma for their two stages.
    return torch.unique_consecutive(sigmas)


def _ve(noise: Tensor, sigma: Tensor) -> Tensor:
    # A VP sample `noise` at `sigma` in sigma space.
    return noise * (1 + sigma**2) ** 0.5


# ---------------------------------------------------------------------------------------
# Parity with diffusers


def test_euler_karras(net, noise) -> None:
    ref = _scheduler(diffusers.EulerDiscreteScheduler, 10, use_karras_sigmas=True, timestep_spacing="linspace")
    schedule = _schedule_of(ref)
    sigmas = get_sigmas("karras", 10, schedule)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_euler, net, schedule, sigmas, noise * sigmas[0])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_euler_churn_draws_from_the_noise_sampler(net, noise) -> None:
    # No diffusers parity here: EulerDiscreteScheduler evaluates the model before it adds
    # the churn noise, k-diffusion (Karras et al. Algorithm 2) after.
    schedule = discrete_schedule()
    sigmas = get_sigmas("karras", 6, schedule)
    calls: list[tuple[float, float]] = []

    def noise_sampler(sigma: float, sigma_next: float) -> Tensor:
        calls.append((sigma, sigma_next))
        return torch.ones(SHAPE)

    plain = _run_ours(S.sample_euler, net, schedule, sigmas, noise * sigmas[0])
    churned = _run_ours(S.sample_euler, net, schedule, sigmas, noise * sigmas[0], s_churn=1.0, noise_sampler=noise_sampler)
    assert len(calls) == 6 and calls[0] == (float(sigmas[0]), float(sigmas[1]))
    assert torch.isfinite(churned).all() and not torch.allclose(plain, churned)
    # s_tmax below every sigma: no churn at all.
    same = _run_ours(S.sample_euler, net, schedule, sigmas, noise * sigmas[0], s_churn=1.0, s_tmax=0.01)
    torch.testing.assert_close(same, plain)


def test_euler_v_prediction(net, noise) -> None:
    ref = _scheduler(diffusers.EulerDiscreteScheduler, 10, timestep_spacing="linspace", prediction_type="v_prediction")
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_euler, net, _schedule_of(ref), ref.sigmas, noise * ref.sigmas[0], prediction="v")
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_euler_ancestral(net, noise) -> None:
    ref = _scheduler(diffusers.EulerAncestralDiscreteScheduler, 10, timestep_spacing="linspace")
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma, seed=5)
    ours = _run_ours(
        S.sample_euler_ancestral, net, _schedule_of(ref), ref.sigmas, noise * ref.sigmas[0],
        noise_sampler=_batch_noise_sampler(5),
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_heun(net, noise) -> None:
    ref = _scheduler(diffusers.HeunDiscreteScheduler, 10, timestep_spacing="linspace")
    sigmas = _unique(ref.sigmas)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_heun, net, _schedule_of(ref), sigmas, noise * sigmas[0])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_heun_v_prediction_karras(net, noise) -> None:
    ref = _scheduler(
        diffusers.HeunDiscreteScheduler, 6, timestep_spacing="linspace", use_karras_sigmas=True,
        prediction_type="v_prediction",
    )
    sigmas = _unique(ref.sigmas)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_heun, net, _schedule_of(ref), sigmas, noise * sigmas[0], prediction="v")
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_lms(net, noise) -> None:
    ref = _scheduler(diffusers.LMSDiscreteScheduler, 10, timestep_spacing="linspace")
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_lms, net, _schedule_of(ref), ref.sigmas, noise * ref.sigmas[0])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpm_2(net, noise) -> None:
    ref = _scheduler(diffusers.KDPM2DiscreteScheduler, 10, timestep_spacing="linspace")
    sigmas = _unique(ref.sigmas)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(S.sample_dpm_2, net, _schedule_of(ref), sigmas, noise * sigmas[0])
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpm_2_ancestral(net, noise) -> None:
    ref = _scheduler(diffusers.KDPM2AncestralDiscreteScheduler, 10, timestep_spacing="linspace")
    sigmas = _unique(ref.sigmas)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma, seed=5)
    ours = _run_ours(
        S.sample_dpm_2_ancestral, net, _schedule_of(ref), sigmas, noise * sigmas[0],
        noise_sampler=_batch_noise_sampler(5),
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def _dpm_multistep(steps: int, **config):
    return _scheduler(
        diffusers.DPMSolverMultistepScheduler, steps, use_karras_sigmas=True, final_sigmas_type="zero", **config
    )


def test_dpmpp_2m_karras(net, noise) -> None:
    ref = _dpm_multistep(10, algorithm_type="dpmsolver++", solver_order=2)
    schedule = _schedule_of(ref)
    sigmas = get_sigmas("karras", 10, schedule)
    torch.testing.assert_close(sigmas, ref.sigmas, rtol=1e-6, atol=0)
    expected = _run_diffusers(ref, net, noise)
    ours = _run_ours(S.sample_dpmpp_2m, RoundedTimesteps(net), schedule, sigmas, _ve(noise, sigmas[0]))
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpmpp_2m_v_prediction(net, noise) -> None:
    ref = _dpm_multistep(8, algorithm_type="dpmsolver++", solver_order=2, prediction_type="v_prediction")
    expected = _run_diffusers(ref, net, noise)
    ours = _run_ours(
        S.sample_dpmpp_2m, RoundedTimesteps(net), _schedule_of(ref), ref.sigmas, _ve(noise, ref.sigmas[0]),
        prediction="v",
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpmpp_2m_sde(net, noise, solver_type: str) -> None:
    ref = _dpm_multistep(10, algorithm_type="sde-dpmsolver++", solver_order=2, solver_type=solver_type)
    expected = _run_diffusers(ref, net, noise, seed=5)
    sampler = S.sample_dpmpp_2m_sde if solver_type == "midpoint" else S.sample_dpmpp_2m_sde_heun
    ours = _run_ours(
        sampler, RoundedTimesteps(net), _schedule_of(ref), ref.sigmas, _ve(noise, ref.sigmas[0]),
        noise_sampler=_batch_noise_sampler(5),
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpmpp_3m_sde_without_noise_is_dpmpp_3m(net, noise) -> None:
    # With eta = 0 "DPM++ 3M SDE" is DPM-Solver++(3M) with the "heun" (phi_2) second-order
    # term. 15 steps: below that diffusers also drops to second order on the
    # next-to-last step, k-diffusion does not.
    ref = _dpm_multistep(15, algorithm_type="dpmsolver++", solver_order=3, solver_type="heun")
    expected = _run_diffusers(ref, net, noise)
    ours = _run_ours(
        S.sample_dpmpp_3m_sde, RoundedTimesteps(net), _schedule_of(ref), ref.sigmas, _ve(noise, ref.sigmas[0]),
        eta=0.0,
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_dpmpp_sde(net, noise) -> None:
    pytest.importorskip("torchsde")  # diffusers' DPMSolverSDEScheduler imports it
    ref = _scheduler(diffusers.DPMSolverSDEScheduler, 8, use_karras_sigmas=True)
    sigmas = _unique(ref.sigmas)
    # Replace the scheduler's Brownian tree by plain noise drawn in call order: both
    # samplers make the same 2 draws per step, so this isolates the algorithm.
    ref.noise_sampler = _batch_noise_sampler(5)
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(
        S.sample_dpmpp_sde, net, _schedule_of(ref), sigmas, noise * sigmas[0],
        noise_sampler=_batch_noise_sampler(5),
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.filterwarnings("ignore:Should have ta>=t0")  # diffusers' own tree, see brownian_tree_noise_sampler
def test_dpmpp_sde_brownian_tree(net, noise) -> None:
    pytest.importorskip("torchsde")
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    ref = _scheduler(diffusers.DPMSolverSDEScheduler, 8, use_karras_sigmas=True, noise_sampler_seed=42)
    sigmas = _unique(ref.sigmas)
    # The same tree gives the same increments for the same query times...
    theirs_ns = BrownianTreeNoiseSampler(noise, float(sigmas[-2]), float(sigmas[0]), 42)
    ours_ns = S.brownian_tree_noise_sampler(noise, sigmas, 42)
    for a, b in [(sigmas[0], sigmas[1]), (sigmas[3], sigmas[4]), (sigmas[1], torch.tensor(3.0))]:
        assert torch.equal(ours_ns(float(a), float(b)), theirs_ns(a, b))
    # ...but the query times of the substeps differ in the last float32 bit (diffusers
    # computes exp(-(-log sigma)) in float32, we in float64), and a Brownian path moves
    # ~sqrt(dt) in dt, so the full loop agrees to ~2e-4 only.
    expected = _run_diffusers(ref, net, noise * ref.init_noise_sigma)
    ours = _run_ours(
        S.sample_dpmpp_sde, net, _schedule_of(ref), sigmas, noise * sigmas[0],
        noise_sampler=S.brownian_tree_noise_sampler(noise, sigmas, 42),
    )
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim(net, noise, eta: float) -> None:
    ref = _scheduler(
        diffusers.DDIMScheduler, 10, set_alpha_to_one=True, steps_offset=1, timestep_spacing="leading", clip_sample=False
    )
    schedule = _schedule_of(ref)
    sigmas = get_sigmas("ddim_uniform", 10, schedule)  # the sigmas of DDIM's integer timesteps
    expected = _run_diffusers(ref, net, noise, seed=5, eta=eta)
    ours = _run_ours(
        S.sample_ddim, net, schedule, sigmas, _ve(noise, sigmas[0]), eta=eta, noise_sampler=_batch_noise_sampler(5)
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "steps,order,variant,final",
    [
        (10, 2, "bh2", "zero"),  # diffusers' defaults
        (3, 2, "bh2", "zero"),
        (10, 3, "bh2", "zero"),
        (10, 1, "bh2", "zero"),
        # bh1 only with a final sigma_min: diffusers' bh1 step to sigma 0 computes
        # B(h) = -inf and returns NaN (we take the first-order step there instead).
        (10, 2, "bh1", "sigma_min"),
        (10, 3, "bh1", "sigma_min"),
    ],
)
def test_unipc(net, noise, steps: int, order: int, variant: str, final: str) -> None:
    ref = _scheduler(
        diffusers.UniPCMultistepScheduler, steps, solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    # Its "linspace" timesteps are integers, so these sigmas are exactly the training
    # sigmas there and our fractional timesteps come out as the same integers.
    expected = _run_diffusers(ref, net, noise)
    if final == "sigma_min":  # diffusers' sample then sits at sigma_min in VP space
        expected = _ve(expected, ref.sigmas[-1])
    ours = _run_ours(
        S.sample_unipc, net, _schedule_of(ref), ref.sigmas, _ve(noise, ref.sigmas[0]), order=order, variant=variant
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_unipc_disable_corrector(net, noise) -> None:
    ref = _scheduler(diffusers.UniPCMultistepScheduler, 8, disable_corrector=[0, 3])
    expected = _run_diffusers(ref, net, noise)
    ours = _run_ours(
        S.sample_unipc, net, _schedule_of(ref), ref.sigmas, _ve(noise, ref.sigmas[0]), disable_corrector=(0, 3)
    )
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


def test_lcm(net, noise) -> None:
    ref = _scheduler(diffusers.LCMScheduler, 4)
    assert ref.timesteps.tolist() == [999, 759, 499, 259]
    schedule = _schedule_of(ref)
    sigmas = torch.cat([schedule.t_to_sigma(ref.timesteps.float()), torch.zeros(1)])
    expected = _run_diffusers(ref, net, noise, seed=5)
    ours = _run_ours(S.sample_lcm, net, schedule, sigmas, _ve(noise, sigmas[0]), noise_sampler=_batch_noise_sampler(5))
    # diffusers' consistency boundary condition (c_skip <= 4e-8 at t >= 259) is the only
    # difference, well inside ATOL.
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------
# Every sampler on an analytic problem


MU, S_DATA = 0.5, 0.5  # data ~ N(MU, S_DATA**2) per element


def _gaussian_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    # The exact denoiser of Gaussian data: E[x0 | x] = MU + S^2 / (S^2 + sigma^2) (x - MU).
    s2 = sigma.reshape(-1, 1, 1, 1) ** 2
    return MU + S_DATA**2 / (S_DATA**2 + s2) * (x - MU)


def _noise_for(info: S.SamplerInfo, x: Tensor, sigmas: Tensor) -> S.NoiseSampler:
    if info.brownian_noise:
        pytest.importorskip("torchsde")
        return S.brownian_tree_noise_sampler(x, sigmas, list(range(x.shape[0])))
    return S.default_noise_sampler(x, [torch.Generator().manual_seed(i) for i in range(x.shape[0])])


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler_solves_the_gaussian_problem(name: str) -> None:
    info = S.SAMPLERS[name]
    schedule = discrete_schedule()
    # Ancestral samplers need more steps than ODE solvers before their samples have the
    # data's spread (Euler a: std 0.44 at 30 steps, 0.486 at 100).
    steps = 60 if info.stochastic else 30
    sigmas = S.get_sampler_sigmas(info, "karras", steps, schedule)
    x_t = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    out = info.function(_gaussian_denoiser, x_t, sigmas, noise_sampler=_noise_for(info, x_t, sigmas))
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    if info.stochastic:
        # The samples are distributed as the data (8192 values: the std is known to ~1%).
        assert float(out.mean()) == pytest.approx(MU, abs=0.03)
        if name == "LCM":
            # Re-noising an MMSE estimate loses variance: LCM needs a consistency model,
            # whose x0 is a sample, not a mean (std 0.33 here, not a bug).
            assert 0.2 < float(out.std()) < S_DATA
        else:
            assert float(out.std()) == pytest.approx(S_DATA, abs=0.04)
    else:
        # The probability-flow ODE has a closed form: x - MU scales with sqrt(S^2 + sigma^2).
        exact = MU + (x_t - MU) * S_DATA / math.sqrt(S_DATA**2 + float(sigmas[0]) ** 2)
        # Max error over 8192 values at 30 Karras steps: Euler and DDIM 0.12 (first order);
        # Heun and DPM++ 2M 9e-3, LMS 4e-3, UniPC 5e-4, DPM2 2e-5.
        tol = 0.15 if name in ("Euler", "DDIM") else 1.5e-2
        assert float((out - exact).abs().max()) < tol


def _gaussian_flow_denoiser(x: Tensor, sigma: Tensor) -> Tensor:
    # The same data under rectified flow, x = (1 - sigma) x0 + sigma noise:
    # E[x0 | x] = MU + a S^2 / (a^2 S^2 + sigma^2) (x - a MU) with a = 1 - sigma.
    s = sigma.reshape(-1, 1, 1, 1)
    a = 1 - s
    return MU + a * S_DATA**2 / (a**2 * S_DATA**2 + s**2) * (x - a * MU)


@pytest.mark.parametrize("name", sorted(S.SAMPLERS))
def test_every_sampler_solves_the_gaussian_problem_on_flow(name: str) -> None:
    from sdlab.sampling.model_sampling import Flow

    info, ms = S.SAMPLERS[name], Flow()
    steps = 60 if info.stochastic else 30
    sigmas = S.get_sampler_sigmas(info, "karras", steps, ms)
    assert float(sigmas[0]) == 1.0  # pure noise: every flow special case at sigma 1 runs
    noise = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(3))
    x_t = ms.noise_scaling(sigmas[0], noise, torch.zeros_like(noise))
    out = info.function(_gaussian_flow_denoiser, x_t, sigmas, noise_sampler=_noise_for(info, x_t, sigmas), model_sampling=ms)
    assert out.shape == x_t.shape and torch.isfinite(out).all()
    if info.stochastic:
        assert float(out.mean()) == pytest.approx(MU, abs=0.03)
        if name == "LCM":
            assert 0.2 < float(out.std()) < S_DATA  # as in sigma space: an MMSE x0, re-noised
        else:
            assert float(out.std()) == pytest.approx(S_DATA, abs=0.04)
    else:
        # From sigma 1 the probability-flow ODE maps the noise z to MU + S z.
        # Max error at 30 Karras steps: Euler and DDIM 0.14; the others 2.5e-3 to 8.6e-3.
        tol = 0.15 if name in ("Euler", "DDIM") else 1.5e-2
        assert float((out - (MU + S_DATA * noise)).abs().max()) < tol


def test_dpmpp_sde_wants_brownian_noise() -> None:
    # Its two noise draws per step must be increments of one path: with independent draws
    # the samples come out too narrow (std 0.456 instead of 0.5 at 30 steps).
    pytest.importorskip("torchsde")
    schedule = discrete_schedule()
    sigmas = get_sigmas("karras", 30, schedule)
    x_t = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    independent = S.sample_dpmpp_sde(_gaussian_denoiser, x_t, sigmas, noise_sampler=_noise_for(S.SAMPLERS["Euler a"], x_t, sigmas))
    brownian = S.sample_dpmpp_sde(_gaussian_denoiser, x_t, sigmas, noise_sampler=_noise_for(S.SAMPLERS["DPM++ SDE"], x_t, sigmas))
    assert float(brownian.std()) == pytest.approx(S_DATA, abs=0.01)
    assert float(independent.std()) < S_DATA - 0.03


def test_second_order_samplers_beat_euler() -> None:
    schedule = discrete_schedule()
    sigmas = get_sigmas("karras", 12, schedule)
    x_t = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(3)) * sigmas[0]
    exact = MU + (x_t - MU) * S_DATA / math.sqrt(S_DATA**2 + float(sigmas[0]) ** 2)
    err = {
        name: float((S.SAMPLERS[name].function(_gaussian_denoiser, x_t, sigmas) - exact).abs().max())
        for name in ("Euler", "Heun", "DPM2", "LMS", "DPM++ 2M", "UniPC")
    }
    for name in ("Heun", "DPM2", "LMS", "DPM++ 2M", "UniPC"):
        assert err[name] < err["Euler"] / 3, err


# ---------------------------------------------------------------------------------------
# Noise and reproducibility


def _run_seeded(name: str, seeds: list[int], net: nn.Module) -> Tensor:
    schedule = discrete_schedule()
    sigmas = get_sigmas("karras", 6, schedule)
    x = torch.stack([torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(s)) for s in seeds]) * sigmas[0]
    gens = [torch.Generator().manual_seed(s + 10_000) for s in seeds]
    return _run_ours(S.SAMPLERS[name].function, net, schedule, sigmas, x, noise_sampler=S.default_noise_sampler(x, gens))


@pytest.mark.parametrize("name", ["Euler a", "DPM++ 2M SDE", "DPM++ SDE"])
def test_stochastic_samplers_are_reproducible(net, name: str) -> None:
    a = _run_seeded(name, [1, 2], net)
    b = _run_seeded(name, [1, 2], net)
    assert torch.equal(a, b)
    c = _run_seeded(name, [1, 3], net)
    # Each image depends only on its own seed: item 0 is unchanged, item 1 differs.
    assert torch.equal(a[0], c[0])
    assert not torch.allclose(a[1], c[1])


def test_default_noise_sampler() -> None:
    x = torch.zeros(3, 2, 4, 4, dtype=torch.float16)
    gens = [torch.Generator().manual_seed(s) for s in (7, 8, 9)]
    noise = S.default_noise_sampler(x, gens)(1.0, 0.5)
    assert noise.shape == x.shape and noise.dtype == torch.float16
    torch.testing.assert_close(noise[1], torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(8)).half())
    with pytest.raises(ValueError, match="one generator per batch item"):
        S.default_noise_sampler(x, gens[:2])
    single = S.default_noise_sampler(x, torch.Generator().manual_seed(7))(1.0, 0.5)
    torch.testing.assert_close(single, torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7)).half())


def test_brownian_tree_noise_sampler_is_deterministic_and_per_item() -> None:
    pytest.importorskip("torchsde")
    x = torch.zeros(2, 4, 8, 8)
    sigmas = get_sigmas("karras", 5, discrete_schedule())
    a = S.brownian_tree_noise_sampler(x, sigmas, [11, 12])
    b = S.brownian_tree_noise_sampler(x, sigmas, [11, 13])
    n_a, n_b = a(float(sigmas[0]), float(sigmas[1])), b(float(sigmas[0]), float(sigmas[1]))
    assert n_a.shape == x.shape
    assert torch.equal(n_a[0], n_b[0]) and not torch.allclose(n_a[1], n_b[1])
    assert torch.equal(n_a, S.brownian_tree_noise_sampler(x, sigmas, [11, 12])(float(sigmas[0]), float(sigmas[1])))
    # Normalised increments: unit variance.
    assert float(n_a.std()) == pytest.approx(1.0, abs=0.15)


# ---------------------------------------------------------------------------------------
# Callback


def test_callback_every_step_and_cancellation() -> None:
    sigmas = get_sigmas("karras", 5, discrete_schedule())
    x = torch.randn(1, 4, 4, 4) * sigmas[0]
    for info in S.SAMPLERS.values():
        seen: list[tuple[int, int]] = []
        info.function(_gaussian_denoiser, x, sigmas, callback=lambda i, n, x, d: seen.append((i, n)))
        assert seen == [(i, 5) for i in range(5)], info.name

    class Cancelled(Exception):
        pass

    def cancel(i: int, n: int, x: Tensor, denoised: Tensor) -> None:
        if i == 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        S.sample_dpmpp_2m(_gaussian_denoiser, x, sigmas, callback=cancel)


# ---------------------------------------------------------------------------------------
# Registry


def test_registry() -> None:
    assert list(S.SAMPLERS) == [
        "DPM++ 2M", "DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE",
        "Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DDIM", "UniPC", "LCM",
    ]
    for info in S.SAMPLERS.values():
        assert info.function.__doc__ and info.function.__name__.startswith("sample_")
    assert S.SAMPLERS["DPM2"].discard_next_to_last_sigma
    assert S.SAMPLERS["Heun"].second_order and not S.SAMPLERS["Heun"].stochastic
    assert S.SAMPLERS["DPM++ 2M SDE"].brownian_noise
    # `default_eta` says whether the function takes `eta`, and with what default.
    import inspect

    for info in S.SAMPLERS.values():
        params = inspect.signature(info.function).parameters
        if info.default_eta is None:
            assert "eta" not in params, info.name
        else:
            assert params["eta"].default == info.default_eta, info.name


def test_resolve_sampler_names_and_aliases() -> None:
    assert S.resolve_sampler("Euler a") is S.SAMPLERS["Euler a"]
    assert S.resolve_sampler("euler A").name == "Euler a"
    assert S.resolve_sampler("k_euler_a").name == "Euler a"
    assert S.resolve_sampler("k_dpmpp_2m").name == "DPM++ 2M"
    assert S.resolve_sampler("DPM++ 2M SDE Heun").default_schedule == "exponential"


@pytest.mark.parametrize(
    "old,sampler,schedule",
    [
        ("DPM++ 2M Karras", "DPM++ 2M", "karras"),
        ("DPM++ SDE Karras", "DPM++ SDE", "karras"),
        ("DPM++ 2M SDE Exponential", "DPM++ 2M SDE", "exponential"),
        ("DPM++ 2M SDE Heun Karras", "DPM++ 2M SDE Heun", "karras"),
        ("DPM++ 3M SDE Karras", "DPM++ 3M SDE", "karras"),
        ("LMS Karras", "LMS", "karras"),
        ("Euler SGM Uniform", "Euler", "sgm_uniform"),
        ("Euler a sgm_uniform", "Euler a", "sgm_uniform"),
        ("k_dpmpp_2m_ka", "DPM++ 2M", "karras"),
        ("k_dpm_2_a_ka", "DPM2 a", "karras"),
        ("k_dpmpp_3m_sde_exp", "DPM++ 3M SDE", "exponential"),
    ],
)
def test_resolve_sampler_old_combined_names(old: str, sampler: str, schedule: str) -> None:
    info = S.resolve_sampler(old)
    assert info.name == sampler and info.default_schedule == schedule
    assert info.function is S.SAMPLERS[sampler].function


def test_unknown_sampler_lists_the_valid_ones() -> None:
    with pytest.raises(SdlabError, match="unknown sampler 'Euler b'.*DPM\\+\\+ 2M.*Euler a.*UniPC"):
        S.resolve_sampler("Euler b")
    with pytest.raises(SdlabError, match="unknown sampler"):
        S.resolve_sampler("Euler Cosine")


def test_get_sampler_sigmas() -> None:
    schedule = discrete_schedule()
    # "Automatic" is the sampler's own default (A1111 >= 1.9), or k-diffusion's spacing.
    torch.testing.assert_close(S.get_sampler_sigmas("DPM++ 2M", "Automatic", 10, schedule), get_sigmas("karras", 10, schedule))
    torch.testing.assert_close(S.get_sampler_sigmas("Euler", "automatic", 10, schedule), get_sigmas("automatic", 10, schedule))
    torch.testing.assert_close(S.get_sampler_sigmas("DPM++ 2M", "Exponential", 10, schedule), get_sigmas("exponential", 10, schedule))
    torch.testing.assert_close(
        S.get_sampler_sigmas("DPM++ 2M SDE Exponential", "automatic", 10, schedule), get_sigmas("exponential", 10, schedule)
    )
    torch.testing.assert_close(S.get_sampler_sigmas("LCM", "automatic", 4, schedule), get_sigmas("sgm_uniform", 4, schedule))
    # DPM2 drops the next-to-last sigma of a schedule one step longer (A1111).
    longer = get_sigmas("karras", 11, schedule)
    dpm2 = S.get_sampler_sigmas("DPM2", "automatic", 10, schedule)
    assert len(dpm2) == 11
    torch.testing.assert_close(dpm2, torch.cat([longer[:-2], longer[-1:]]))


# ---------------------------------------------------------------------------------------
# Denoisers


def test_discrete_denoiser_eps_and_v(net) -> None:
    schedule = discrete_schedule()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 3
    sigma = torch.tensor([3.0, 0.5])
    ctx = torch.randn(2, 5, 3)
    t = schedule.sigma_to_t(sigma)
    c_in = (sigma**2 + 1).rsqrt().view(-1, 1, 1, 1)
    out = net(x * c_in, t, ctx)
    s = sigma.view(-1, 1, 1, 1)
    eps = DiscreteDenoiser(net, schedule, "eps")(x, sigma, Conditioning(ctx))
    torch.testing.assert_close(eps, x - s * out)
    v = DiscreteDenoiser(net, schedule, "v")(x, sigma, Conditioning(ctx))
    torch.testing.assert_close(v, x / (s**2 + 1) - s / (s**2 + 1).sqrt() * out)


def test_discrete_denoiser_concat_and_dtype() -> None:
    seen = {}

    class Inpaint(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = TinyEpsNet(in_channels=9).to(torch.float64)

        def forward(self, x, t, context, y=None):
            seen.update(x=x, t=t, context=context, y=y)
            return self.net(x, t, context)

    schedule = discrete_schedule()
    model = Inpaint()
    x = torch.randn(2, 4, 8, 8)
    concat = torch.randn(2, 5, 8, 8)
    y = torch.randn(2, 6)
    out = DiscreteDenoiser(model, schedule)(x, torch.tensor([2.0, 2.0]), Conditioning(torch.randn(2, 3, 3), y=y, concat=concat))
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert seen["x"].dtype == torch.float64 and seen["x"].shape == (2, 9, 8, 8)
    assert seen["context"].dtype == torch.float64 and seen["y"].dtype == torch.float64
    assert seen["t"].dtype == torch.float32
    # The noisy latent is scaled by c_in, the extra channels are passed as they are.
    torch.testing.assert_close(seen["x"][:, :4].float(), x / math.sqrt(5))
    torch.testing.assert_close(seen["x"][:, 4:].float(), concat)


class _Recorder:
    def __init__(self, denoiser) -> None:
        self.denoiser, self.batches = denoiser, []
        self.prediction = denoiser.prediction

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        return self.denoiser(x, sigma, cond)


def test_cfg_batches_cond_and_uncond(net) -> None:
    schedule = discrete_schedule()
    inner = _Recorder(DiscreteDenoiser(net, schedule))
    cond, uncond = Conditioning(torch.randn(2, 4, 3)), Conditioning(torch.randn(2, 4, 3))
    x, sigma = torch.randn(2, 4, 8, 8) * 5, torch.full((2,), 5.0)
    out = CFGDenoiser(inner, cond, uncond, scale=7.5)(x, sigma)
    assert inner.batches == [4]
    x0_c, x0_u = inner.denoiser(x, sigma, cond), inner.denoiser(x, sigma, uncond)
    torch.testing.assert_close(out, x0_u + 7.5 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)
    # Scale 1 skips the unconditional pass (Turbo models), and needs no uncond.
    inner.batches.clear()
    torch.testing.assert_close(CFGDenoiser(inner, cond, None, scale=1.0)(x, sigma), x0_c)
    assert inner.batches == [2]
    with pytest.raises(ValueError, match="pad the shorter prompt"):
        CFGDenoiser(inner, cond, Conditioning(torch.randn(2, 8, 3)), scale=5.0)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_cfg_rescale_matches_diffusers(net, prediction: str) -> None:
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    schedule = discrete_schedule()
    cond, uncond = Conditioning(torch.randn(2, 4, 3)), Conditioning(torch.randn(2, 4, 3))
    x, sigma = torch.randn(2, 4, 8, 8) * 2, torch.tensor([2.0, 2.0])
    out = CFGDenoiser(DiscreteDenoiser(net, schedule, prediction), cond, uncond, scale=6.0, rescale=0.7)(x, sigma)
    # diffusers guides and rescales the UNet output (eps or v), then the scheduler turns it into x0.
    x_in, t = x / math.sqrt(5), schedule.sigma_to_t(sigma)
    out_c, out_u = net(x_in, t, cond.context), net(x_in, t, uncond.context)
    guided = rescale_noise_cfg(out_u + 6.0 * (out_c - out_u), out_c, guidance_rescale=0.7)
    if prediction == "eps":
        expected = x - 2.0 * guided
    else:
        expected = x / 5 - 2.0 / math.sqrt(5) * guided
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_v_prediction_zero_terminal_snr_is_finite(net) -> None:
    # The ZTSNR schedule starts at sigma ~4519: the sampler must stay finite.
    schedule = discrete_schedule(zero_terminal_snr=True)
    sigmas = get_sigmas("sgm_uniform", 4, schedule)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)) * sigmas[0]
    out = _run_ours(S.sample_euler, net, schedule, sigmas, x, prediction="v")
    assert torch.isfinite(out).all() and float(out.abs().max()) < 10
