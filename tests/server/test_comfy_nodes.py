"""ComfyUI's nodes for SD3, area conditioning, VAE files, ControlNet, Canny and upscale models,
`POST /upload/mask`, and binary preview frames, each against sdlab's Python API (or the field's
package that ComfyUI itself runs: kornia for Canny, spandrel for upscalers).

Graphs run two ways: through the HTTP server (what a client sees), and directly through
`graph.execute` with the worker's model, so that a node's output (a LATENT) can be compared
with the same computation made with the Python API on the same loaded model."""

from __future__ import annotations

import io
import json
import struct
import urllib.request
import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlab import steps  # noqa: E402
from sdlab.checkpoints.loader import new_bundle  # noqa: E402
from sdlab.families import FAMILIES, ModelConfig  # noqa: E402
from sdlab.models.clip import CLIPTextConfig  # noqa: E402
from sdlab.models.mmdit import MMDiTConfig  # noqa: E402
from sdlab.models.t5 import T5Config  # noqa: E402
from sdlab.models.vae import VAEConfig  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.comfy import graph  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

SD1, SD3 = "tiny.safetensors", "tiny-sd3.safetensors"


def tiny_sd3_config() -> ModelConfig:
    """SD3's networks at test size: CLIP-L 16 and CLIP-G 32 wide (pooled 48), T5 64 = the MMDiT's
    context width, a 16-channel VAE of downsampling 2."""
    return ModelConfig(
        FAMILIES["sd3"],
        MMDiTConfig(depth=2, hidden_size=32, heads=2, pos_embed_max_size=12, adm_in_channels=48, context_dim=64),
        VAEConfig(latent_channels=16, base_channels=32, channel_mult=(1, 1), num_res_blocks=1, use_quant_conv=False),
        (CLIPTextConfig(layout="openai", width=16, layers=2, heads=1, mlp_width=37, activation="quick_gelu",
                        projection_dim=16),
         CLIPTextConfig(layout="openai", width=32, layers=2, heads=1, mlp_width=37, activation="gelu",
                        projection_dim=32),
         T5Config(d_model=64, d_kv=8, num_heads=4, d_ff=37, num_layers=2)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A models folder with a tiny SD1 and SD3 checkpoint, SD3's encoders as separate files, a
    VAE file, a ControlNet for the SD1 UNet and an ESRGAN; the app (not started) over it."""
    from sdlab.models.controlnet import ControlNet, ControlNetConfig
    from tests.test_upscalers import esrgan_new

    root = tmp_path_factory.mktemp("models")
    for folder in ("Stable-diffusion", "text_encoders", "VAE", "ControlNet", "upscale_models"):
        (root / folder).mkdir()
    sd1 = tiny_bundle("sd1", seed=0)
    save_native(sd1, root / "Stable-diffusion" / SD1)
    sd3 = new_bundle(tiny_sd3_config(), seed=0, init_std=0.1, name="tiny-sd3")
    save_native(sd3, root / "Stable-diffusion" / SD3)
    state = sd3.state_dict()
    for name in ("clip_l", "clip_g", "t5xxl"):  # as ComfyUI keeps them: no prefix
        prefix = f"text_encoders.{name}.transformer."
        save_file({k[len(prefix):]: v.contiguous() for k, v in state.items() if k.startswith(prefix)},
                  str(root / "text_encoders" / f"{name}.safetensors"))
    save_file({k: v.contiguous() for k, v in tiny_bundle("sd1", seed=1).vae.state_dict().items()},
              str(root / "VAE" / "other.safetensors"))
    torch.manual_seed(0)
    net = ControlNet(ControlNetConfig(sd1.config.unet, hint_block_channels=(16, 32, 64)))
    g = torch.Generator().manual_seed(100)
    with torch.no_grad():  # every weight random, the zero-initialised convs too (else it adds nothing)
        for name, p in net.named_parameters():
            p.add_((0.3 if name.startswith(("zero_convs", "middle_block_out")) else 0.05)
                   * torch.randn(p.shape, generator=g))
    save_file({"control_model." + k: v.contiguous() for k, v in net.state_dict().items()},
              str(root / "ControlNet" / "tiny-cn.safetensors"))
    save_file(esrgan_new(nf=8, nb=1), str(root / "upscale_models" / "4x-tiny.safetensors"))
    outputs = tmp_path_factory.mktemp("outputs")
    app = create_app(ServerSettings(models_dir=root, model=SD1, outputs_dir=outputs))
    return root, app, outputs


class Worker:
    """What `graph.execute` asks of the worker: the model of a checkpoint, loaded as the server
    loads it (kept, so that the Python API's reference runs on the very same weights)."""

    def __init__(self, root):
        self.root, self.pipes = root, {}

    def pipeline(self, entry):
        from sdlab.device import parse_dtype, parse_weight_dtype
        from sdlab.models_dir import ModelsDir
        from sdlab.perf import load_for_inference
        from sdlab.pipeline import Pipeline

        if entry.path not in self.pipes:
            bundle = load_for_inference(entry.path, None, parse_dtype(None), compile=False, offload=False,
                                        weight_dtype=parse_weight_dtype(None))
            self.pipes[entry.path] = Pipeline(bundle, models=ModelsDir(self.root))
        return self.pipes[entry.path]

    def progress(self, *args, **kwargs):
        pass

    def check(self):
        pass


@pytest.fixture(scope="module")
def direct(setup):
    root, app, _ = setup
    env = app.state.sdlab.comfy.env
    worker = Worker(root)

    def run(prompt: dict, fails: bool = False) -> dict:
        """Every node's output values, by node id (`fails`: the execution_error's data instead)."""
        valid, error, outputs, node_errors = graph.validate_prompt(prompt, env)
        assert valid, (error, node_errors)
        cache, messages = graph.OutputCache(), []
        status, _, _ = graph.execute(worker, env, "p", prompt, {}, outputs, cache, lambda *a, **k: None, messages)
        if fails:
            assert status == "error"
            return dict(messages)["execution_error"]
        assert status == "success", messages[-1]
        sigs = graph.Signatures(prompt, env)
        return {n: cache.outputs[sigs.key(n)][0] for n in prompt if sigs.key(n) in cache.outputs}

    return run, worker, env


@pytest.fixture(scope="module")
def client(setup):
    with TestClient(setup[1]) as c:
        yield c


def text2img(ckpt: str, size: int, seed: int = 7, steps_: int = 3, cfg: float = 5.0, prompt: str = "a red cat",
             negative: str = "blurry", latent: str = "EmptyLatentImage", sampler: str = "euler",
             scheduler: str = "normal") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": latent, "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": seed, "steps": steps_, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def wait(client, prompt_id: str) -> dict:
    import time

    for _ in range(3000):
        h = client.get(f"/history/{prompt_id}").json()
        if h:
            return h[prompt_id]
        time.sleep(0.02)
    raise AssertionError("the prompt did not finish")


def view(client, image: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get("/view", params=image).content)).convert("RGB"), dtype=int)


def final_latent(pipe, req) -> torch.Tensor:
    """`Pipeline.generate`'s last latent (the Python API's image before the VAE)."""
    last = []
    pipe.generate(req, lambda p: last.append(p.latents) if p.step == p.total else None)
    return last[-1].float().cpu()


# ---------------------------------------------------------------------------------------------

def test_object_info_of_the_new_nodes(client):
    info = client.get("/object_info").json()
    req = lambda n: info[n]["input"]["required"]  # noqa: E731
    assert req("VAELoader") == {"vae_name": [["other.safetensors"]]}
    assert (info["VAELoader"]["category"], info["VAELoader"]["display_name"]) == ("loaders", "Load VAE")
    assert req("ConditioningSetArea") == {
        "conditioning": ["CONDITIONING"],
        "width": ["INT", {"default": 64, "min": 64, "max": 16384, "step": 8}],
        "height": ["INT", {"default": 64, "min": 64, "max": 16384, "step": 8}],
        "x": ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}],
        "y": ["INT", {"default": 0, "min": 0, "max": 16384, "step": 8}],
        "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}]}
    assert info["ConditioningSetArea"]["display_name"] == "Conditioning (Set Area)"
    names = ["clip_g.safetensors", "clip_l.safetensors", "t5xxl.safetensors"]
    assert req("TripleCLIPLoader") == {f"clip_name{i}": [names] for i in (1, 2, 3)}
    assert info["TripleCLIPLoader"]["input"]["optional"] == {"device": [["default", "cpu"], {"advanced": True}]}
    assert req("EmptySD3LatentImage")["width"] == ["INT", {"default": 1024, "min": 16, "max": 16384, "step": 16}]
    assert (info["EmptySD3LatentImage"]["category"], info["EmptySD3LatentImage"]["python_module"]) == (
        "latent/sd3", "comfy_extras.nodes_sd3")
    assert req("ModelSamplingSD3") == {"model": ["MODEL"],
                                       "shift": ["FLOAT", {"default": 3.0, "min": 0.0, "max": 100.0, "step": 0.01}]}
    assert list(req("CLIPTextEncodeSD3")) == ["clip", "clip_l", "clip_g", "t5xxl", "empty_padding"]
    assert req("CLIPTextEncodeSD3")["empty_padding"][0] == ["none", "empty_prompt"]
    assert req("ControlNetLoader") == {"control_net_name": [["tiny-cn.safetensors"]]}
    assert info["DiffControlNetLoader"]["display_name"] == "Load ControlNet Model (diff)"
    adv = info["ControlNetApplyAdvanced"]
    assert list(adv["input"]["required"]) == ["positive", "negative", "control_net", "image", "strength",
                                              "start_percent", "end_percent"]
    assert adv["input"]["required"]["end_percent"] == ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0,
                                                                 "step": 0.001}]
    assert adv["input"]["optional"] == {"vae": ["VAE"]}
    assert (adv["output"], adv["output_name"], adv["category"]) == (
        ["CONDITIONING", "CONDITIONING"], ["positive", "negative"], "conditioning/controlnet")
    assert info["ControlNetApply"]["deprecated"] is True and "deprecated" not in adv
    assert req("Canny")["low_threshold"] == ["FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}]
    assert info["Canny"]["category"] == "image/preprocessors"
    assert req("UpscaleModelLoader") == {"model_name": [["4x-tiny.safetensors"]]}
    assert info["ImageUpscaleWithModel"]["output"] == ["IMAGE"]
    assert info["UpscaleModelLoader"]["output"] == ["UPSCALE_MODEL"]


def test_sd3_graph_is_the_python_apis_generation(direct, setup, client):
    """An SD3 graph (ModelSamplingSD3's shift) samples the latent `Pipeline.generate` samples with
    the same settings, exactly (flow models mix noise in the same way in both); its saved image is
    within one level (ComfyUI truncates where the web UI rounds). TripleCLIPLoader's encoders and
    CLIPTextEncodeSD3 with one text for all give the same; an empty T5 text with "none" does not."""
    from sdlab.pipeline import GenerationRequest

    run, worker, env = direct
    g = text2img(SD3, 64, latent="EmptySD3LatentImage")  # latent 8x8: 16 px through the tiny VAE
    g["8"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 2.0}}
    g["5"]["inputs"]["model"] = ["8", 0]
    ours = run(g)["5"][0]["samples"]
    pipe = worker.pipeline(env.find_checkpoint(SD3))
    req = GenerationRequest("a red cat", negative_prompt="blurry", seed=7, steps=3, cfg_scale=5.0, sampler="Euler",
                            schedule="normal", width=16, height=16, shift=2.0)
    assert torch.equal(ours, final_latent(pipe, req))
    unshifted = run(text2img(SD3, 64, latent="EmptySD3LatentImage"))["5"][0]["samples"]
    assert (unshifted - ours).abs().max() > 0.05

    triple = dict(g, **{"9": {"class_type": "TripleCLIPLoader", "inputs": {
        "clip_name1": "t5xxl.safetensors", "clip_name2": "clip_g.safetensors", "clip_name3": "clip_l.safetensors"}}})
    triple["2"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["9", 0]}}
    triple["3"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["9", 0], "clip_l": "blurry",
                                                                  "clip_g": "blurry", "t5xxl": "blurry",
                                                                  "empty_padding": "none"}}
    assert torch.equal(run(triple)["5"][0]["samples"], ours)
    triple["3"]["inputs"]["t5xxl"] = ""  # no T5 tokens for the negative prompt
    assert not torch.equal(run(triple)["5"][0]["samples"], ours)
    triple["3"]["inputs"].update(clip_l="", clip_g="", t5xxl="blurry")  # T5's tokens alone, pooled zeros
    assert run(triple)["5"][0]["samples"].isfinite().all()

    r = client.post("/prompt", json={"prompt": g})
    entry = wait(client, r.json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
    image = view(client, entry["outputs"]["7"]["images"][0])
    expected = np.asarray(pipe.generate(req).images[0], dtype=int)
    assert image.shape == expected.shape == (16, 16, 3) and np.abs(image - expected).max() <= 1

    bad = text2img(SD1, 64)
    bad["8"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 2.0}}
    bad["5"]["inputs"]["model"] = ["8", 0]
    error = run(bad, fails=True)
    assert error["node_type"] == "KSampler"
    assert "ModelSamplingSD3 sets the shift of flow models (SD3, SD3.5)" in error["exception_message"]


def test_area_weights_are_comfyuis():
    """The blend of `calc_cond_batch` on a model whose x0 is a constant per conditioning: inside
    an area (strength s) (a + s b) / (1 + s), a ramp over the inner edges, the rest a alone; the
    negative side gets an entry of the same area, so guidance compares like with like."""
    from sdlab.sampling.denoiser import Conditioning
    from sdlab.sampling.regional import Area, Region, RegionalCFG, region_weight

    def model(x, sigma, cond):
        return cond.context[:, :1, :1, None].expand(-1, x.shape[1], x.shape[2], x.shape[3]).clone()

    def c(v):
        return Conditioning(torch.full((1, 1, 4), float(v)))

    area = Area(height=8, width=12, y=4, x=0)  # touches the left edge of the 16 x 16 latent only
    w = region_weight(area, 2.0, 16, 16)
    assert w.shape == (8, 12)
    ramp = [(t + 1) / 2 for t in range(2)]  # min(8, 8 // 4) rows at the top and bottom edges
    assert w[0, 5] == 2.0 * ramp[0] and w[1, 5] == 2.0 * ramp[1] and w[4, 5] == 2.0 and w[7, 5] == 2.0 * ramp[0]
    assert w[4, 0] == 2.0  # no ramp at the image's edge
    assert w[4, 11] == 2.0 * (1 / 3)  # min(8, 12 // 4) = 3 columns at the inner right edge
    x, sigma = torch.zeros(1, 4, 16, 16), torch.ones(1)
    guided = RegionalCFG([Region(model, c(1.0)), Region(model, c(3.0), 2.0, area)],
                         [Region(model, c(0.5)), Region(model, c(0.5), 2.0, area)], 7.0)
    out = guided(x, sigma)
    inside, edge, outside = out[0, 0, 8, 5], out[0, 0, 4, 5], out[0, 0, 0, 0]
    assert torch.isclose(outside, torch.tensor(0.5 + 7 * (1.0 - 0.5)))
    assert torch.isclose(inside, torch.tensor(0.5 + 7 * ((1 + 2 * 3) / 3 - 0.5)))
    assert torch.isclose(edge, torch.tensor(0.5 + 7 * ((1 + 1 * 3) / 2 - 0.5)))


def test_area_conditioning_on_a_graph(direct):
    """ConditioningSetArea on SD1: after one Euler step (the latent is the model's x0) the latent
    outside the area is exactly the one without it, and inside it is not; an area as large as the
    latent is the plain conditioning (up to a batch's rounding)."""
    run, _, _ = direct
    plain = text2img(SD1, 128, steps_=1)  # latent 16 x 16
    base = run(plain)["5"][0]["samples"]
    g = json.loads(json.dumps(plain))
    g["10"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue house", "clip": ["1", 1]}}
    g["11"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["10", 0], "width": 64, "height": 64,
                                                                "x": 64, "y": 0, "strength": 1.5}}
    g["12"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["11", 0]}}
    g["5"]["inputs"]["positive"] = ["12", 0]
    regional = run(g)["5"][0]["samples"]
    inside = (slice(None), slice(None), slice(0, 8), slice(8, 16))
    outside = torch.ones(16, 16, dtype=torch.bool)
    outside[0:8, 8:16] = False
    assert torch.equal(regional[..., outside], base[..., outside])
    assert (regional[inside] - base[inside]).abs().max() > 0.01
    whole = json.loads(json.dumps(plain))
    whole["11"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": 128,
                                                                    "height": 128, "x": 0, "y": 0, "strength": 1.0}}
    whole["5"]["inputs"]["positive"] = ["11", 0]
    assert torch.allclose(run(whole)["5"][0]["samples"], base, atol=1e-4)


def _hint(size: int) -> np.ndarray:
    return (np.random.default_rng(3).random((size, size, 3)) * 255).astype(np.uint8)


def test_controlnet_nodes_apply_the_python_apis_controlnet(direct, setup):
    """ControlNetLoader + ControlNetApplyAdvanced sample exactly what the Python API's ControlNet
    patch (`controlnet.apply.controlled`) samples with ComfyUI's noise; the control matters;
    a percent range that never starts is no control; the deprecated ControlNetApply reaches the
    negative prompt too; DiffControlNetLoader wants the model that samples. The image is within
    two levels of `Pipeline.txt2img(controls=...)` (ComfyUI's noise and truncation)."""
    from sdlab.controlnet.apply import ControlUnit, controlled, hint_tensor
    from sdlab.model import unet_model
    from sdlab.sampling.denoiser import CFGDenoiser
    from sdlab.sampling.noise import BatchNoise
    from sdlab.sampling.samplers import SAMPLERS
    from sdlab.sampling.schedules import SCHEDULES
    from sdlab.text.conditioning import prompt_schedule

    run, worker, env = direct
    root = setup[0]
    hint = _hint(64)  # the tiny VAE downsamples by 4: a 16 x 16 latent is 64 pixels
    Image.fromarray(hint).save(env.folder("input") / "hint.png")
    g = text2img(SD1, 128, steps_=4)
    g.update({"20": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "tiny-cn.safetensors"}},
              "21": {"class_type": "ControlNetApplyAdvanced", "inputs": {
                  "positive": ["2", 0], "negative": ["3", 0], "control_net": ["20", 0], "image": ["22", 0],
                  "strength": 0.7, "start_percent": 0.0, "end_percent": 1.0}},
              "22": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}})
    g["5"]["inputs"].update(positive=["21", 0], negative=["21", 1])
    out = run(g)
    ours = out["5"][0]["samples"]

    pipe = worker.pipeline(env.find_checkpoint(SD1))
    with torch.no_grad():
        model = unet_model(pipe.bundle)
        pos, neg = prompt_schedule(pipe.text, ["a red cat", "blurry"], 4, 1)
        noise = BatchNoise((1, 4, 16, 16), 7)
        sigmas = SCHEDULES["normal"].function(4, model.sampling)
        net = pipe.controlnets.get(str(root / "ControlNet" / "tiny-cn.safetensors"), pipe.bundle)
        unit = ControlUnit(net, hint_tensor(hint), 0.7)
        cfg = CFGDenoiser(controlled(model, [unit], sigmas), model.conditioning(pos.at(0), 1, None, False),
                          model.conditioning(neg.at(0), 1, None, True), 5.0)
        x = noise.initial() * float(torch.sqrt(1 + sigmas[0] ** 2))  # ComfyUI's starting noise
        reference = steps.sample(model.sampling, cfg, x, sigmas, SAMPLERS["Euler"],
                                 noise.sampler_noise(x, sigmas, False)).float()
    assert torch.equal(ours, reference)
    plain = run(text2img(SD1, 128, steps_=4))["5"][0]["samples"]
    assert (ours - plain).abs().max() > 0.05

    never = json.loads(json.dumps(g))
    never["21"]["inputs"]["start_percent"] = 1.0
    assert torch.equal(run(never)["5"][0]["samples"], plain)

    old = json.loads(json.dumps(g))
    old["21"] = {"class_type": "ControlNetApply", "inputs": {"conditioning": ["2", 0], "control_net": ["20", 0],
                                                             "image": ["22", 0], "strength": 0.7}}
    old["5"]["inputs"].update(positive=["21", 0], negative=["3", 0])
    assert torch.equal(run(old)["5"][0]["samples"], ours)

    diff = json.loads(json.dumps(g))
    diff["20"] = {"class_type": "DiffControlNetLoader", "inputs": {"model": ["1", 0],
                                                                   "control_net_name": "tiny-cn.safetensors"}}
    assert torch.equal(run(diff)["5"][0]["samples"], ours)
    other = json.loads(json.dumps(diff))
    other["30"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3}}
    other["20"]["inputs"]["model"] = ["30", 0]
    assert "DiffControlNetLoader's model is tiny-sd3.safetensors" in run(other, fails=True)["exception_message"]

    graph_image = np.clip(255.0 * out["6"][0][0].numpy(), 0, 255).astype(np.uint8).astype(int)
    api = pipe.txt2img("a red cat", negative_prompt="blurry", seed=7, steps=4, cfg_scale=5.0, sampler="Euler",
                       schedule="normal", width=64, height=64, controls=[unit])[0]
    assert np.abs(graph_image - np.asarray(api, dtype=int)).max() <= 2


def test_canny_is_kornias(direct):
    """ComfyUI's Canny runs kornia's `canny`; sdlab's runs its steps in OpenCV. On a photo-like
    image the edge maps agree but for a few pixels where the gradient direction ties (measured:
    8 of 12288 at the lowest thresholds here)."""
    kornia = pytest.importorskip("kornia")
    from sdlab.server.comfy.nodes_control import Canny

    rng = np.random.default_rng(0)
    small = rng.random((12, 16, 3)).astype(np.float32)
    big = np.asarray(Image.fromarray((small * 255).astype(np.uint8)).resize((128, 96), Image.BICUBIC))
    image = torch.from_numpy(big.astype(np.float32) / 255.0)[None]
    for low, high in ((0.05, 0.15), (0.2, 0.3), (0.4, 0.8)):
        ours = Canny().run(None, image, low, high)[0]
        theirs = kornia.filters.canny(image.movedim(-1, 1), low, high)[1].movedim(1, -1).repeat(1, 1, 1, 3)
        assert ours.shape == theirs.shape == (1, 96, 128, 3)
        differ = (ours != theirs)[..., 0].float().mean().item()
        assert differ <= 0.002 and theirs.sum() > 0, (low, high, differ)


def test_upscale_model_nodes(client, setup):
    """LoadImage -> UpscaleModelLoader + ImageUpscaleWithModel -> SaveImage: the saved image is
    spandrel's own output of the model (truncated to 8 bits, as SaveImage writes), and within a
    level of the Python API's `Upscalers.upscale` (which rounds)."""
    from sdlab.errors import SdlabError
    from sdlab.upscalers import Upscalers, import_spandrel, load_upscaler_model

    try:
        import_spandrel()
    except SdlabError:
        pytest.skip("spandrel is not installed (pip install spandrel)")
    root = setup[0]
    source = Image.fromarray((np.random.default_rng(1).random((24, 32, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    source.save(buf, format="PNG")
    client.post("/upload/image", files={"image": ("small.png", buf.getvalue(), "image/png")})
    g = {"1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
         "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-tiny.safetensors"}},
         "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
         "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}}}
    entry = wait(client, client.post("/prompt", json={"prompt": g}).json()["prompt_id"])
    assert entry["status"]["status_str"] == "success", entry["status"]["messages"][-1]
    saved = view(client, entry["outputs"]["4"]["images"][0])
    model = load_upscaler_model(root / "upscale_models" / "4x-tiny.safetensors", "cpu")
    x = torch.from_numpy(np.asarray(source, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    with torch.no_grad():
        whole = model(x)[0].clamp(0, 1).permute(1, 2, 0).numpy()
    assert saved.shape == (96, 128, 3)
    assert np.array_equal(saved, np.clip(255.0 * whole, 0, 255).astype(np.uint8))
    api = np.asarray(Upscalers(root).upscale(source, "4x-tiny", 4), dtype=int)
    assert np.abs(saved - api).max() <= 1


def test_vae_loader(direct, setup):
    """VAELoader's VAE decodes a model's latent as `Pipeline.use_vae` decodes it, exactly; a VAE
    file encodes into its raw space, which the sampler and the decoder read back."""
    from sdlab.device import parse_dtype, parse_weight_dtype
    from sdlab.perf import load_for_inference
    from sdlab.pipeline import Pipeline

    run, _, env = direct
    root = setup[0]
    g = text2img(SD1, 128, steps_=2)
    g["8"] = {"class_type": "VAELoader", "inputs": {"vae_name": "other.safetensors"}}
    g["6"]["inputs"]["vae"] = ["8", 0]
    out = run(g)
    latent, image = out["5"][0], out["6"][0]
    pipe = Pipeline(load_for_inference(root / "Stable-diffusion" / SD1, None, parse_dtype(None), compile=False,
                                       offload=False, weight_dtype=parse_weight_dtype(None)))
    pipe.use_vae(root / "VAE" / "other.safetensors")
    with torch.no_grad():
        expected = steps.decode(pipe.bundle.vae, latent["samples"], pipe.bundle.family)
    assert torch.equal(image, ((expected.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1))

    encode = {"8": g["8"],
              "9": {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["8", 0]}},
              "10": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
              "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["8", 0]}},
              "12": {"class_type": "PreviewImage", "inputs": {"images": ["11", 0]}}}
    out = run({**g, **encode})
    raw = out["9"][0]
    assert raw["space"].latent_scale == 1.0 and raw["space"].latent_shift == 0.0
    from sdlab.perf import encode_images

    with torch.no_grad():
        z = encode_images(pipe.bundle.vae, out["10"][0].permute(0, 3, 1, 2) * 2 - 1).mean  # its mean: raw
    assert torch.allclose(raw["samples"], z.float(), atol=1e-5)


def test_upload_mask(client, setup):
    """POST /upload/mask writes the original image with the upload's alpha (its text chunks
    kept) under the upload's name; references leading outside the folders are refused."""
    outputs = setup[2]
    meta = PngImagePlugin.PngInfo()
    meta.add_text("prompt", "{}")
    original = Image.fromarray((np.random.default_rng(2).random((16, 20, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    original.save(buf, format="PNG", pnginfo=meta)
    client.post("/upload/image", files={"image": ("photo.png", buf.getvalue(), "image/png")})
    alpha = np.zeros((16, 20), np.uint8)
    alpha[4:12, 5:15] = 255
    painted = Image.new("RGBA", (20, 16), (0, 0, 0, 0))
    painted.putalpha(Image.fromarray(alpha))
    mask = io.BytesIO()
    painted.save(mask, format="PNG")
    ref = {"filename": "photo.png", "subfolder": "", "type": "input"}

    def upload(reference, name="clipspace-mask-1.png"):
        return client.post("/upload/mask", files={"image": (name, mask.getvalue(), "image/png")},
                           data={"subfolder": "clipspace", "type": "input", "original_ref": json.dumps(reference)})

    r = upload(ref)
    assert r.status_code == 200 and r.json() == {"name": "clipspace-mask-1.png", "subfolder": "clipspace",
                                                 "type": "input"}
    written = Image.open(outputs / "comfy" / "input" / "clipspace" / "clipspace-mask-1.png")
    assert written.mode == "RGBA" and written.text == {"prompt": "{}"}
    assert np.array_equal(np.asarray(written)[..., :3], np.asarray(original))
    assert np.array_equal(np.asarray(written)[..., 3], alpha)
    assert upload({**ref, "filename": "../../etc/passwd"}).status_code == 400
    assert upload({**ref, "filename": "/etc/passwd"}).status_code == 400
    assert upload({**ref, "subfolder": "../../.."}).status_code == 403
    assert upload({**ref, "filename": "absent.png"}).status_code == 404
    assert client.post("/api/upload/mask", files={"image": ("m.png", mask.getvalue(), "image/png")},
                       data={"original_ref": "{not json"}).status_code == 400
    assert not list(outputs.parent.glob("passwd")) and not (outputs / "comfy" / "input" / "m.png").exists()


def test_previews_only_when_the_prompt_asks(setup, tmp_path):
    """On a real server, with ComfyUI's own client (websocket-client): a prompt whose extra_data
    asks for previews gets one binary frame per sampler step after its `progress`, each a
    PREVIEW_IMAGE of a JPEG fitted into 512 x 512; a prompt that does not ask gets none."""
    websocket = pytest.importorskip("websocket")
    from tests.server.live import serving

    app = create_app(ServerSettings(models_dir=setup[0], model=SD1, outputs_dir=tmp_path))  # a server of its own
    with serving(app) as port:
        address = f"127.0.0.1:{port}"

        def frames_of(extra_data: dict, seed: int) -> tuple[list, list]:
            client_id = str(uuid.uuid4())
            ws = websocket.WebSocket()
            ws.connect(f"ws://{address}/ws?clientId={client_id}", timeout=60)
            events, frames = [], []
            try:
                body = json.dumps({"prompt": text2img(SD1, 64, steps_=3, seed=seed), "client_id": client_id,
                                   "extra_data": extra_data}).encode()
                prompt_id = json.loads(urllib.request.urlopen(urllib.request.Request(
                    f"http://{address}/prompt", data=body)).read())["prompt_id"]
                while True:
                    out = ws.recv()
                    if isinstance(out, bytes):
                        frames.append(out)
                        events.append("frame")
                        continue
                    message = json.loads(out)
                    events.append(message["type"])
                    if message["type"] == "executing" and message["data"]["node"] is None \
                            and message["data"]["prompt_id"] == prompt_id:
                        return events, frames
            finally:
                ws.close()

        events, frames = frames_of({"preview_method": "auto"}, 11)
        assert len(frames) == 3
        assert [e for e in events if e in ("progress", "frame")] == ["progress", "frame"] * 3
        for frame in frames:
            assert struct.unpack(">II", frame[:8]) == (1, 1)  # PREVIEW_IMAGE, JPEG
            preview = Image.open(io.BytesIO(frame[8:]))
            assert preview.format == "JPEG" and preview.size == (512, 512)  # an 8 x 8 latent, fitted
        for seed, extra in enumerate(({}, {"preview_method": "none"}, {"preview_method": "default"})):
            events, frames = frames_of(extra, 20 + seed)
            assert frames == [] and events.count("progress") == 3
