"""ControlNet applied in generation: txt2img with one and with two units against diffusers'
StableDiffusionControlNetPipeline (weight, guidance start / end, MultiControlNetModel); the
control modes' weights; bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdlab.checkpoints.io import save_safetensors
from sdlab.checkpoints.loader import load_bundle
from sdlab.controlnet.apply import ControlledModel, control_weights, resize_hint
from sdlab.controlnet.units import ControlRequest
from sdlab.errors import SdlabError
from sdlab.models.controlnet import ControlNetConfig
from sdlab.models_dir import ModelsDir
from sdlab.pipeline import GenerationRequest, Pipeline

from .models.test_controlnet import random_controlnet
from .tiny import as_float_array, diffusers_folder, euler_karras

SIZE = 64
PROMPT = "a red circle on a blue background"


def _hint(seed: int) -> Image.Image:
    g = np.random.default_rng(seed)
    return Image.fromarray((g.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny SD1 diffusers folder, and two random ControlNets for its UNet written where the web
    UI keeps them (the tiny VAE scales by 4, so the hint encoder has two stride-2 convs)."""
    tmp = tmp_path_factory.mktemp("cn")
    _, folder = diffusers_folder(tmp, "sd1")
    bundle = load_bundle(folder, device="cpu")
    models = ModelsDir(tmp / "models")
    (models.root / "ControlNet").mkdir(parents=True)
    nets = []
    for i in range(2):
        net = random_controlnet(ControlNetConfig(bundle.config.unet, hint_block_channels=(16, 32, 64)), seed=i)
        save_safetensors({"control_model." + k: v for k, v in net.state_dict().items()},
                         models.root / "ControlNet" / f"tiny{i}.safetensors")
        nets.append(net)
    return folder, bundle, models, nets


def _diffusers_net(net):
    """diffusers' twin of a ControlNet whose hint encoder has fewer levels than the released 4 (its
    converter assumes 4 and names the last conv a block)."""
    from diffusers import ControlNetModel
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    from .models.test_controlnet import diffusers_controlnet_config

    config = diffusers_controlnet_config(net.cfg)
    checkpoint = {"control_model." + k: v for k, v in net.state_dict().items()}
    converted = convert_controlnet_checkpoint(checkpoint, {"layers_per_block": config["layers_per_block"]})
    last = f"controlnet_cond_embedding.blocks.{2 * (len(net.cfg.hint_block_channels) - 1)}."
    converted = {k.replace(last, "controlnet_cond_embedding.conv_out."): v for k, v in converted.items()}
    reference = ControlNetModel(**config).eval()
    reference.load_state_dict(converted, strict=True)
    return reference


def _diffusers(folder, nets):
    from diffusers import StableDiffusionControlNetPipeline

    controlnet = [_diffusers_net(n) for n in nets]
    return euler_karras(StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=controlnet if len(controlnet) > 1 else controlnet[0], safety_checker=None))


def test_one_unit_matches_diffusers(setup):
    folder, bundle, models, nets = setup
    theirs = _diffusers(folder, nets[:1])
    ref = theirs(PROMPT, image=_hint(0), num_inference_steps=5, guidance_scale=7.5, height=SIZE, width=SIZE,
                 controlnet_conditioning_scale=0.7, control_guidance_start=0.2, control_guidance_end=0.8,
                 generator=torch.Generator("cpu").manual_seed(42), output_type="np").images
    pipe = Pipeline(bundle, models=models)
    unit = ControlRequest("tiny0", image=_hint(0), weight=0.7, guidance_start=0.2, guidance_end=0.8)
    ours = pipe.txt2img(PROMPT, steps=5, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=42,
                        width=SIZE, height=SIZE, controls=[unit])
    diff = np.abs(as_float_array(ours) - ref).max()
    assert diff <= 1 / 255, diff
    # The control matters (the tiny VAE draws almost the same grey for any latent: compare latents).
    latents = []
    for controls in ([unit], []):
        request = GenerationRequest(PROMPT, steps=5, sampler="Euler", schedule="karras", cfg_scale=7.5, seed=42,
                                    width=SIZE, height=SIZE, controls=controls)
        pipe.generate(request, lambda p: latents.append(p.latents) if p.step == p.total else None)
    assert (latents[0] - latents[1]).abs().max() > 0.05
    assert 'ControlNet 0: "Module: none, Model: tiny0, Weight: 0.7' in ours[0].info["parameters"]


def test_two_units_match_multicontrolnet(setup):
    folder, bundle, models, nets = setup
    theirs = _diffusers(folder, nets)
    ref = theirs(PROMPT, image=[_hint(0), _hint(1)], num_inference_steps=4, guidance_scale=5.0, height=SIZE,
                 width=SIZE, controlnet_conditioning_scale=[0.5, 0.8],
                 generator=torch.Generator("cpu").manual_seed(3), output_type="np").images
    units = [ControlRequest("tiny0", image=_hint(0), weight=0.5), ControlRequest("tiny1", image=_hint(1), weight=0.8)]
    ours = Pipeline(bundle, models=models).txt2img(PROMPT, steps=4, sampler="Euler", schedule="karras", cfg_scale=5.0,
                                                   seed=3, width=SIZE, height=SIZE, controls=units)
    assert np.abs(as_float_array(ours) - ref).max() <= 1 / 255


def test_control_modes_weights_and_the_negative_half():
    assert control_weights("Balanced", 0.5, 13) == [0.5] * 13
    soft = control_weights("My prompt is more important", 1.0, 13)
    assert soft[-1] == 1.0 and soft[0] == pytest.approx(0.825 ** 12)
    assert control_weights("ControlNet is more important", 2.0, 10)[-1] == pytest.approx(2 * 0.825 ** 3)  # SDXL: 10


@torch.no_grad()
def test_controlnet_is_more_important_leaves_the_negative_prompt_uncontrolled(setup):
    from sdlab.controlnet.apply import ControlUnit, _schedule
    from sdlab.model import unet_model
    from sdlab.sampling.denoiser import CFGDenoiser, Conditioning

    _, bundle, _, nets = setup
    model = unet_model(bundle)
    hint = torch.rand(1, 3, SIZE, SIZE)
    sigmas = torch.tensor([5.0, 1.0, 0.0])
    g = torch.Generator().manual_seed(0)
    cond, uncond = (Conditioning(torch.randn(1, 77, 64, generator=g)) for _ in range(2))
    x, sigma = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([5.0])

    def halves(mode):
        """x0 of the negative and the positive half of the batch CFG runs."""
        inner = ControlledModel(model, [_schedule(ControlUnit(nets[0], hint, 1.0, mode=mode), sigmas)])
        batched = CFGDenoiser(inner, cond, uncond, 2.0)._batched
        return inner(torch.cat([x, x]), torch.cat([sigma, sigma]), batched).chunk(2)

    neg_soft, pos_soft = halves("My prompt is more important")
    neg_cn, pos_cn = halves("ControlNet is more important")
    neg_plain = model(x, sigma, uncond)
    torch.testing.assert_close(pos_cn, pos_soft)  # the same soft weights on the prompt's half
    torch.testing.assert_close(neg_cn, neg_plain)  # and none on the negative prompt's
    assert not torch.allclose(neg_soft, neg_plain)


def test_resize_modes():
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :32] = 200
    image[0] = image[-1] = 10  # the border's median colour
    assert resize_hint(image, 64, 64, "Just Resize").shape == (64, 64, 3)
    crop = resize_hint(image, 64, 64, "Crop and Resize")
    assert crop.shape == (64, 64, 3)
    fill = resize_hint(image, 64, 64, "Resize and Fill")
    assert fill.shape == (64, 64, 3) and (fill[:8] == np.median(np.concatenate(
        [image[0], image[-1], image[:, 0], image[:, -1]]), axis=0)).all()
    with pytest.raises(SdlabError, match="resize mode"):
        resize_hint(image, 64, 64, "Stretch")


def test_bad_input_is_one_line(setup, tmp_path):
    _, bundle, models, nets = setup
    pipe = Pipeline(bundle, models=models)
    args = dict(steps=1, width=SIZE, height=SIZE, seed=1)
    with pytest.raises(SdlabError, match="not found"):
        pipe.txt2img(PROMPT, controls=[ControlRequest("missing", image=_hint(0))], **args)
    with pytest.raises(SdlabError, match="no control image"):
        pipe.txt2img(PROMPT, controls=[ControlRequest("tiny0")], **args)
    with pytest.raises(SdlabError, match="unknown ControlNet preprocessor"):
        pipe.txt2img(PROMPT, controls=[ControlRequest("tiny0", image=_hint(0), module="nope")], **args)
    with pytest.raises(SdlabError, match="control mode"):
        pipe.txt2img(PROMPT, controls=[ControlRequest("tiny0", image=_hint(0), control_mode="Loud")], **args)
    # An SDXL ControlNet with this SD1 model.
    from tests.tiny import tiny_config

    sdxl = random_controlnet(ControlNetConfig(tiny_config("sdxl").unet, hint_block_channels=(16, 32, 64)))
    save_safetensors({"control_model." + k: v for k, v in sdxl.state_dict().items()},
                     models.root / "ControlNet" / "xl.safetensors")
    with pytest.raises(SdlabError):
        pipe.txt2img(PROMPT, controls=[ControlRequest("xl", image=_hint(0))], **args)
