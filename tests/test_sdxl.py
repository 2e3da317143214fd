"""SDXL: loading both ways, txt2img against StableDiffusionXLPipeline, the refiner in
img2img against StableDiffusionXLImg2ImgPipeline, and the base+refiner switch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.loader import load_bundle
from sdlab.pipeline import GenerationRequest, Pipeline

from .checkpoints.test_loading import _assert_close
from .tiny import as_float_array, diffusers_folder, euler_karras, save_native, tiny_bundle

SIZE = 64
PROMPT = "a red circle on a blue background"


def _text_outputs(bundle):
    tokens = bundle.tokenizers[-1](["a red circle, on a blue background"])
    with torch.no_grad():
        return {f"te{i}": te(tokens, skip=2, final_norm=False).hidden for i, te in enumerate(bundle.text_encoders)} | \
            {"pooled": bundle.text_encoders[-1](tokens).pooled}


@pytest.mark.parametrize("family", ["sdxl", "sdxl-inpaint", "sdxl-refiner"])
def test_sdxl_single_file_and_folder_round_trip(tmp_path, family):
    ref, folder = diffusers_folder(tmp_path, family)
    single = load_bundle(save_native(ref, tmp_path / "m.safetensors"), device="cpu")
    assert single.family.name == family
    assert single.config.unet == ref.config.unet and single.config.text_encoders == ref.config.text_encoders
    back = load_bundle(folder, device="cpu")
    assert back.family.name == family and back.family.latent_scale == 0.13025
    _assert_close(_text_outputs(ref), _text_outputs(back), atol=1e-6)


def test_sdxl_text_encoders_match_transformers(tmp_path):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    ref, folder = diffusers_folder(tmp_path, "sdxl")
    te1 = CLIPTextModel.from_pretrained(folder / "text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    tokens = ref.tokenizers[1](["a red circle, on a blue background"])
    with torch.no_grad():
        theirs = {"te0": te1(tokens, output_hidden_states=True).hidden_states[-2],
                  "te1": te2(tokens, output_hidden_states=True).hidden_states[-2],
                  "pooled": te2(tokens).text_embeds}
    _assert_close(_text_outputs(ref), theirs)


def test_sdxl_txt2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    _, folder = diffusers_folder(tmp_path, "sdxl")
    theirs = euler_karras(StableDiffusionXLPipeline.from_pretrained(folder))
    ref = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0, height=SIZE,
                 width=SIZE, generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    ours = Pipeline(load_bundle(folder, device="cpu")).txt2img(
        PROMPT, negative_prompt="blurry", steps=4, sampler="Euler", schedule="karras", cfg_scale=6.0,
        seed=42, width=SIZE, height=SIZE)
    diff = np.abs(as_float_array(ours) - ref).max()
    assert diff <= 1 / 255, diff


def test_refiner_img2img_matches_diffusers(tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    _, folder = diffusers_folder(tmp_path, "sdxl-refiner")
    theirs = euler_karras(StableDiffusionXLImg2ImgPipeline.from_pretrained(folder))
    init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    ref = theirs(PROMPT, image=init, strength=0.5, negative_prompt="blurry", num_inference_steps=6,
                 guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1), output_type="np").images
    ours = Pipeline(load_bundle(folder, device="cpu")).img2img(
        init, PROMPT, negative_prompt="blurry", steps=6, denoising_strength=0.5, sampler="Euler",
        schedule="karras", cfg_scale=5.0, seed=1)
    diff = np.abs(as_float_array(ours) - ref).max()
    assert diff <= 1 / 255, diff


def test_base_plus_refiner_switch(tmp_path):
    base, refiner = tiny_bundle("sdxl", seed=1), tiny_bundle("sdxl-refiner", seed=2)
    alone = Pipeline(base).generate(GenerationRequest(PROMPT, steps=6, seed=3, width=SIZE, height=SIZE))
    pipe = Pipeline(base, refiner=refiner)
    both = pipe.generate(GenerationRequest(PROMPT, steps=6, seed=3, width=SIZE, height=SIZE, refiner_switch_at=0.5))
    assert "Refiner switch at: 0.5" in both.infotexts[0]
    assert not np.array_equal(np.asarray(alone.images[0]), np.asarray(both.images[0]))
    # Switching at 1.0 never reaches the refiner: the base image, bit for bit.
    never = pipe.generate(GenerationRequest(PROMPT, steps=6, seed=3, width=SIZE, height=SIZE, refiner_switch_at=1.0))
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(never.images[0]))


def test_turbo_preset_on_sdxl():
    from sdlab.generate_cli import PRESETS

    pipe = Pipeline(tiny_bundle("sdxl"))
    res = pipe.generate(GenerationRequest(PROMPT, seed=1, width=SIZE, height=SIZE, **PRESETS["turbo"]))
    assert "Steps: 1" in res.infotexts[0] and "CFG scale: 1" in res.infotexts[0]
