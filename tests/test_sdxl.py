"""SDXL: loading both ways, txt2img against StableDiffusionXLPipeline, the refiner in
img2img against StableDiffusionXLImg2ImgPipeline, and the base+refiner switch."""

from __future__ import annotations

import json

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


# ---------------------------------------------------------------- configs that are not the released ones


def _diffusers_tiny_sdxl(folder):
    """A tiny SDXL pipeline that diffusers writes itself, configured as the tiny pipelines the
    ecosystem tests with (diffusers' StableDiffusionXLPipelineFastTests components): a size
    embedding 8 wide (addition_time_embed_dim), one GroupNorm group, attention heads 1 channel
    wide, sample_size 32 (64 px), both tokenizers padding with <|endoftext|>; and a scheduler
    trained on other betas than the released models. Weights as diffusers initialises them."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from sdlab.text.tokenizer import CLIPTokenizer as OurTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(2, 4), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=1)  # 80 = 32 + 6 * 8
    vae = AutoencoderKL(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, sample_size=128)
    te_config = CLIPTextConfig(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32,
                               intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, vocab_size=49408,
                               hidden_act="gelu", projection_dim=32)
    OurTokenizer(pad_token="eos").save(folder.parent / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder.parent / "tokenizer")
    scheduler = EulerDiscreteScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    StableDiffusionXLPipeline(vae, CLIPTextModel(te_config), CLIPTextModelWithProjection(te_config), tokenizer,
                              tokenizer, unet, scheduler).save_pretrained(folder)
    return folder


def test_sdxl_folder_with_other_constants_matches_diffusers(tmp_path):
    """The issue's case: `sdlab generate` on such a folder, at the size the folder implies,
    equals StableDiffusionXLPipeline pixel for pixel."""
    from diffusers import StableDiffusionXLPipeline

    from sdlab.cli import main as cli_main

    folder = _diffusers_tiny_sdxl(tmp_path / "tiny-sdxl")
    loaded = load_bundle(folder, device="cpu")
    assert loaded.config.unet.size_embed_dim == 8 and loaded.config.unet.norm_groups == 1
    fam = loaded.family
    assert (fam.default_size, fam.beta_start, fam.beta_end) == (64, 0.0001, 0.02)
    assert [t.pad_token for t in loaded.tokenizers] == ["eos", "eos"]

    theirs = euler_karras(StableDiffusionXLPipeline.from_pretrained(folder))
    ref = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0,
                 generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "-n", "blurry", "-m", str(folder), "--steps", "4", "--sampler", "Euler",
                     "--schedule", "karras", "--cfg", "6", "--seed", "42", "--device", "cpu", "--dtype", "fp32",
                     "--weight-dtype", "fp32", "-o", str(out)]) == 0
    ours = as_float_array([Image.open(out).convert("RGB")])
    assert ours.shape == ref.shape == (1, 64, 64, 3)
    assert ref.std() > 0.01  # not a flat image, so the comparison means something
    diff = np.abs(ours - ref).max()
    assert diff <= 1 / 255, diff


def _with_size_embed_dim(family: str, dim: int, seed: int):
    """The tiny bundle of `family` with SDXL's numbers embedded `dim` wide (y narrower to match)."""
    from dataclasses import replace

    from sdlab.checkpoints.loader import new_bundle

    from .tiny import tiny_config

    cfg = tiny_config(family)
    n = cfg.family.size_numbers
    unet = replace(cfg.unet, size_embed_dim=dim, adm_in_channels=cfg.unet.adm_in_channels - n * (256 - dim))
    return new_bundle(replace(cfg, unet=unet), seed=seed, init_std=0.05, name=f"tiny-{family}-{dim}")


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_size_embedding_width_read_from_a_single_file_and_written_back(tmp_path, family):
    """A single file does not state the width: it is read off label_emb's shape (less the pooled
    text width, over 6 numbers, 5 for the refiner); `sdlab convert` writes it into config.json,
    and diffusers' pipeline on the converted folder equals sdlab on the single file."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    from sdlab.cli import main as cli_main

    ref = _with_size_embed_dim(family, 8, seed=5)
    single = save_native(ref, tmp_path / "m.safetensors")
    loaded = load_bundle(single, device="cpu")
    assert loaded.config.unet == ref.config.unet and loaded.config.unet.size_embed_dim == 8

    assert cli_main(["convert", str(single), str(tmp_path / "folder")]) == 0
    unet_json = json.loads((tmp_path / "folder" / "unet" / "config.json").read_text())
    assert unet_json["addition_time_embed_dim"] == 8
    assert unet_json["projection_class_embeddings_input_dim"] == ref.config.unet.adm_in_channels

    generator = torch.Generator("cpu").manual_seed(7)
    params = dict(negative_prompt="blurry", steps=4, sampler="Euler", schedule="karras", cfg_scale=6.0, seed=7)
    if family == "sdxl":
        theirs = euler_karras(StableDiffusionXLPipeline.from_pretrained(tmp_path / "folder"))
        ref_images = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=6.0, height=SIZE,
                            width=SIZE, generator=generator, output_type="np").images
        ours = Pipeline(loaded).txt2img(PROMPT, width=SIZE, height=SIZE, **params)
    else:
        theirs = euler_karras(StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_path / "folder"))
        init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
        ref_images = theirs(PROMPT, image=init, strength=1.0, negative_prompt="blurry", num_inference_steps=4,
                            guidance_scale=6.0, generator=generator, output_type="np").images
        ours = Pipeline(loaded).img2img(init, PROMPT, denoising_strength=1.0, **params)
    diff = np.abs(as_float_array(ours) - ref_images).max()
    assert diff <= 1 / 255, diff


def test_size_embedding_width_that_does_not_divide_is_refused():
    from sdlab.errors import SdlabError
    from sdlab.families import model_config

    shapes = {k: tuple(v.shape) for k, v in _with_size_embed_dim("sdxl", 8, seed=0).state_dict().items()}
    assert model_config(shapes).unet.size_embed_dim == 8
    out, width = shapes["model.diffusion_model.label_emb.0.0.weight"]
    shapes["model.diffusion_model.label_emb.0.0.weight"] = (out, width + 1)  # 64 pooled + 49: not 6 equal widths
    with pytest.raises(SdlabError, match="label_emb.0.0.weight"):
        model_config(shapes)


def _refiner_pipeline(tmp_path):
    from sdlab.models_dir import ModelsDir

    base, refiner = tiny_bundle("sdxl", seed=1), tiny_bundle("sdxl-refiner", seed=2)
    models = ModelsDir(tmp_path)
    for kind in ("embedding", "lora"):
        models.folder(kind).mkdir(parents=True)
    return Pipeline(base, refiner=refiner, models=models)


def test_refiner_reads_the_embeddings_of_the_prompt(tmp_path):
    """An SDXL embedding's clip_g vectors reach the refiner's encoder (SDXL's second) too."""
    from safetensors.torch import save_file

    from sdlab.recipes import passes
    from sdlab.request import validate
    from sdlab.sampling.samplers import resolve_sampler

    pipe = _refiner_pipeline(tmp_path)
    g = torch.Generator().manual_seed(0)
    vectors = {"clip_l": torch.randn(2, 64, generator=g), "clip_g": torch.randn(2, 64, generator=g)}
    save_file(vectors, str(pipe.models.folder("embedding") / "xlstyle.safetensors"))
    req = GenerationRequest("a circle in xlstyle", steps=4, seed=3, width=SIZE, height=SIZE, refiner_switch_at=0.5)
    prompt, negative = req.prompt, req.negative_prompt
    embeddings = pipe.embeddings_for(prompt, negative)
    assert [list(e) for e in embeddings[1]] == [["xlstyle"]]
    torch.testing.assert_close(embeddings[1][0]["xlstyle"], vectors["clip_g"])
    run = passes.prepare(pipe, validate(req, SIZE), prompt, negative, resolve_sampler("Euler"), "karras", embeddings)
    refiner_context = run.refiner.prompts[0].at(0).context
    runner = pipe.refiner_text[0]
    chunks = runner.chunks(prompt, {"xlstyle": vectors["clip_g"]})
    expected = runner.encode(chunks, 1, {"xlstyle": vectors["clip_g"]}).context
    torch.testing.assert_close(refiner_context, expected)
    as_words = runner.encode(runner.chunks(prompt), 1).context
    assert not torch.allclose(refiner_context, as_words)
    result = pipe.generate(req)
    assert 'TI hashes: "xlstyle: ' in result.infotexts[0]


def test_refiner_gets_the_loras_of_the_prompt_where_they_fit(tmp_path):
    """A base-model LoRA's bigG modules (lora_te2_) reach the refiner's encoder; its UNet modules
    are applied where the refiner has a layer of that name and shape, skipped where not."""
    from safetensors.torch import save_file

    from sdlab.lora import kohya_name

    pipe = _refiner_pipeline(tmp_path)
    base_g, refiner_g = pipe.bundle.text_encoders[1], pipe.refiner.text_encoders[0]
    g = torch.Generator().manual_seed(0)
    sd = {}
    layer = "transformer.resblocks.0.mlp.c_fc"
    fc = base_g.get_submodule(layer)
    name = kohya_name(layer, "te2")
    sd[f"{name}.lora_down.weight"] = torch.randn(2, fc.in_features, generator=g)
    sd[f"{name}.lora_up.weight"] = torch.randn(fc.out_features, 2, generator=g)
    sd[f"{name}.alpha"] = torch.tensor(2.0)
    # The base UNet's output layer fits the refiner's; its first attention block exists only in the base.
    for path in ("out.2", "output_blocks.0.1.proj_in"):
        m = pipe.bundle.unet.get_submodule(path)
        unet_name = kohya_name(path, "unet", pipe.bundle.unet.cfg)
        shape_in = (m.in_channels, *m.kernel_size) if isinstance(m, torch.nn.Conv2d) else (m.in_features,)
        out = m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
        sd[f"{unet_name}.lora_down.weight"] = torch.randn(2, *shape_in, generator=g)
        sd[f"{unet_name}.lora_up.weight"] = torch.randn(out, 2, *([1, 1] if len(shape_in) == 3 else []), generator=g)
        sd[f"{unet_name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(pipe.models.folder("lora") / "xl.safetensors"))
    weight = refiner_g.get_submodule(layer).weight
    original_g, original_out = weight.detach().clone(), pipe.refiner.unet.get_submodule("out.2").weight.detach().clone()
    req = GenerationRequest("a circle <lora:xl:1>", steps=2, seed=3, width=SIZE, height=SIZE, refiner_switch_at=0.5)
    pipe.generate(req)
    expected = original_g + sd[f"{name}.lora_up.weight"] @ sd[f"{name}.lora_down.weight"]
    torch.testing.assert_close(refiner_g.get_submodule(layer).weight, expected)
    assert not torch.equal(pipe.refiner.unet.get_submodule("out.2").weight, original_out)
    # A request without it restores the refiner exactly.
    pipe.generate(GenerationRequest("a circle", steps=2, seed=3, width=SIZE, height=SIZE, refiner_switch_at=0.5))
    assert torch.equal(refiner_g.get_submodule(layer).weight, original_g)
    assert torch.equal(pipe.refiner.unet.get_submodule("out.2").weight, original_out)
