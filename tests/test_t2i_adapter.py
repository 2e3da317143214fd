"""T2I-Adapters: the network against diffusers' T2IAdapter (full, SDXL's full_xl and light
layouts, every weight random), read from diffusers' keys, from the original TencentARC keys (made
from diffusers' by ComfyUI's renaming) and from a diffusers folder; our UNet fed the features where
diffusers' UNet takes `down_intrablock_additional_residuals`; txt2img against
StableDiffusionAdapterPipeline (adapter_conditioning_scale) and StableDiffusionXLAdapterPipeline
(adapter_conditioning_factor: the step window); the kind `sdlab info` names; bad input."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.diffusers_folder import write_diffusers_folder
from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle, new_bundle
from sdlab.controlnet import control_file_info, inspect_control_file, load_controlnet
from sdlab.controlnet.apply import adapter_weights
from sdlab.controlnet.units import ControlRequest
from sdlab.errors import SdlabError
from sdlab.models.t2i_adapter import T2IAdapter, T2IAdapterConfig, feature_targets
from sdlab.models.unet import ControlResiduals, UNet
from sdlab.models_dir import ModelsDir
from sdlab.pipeline import GenerationRequest, Pipeline

from .models.test_controlnet import conditioning
from .models.test_unet import TINY, diffusers_twin, inputs, random_unet
from .tiny import as_float_array, diffusers_folder, euler_karras, tiny_config

PROMPT = "a red circle on a blue background"
SIZE = 64
LAYOUTS = {  # diffusers' adapter_type -> (channels, num_res_blocks, unshuffle) at tiny widths
    "full_adapter": ([32, 64, 128, 128], 2, 8),
    "full_adapter_xl": ([32, 64, 128, 128], 2, 16),
    "light_adapter": ([32, 64, 128], 4, 8),
}


def random_adapter(adapter_type: str, channels, num_res_blocks: int, downscale_factor: int, seed: int = 0,
                   scale: float = 0.2):
    """diffusers' T2IAdapter with every weight random (`scale` / sqrt(fan-in)): unit-scale
    features at 0.2, features that move a tiny model's latents at 1."""
    from diffusers import T2IAdapter as Reference

    torch.manual_seed(seed)
    ref = Reference(in_channels=3, channels=list(channels), num_res_blocks=num_res_blocks,
                    downscale_factor=downscale_factor, adapter_type=adapter_type).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
    return ref


def original_keys(sd: dict, light: bool) -> dict:
    """diffusers' keys renamed to the original TencentARC ones as ComfyUI's `load_t2i_adapter`
    renames them (full: `adapter.body.I.resnets.J.` -> `body.{2I+J}.`, `adapter.body.I.` ->
    `body.{2I}.`, `adapter.` -> ``) and, for the light layout, as the extension's Adapter_light
    names its modules (`body.I.body.J.`)."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[1] == "body" and parts[3] == "resnets":
            i, j = int(parts[2]), int(parts[4])
            k = ".".join([f"body.{i}.body.{j}" if light else f"body.{2 * i + j}", *parts[5:]])
        elif parts[1] == "body":
            k = ".".join([f"body.{parts[2] if light else 2 * int(parts[2])}", *parts[3:]])
        else:
            k = ".".join(parts[1:])
        out[k] = v
    return out


@pytest.mark.parametrize("adapter_type", list(LAYOUTS))
@torch.no_grad()
def test_network_matches_diffusers_from_every_layout(adapter_type, tmp_path):
    channels, blocks, factor = LAYOUTS[adapter_type]
    ref = random_adapter(adapter_type, channels, blocks, factor)
    hint = torch.rand(2, 3, 128, 96, generator=torch.Generator().manual_seed(3))
    expected = ref(hint)
    sd = ref.state_dict()
    files = {"diffusers keys": tmp_path / "diffusers.safetensors", "original keys": tmp_path / "original.safetensors",
             "diffusers folder": tmp_path / "folder"}
    save_safetensors(sd, files["diffusers keys"])
    save_safetensors(original_keys(sd, adapter_type == "light_adapter"), files["original keys"])
    ref.save_pretrained(files["diffusers folder"])
    for how, path in files.items():
        net = load_controlnet(path)
        assert isinstance(net, T2IAdapter), how
        ours = net(hint)
        assert len(ours) == len(expected) == 4
        for a, b in zip(ours, expected):
            assert a.shape == b.shape and a.abs().mean() > 0.05, how
            assert (a - b).abs().max().item() < 1e-4, how
    family = "SDXL" if adapter_type == "full_adapter_xl" else "SD 1.x"
    light = " (light)" if adapter_type == "light_adapter" else ""
    for path in files.values():
        assert inspect_control_file(path).describe() == f"T2I-Adapter for {family}{light}"


@pytest.mark.parametrize("name", ["sd1-style", "sdxl-style"])
@torch.no_grad()
def test_unet_takes_the_features_where_diffusers_does(name):
    """Features of each target's shape on our UNet (`ControlResiduals.encoder`) and on diffusers'
    (its own rule: the end of each down block, then the middle if the shape fits)."""
    cfg = TINY[name]
    unet = random_unet(cfg, seed=5)
    reference = diffusers_twin(unet)
    size = (16, 16)
    x, t, context = inputs(cfg, size)
    y, kwargs = conditioning(cfg)
    g = torch.Generator().manual_seed(7)
    targets = feature_targets(cfg, latent_factor=1)  # scales in latent cells
    features = [torch.randn(2, tg.width, -(-size[0] // tg.scale), -(-size[1] // tg.scale), generator=g)
                for tg in targets]
    blocks = 1 + sum(cfg.num_res_blocks) + len(cfg.channel_mult) - 1
    encoder = [None] * blocks
    for tg, f in zip(targets[:-1], features):
        encoder[tg.block] = f
    ours = unet(x, t, context, y, control=ControlResiduals((), features[-1], tuple(encoder)))
    theirs = reference(x, t, context, down_intrablock_additional_residuals=[f.clone() for f in features],
                       **kwargs).sample
    assert (ours - unet(x, t, context, y)).abs().mean() > 0.05
    assert (ours - theirs).abs().max().item() < 1e-4


def _hint(seed: int = 0) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """The tiny SD1 model (VAE factor 4, two levels) as a diffusers folder, loaded."""
    _, folder = diffusers_folder(tmp_path_factory.mktemp("t2i"), "sd1")
    return folder, load_bundle(folder, device="cpu")


def test_txt2img_matches_diffusers_adapter_pipeline(sd1, tmp_path):
    """A two-level adapter unshuffling by 4 for the tiny SD1 model, written as a diffusers folder
    into models/ControlNet and named by the unit."""
    from diffusers import StableDiffusionAdapterPipeline

    folder, bundle = sd1
    models = ModelsDir(tmp_path / "models")
    adapter = random_adapter("full_adapter", [32, 64], 2, 4, scale=1.0)
    adapter.save_pretrained(models.root / "ControlNet" / "tiny_adapter")
    theirs = euler_karras(StableDiffusionAdapterPipeline.from_pretrained(folder, adapter=adapter,
                                                                         safety_checker=None))
    ref = theirs(PROMPT, image=_hint(), num_inference_steps=3, guidance_scale=7.5, height=SIZE, width=SIZE,
                 adapter_conditioning_scale=0.6, generator=torch.Generator("cpu").manual_seed(42),
                 output_type="np").images
    pipe = Pipeline(bundle, models=models)
    unit = ControlRequest("tiny_adapter", image=_hint(), weight=0.6)
    args = dict(steps=3, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=42, width=SIZE, height=SIZE)
    latents = []  # the adapter matters (the tiny VAE draws almost the same grey for any latent)
    results = [pipe.generate(GenerationRequest(PROMPT, controls=controls, **args),
                             lambda p: latents.append(p.latents) if p.step == p.total else None)
               for controls in ([unit], [])]
    ours = results[0].images
    assert np.abs(as_float_array(ours) - ref).max() <= 1 / 255
    assert 'ControlNet 0: "Module: none, Model: tiny_adapter, Weight: 0.6' in ours[0].info["parameters"]
    assert (latents[0] - latents[1]).abs().max() > 0.05


def test_sdxl_adapter_and_its_step_window_match_diffusers(tmp_path):
    """A three-level tiny SDXL (level 0 without attention, as SDXL's) with a full_xl adapter: its
    features after the level-0 downsample, in levels 1 and 2 and on the middle; guidance end 0.5
    is diffusers' adapter_conditioning_factor 0.5 (the first int(4 * 0.5) steps)."""
    from diffusers import StableDiffusionXLAdapterPipeline

    cfg = tiny_config("sdxl")
    cfg = replace(cfg, unet=replace(cfg.unet, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                                    transformer_depth=(0, 1, 1), transformer_depth_middle=1))
    bundle = new_bundle(cfg, seed=0, init_std=0.05)
    folder = tmp_path / "sdxl"
    write_diffusers_folder(bundle.state_dict(), bundle.config, folder)
    models = ModelsDir(tmp_path / "models")
    adapter = random_adapter("full_adapter_xl", [64, 128, 128, 128], 2, 8, scale=1.0)
    save_safetensors(adapter.state_dict(), models.root / "ControlNet" / "xl_adapter.safetensors")
    theirs = euler_karras(StableDiffusionXLAdapterPipeline.from_pretrained(folder, adapter=adapter))
    ref = theirs(PROMPT, image=_hint(1), num_inference_steps=4, guidance_scale=5.0, height=SIZE, width=SIZE,
                 adapter_conditioning_scale=0.8, adapter_conditioning_factor=0.5,
                 generator=torch.Generator("cpu").manual_seed(7), output_type="latent").images
    latents = []
    Pipeline(load_bundle(folder, device="cpu"), models=models).generate(
        GenerationRequest(PROMPT, steps=4, sampler="Euler", schedule="karras", cfg_scale=5.0, seed=7, width=SIZE,
                          height=SIZE, controls=[ControlRequest("xl_adapter", image=_hint(1), weight=0.8,
                                                                guidance_end=0.5)]),
        lambda p: latents.append(p.latents) if p.step == p.total else None)
    # Latents, not pixels: the tiny VAE draws nearly the same image for both windows. Measured:
    # 3.8e-5 of latents up to 53; against adapter_conditioning_factor 1.0 instead, 0.019.
    assert (latents[-1] - ref).abs().max().item() < 5e-4


def test_soft_weights_and_the_negative_half():
    assert adapter_weights("Balanced", 0.5, 4) == [0.5] * 4
    assert adapter_weights("My prompt is more important", 2.0, 4) == pytest.approx([0.5, 1.24, 1.65, 2.0])
    assert adapter_weights("ControlNet is more important", 1.0, 2) == [0.25, 0.62]


@torch.no_grad()
def test_controlnet_is_more_important_leaves_the_negative_half_unguided(sd1):
    from sdlab.controlnet.apply import ControlledModel, ControlUnit, _schedule
    from sdlab.model import unet_model
    from sdlab.sampling.denoiser import CFGDenoiser, Conditioning

    model = unet_model(sd1[1])
    net = T2IAdapter(T2IAdapterConfig(channels=(32, 64), downscale_factor=4)).eval()
    sigmas = torch.tensor([5.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    cond, uncond = (Conditioning(torch.randn(1, 77, 64, generator=g)) for _ in range(2))
    x, sigma = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([5.0])
    unit = ControlUnit(net, torch.rand(1, 3, SIZE, SIZE, generator=g), 1.0, mode="ControlNet is more important")
    inner = ControlledModel(model, [_schedule(unit, sigmas)])
    neg, pos = inner(torch.cat([x, x]), torch.cat([sigma, sigma]), CFGDenoiser(inner, cond, uncond, 2.0)._batched
                     ).chunk(2)
    torch.testing.assert_close(neg, model(x, sigma, uncond))
    assert not torch.allclose(pos, model(x, sigma, cond))


def test_kinds_and_bad_input(tmp_path):
    shapes = {k: tuple(v.shape) for k, v in T2IAdapter(T2IAdapterConfig()).state_dict().items()}
    assert control_file_info(shapes).describe() == "T2I-Adapter for SD 1.x"
    assert control_file_info({"style_embedding": (1, 8, 1024)}).describe() == \
        "T2I-Adapter for SD 1.x (style, not supported)"
    save_safetensors({"style_embedding": torch.zeros(1, 8, 16)}, tmp_path / "style.safetensors")
    with pytest.raises(SdlabError, match="style adapter"):
        load_controlnet(tmp_path / "style.safetensors")
    # An SD 1.x adapter (features at 1/4.. of the image) refused by the tiny SDXL model, in one line.
    with torch.device("meta"):
        unet = UNet(tiny_config("sdxl").unet)
    adapter = random_adapter("full_adapter", [64, 128], 2, 4)
    save_safetensors(adapter.state_dict(), tmp_path / "sd1_adapter.safetensors")
    with pytest.raises(SdlabError, match="T2I-Adapter for SD 1.x / 2.x and cannot guide this model") as e:
        load_controlnet(tmp_path / "sd1_adapter.safetensors", unet=unet, latent_factor=4)
    assert "\n" not in str(e.value)
    # A hint whose size the unshuffle does not divide.
    with pytest.raises(ValueError, match="multiples of 8"):
        T2IAdapter(T2IAdapterConfig(channels=(8, 8), downscale_factor=8))(torch.rand(1, 3, 60, 64))


def test_sdlab_info_names_the_kind(tmp_path, capsys):
    from sdlab.cli import main

    adapter = random_adapter("full_adapter_xl", [32, 64, 128, 128], 2, 16)
    save_safetensors(adapter.state_dict(), tmp_path / "xl.safetensors")
    adapter.save_pretrained(tmp_path / "folder")
    for path in (tmp_path / "xl.safetensors", tmp_path / "folder"):
        assert main(["info", str(path)]) == 0
        rows = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
        assert rows["kind"] == "T2I-Adapter for SDXL"
