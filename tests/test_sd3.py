"""SD3 / SD3.5 as a family: detection, loading (diffusers folder, single file with or without its
encoders, separate encoder files), txt2img and img2img against diffusers'
StableDiffusion3Pipeline / StableDiffusion3Img2ImgPipeline on a tiny random folder that diffusers
writes itself, and the one-line errors."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.errors import SdlabError
from sdlab.families import detect_family
from sdlab.pipeline import GenerationRequest, Pipeline

from .tiny import as_float_array

diffusers = pytest.importorskip("diffusers")

SIZE = 32
PROMPT = "a red circle on a blue background"


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Every parameter and persistent buffer drawn anew (adaLN, pos_embed and the zero-initialised
    layers included), at a scale that keeps activations near unit size."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if t.ndim == 1 and ("norm" in name or "ln_" in name) and name.endswith("weight"):
                t.copy_(1 + 0.2 * noise)
            elif t.ndim <= 1 or name.endswith("pos_embed"):
                t.copy_(0.2 * noise)
            else:
                t.copy_(noise / t[0].numel() ** 0.5)


def tiny_sd3_folder(folder, t5: bool = True, seed: int = 0):
    """A tiny random SD3 pipeline written by diffusers (sizes in the spirit of diffusers' own SD3
    tests; CLIP widths 16 + 32 padded to the T5 / context width 64, pooled 16 + 32 = 48), with
    sdlab's tokenizers (no network), scheduler shift 3. Heads and groups follow the rules single
    files are read by (one head per layer in the MMDiT, CLIP 64 channels per head or one, 32
    VAE groups), so its native weights saved as one file load to the same networks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel,
                              T5TokenizerFast)

    from sdlab.text.t5_tokenizer import T5Tokenizer as OurT5
    from sdlab.text.tokenizer import CLIPTokenizer as OurClip

    transformer = SD3Transformer2DModel(sample_size=SIZE // 2, patch_size=2, in_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=48, out_channels=16,
                                        pos_embed_max_size=12)

    def clip(width, act, pad):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad, hidden_size=width, intermediate_size=37,
            num_attention_heads=1, num_hidden_layers=3, vocab_size=49408, hidden_act=act, projection_dim=width))

    clip_l, clip_g = clip(16, "quick_gelu", 49407), clip(32, "gelu", 0)
    t5_model = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=8, num_heads=4, d_ff=37, num_layers=2,
                                       feed_forward_proj="gated-gelu", dropout_rate=0.0)) if t5 else None
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32, 32),
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, latent_channels=16, norm_num_groups=32, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305, sample_size=SIZE)
    for i, m in enumerate([transformer, clip_l, clip_g, vae] + ([t5_model] if t5 else [])):
        _perturb(m, seed * 10 + i)
    tok_dir = folder.parent / f"{folder.name}-tokenizers"
    OurClip(pad_token="eos").save(tok_dir / "l")
    OurClip(pad_token="zero").save(tok_dir / "g")
    OurT5().save(tok_dir / "t5")
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=clip_l, tokenizer=CLIPTokenizer.from_pretrained(tok_dir / "l"),
        text_encoder_2=clip_g, tokenizer_2=CLIPTokenizer.from_pretrained(tok_dir / "g"),
        text_encoder_3=t5_model, tokenizer_3=T5TokenizerFast.from_pretrained(tok_dir / "t5") if t5 else None)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3") / "tiny-sd3")


@pytest.fixture(scope="module")
def bundle(folder):
    return load_bundle(folder, device="cpu", dtype=torch.float32)


def test_folder_loads_as_the_sd3_family(bundle):
    fam = bundle.family
    assert fam.name == "sd3" and fam.is_flow and fam.flow_shift == 3.0
    assert (fam.latent_scale, fam.latent_shift, fam.size_multiple) == (1.5305, 0.0609, 16)
    assert [s.prefix.split(".")[1] for s in fam.text_encoders] == ["clip_l", "clip_g", "t5xxl"]
    assert [t.pad_id for t in bundle.tokenizers[:2]] == [49407, 0]
    assert bundle.config.unet.hidden_size == 32 and bundle.config.unet.heads == 2
    assert detect_family({k: tuple(v.shape) for k, v in bundle.state_dict().items()}).name == "sd3"


def test_txt2img_matches_diffusers(folder, bundle):
    from diffusers import StableDiffusion3Pipeline

    theirs = StableDiffusion3Pipeline.from_pretrained(folder)
    ref = theirs(PROMPT, negative_prompt="blurry", num_inference_steps=4, guidance_scale=5.0, height=SIZE,
                 width=SIZE, generator=torch.Generator("cpu").manual_seed(42), max_sequence_length=77,
                 output_type="np").images
    res = Pipeline(bundle).generate(GenerationRequest(
        PROMPT, negative_prompt="blurry", steps=4, sampler="Euler", schedule="normal", cfg_scale=5.0, seed=42,
        width=SIZE, height=SIZE))
    ours = as_float_array(res.images)
    assert ref.std() > 0.02  # not a flat image
    diff = np.abs(ours - ref).max()
    assert diff <= 1 / 255, diff
    assert "Shift" not in res.infotexts[0]


def test_img2img_matches_diffusers(folder, bundle):
    from diffusers import StableDiffusion3Img2ImgPipeline

    theirs = StableDiffusion3Img2ImgPipeline.from_pretrained(folder)
    init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    ref = theirs(PROMPT, image=init, strength=0.5, negative_prompt="blurry", num_inference_steps=6,
                 guidance_scale=5.0, generator=torch.Generator("cpu").manual_seed(1), max_sequence_length=77,
                 output_type="np").images
    ours = Pipeline(bundle).img2img(init, PROMPT, negative_prompt="blurry", steps=6, denoising_strength=0.5,
                                    sampler="Euler", schedule="normal", cfg_scale=5.0, seed=1)
    diff = np.abs(as_float_array(ours) - ref).max()
    assert diff <= 1 / 255, diff


# ---------------------------------------------------------------- single files and separate encoders


def _native(bundle) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bundle.state_dict().items()}


def _part(sd, prefix, keep_prefix=""):
    return {keep_prefix + k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _same_tensors(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_single_files_with_and_without_encoders(tmp_path, bundle, caplog):
    sd = _native(bundle)
    full = tmp_path / "sd3_incl_clips_t5.safetensors"
    save_safetensors(sd, full)
    loaded = load_bundle(full, device="cpu", dtype=torch.float32)
    assert loaded.family.name == "sd3" and len(loaded.text_encoders) == 3
    _same_tensors(loaded, bundle)
    assert (loaded.config.unet, loaded.config.vae, loaded.config.text_encoders) == \
        (bundle.config.unet, bundle.config.vae, bundle.config.text_encoders)

    # MMDiT + VAE only, the encoders as ComfyUI keeps them (no prefix; T5 with both table keys).
    bare = tmp_path / "sd3_medium.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("text_encoders.")}, bare)
    enc = tmp_path / "text_encoders"
    enc.mkdir()
    save_safetensors(_part(sd, "text_encoders.clip_l.transformer."), enc / "clip_l.safetensors")
    save_safetensors(_part(sd, "text_encoders.clip_g.transformer."), enc / "clip_g.safetensors")
    t5 = _part(sd, "text_encoders.t5xxl.transformer.")
    t5["encoder.embed_tokens.weight"] = t5["shared.weight"]
    save_safetensors({k: v.to(torch.float16) for k, v in t5.items()}, enc / "t5xxl_fp16.safetensors")
    with pytest.raises(SdlabError, match="no clip_l and clip_g text encoder"):
        load_bundle(bare, device="cpu")
    files = {"clip_l": enc / "clip_l.safetensors", "clip_g": enc / "clip_g.safetensors",
             "t5xxl": enc / "t5xxl_fp16.safetensors"}
    separate = load_bundle(bare, device="cpu", dtype=torch.float32, text_encoder_files=files)
    for ours, theirs in zip(separate.text_encoders[:2], bundle.text_encoders[:2]):
        _same_tensors(ours, theirs)
    assert torch.equal(separate.text_encoders[2].shared.weight, bundle.text_encoders[2].shared.weight.half().float())
    # Found in ComfyUI's models/text_encoders when not given.
    found = load_bundle(bare, device="cpu", dtype=torch.float32, text_encoder_dirs=[enc])
    assert len(found.text_encoders) == 3

    # incl_clips without T5: CLIP-only conditioning, said once in the log.
    clips = tmp_path / "sd3_medium_incl_clips.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("text_encoders.t5xxl.")}, clips)
    with caplog.at_level(logging.INFO, logger="sdlab.checkpoints.sd3"):
        no_t5 = load_bundle(clips, device="cpu", dtype=torch.float32)
    assert sum("no T5" in r.message for r in caplog.records) == 1
    assert len(no_t5.text_encoders) == 2
    res = Pipeline(no_t5).generate(GenerationRequest(PROMPT, steps=2, sampler="Euler", cfg_scale=3.0, seed=1,
                                                     width=SIZE, height=SIZE))
    assert np.asarray(res.images[0]).std() > 1


def test_sdlab_checkpoint_round_trip_is_exact(tmp_path, bundle):
    from sdlab.checkpoints.loader import save_checkpoint

    save_checkpoint(bundle, tmp_path / "ours.safetensors")
    back = load_bundle(tmp_path / "ours.safetensors", device="cpu", dtype=torch.float32)
    assert back.config == bundle.config
    req = GenerationRequest(PROMPT, steps=2, sampler="Euler", cfg_scale=4.0, seed=3, width=SIZE, height=SIZE)
    a, b = Pipeline(bundle).generate(req).images[0], Pipeline(back).generate(req).images[0]
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_errors_are_one_line(tmp_path, bundle):
    sd = _native(bundle)
    no_vae = tmp_path / "no_vae.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, no_vae)
    with pytest.raises(SdlabError, match="holds no VAE") as e:
        load_bundle(no_vae, device="cpu")
    assert "\n" not in str(e.value)

    from transformers import T5Config, T5EncoderModel

    small = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=1,
                                    feed_forward_proj="gated-gelu"))
    save_safetensors({k: v.clone() for k, v in small.state_dict().items() if k != "encoder.embed_tokens.weight"},
                     tmp_path / "t5_small.safetensors")
    full = tmp_path / "full.safetensors"
    save_safetensors(sd, full)
    with pytest.raises(SdlabError, match="T5 encoder is 32 wide but this MMDiT reads 64"):
        load_bundle(full, device="cpu", text_encoder_files={"t5xxl": tmp_path / "t5_small.safetensors"})

    with pytest.raises(SdlabError, match="not a multiple of 16"):
        Pipeline(bundle).generate(GenerationRequest(PROMPT, steps=1, width=40, height=32))


def test_info_names_the_family_and_encoders(tmp_path, bundle, folder, capsys):
    from sdlab.cli import main as cli_main

    sd = _native(bundle)
    clips = tmp_path / "sd35_medium_like.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("text_encoders.t5xxl.")}, clips)
    assert cli_main(["info", str(clips)]) in (0, None)
    out = capsys.readouterr().out
    assert "sd3 (Stable Diffusion 3)" in out and "flow, shift 3" in out
    assert "t5xxl" in out and "not included (give one with --t5)" in out
    assert cli_main(["info", str(folder)]) in (0, None)
    assert "not included" not in capsys.readouterr().out


def test_cli_shift_is_recorded_and_replayed(tmp_path, folder, bundle):
    from sdlab.cli import main as cli_main
    from sdlab.infotext import read_infotext

    out = tmp_path / "out.png"
    assert cli_main(["generate", PROMPT, "-m", str(folder), "--steps", "2", "--sampler", "Euler", "--cfg", "4",
                     "--seed", "5", "-W", "32", "-H", "32", "--shift", "2", "--device", "cpu", "--dtype", "fp32",
                     "--weight-dtype", "fp32", "-o", str(out)]) == 0
    image = Image.open(out)
    assert "Shift: 2" in read_infotext(image)
    again = Pipeline(bundle).generate(GenerationRequest(PROMPT, steps=2, sampler="Euler", cfg_scale=4.0, seed=5,
                                                        width=32, height=32, shift=2.0))
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(again.images[0]))


def test_skip_layer_guidance_matches_diffusers(folder, bundle):
    from diffusers import StableDiffusion3Pipeline

    theirs = StableDiffusion3Pipeline.from_pretrained(folder)
    kwargs = dict(num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE, max_sequence_length=77,
                  output_type="np", negative_prompt="blurry")
    ref = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(42), skip_guidance_layers=[0],
                 skip_layer_guidance_scale=2.8, skip_layer_guidance_start=0.01, skip_layer_guidance_stop=0.6,
                 **kwargs).images
    plain = theirs(PROMPT, generator=torch.Generator("cpu").manual_seed(42), **kwargs).images
    res = Pipeline(bundle).generate(GenerationRequest(
        PROMPT, negative_prompt="blurry", steps=4, sampler="Euler", schedule="normal", cfg_scale=5.0, seed=42,
        width=SIZE, height=SIZE, slg_layers=(0,), slg_scale=2.8, slg_start=0.01, slg_end=0.6))
    assert np.abs(ref - plain).max() > 10 / 255  # steps 1 and 2 were guided
    diff = np.abs(as_float_array(res.images) - ref).max()
    assert diff <= 1 / 255, diff
    assert "SLG layers: 0" in res.infotexts[0] and "SLG end: 0.6" in res.infotexts[0]
    with pytest.raises(SdlabError, match="not layers of this 2-layer MMDiT"):
        Pipeline(bundle).generate(GenerationRequest(PROMPT, steps=2, width=SIZE, height=SIZE, slg_layers=(7,)))


def test_lora_in_kohya_and_diffusers_formats(tmp_path, bundle):
    from sdlab.lora import LoraUse, apply_loras, load_lora

    g = torch.Generator().manual_seed(3)
    qkv = "joint_blocks.0.x_block.attn.qkv.weight"
    before = bundle.unet.get_parameter(qkv).detach().clone()
    d, r = bundle.config.unet.hidden_size, 4
    down, up = torch.randn(r, d, generator=g), torch.randn(3 * d, r, generator=g)
    save_safetensors({"lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight": down,
                      "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_up.weight": up,
                      "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha": torch.tensor(2.0)}, tmp_path / "k.safetensors")
    a, b = torch.randn(r, d, generator=g), torch.randn(d, r, generator=g)
    save_safetensors({"transformer.transformer_blocks.0.attn.to_k.lora_A.weight": a,
                      "transformer.transformer_blocks.0.attn.to_k.lora_B.weight": b}, tmp_path / "p.safetensors")
    for path, delta in ((tmp_path / "k.safetensors", up @ down * (2.0 / r)),
                        (tmp_path / "p.safetensors", torch.cat([torch.zeros(d, d), b @ a, torch.zeros(d, d)]))):
        applied = apply_loras(bundle, [LoraUse(load_lora(path), 1.0, 1.0)])
        try:
            after = bundle.unet.get_parameter(qkv).detach()
            torch.testing.assert_close(after - before, delta, atol=1e-5, rtol=1e-5)
        finally:
            applied.restore()
    assert torch.equal(bundle.unet.get_parameter(qkv), before)


def test_lora_on_packed_weights(tmp_path, bundle):
    """On the CPU the MMDiT's linear weights are packed for oneDNN (perf.prepare_for_inference): a
    LoRA merges into the packed qkv as into the plain one, and restore puts the packed original back."""
    from sdlab.lora import LoraUse, apply_loras, load_lora
    from sdlab.models.layers import cpu_packing_supported, pack_weights_for_cpu, unpack_weights

    if not cpu_packing_supported(torch.float32):
        pytest.skip("this PyTorch build has no oneDNN matrix products")
    g = torch.Generator().manual_seed(4)
    module = bundle.unet.get_submodule("joint_blocks.1.context_block.attn.qkv")
    d, r = bundle.config.unet.hidden_size, 4
    down, up = torch.randn(r, d, generator=g), torch.randn(3 * d, r, generator=g)
    save_safetensors({"lora_unet_joint_blocks_1_context_block_attn_qkv.lora_down.weight": down,
                      "lora_unet_joint_blocks_1_context_block_attn_qkv.lora_up.weight": up}, tmp_path / "k.safetensors")
    before = module.weight.detach().clone()
    x = torch.randn(2, 5, d, generator=g)
    try:
        assert pack_weights_for_cpu(bundle.unet) > 0 and module.weight.is_mkldnn
        with torch.no_grad():
            applied = apply_loras(bundle, [LoraUse(load_lora(tmp_path / "k.safetensors"), 1.0, 1.0)])
            try:
                assert module.weight.is_mkldnn
                torch.testing.assert_close(module(x), F.linear(x, before + up @ down, module.bias), atol=1e-4,
                                           rtol=1e-4)
            finally:
                applied.restore()
        assert module.weight.is_mkldnn and torch.equal(module.weight.to_dense(), before)
    finally:
        unpack_weights(bundle.unet)
