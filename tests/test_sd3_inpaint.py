"""SD3 inpainting (img2img with a mask, the 16-channel model) against diffusers'
StableDiffusion3InpaintPipeline on the tiny random folder that tests/test_sd3.py has diffusers write
(`sd3_folder` in conftest.py).

The rules differ in two places, and the test holds both where they meet:
- diffusers keeps the unmasked region by mixing the noised original back into the latent after
  each step; sdlab (the web UI's way) makes the original the denoised estimate there. For Euler on
  a flow model both keep that region exactly on `sigma * noise + (1 - sigma) * original`, so the
  images agree; sdlab then pastes the original pixels back (through the blurred mask), diffusers
  returns the decoded image as it is. So: inside the mask within 1/255, outside it the original.
- diffusers runs `N - int(N - N * strength)` steps, the web UI `int(N * strength)`; they agree when
  `N * strength` is a whole number (4 x 0.5 here, and full strength).
The mask is binary and on the latent grid (diffusers binarises it; sdlab's mask_blur 0).

diffusers' StableDiffusion3InpaintPipeline decodes `latents / scaling_factor` without adding the VAE's
`shift_factor` back (huggingface/diffusers#13611, issue 1; its txt2img and img2img pipelines add it),
which moves its pixels by ~4/255 on this model. So its sampling is the reference (its latents), decoded
as its other SD3 pipelines decode.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.loader import load_bundle
from sdlab.pipeline import Pipeline

from .test_sd3 import PROMPT, SIZE
from .tiny import as_float_array

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def theirs(sd3_folder):
    from diffusers import StableDiffusion3InpaintPipeline

    return StableDiffusion3InpaintPipeline.from_pretrained(sd3_folder)


@pytest.fixture(scope="module")
def pipe(sd3_folder):
    return Pipeline(load_bundle(sd3_folder, device="cpu", dtype=torch.float32))


def _init_and_mask() -> tuple[Image.Image, Image.Image]:
    init = Image.fromarray((np.random.default_rng(2).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (SIZE, SIZE), 0)
    mask.paste(255, (8, 8, 24, 32))
    return init, mask


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpaint_matches_diffusers_inside_the_mask_and_keeps_the_rest(theirs, pipe, strength):
    init, mask = _init_and_mask()
    latents = theirs(PROMPT, image=init, mask_image=mask, strength=strength, negative_prompt="blurry",
                     num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, max_sequence_length=77,
                     generator=torch.Generator("cpu").manual_seed(4), output_type="latent").images
    # Decoded as diffusers' other SD3 pipelines decode (its inpaint pipeline leaves out the VAE's shift).
    vae = theirs.vae.config
    with torch.no_grad():
        pixels = theirs.vae.decode(latents / vae.scaling_factor + vae.shift_factor, return_dict=False)[0]
    ref = theirs.image_processor.postprocess(pixels, output_type="np")
    ours = pipe.inpaint(
        init, mask, PROMPT, negative_prompt="blurry", steps=4, denoising_strength=strength, sampler="Euler",
        schedule="normal", cfg_scale=5.0, seed=4, mask_blur=0)
    repaint = np.asarray(mask)[None, :, :, None] >= 128
    inside = np.broadcast_to(repaint, ref.shape)
    diff = np.abs(as_float_array(ours) - ref)[inside].max()
    assert diff <= 1 / 255, diff
    # Not a trivial agreement: the repainted region moved away from the original.
    assert np.abs(ref - np.asarray(init, np.float32)[None] / 255)[inside].mean() > 0.05
    keep = ~repaint[0, :, :, 0]
    assert np.array_equal(np.asarray(ours[0])[keep], np.asarray(init)[keep])
