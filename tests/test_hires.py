"""Hires fix: the second pass against diffusers (txt2img to latents, the web UI's interpolate,
img2img on those latents under the web UI's step rule), the size rules, the infotext and its
round trip through `sdlab generate --from`, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.hires import schedule_steps, target
from sdlab.infotext import parse_infotext
from sdlab.pipeline import GenerationRequest, Pipeline

from .tiny import as_float_array, diffusers_folder, euler_karras, save_native, tiny_bundle

PROMPT = "a red circle on a blue background"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return diffusers_folder(tmp_path_factory.mktemp("hr"), "sd1")[1]


@pytest.fixture(scope="module")
def pipe(folder):
    return Pipeline(load_bundle(folder, device="cpu"))


def test_latent_hires_matches_diffusers_txt2img_then_img2img(folder, pipe):
    """The second pass is an img2img of the interpolated first-pass latent: a schedule of
    int(3 / 0.5) = 6 steps of which the last 3 run, noise drawn from the seed at the new size."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    t2i = euler_karras(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    first = t2i(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=32, width=32,
                generator=torch.Generator("cpu").manual_seed(42), output_type="latent").images
    # The web UI's "Latent" mode: bilinear, no antialias, to the target's latent size.
    factor = pipe.bundle.config.vae.downsample_factor  # 4 for the tiny VAE
    up = torch.nn.functional.interpolate(first, size=(64 // factor, 64 // factor), mode="bilinear",
                                         antialias=False)
    i2i = euler_karras(StableDiffusionImg2ImgPipeline(**t2i.components))
    n, denoise = 3, 0.5
    total = int(n / min(denoise, 0.999))  # the web UI's rule, written out here
    assert total == 6 and int(total * denoise) == n  # diffusers runs the last int(total * strength)
    ref = i2i(PROMPT, negative_prompt="blurry", image=up, strength=denoise, num_inference_steps=total,
              guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    steps_seen = []
    res = pipe.generate(GenerationRequest(
        PROMPT, negative_prompt="blurry", steps=5, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=42,
        width=32, height=32, enable_hr=True, hr_scale=2, hr_upscaler="Latent", hr_second_pass_steps=n,
        denoising_strength=denoise), callback=lambda p: steps_seen.append((p.step, p.total)))
    assert res.images[0].size == (64, 64)
    assert np.abs(as_float_array(res.images) - ref).max() <= 1 / 255
    assert steps_seen == [(i, 8) for i in range(1, 9)]  # 5 + 3 steps, one progress bar
    info = parse_infotext(res.infotexts[0])
    assert info["Size"] == "32x32"  # the first pass's, as the web UI writes it
    assert info["Denoising strength"] == "0.5" and info["Hires upscale"] == "2" and info["Hires steps"] == "3"
    assert info["Hires upscaler"] == "Latent"
    assert "Hires sampler" not in info and "Hires schedule type" not in info
    text = res.infotexts[0]
    assert text.index("Denoising strength") < text.index("Hires upscale") < text.index("Hires steps") \
        < text.index("Hires upscaler")


@pytest.mark.parametrize("w,h,scale,rx,ry,to,trunc,size", [
    (512, 512, 2.0, 0, 0, (1024, 1024), (0, 0), (1024, 1024)),
    (512, 768, 1.5, 0, 0, (768, 1152), (0, 0), (768, 1152)),
    (512, 512, 1.3, 0, 0, (665, 665), (0, 0), (664, 664)),  # int(512 * 1.3), output a multiple of 8
    (512, 768, 2, 1024, 0, (1024, 1536), (0, 0), (1024, 1536)),  # one side 0: keep the aspect
    (512, 768, 2, 0, 1024, (682, 1024), (0, 0), (680, 1024)),
    (512, 768, 2, 1024, 1024, (1024, 1536), (0, 64), (1024, 1024)),  # both: fill, crop the centre
    (768, 512, 2, 1024, 1024, (1536, 1024), (64, 0), (1024, 1024)),
])
def test_target_size_rules(w, h, scale, rx, ry, to, trunc, size):
    t = target(w, h, scale, rx, ry)
    assert (t.upscale_to, t.truncate, t.size) == (to, trunc, size)


def test_step_rule():
    assert schedule_steps(20, 0.7) == 28  # 28-step schedule, the last 20 run
    assert schedule_steps(20, 1.0) == 20
    assert schedule_steps(10, 0) == 0


def test_resize_both_sides_crops_and_other_options_reach_the_infotext(pipe):
    req = GenerationRequest(PROMPT, steps=2, seed=3, width=32, height=16, enable_hr=True, hr_resize_x=48,
                            hr_resize_y=48, hr_upscaler="Latent (nearest-exact)", denoising_strength=0.6,
                            hr_sampler_name="DPM++ 2M", hr_scheduler="exponential", hr_prompt="a blue square",
                            hr_negative_prompt="red", hr_cfg=4.0)
    res = pipe.generate(req)
    assert res.images[0].size == (48, 48)
    info = parse_infotext(res.infotexts[0])
    assert info["Size"] == "32x16" and info["Hires resize"] == "48x48" and "Hires upscale" not in info
    assert info["Hires upscaler"] == "Latent (nearest-exact)" and info["Hires sampler"] == "DPM++ 2M"
    assert info["Hires schedule type"] == "Exponential" and info["Hires prompt"] == "a blue square"
    assert info["Hires negative prompt"] == "red" and info["Hires CFG Scale"] == "4"
    assert "Hires steps" not in info  # 0: as many as steps
    # denoising strength 0 keeps the upscaled latent
    still = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=3, width=32, height=32, enable_hr=True,
                                            hr_scale=1.5, denoising_strength=0.0))
    assert still.images[0].size == (48, 48)


def test_image_upscaler_path(pipe):
    def make(name):
        return pipe.generate(GenerationRequest(PROMPT, steps=2, seed=5, width=32, height=32, enable_hr=True,
                                               hr_upscaler=name, hr_second_pass_steps=2, denoising_strength=0.5))
    a, b, c = make("Lanczos"), make("Lanczos"), make("Nearest")
    assert a.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not np.array_equal(np.asarray(a.images[0]), np.asarray(c.images[0]))
    assert parse_infotext(a.infotexts[0])["Hires upscaler"] == "Lanczos"


@pytest.mark.parametrize("fields,words", [
    ({"hr_scale": 0}, "hires scale must be above 0"),
    ({"hr_resize_x": -8}, "must not be negative"),
    ({"hr_checkpoint_name": "other.safetensors"}, "second checkpoint"),
    ({"hr_second_pass_steps": -1}, "hires steps"),
    ({"hr_sampler_name": "nope"}, "sampler"),
    ({"hr_upscaler": "4x-nothing"}, "no upscaler named '4x-nothing'"),
])
def test_bad_hires_requests(pipe, fields, words):
    with pytest.raises(SdlabError, match=words):
        pipe.generate(GenerationRequest(PROMPT, steps=1, width=32, height=32, enable_hr=True, **fields))


def test_hires_is_refused_with_an_init_image(pipe):
    with pytest.raises(SdlabError, match="txt2img"):
        pipe.generate(GenerationRequest(PROMPT, steps=1, init_image=Image.new("RGB", (32, 32)), enable_hr=True))


def test_generate_cli_flags_and_from_replay(tmp_path):
    from sdlab.cli import main

    model = save_native(tiny_bundle("sd1"), tmp_path / "tiny.safetensors")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["generate", PROMPT, "-m", str(model), "-W", "32", "-H", "32", "--steps", "2", "--seed", "9",
          "--hires-scale", "2", "--hires-upscaler", "Latent (bicubic)", "--hires-steps", "2",
          "--hires-denoise", "0.6", "--hires-prompt", "a green square", "-o", str(a)]) == 0
    info = parse_infotext(Image.open(a).info["parameters"])
    assert Image.open(a).size == (64, 64) and info["Size"] == "32x32"
    assert info["Hires upscale"] == "2" and info["Hires upscaler"] == "Latent (bicubic)"
    assert info["Denoising strength"] == "0.6" and info["Hires prompt"] == "a green square"
    assert main(["generate", "--from", str(a), "-m", str(model), "-o", str(b)]) == 0
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert Image.open(a).info["parameters"] == Image.open(b).info["parameters"]


def test_hires_prompts_and_cfg_reach_the_second_pass(pipe, monkeypatch):
    """The second pass encodes the hires prompts over its own steps and guides with hr_cfg."""
    from sdlab.recipes import passes

    encoded, scales = [], []
    real_schedule, real_cfg = passes.prompt_schedule, passes.CFGDenoiser

    def schedule(runners, prompts, steps, *args, **kwargs):
        encoded.append((tuple(prompts), steps))
        return real_schedule(runners, prompts, steps, *args, **kwargs)

    def cfg(model, cond, uncond, scale, *args):
        scales.append(scale)
        return real_cfg(model, cond, uncond, scale, *args)

    monkeypatch.setattr(passes, "prompt_schedule", schedule)
    monkeypatch.setattr(passes, "CFGDenoiser", cfg)
    pipe.generate(GenerationRequest(PROMPT, negative_prompt="blurry", steps=2, seed=1, width=32, height=32,
                                    cfg_scale=6, enable_hr=True, hr_second_pass_steps=3, hr_prompt="a blue square",
                                    hr_negative_prompt="red", hr_cfg=3.5))
    assert encoded == [((PROMPT, "blurry"), 2), (("a blue square", "red"), 3)]
    assert scales == [6, 3.5]
