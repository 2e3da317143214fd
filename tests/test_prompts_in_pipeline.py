"""Prompts, LoRA tags and embeddings through the whole pipeline: image parity with
diffusers, long prompts, exact un-merging, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.models_dir import ModelsDir
from sdlab.pipeline import GenerationRequest, Pipeline

from .test_lora import _kohya
from .tiny import as_float_array, diffusers_folder, euler_karras, tiny_bundle

SIZE = 64
PROMPT = "a red circle on a blue background"


@pytest.fixture
def models(tmp_path):
    root = tmp_path / "models"
    for sub in ("Stable-diffusion", "Lora", "embeddings", "VAE"):
        (root / sub).mkdir(parents=True)
    return ModelsDir(root)


def test_kohya_lora_tag_matches_diffusers_images(tmp_path, models):
    from diffusers import StableDiffusionPipeline

    ref, folder = diffusers_folder(tmp_path, "sd1")
    lora = models.folder("lora") / "style.safetensors"
    save_safetensors(_kohya(ref), lora)
    theirs = euler_karras(StableDiffusionPipeline.from_pretrained(folder, safety_checker=None))
    theirs.load_lora_weights(str(lora))
    theirs.fuse_lora(lora_scale=0.6)
    expected = theirs(PROMPT, num_inference_steps=4, guidance_scale=7.0, height=SIZE, width=SIZE,
                      generator=torch.Generator("cpu").manual_seed(9), output_type="np").images

    pipe = Pipeline(load_bundle(folder, device="cpu"), models=models)
    params = dict(steps=4, sampler="Euler", schedule="karras", cfg_scale=7.0, seed=9, width=SIZE, height=SIZE)
    plain = pipe.generate(GenerationRequest(PROMPT, **params))
    with_lora = pipe.generate(GenerationRequest(PROMPT + " <lora:style:0.6>", **params))
    assert np.abs(as_float_array(with_lora.images) - expected).max() <= 1 / 255
    assert "Lora hashes: \"style: " in with_lora.infotexts[0]
    # The LoRA changed the image, and the next request without it is the original bit for bit.
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_lora.images[0]))
    again = pipe.generate(GenerationRequest(PROMPT, **params))
    assert np.array_equal(np.asarray(plain.images[0]), np.asarray(again.images[0]))


def test_long_prompt_is_three_chunks_and_matters(models):
    """200 tokens -> chunks of 75, 75, 50 -> a 231-token conditioning (3 x 77), and the
    tokens past the first 75 change the image (on the trained demo model: random ones
    barely listen to their text)."""
    import sdlab

    pipe = Pipeline(load_bundle(sdlab.demo_model_path(), device="cpu"), models=models)
    vocabulary = ["red", "blue", "green", "cat", "dog", "house", "tree", "sky", "sun", "moon"]
    words = [vocabulary[i % len(vocabulary)] for i in range(200)]
    assert len(pipe.text[0].tokenizer.encode(" ".join(words))) == 200  # one token per word
    from sdlab.text.conditioning import prompt_schedule

    cond, uncond = prompt_schedule(pipe.text, [" ".join(words), ""], 10, 1)
    assert cond.at(0).context.shape[1] == 231 and uncond.at(0).context.shape[1] == 231
    params = dict(steps=3, seed=1)
    full = np.asarray(pipe.txt2img(" ".join(words), **params)[0])
    head = np.asarray(pipe.txt2img(" ".join(words[:75]), **params)[0])
    assert not np.array_equal(full, head)


def test_emphasis_changes_the_image(models):
    import sdlab

    pipe = Pipeline(load_bundle(sdlab.demo_model_path(), device="cpu"), models=models)
    params = dict(steps=3, seed=1)
    plain = np.asarray(pipe.txt2img("a red circle", **params)[0])
    weighted = np.asarray(pipe.txt2img("a (red:1.5) circle", **params)[0])
    assert not np.array_equal(plain, weighted)


def test_embedding_in_prompt(models):
    bundle = tiny_bundle("sd1")
    torch.save({"string_to_param": {"*": torch.randn(2, 64)}}, models.folder("embedding") / "mystyle.pt")
    pipe = Pipeline(bundle, models=models)
    res = pipe.generate(GenerationRequest("a circle in mystyle", steps=2, seed=1, width=32, height=32))
    assert "TI hashes: \"mystyle: " in res.infotexts[0]
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}}, models.folder("embedding") / "narrow.pt")
    with pytest.raises(SdlabError, match="narrow"):
        pipe.generate(GenerationRequest("a circle in narrow", steps=2, seed=1, width=32, height=32))


def test_lora_bad_input_leaves_weights_untouched(tmp_path, models):
    bundle = tiny_bundle("sd1")
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    pipe = Pipeline(bundle, models=models)
    sd2 = tiny_bundle("sd2")
    save_safetensors(_kohya(sd2, te=False), models.folder("lora") / "other.safetensors")
    cases = [("<lora:missing:1>", "not found"), ("<lora:other:1>", "other"), ("<lora::1>", "lora")]
    for tag, words in cases:
        with pytest.raises(SdlabError, match=words):
            pipe.generate(GenerationRequest(f"{PROMPT} {tag}", steps=2, seed=1, width=32, height=32))
        for k, v in bundle.unet.state_dict().items():
            assert torch.equal(v, before[k]), (tag, k)
