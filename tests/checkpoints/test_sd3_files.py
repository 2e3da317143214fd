"""SD3 / SD3.5 files: `sdlab convert` both ways (a released-layout single file <-> the diffusers
folder diffusers itself writes, key for key), files without a part (no VAE + `--vae`; one CLIP
alone, zero-filled as ComfyUI's `SD3ClipModel` does), an fp8 T5 kept narrow, kohya's T5 / CLIP
LoRA modules, and the one-line errors, on the tiny random SD3 of tests/test_sd3.py."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints import sd3
from sdlab.checkpoints.io import read_state_dict, save_safetensors
from sdlab.checkpoints.loader import load_bundle, save_checkpoint
from sdlab.cli import main as cli_main
from sdlab.errors import SdlabError
from sdlab.pipeline import GenerationRequest, Pipeline

from ..test_sd3 import PROMPT, SIZE, tiny_sd3_folder

diffusers = pytest.importorskip("diffusers")

L, G, T5 = (f"text_encoders.{n}.transformer." for n in ("clip_l", "clip_g", "t5xxl"))
VAE = "first_stage_model."
FP32 = ["--device", "cpu", "--dtype", "fp32", "--weight-dtype", "fp32"]
PARTS = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model",
         "text_encoder_2": "model", "text_encoder_3": "model"}  # diffusers' weight file of each sub-folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny SD3 pipeline as diffusers writes it (`save_pretrained`)."""
    return tiny_sd3_folder(tmp_path_factory.mktemp("sd3-files") / "tiny-sd3")


@pytest.fixture(scope="module")
def native(folder):
    """The folder's weights in the released single-file layout, as one dict of tensors (T5's
    token table under both of its names, as in sd3_medium_incl_clips_t5xxlfp16.safetensors)."""
    sd = {k: v.clone() for k, v in load_bundle(folder, device="cpu", dtype=torch.float32).state_dict().items()}
    sd[T5 + "encoder.embed_tokens.weight"] = sd[T5 + "shared.weight"].clone()
    return sd


@pytest.fixture(scope="module")
def full_file(tmp_path_factory, native):
    path = tmp_path_factory.mktemp("sd3-single") / "sd3_medium_incl_clips_t5xxlfp16.safetensors"
    save_safetensors(native, path)  # no sdlab metadata: read as a released file is
    return path


@pytest.fixture(scope="module")
def full(full_file):
    """The single file loaded (tests that change its weights put them back)."""
    return load_bundle(full_file, device="cpu", dtype=torch.float32)


def _without(sd: dict, *prefixes: str) -> dict:
    return {k: v for k, v in sd.items() if not k.startswith(prefixes)}


def _part(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _tensors(path) -> dict[str, torch.Tensor]:
    sd = read_state_dict(path)
    return {k: sd[k] for k in sd.keys()}


def _levels_apart(a: Image.Image, b: Image.Image) -> int:
    """The largest difference between two 8-bit images. The same weights in two loads are
    computed by the CPU's kernels in other memory, which may round a last bit differently."""
    return int(np.abs(np.asarray(a).astype(int) - np.asarray(b).astype(int)).max())


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("sdlab: error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------- convert


def _assert_same_transformer(theirs, ours) -> None:
    """diffusers' SD3Transformer2DModel computes what sdlab's MMDiT does (unit-scale inputs)."""
    g = torch.Generator().manual_seed(0)
    x, ctx, pooled = torch.randn(1, 16, 16, 16, generator=g), torch.randn(1, 10, 64, generator=g), torch.randn(1, 48, generator=g)
    t = torch.tensor([700.0])
    with torch.no_grad():
        want = ours(x, t, ctx, pooled)
        got = theirs(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max() < 1e-4


def test_convert_single_file_to_diffusers_and_back_is_exact(tmp_path, folder, full_file, native, full):
    from diffusers import StableDiffusion3Pipeline

    out, back = tmp_path / "converted", tmp_path / "back.safetensors"
    assert cli_main(["convert", str(full_file), str(out)]) == 0
    assert cli_main(["convert", str(out), str(back)]) == 0

    # The folder is diffusers' own, key for key and value for value.
    for sub, stem in PARTS.items():
        ours, theirs = (_tensors(f / sub / f"{stem}.safetensors") for f in (out, folder))
        assert ours.keys() == theirs.keys(), (sub, set(ours) ^ set(theirs))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), sub
    config = json.loads((out / "transformer" / "config.json").read_text())
    reference = json.loads((folder / "transformer" / "config.json").read_text())
    # A released file does not say its size: the family's 1024 px (latent 512 with this 2x VAE).
    assert config.pop("sample_size") == 512
    assert {k: v for k, v in config.items() if k != "_diffusers_version"} == \
        {k: reference[k] for k in config if k != "_diffusers_version"}
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert (vae["scaling_factor"], vae["shift_factor"], vae["latent_channels"], vae["use_quant_conv"]) == \
        (1.5305, 0.0609, 16, False)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0

    # ... and back: the single file is the one we started from, key for key.
    again = _tensors(back)
    assert again.keys() == native.keys(), set(again) ^ set(native)
    assert all(torch.equal(again[k], native[k]) for k in native)
    assert sd3.config(read_state_dict(back)) == sd3.read_sd3_folder(out)[1]

    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    _assert_same_transformer(pipe.transformer, full.unet)


def test_single_file_loads_in_diffusers_from_single_file(tmp_path, folder, full):
    """Every component of a file sdlab writes from a diffusers folder (diffusers cannot write one)."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "file.safetensors"
    assert cli_main(["convert", str(folder), str(out)]) == 0
    pipe = StableDiffusion3Pipeline.from_single_file(str(out), config=str(folder), local_files_only=True)
    for sub, stem in PARTS.items():
        got, want = getattr(pipe, sub).state_dict(), _tensors(folder / sub / f"{stem}.safetensors")
        assert not [k for k, v in got.items() if v.is_meta], sub  # nothing left unloaded
        if sub == "text_encoder":
            # SD3 pools CLIP-L unprojected: diffusers' single-file loader gives it the identity.
            assert torch.equal(got.pop("text_projection.weight"), torch.eye(16))
            want.pop("text_projection.weight")
        assert all(torch.equal(got[k], want[k]) for k in want), sub
    _assert_same_transformer(pipe.transformer, full.unet)


def test_convert_refuses_before_loading(tmp_path, full_file, capsys):
    (tmp_path / "taken").mkdir()
    assert cli_main(["convert", str(full_file), str(tmp_path / "taken")]) == 2
    assert "already exists" in _one_error_line(capsys)


# ---------------------------------------------------------------- files without a part


def test_vae_less_file_takes_vae(tmp_path, folder, native, capsys):
    import sdlab

    bare = tmp_path / "sd3.5_like_no_vae.safetensors"
    save_safetensors(_without(native, VAE), bare)
    with pytest.raises(SdlabError, match="holds no VAE.*--vae") as e:
        load_bundle(bare, device="cpu")
    assert "\n" not in str(e.value)
    assert cli_main(["generate", PROMPT, "-m", str(bare), "--steps", "1", "-W", "32", "-H", "32", *FP32,
                     "-o", str(tmp_path / "x.png")]) == 1
    assert "--vae" in _one_error_line(capsys)

    original = tmp_path / "sd3_vae.safetensors"  # the released layout, prefix kept (as in sd3 files)
    save_safetensors(_part(native, VAE) | {"loss.logvar": torch.zeros(())}, original)
    diffusers_vae = folder / "vae" / "diffusion_pytorch_model.safetensors"
    pipe = sdlab.load(bare, device="cpu", dtype=torch.float32, vae=original)
    for k, v in pipe.bundle.vae.state_dict().items():
        assert torch.equal(v, native[VAE + k]), k
    request = GenerationRequest(PROMPT, steps=2, sampler="Euler", cfg_scale=3.0, seed=4, width=SIZE, height=SIZE)
    api = pipe.generate(request).images[0]

    png = tmp_path / "cli.png"
    assert cli_main(["generate", PROMPT, "-m", str(bare), "--vae", str(diffusers_vae), "--steps", "2", "--sampler",
                     "Euler", "--cfg", "3", "--seed", "4", "-W", "32", "-H", "32", *FP32, "-o", str(png)]) == 0
    assert _levels_apart(Image.open(png).convert("RGB"), api) <= 1  # diffusers' keys read as the original's

    sd_vae = tmp_path / "sd15_vae.safetensors"  # a 4-channel VAE: another family's
    from sdlab.models.vae import AutoencoderKL, VAEConfig

    four = AutoencoderKL(VAEConfig(latent_channels=4, base_channels=32, channel_mult=(1, 1), num_res_blocks=1))
    save_safetensors(four.state_dict(), sd_vae)
    with pytest.raises(SdlabError, match="4-channel latents but this MMDiT reads 16") as e:
        load_bundle(bare, device="cpu", vae_file=sd_vae)
    assert "\n" not in str(e.value)


def _comfyui_layout(parts: dict, context_dim: int, widths: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI `SD3ClipModel.encode_token_weights` on the encoders in `parts` ("l", "g", "t5":
    (context, pooled)), with CLIP-L / CLIP-G widths `widths` for its constants 768 / 1280."""
    wl, wg = widths
    if "l" in parts:
        lg, l_pooled = parts["l"]
    else:
        lg, l_pooled = None, torch.zeros(1, wl)
    if "g" in parts:
        g_out, g_pooled = parts["g"]
        lg = torch.cat([lg, g_out], dim=-1) if lg is not None else torch.nn.functional.pad(g_out, (wl, 0))
    else:
        g_pooled = torch.zeros(1, wg)
    out = lg = torch.nn.functional.pad(lg, (0, context_dim - lg.shape[-1]))
    if "t5" in parts:
        out = torch.cat([lg, parts["t5"][0]], dim=-2)
    return out, torch.cat([l_pooled, g_pooled], dim=-1)


@pytest.mark.parametrize("present", [("g", "t5"), ("l",)])
def test_one_clip_is_zero_filled_as_comfyui(tmp_path, native, full, present, caplog):
    from sdlab.model import model_for
    from sdlab.text.conditioning import prompt_schedule

    runners = Pipeline(full).text
    chunks = [r.chunks(PROMPT) for r in runners]
    each = {name: (e.context, e.pooled) for name, r, c in zip(("l", "g", "t5"), runners, chunks)
            for e in [r.encode(c, 1)]}

    prefixes = {"l": L, "g": G, "t5": T5}
    path = tmp_path / "one_clip.safetensors"
    save_safetensors(_without(native, *(p for n, p in prefixes.items() if n not in present)), path)
    with caplog.at_level(logging.INFO, logger="sdlab.checkpoints.sd3"):
        bundle = load_bundle(path, device="cpu", dtype=torch.float32)
    absent = "clip_l" if "l" not in present else "clip_g"
    assert sum(f"no {absent} text encoder" in r.message and "zeros" in r.message for r in caplog.records) == 1

    pipe = Pipeline(bundle)
    (schedule,) = prompt_schedule(pipe.text, [PROMPT], 1, 1, combine="sd3")
    cond = model_for(bundle).conditioning(schedule.at(0), 1)
    widths = (full.config.text_encoders[0].width, full.config.text_encoders[1].width)
    context, pooled = _comfyui_layout({n: each[n] for n in present}, 64, widths)
    # The same encoders in two loads may round a last bit differently (see `_levels_apart`).
    torch.testing.assert_close(cond.context, context, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.y, pooled, rtol=0, atol=1e-6)
    zeros = slice(0, widths[0]) if "l" not in present else slice(widths[0], None)  # the absent CLIP's part
    assert not cond.y[:, zeros].any() and not cond.context[:, :77, zeros].any()
    assert cond.y.abs().sum() > 0 and cond.context[:, :77].abs().sum() > 0
    image = pipe.generate(GenerationRequest(PROMPT, steps=1, seed=1, width=SIZE, height=SIZE)).images[0]
    assert np.asarray(image).std() > 1

    # sdlab's own file of such a model says which encoders it holds (its config in the metadata).
    save_checkpoint(bundle, tmp_path / "ours.safetensors")
    assert load_bundle(tmp_path / "ours.safetensors", device="cpu", dtype=torch.float32).config == bundle.config


# ---------------------------------------------------------------- fp8 T5


def test_fp8_t5_stays_fp8_and_matches_its_upcast_weights(tmp_path, native):
    import sdlab
    from transformers import T5Config, T5EncoderModel

    from sdlab.models.t5 import UpcastLinear

    bare = tmp_path / "sd3_medium_incl_clips.safetensors"
    save_safetensors(_without(native, T5), bare)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in _part(native, T5).items()}
    t5_file = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_safetensors(fp8, t5_file)

    bundle = load_bundle(bare, device="cpu", dtype=torch.float32, text_encoder_files={"t5xxl": t5_file})
    t5 = bundle.text_encoders[2]
    linears = [m for m in t5.modules() if isinstance(m, UpcastLinear)]
    assert linears and all(m.weight.dtype == torch.float8_e4m3fn for m in linears)
    # Through sdlab.load too, whose default stores weights as fp16 on a CPU computing in fp32.
    loaded = sdlab.load(bare, device="cpu", text_encoder_files={"t5xxl": t5_file}).bundle.text_encoders[2]
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in loaded.modules() if isinstance(m, UpcastLinear))

    # transformers' T5 on the same weights, rounded to fp8 and upcast to fp32.
    cfg = bundle.config.text_encoders[2]
    theirs = T5EncoderModel(T5Config(vocab_size=cfg.vocab_size, d_model=cfg.d_model, d_kv=cfg.d_kv, d_ff=cfg.d_ff,
                                     num_layers=cfg.num_layers, num_heads=cfg.num_heads, feed_forward_proj="gated-gelu",
                                     dropout_rate=0.0)).eval()
    theirs.load_state_dict({k: v.float() for k, v in fp8.items()}, strict=False)
    ids = torch.tensor([bundle.tokenizers[2].encode(PROMPT)])
    with torch.no_grad():
        want = theirs(input_ids=ids).last_hidden_state
        for net in (t5, loaded):
            got = net(ids, dtype=torch.float32)
            assert want.abs().mean() > 0.05
            assert (got - want).abs().max() < 1e-4


# ---------------------------------------------------------------- LoRA on the text encoders


def test_kohya_lora_reaches_t5_and_both_clips(tmp_path, full):
    from sdlab.lora import LoraUse, apply_loras, load_lora

    bundle = full
    g = torch.Generator().manual_seed(5)
    # kohya's networks/lora_sd3.py: lora_te1_ (CLIP-L), lora_te2_ (CLIP-G), lora_te3_ (T5), each the
    # transformers module path with "_" for ".".
    modules = {"lora_te3_encoder_block_0_layer_0_SelfAttention_q": (2, "encoder.block.0.layer.0.SelfAttention.q"),
               "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo": (2, "encoder.block.1.layer.1.DenseReluDense.wo"),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (0, "text_model.encoder.layers.0.self_attn.q_proj"),
               "lora_te2_text_model_encoder_layers_2_mlp_fc1": (1, "text_model.encoder.layers.2.mlp.fc1")}
    tensors, expected, rank, alpha, multiplier = {}, {}, 4, 3.0, 0.7
    for name, (net, path) in modules.items():
        w = bundle.text_encoders[net].get_parameter(path + ".weight").detach()
        down, up = torch.randn(rank, w.shape[1], generator=g), torch.randn(w.shape[0], rank, generator=g)
        tensors.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
        expected[(net, path)] = w + multiplier * alpha / rank * up @ down
    save_safetensors(tensors, tmp_path / "sd3_te_lora.safetensors")

    # The T5 with the deltas merged by hand.
    by_hand = copy.deepcopy(bundle.text_encoders[2])
    with torch.no_grad():
        for (net, path), w in expected.items():
            if net == 2:
                by_hand.get_parameter(path + ".weight").copy_(w)
    ids = torch.tensor([bundle.tokenizers[2].encode(PROMPT)])
    before = bundle.text_encoders[2](ids)
    with apply_loras(bundle, [LoraUse(load_lora(tmp_path / "sd3_te_lora.safetensors"), multiplier, 1.0)]) as applied:
        assert not applied.unmatched
        for (net, path), w in expected.items():
            torch.testing.assert_close(bundle.text_encoders[net].get_parameter(path + ".weight"), w, rtol=0, atol=1e-5)
        with torch.no_grad():
            patched, merged = bundle.text_encoders[2](ids), by_hand(ids)
        assert (patched - before).abs().max() > 1e-2
        torch.testing.assert_close(patched, merged, rtol=0, atol=1e-4)  # fp32 sums in another order
    assert torch.equal(bundle.text_encoders[2](ids), before)


# ---------------------------------------------------------------- bad input, one line each


def test_bad_input_is_one_line(tmp_path, native, full_file, capsys):
    from transformers import T5Config, T5EncoderModel

    small = T5EncoderModel(T5Config(vocab_size=32128, d_model=32, d_kv=8, num_heads=4, d_ff=37, num_layers=1,
                                    feed_forward_proj="gated-gelu"))
    t5_base = tmp_path / "t5_base.safetensors"
    save_safetensors({k: v.clone() for k, v in small.state_dict().items() if k != "encoder.embed_tokens.weight"}, t5_base)
    assert cli_main(["generate", PROMPT, "-m", str(full_file), "--t5", str(t5_base), "--steps", "1", *FP32,
                     "-o", str(tmp_path / "a.png")]) == 1
    assert "T5 encoder is 32 wide but this MMDiT reads 64" in _one_error_line(capsys)

    assert cli_main(["generate", PROMPT, "-m", str(full_file), "-W", "40", "-H", "32", "--steps", "1", *FP32,
                     "-o", str(tmp_path / "b.png")]) == 1
    assert "width 40 is not a multiple of 16" in _one_error_line(capsys)

    no_clips = tmp_path / "sd3_medium.safetensors"
    save_safetensors(_without(native, L, G), no_clips)
    assert cli_main(["generate", PROMPT, "-m", str(no_clips), "--steps", "1", *FP32,
                     "-o", str(tmp_path / "c.png")]) == 1
    assert "--clip-l / --clip-g" in _one_error_line(capsys)
