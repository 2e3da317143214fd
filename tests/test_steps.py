"""The generation steps on their own: noise sources, patches, the model adapter, encode/decode,
noising, and the web UI recipe's prompt editing as sigma ranges."""

from __future__ import annotations

import pytest
import torch

from sdlab import steps
from sdlab.families import FAMILIES
from sdlab.model import SizeConditioning, UNetModel, unet_model
from sdlab.pipeline import GenerationRequest, Pipeline
from sdlab.request import validate
from sdlab.sampling.denoiser import Conditioning, DiscreteDenoiser
from sdlab.sampling.model_sampling import Flow
from sdlab.sampling.noise import BatchNoise, PerImageNoise
from sdlab.sampling.patches import by_sigma, inpaint_mask
from sdlab.sampling.rng import ImageRNG
from sdlab.sampling.samplers import resolve_sampler
from sdlab.sampling.schedules import discrete_schedule

from .tiny import tiny_bundle

SHAPE = (4, 8, 8)


def test_per_image_noise_is_the_web_uis():
    """Image i depends on its own seed only; the VAE's draw comes first from image 0's generator,
    then the initial noise, as diffusers orders them."""
    noise = PerImageNoise(SHAPE, [10, 11])
    encoding = noise.for_encoding((1, *SHAPE))
    initial = noise.initial()
    rng = ImageRNG(SHAPE, [10, 11])
    torch.testing.assert_close(encoding, rng.draw(rng.generators[0], (1, *SHAPE)), rtol=0, atol=0)
    torch.testing.assert_close(initial, rng.first(), rtol=0, atol=0)
    alone = PerImageNoise(SHAPE, [11]).initial()
    torch.testing.assert_close(initial[1], alone[0], rtol=0, atol=0)
    x = torch.zeros(2, *SHAPE)
    draw = noise.sampler_noise(x, torch.tensor([2.0, 1.0, 0.0]), brownian=False)
    torch.testing.assert_close(draw(2.0, 1.0), rng.next(), rtol=0, atol=0)


def test_batch_noise_is_comfyuis():
    """ComfyUI's `prepare_noise`: the whole batch from one CPU generator seeded with the seed;
    its samplers' noise from another generator with the same seed."""
    noise = BatchNoise((2, *SHAPE), seed=5)
    expected = torch.randn((2, *SHAPE), generator=torch.Generator("cpu").manual_seed(5))
    torch.testing.assert_close(noise.initial(), expected, rtol=0, atol=0)
    torch.testing.assert_close(noise.initial(), expected, rtol=0, atol=0)  # a value: the same every time
    draw = noise.sampler_noise(torch.zeros(2, *SHAPE), torch.tensor([2.0, 0.0]), brownian=False)
    torch.testing.assert_close(draw(2.0, 0.0), expected, rtol=0, atol=0)


def test_by_sigma_and_inpaint_mask():
    first, second = (lambda x, s: torch.full_like(x, 1.0)), (lambda x, s: torch.full_like(x, 2.0))
    picked = by_sigma([(3.0, first), (float("-inf"), second)])
    x = torch.zeros(1, *SHAPE)
    assert float(picked(x, torch.tensor([5.0])).mean()) == 1.0
    assert float(picked(x, torch.tensor([3.0])).mean()) == 2.0  # at the bound: the next stretch
    assert by_sigma([(0.0, first)]) is first
    latent, mask = torch.full((1, *SHAPE), 7.0), torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1
    out = inpaint_mask(second, latent, mask)(x, torch.tensor([1.0]))
    assert torch.all(out[..., :4] == 2.0) and torch.all(out[..., 4:] == 7.0)


def test_noised_by_model_sampling():
    noise, latent = torch.randn(1, *SHAPE), torch.randn(1, *SHAPE)
    eps = unet_model(tiny_bundle("sd1")).sampling
    sigma = torch.tensor(2.5)
    torch.testing.assert_close(steps.noised(eps, sigma, noise, latent), latent + noise * sigma, rtol=0, atol=0)
    torch.testing.assert_close(steps.noised(eps, sigma, noise), noise * sigma, rtol=0, atol=0)
    flow = Flow(shift=3.0)
    s = torch.tensor(0.25)
    torch.testing.assert_close(steps.noised(flow, s, noise, latent), s * noise + (1 - s) * latent)


def test_unet_adapter_is_the_discrete_denoiser_with_sdxl_y():
    bundle = tiny_bundle("sdxl")
    model = unet_model(bundle)
    encoded = type("Encoded", (), {"context": torch.randn(1, 77, 128), "pooled": torch.randn(1, 64)})()
    sizes = SizeConditioning((64, 64), (0, 0), (64, 64))
    cond = model.conditioning(encoded, 2, sizes, negative=False)
    assert cond.context.shape == (2, 77, 128) and cond.y.shape == (2, 64 + 6 * 256)
    x, sigma = torch.randn(2, *SHAPE), torch.tensor([3.0, 3.0])
    reference = DiscreteDenoiser(bundle.unet, discrete_schedule(), "eps", dtype=torch.float32)
    torch.testing.assert_close(model(x, sigma, cond), reference(x, sigma, cond), rtol=0, atol=0)


def test_encode_and_decode_in_the_familys_latent_space():
    """(z - shift) * scale and back: a family with a latent shift (SD3's kind) round-trips."""
    from dataclasses import replace

    bundle = tiny_bundle("sd1")
    family = replace(FAMILIES["sd1"], latent_scale=1.5, latent_shift=0.25)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    noise = PerImageNoise((4, 4, 4), [1])
    z = steps.encode_image(bundle.vae, pixels, family, noise)
    with torch.no_grad():
        dist = bundle.vae.encode(pixels)
    eps = PerImageNoise((4, 4, 4), [1]).for_encoding(tuple(dist.mean.shape))
    torch.testing.assert_close(z, (dist.mean + dist.std * eps - 0.25) * 1.5)
    with torch.no_grad():
        expected = bundle.vae.decode(z / 1.5 + 0.25)
    torch.testing.assert_close(steps.decode(bundle.vae, z, family), expected)


def test_sample_refuses_what_the_model_cannot_run():
    from sdlab.errors import SdlabError
    from sdlab.sampling.samplers import SAMPLERS

    flow = Flow()
    flow_only = [info for info in SAMPLERS.values() if info.flow]
    assert flow_only, "some sampler runs on flow models"
    refused = next((info for info in SAMPLERS.values() if not info.flow), None)
    if refused is not None:
        with pytest.raises(SdlabError, match="flow"):
            steps.sample(flow, lambda x, s: x, torch.zeros(1, *SHAPE), torch.tensor([1.0, 0.0]), refused, None)
    x = steps.sample(flow, lambda x, s: torch.zeros_like(x), torch.ones(1, *SHAPE), torch.tensor([1.0, 0.0]),
                     resolve_sampler("Euler"), None)
    torch.testing.assert_close(x, torch.zeros(1, *SHAPE))  # one Euler step to sigma 0 lands on x0


def test_prompt_editing_becomes_sigma_ranges(monkeypatch):
    """"[red:blue:2]" over 4 Euler steps: the first prompt for steps 0..2 (sigma above the 4th
    sigma), then the second; img2img counts the requested steps, so it switches earlier in its own."""
    from sdlab.recipes import passes

    seen = []

    class Recorder:
        def __init__(self, model, cond, uncond, scale, rescale):
            self.cond = cond

        def __call__(self, x, sigma):
            seen.append(self.cond.context)
            return x

    monkeypatch.setattr(passes, "CFGDenoiser", Recorder)
    pipe = Pipeline(tiny_bundle("sd1"))
    req = validate(GenerationRequest("a [red:blue:2] circle", steps=4, seed=1, width=32, height=32,
                                     sampler="Euler"), 32)
    sampler = resolve_sampler("Euler")
    run = passes.prepare(pipe, req, req.prompt, "", sampler, "karras", [[{}], []])
    positive = run.base.prompts[0]
    red, blue = positive.at(0).context, positive.at(4).context
    guide = passes.guided(run.base, run, None, run.sigmas, offset=0)
    x = torch.zeros(1, 4, 4, 4)
    for sigma in run.sigmas[:-1]:
        guide(x, sigma.reshape(1))
    expected = [red, red, red, blue]
    assert len(seen) == 4 and all(torch.equal(a, b.expand_as(a)) for a, b in zip(seen, expected))
    seen.clear()
    # img2img at strength 0.5 walks the last 2 sigmas as steps 2 and 3 of the 4 requested.
    guide = passes.guided(run.base, run, None, run.sigmas[-3:], offset=2)
    for sigma in run.sigmas[-3:-1]:
        guide(x, sigma.reshape(1))
    assert torch.equal(seen[0], red.expand_as(seen[0])) and torch.equal(seen[1], blue.expand_as(seen[1]))
    assert isinstance(run.base.model, UNetModel) and isinstance(run.base.model.sampling.sigmas, torch.Tensor)
    assert Conditioning  # the net-level conditioning the adapter builds
