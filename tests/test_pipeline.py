"""Whole-pipeline parity with diffusers on tiny random models, reproducibility,
infotext, and bad input."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.infotext import create_infotext, parse_infotext
from sdlab.pipeline import GenerationRequest, Interrupted, Pipeline

from .tiny import as_float_array, diffusers_folder, euler_karras, save_native, tiny_bundle

SIZE = 64
PROMPT = "a red circle on a blue background"


def _init_image():
    g = np.random.default_rng(0)
    return Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("family", ["sd1", "sd2-v"])
def test_txt2img_matches_diffusers(tmp_path, family):
    from diffusers import StableDiffusionPipeline

    _, folder = diffusers_folder(tmp_path, family)
    theirs = euler_karras(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    ref = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=5, guidance_scale=7.5, height=SIZE,
                 width=SIZE, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    ours = Pipeline(load_bundle(folder, device="cpu")).txt2img(
        PROMPT, negative_prompt="blurry", steps=5, sampler="Euler", schedule="karras", cfg_scale=7.5,
        seed=42, width=SIZE, height=SIZE)
    diff = np.abs(as_float_array(ours) - ref).max()
    assert diff <= 1 / 255, diff


def test_euler_ancestral_batch_matches_diffusers_per_seed(tmp_path):
    """Stochastic sampler: our image i uses seed + i, like the web UIs; each equals
    diffusers run with that seed alone."""
    from diffusers import EulerAncestralDiscreteScheduler, StableDiffusionPipeline

    _, folder = diffusers_folder(tmp_path, "sd1")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs.scheduler = EulerAncestralDiscreteScheduler.from_config(theirs.scheduler.config, timestep_spacing="linspace")
    pipe = Pipeline(load_bundle(folder, device="cpu"))
    ours = pipe.txt2img(PROMPT, steps=4, sampler="Euler a", schedule="automatic", cfg_scale=5, seed=7,
                        width=SIZE, height=SIZE, batch_size=2)
    for i, img in enumerate(ours):
        ref = theirs(PROMPT, num_inference_steps=4, guidance_scale=5, height=SIZE, width=SIZE,
                     generator=torch.Generator("cpu").manual_seed(7 + i), output_type="np").images
        assert np.abs(as_float_array([img]) - ref).max() <= 1 / 255


def test_img2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline

    _, folder = diffusers_folder(tmp_path, "sd1")
    theirs = euler_karras(StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None))
    init = _init_image()
    ref = theirs(PROMPT, image=init, strength=0.6, num_inference_steps=5, guidance_scale=7.5,
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    ours = Pipeline(load_bundle(folder, device="cpu")).img2img(
        init, PROMPT, steps=5, denoising_strength=0.6, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=3)
    assert np.abs(as_float_array(ours) - ref).max() <= 1 / 255


def test_inpaint_9ch_matches_diffusers_and_keeps_unmasked_pixels(tmp_path):
    from diffusers import StableDiffusionInpaintPipeline

    _, folder = diffusers_folder(tmp_path, "sd1-inpaint")
    theirs = euler_karras(StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None))
    init = _init_image()
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (16, 16, 48, 40))
    ref = theirs(PROMPT, image=init, mask_image=mask, strength=1.0, num_inference_steps=5, guidance_scale=7.5,
                 height=SIZE, width=SIZE, generator=torch.Generator("cpu").manual_seed(5), output_type="np").images
    ours = Pipeline(load_bundle(folder, device="cpu")).inpaint(
        init, mask, PROMPT, steps=5, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=5, mask_blur=0)
    keep = np.asarray(mask)[None, :, :, None] < 128
    # Inside the mask: what the model painted, as diffusers paints it.
    assert np.abs(as_float_array(ours) - ref)[np.broadcast_to(~keep, ref.shape)].max() <= 1 / 255
    # Outside: the original pixels, unchanged.
    assert np.array_equal(np.asarray(ours[0])[keep[0, :, :, 0]], np.asarray(init)[keep[0, :, :, 0]])


def test_inpaint_ordinary_unet_keeps_unmasked_pixels(tmp_path):
    pipe = Pipeline(tiny_bundle("sd1"))
    init = _init_image()
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 40, 40))
    out = pipe.inpaint(init, mask, PROMPT, steps=3, seed=1, mask_blur=0, width=SIZE, height=SIZE)[0]
    keep = np.asarray(mask) == 0
    assert np.array_equal(np.asarray(out)[keep], np.asarray(init)[keep])
    assert not np.array_equal(np.asarray(out)[~keep], np.asarray(init)[~keep])
    only = pipe.inpaint(init, mask, PROMPT, steps=3, seed=1, mask_blur=2, width=32, height=32,
                        inpaint_full_res=True, inpaint_full_res_padding=4)[0]
    assert only.size == init.size
    far = np.zeros_like(keep)
    far[50:, 50:] = True
    assert np.array_equal(np.asarray(only)[far], np.asarray(init)[far])


# ------------------------------------------------------------ reproducibility


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    return save_native(tiny_bundle("sd1"), path)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "sdlab", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_generate_cli_is_reproducible_and_from_png(tmp_path, tiny_file):
    args = ["generate", "a (red:1.3) circle, [square:triangle:2]", "-m", str(tiny_file), "-W", "64", "-H", "64",
            "--steps", "4", "--seed", "11", "--sampler", "DPM++ 2M SDE"]
    r1 = _cli(*args, "-o", str(tmp_path / "a.png"))
    assert r1.returncode == 0, r1.stderr
    assert "step" in r1.stderr  # the progress bar
    r2 = _cli(*args, "-o", str(tmp_path / "b.png"))
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    r3 = _cli("generate", "--from", str(tmp_path / "a.png"), "-m", str(tiny_file), "-o", str(tmp_path / "c.png"))
    assert r3.returncode == 0, r3.stderr
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "c.png").read_bytes()
    info = parse_infotext(Image.open(tmp_path / "a.png").info["parameters"])
    assert info["Seed"] == "11" and info["Sampler"] == "DPM++ 2M SDE" and info["Size"] == "64x64"
    assert info["RNG"] == "CPU"


def test_batch_and_count_use_consecutive_seeds(tiny_file):
    pipe = Pipeline(load_bundle(tiny_file, device="cpu"))
    res = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=100, batch_size=2, n_iter=2, width=32, height=32))
    assert res.seeds == [100, 101, 102, 103] and len(res.images) == 4
    alone = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=102, width=32, height=32))
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(res.images[2]))


def test_nv_rng_and_variation_seed_change_the_image(tiny_file):
    pipe = Pipeline(load_bundle(tiny_file, device="cpu"))
    base = np.asarray(pipe.txt2img(PROMPT, steps=2, seed=1, width=32, height=32)[0])
    nv = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=1, width=32, height=32, rng="nv"))
    assert "RNG: NV" in nv.infotexts[0]
    assert not np.array_equal(base, np.asarray(nv.images[0]))
    var = pipe.generate(GenerationRequest(PROMPT, steps=2, seed=1, width=32, height=32, subseed=5,
                                          subseed_strength=0.3))
    assert "Variation seed: 5" in var.infotexts[0]
    assert not np.array_equal(base, np.asarray(var.images[0]))


def test_zero_terminal_snr_sampling(tiny_file, monkeypatch):
    """A model marked as trained on the zero-terminal-SNR schedule (Family.zero_terminal_snr) is
    sampled on it, from sigma ~4519, with the web UI's infotext entry; a request can turn it on or
    off; `--from` / the API's infotext read the entry back."""
    import sdlab.recipes.passes as pipeline_module
    from sdlab.generate_cli import request_fields_from_infotext
    from sdlab.sampling.schedules import discrete_schedule

    bundle = load_bundle(tiny_file, device="cpu")
    pipe = Pipeline(bundle)
    seen = []
    sigmas_of = pipeline_module.get_sampler_sigmas
    monkeypatch.setattr(pipeline_module, "get_sampler_sigmas",
                        lambda *a: seen.append(sigmas_of(*a)) or seen[-1])
    req = dict(prompt=PROMPT, steps=3, seed=1, width=32, height=32, sampler="Euler")
    plain = pipe.generate(GenerationRequest(**req))
    forced = pipe.generate(GenerationRequest(**req, zero_terminal_snr=True))
    ztsnr_max = float(discrete_schedule(zero_terminal_snr=True).sigmas[-1])
    assert 4500 < ztsnr_max < 4540
    assert seen[0][0] == pytest.approx(float(discrete_schedule().sigmas[-1]), rel=1e-5)
    assert seen[1][0] == pytest.approx(ztsnr_max, rel=1e-5)
    assert "Noise Schedule" not in plain.infotexts[0]
    assert "Noise Schedule: Zero Terminal SNR" in forced.infotexts[0]
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(forced.images[0]))

    bundle.config = replace(bundle.config, family=replace(bundle.family, zero_terminal_snr=True))
    marked = pipe.generate(GenerationRequest(**req))
    assert np.array_equal(np.asarray(marked.images[0]), np.asarray(forced.images[0]))
    assert np.array_equal(np.asarray(pipe.generate(GenerationRequest(**req, zero_terminal_snr=False)).images[0]),
                          np.asarray(plain.images[0]))
    assert request_fields_from_infotext(forced.infotexts[0])["zero_terminal_snr"] is True
    assert "zero_terminal_snr" not in request_fields_from_infotext(plain.infotexts[0])


def test_interrupt_returns_partial_result(tiny_file):
    pipe = Pipeline(load_bundle(tiny_file, device="cpu"))

    def stop_at_two(p):
        if p.step == 2:
            raise Interrupted

    res = pipe.generate(GenerationRequest(PROMPT, steps=10, seed=1, width=32, height=32), stop_at_two)
    assert res.interrupted and len(res.images) == 1
    # Steps names the schedule; the infotext says the image stopped part-way along it
    params = parse_infotext(res.infotexts[0])
    assert params["Steps"] == "10" and params["Interrupted at step"] == "2/10"
    assert res.images[0].info["parameters"] == res.infotexts[0]


def test_infotext_round_trip():
    text = create_infotext("a, b: c", "ugly", {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras",
                                                "CFG scale": 7.0, "Seed": 1, "Size": "512x768",
                                                "Model": "my, model", "Clip skip": 2})
    assert text.splitlines()[2].startswith("Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1")
    back = parse_infotext(text)
    assert back["Prompt"] == "a, b: c" and back["Negative prompt"] == "ugly"
    assert back["Model"] == "my, model" and back["Size-1"] == "512" and back["Size-2"] == "768"


# ------------------------------------------------------------ bad input


@pytest.mark.parametrize("args, words", [
    (["--sampler", "Eulerr"], "unknown sampler"),
    (["--schedule", "karass"], "unknown schedule"),
    (["-W", "100"], "multiple of 8"),
    (["--steps", "0"], "steps must be at least 1"),
])
def test_generate_bad_input(tmp_path, tiny_file, args, words, capsys):
    # In this process, through the CLI's main() (`python -m sdlab` is tested above): seconds faster.
    from sdlab.cli import main as cli_main

    code = cli_main(["generate", "x", "-m", str(tiny_file), *args, "-o", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and words in err, err


def test_img2img_bad_input(tmp_path, tiny_file, capsys):
    from sdlab.cli import main as cli_main

    (tmp_path / "broken.png").write_bytes(b"not a png")
    _init_image().save(tmp_path / "init.png")
    cases = [
        (["img2img", "x", "--init", str(tmp_path / "broken.png")], "cannot read"),
        (["img2img", "x", "--init", str(tmp_path / "init.png"), "--strength", "1.5"], "between 0 and 1"),
    ]
    for args, words in cases:
        code = cli_main([*args, "-m", str(tiny_file), "-o", str(tmp_path / "o.png")])
        err = capsys.readouterr().err
        assert code != 0 and "Traceback" not in err, err
        assert words in err, err


def test_a_mask_of_another_size_is_resized_to_the_image():
    """As the web UI does (painting tools and clients draw masks at another scale): the image is
    the one the mask resized beforehand gives, and the pixels outside it are the init image's."""
    pipe = Pipeline(tiny_bundle("sd1"))
    init = _init_image()
    small = np.zeros((SIZE // 2, SIZE // 2), np.uint8)
    small[8:24, 4:20] = 255
    small_mask = Image.fromarray(small)
    resized = small_mask.resize(init.size, Image.LANCZOS)
    params = {"steps": 2, "seed": 1, "mask_blur": 0}
    got = np.asarray(pipe.inpaint(init, small_mask, PROMPT, **params)[0])
    want = np.asarray(pipe.inpaint(init, resized, PROMPT, **params)[0])
    assert got.shape == (SIZE, SIZE, 3) and np.array_equal(got, want)
    outside = np.asarray(resized) == 0
    assert np.array_equal(got[outside], np.asarray(init)[outside]) and not np.array_equal(got, np.asarray(init))


def test_pipeline_rejects_bad_requests():
    pipe = Pipeline(tiny_bundle("sd1"))
    with pytest.raises(SdlabError, match="choose one of"):
        pipe.txt2img("x", sampler="nope", steps=1, width=32, height=32)
