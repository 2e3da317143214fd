"""The web UI's API under /sdapi/v1, through FastAPI's test client, on tiny random models."""

from __future__ import annotations

import base64
import datetime
import io
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings, parse_api_auth  # noqa: E402
from sdlab.server.worker import Job  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

API = "/sdapi/v1"
SMALL = {"width": 32, "height": 32, "steps": 3}
LONG = 1000  # steps of a job that is meant to be stopped

# Field names of AUTOMATIC1111's request models (REFERENCE.md A.1: StableDiffusionProcessing,
# ...Txt2Img, ...Img2Img and the API-only keys of modules/api/models.py).
COMMON_FIELDS = [
    "prompt", "negative_prompt", "styles", "seed", "subseed", "subseed_strength", "seed_resize_from_h",
    "seed_resize_from_w", "sampler_name", "scheduler", "batch_size", "n_iter", "steps", "cfg_scale", "width",
    "height", "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid", "eta", "denoising_strength",
    "s_min_uncond", "s_churn", "s_tmax", "s_tmin", "s_noise", "override_settings",
    "override_settings_restore_afterwards", "refiner_checkpoint", "refiner_switch_at", "disable_extra_networks",
    "comments", "sampler_index", "script_name", "script_args", "send_images", "save_images", "alwayson_scripts",
    "force_task_id", "infotext",
]
TXT2IMG_FIELDS = [
    "enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler", "hr_second_pass_steps",
    "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name", "hr_scheduler", "hr_prompt",
    "hr_negative_prompt",
]
IMG2IMG_FIELDS = [
    "init_images", "resize_mode", "image_cfg_scale", "mask", "mask_blur_x", "mask_blur_y", "mask_blur",
    "mask_round", "inpainting_fill", "inpaint_full_res", "inpaint_full_res_padding", "inpainting_mask_invert",
    "initial_noise_multiplier", "latent_mask", "include_init_images",
]
DEFAULTS = {  # the web UI's defaults for the fields clients most often leave out
    "prompt": "", "negative_prompt": "", "seed": -1, "subseed": -1, "subseed_strength": 0, "batch_size": 1,
    "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512, "sampler_index": "Euler",
    "send_images": True, "save_images": False, "override_settings_restore_afterwards": True,
}
IMG2IMG_DEFAULTS = {"denoising_strength": 0.75, "resize_mode": 0, "mask_blur_x": 4, "mask_blur_y": 4,
                    "inpainting_fill": 0, "inpaint_full_res": True, "inpaint_full_res_padding": 0,
                    "inpainting_mask_invert": 0, "include_init_images": False}
INFO_KEYS = ["prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "seed_resize_from_w", "seed_resize_from_h", "denoising_strength", "extra_generation_params",
             "index_of_first_image", "infotexts", "styles", "job_timestamp", "clip_skip",
             "is_using_inpainting_conditioning", "version"]

# The listings the web UI's clients read at startup, each with the keys of the web UI's item
# model (A1111 modules/api/models.py); dict: answered with an object, not a list.
LISTINGS = {
    "upscalers": {"name", "model_name", "model_path", "model_url", "scale"},
    "latent-upscale-modes": {"name"},
    "sd-vae": {"model_name", "filename"},
    "prompt-styles": {"name", "prompt", "negative_prompt"},
    "hypernetworks": {"name", "path"},
    "face-restorers": {"name", "cmd_dir"},
    "realesrgan-models": {"name", "path", "scale"},
    "script-info": {"name", "is_alwayson", "is_img2img", "args"},
    "extensions": {"name", "remote", "branch", "commit_hash", "version", "commit_date", "enabled"},
    "loras": {"name", "alias", "path", "metadata"},
    "scripts": dict, "cmd-flags": dict, "memory": dict, "embeddings": dict,
}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
    save_native(tiny_bundle("sd1", seed=1), root / "Stable-diffusion" / "other.safetensors")
    (root / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, root / "Lora" / "shapes.safetensors",
              metadata={"ss_output_name": "shapes-v1", "ss_network_dim": "4"})
    (root / "embeddings").mkdir()
    save_file({"emb_params": torch.zeros(2, 64)}, root / "embeddings" / "mystyle.safetensors")
    # The web UI's styles.csv, where sdlab looks by default: `{prompt}` takes the prompt's place,
    # other style text goes after a comma; rows starting with # are comments.
    (root / "styles.csv").write_text('name,prompt,negative_prompt\n'
                                     'film,"a photo of {prompt}, film grain",blurry\n'
                                     'sharp,sharp focus,\n'
                                     '# unused,x,y\n', encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    app = create_app(ServerSettings(models_dir=models_dir, model="tiny.safetensors",
                                    limits=Limits(max_pixels=512 * 512, max_steps=1000, max_batch=8),
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with TestClient(app) as c:
        yield c


def png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def b64_image(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def txt2img(client, **fields):
    r = client.post(f"{API}/txt2img", json={**SMALL, **fields})
    assert r.status_code == 200, r.text
    data = r.json()
    return data, json.loads(data["info"])


# -- request models --------------------------------------------------------------------------

def test_request_models_have_the_web_ui_field_names_and_defaults(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    t2i, i2i = schemas["Txt2ImgRequest"]["properties"], schemas["Img2ImgRequest"]["properties"]
    assert not [f for f in COMMON_FIELDS + TXT2IMG_FIELDS if f not in t2i]
    assert not [f for f in COMMON_FIELDS + IMG2IMG_FIELDS if f not in i2i]
    for name, value in DEFAULTS.items():
        assert t2i[name].get("default") == value, name
        assert i2i[name].get("default") == value, name
    for name, value in IMG2IMG_DEFAULTS.items():
        assert i2i[name].get("default") == value, name
    assert schemas["Img2ImgRequest"]["required"] == ["init_images"]
    assert "description" in t2i["steps"] and "description" in t2i["seed"]
    paths = client.get("/openapi.json").json()["paths"]
    for p in ["txt2img", "img2img", "sd-models", "samplers", "schedulers", "loras", "embeddings", "options",
              "progress", "interrupt", "skip", "png-info", "refresh-checkpoints", "memory", *LISTINGS, "interrogate"]:
        assert f"{API}/{p}" in paths, p
    assert client.get("/docs").status_code == 200


# -- txt2img -----------------------------------------------------------------------------------

def test_txt2img_image_carries_the_infotext_of_info(client):
    r = client.post(f"{API}/txt2img", json={**SMALL, "prompt": "a red square", "negative_prompt": "blurry",
                                             "seed": 1234, "batch_size": 2, "sampler_name": "Euler a"})
    assert r.status_code == 200
    assert float(r.headers["X-Process-Time"]) > 0
    data = r.json()
    info = json.loads(data["info"])
    assert not [k for k in INFO_KEYS if k not in info]
    assert info["all_seeds"] == [1234, 1235] and info["seed"] == 1234
    assert info["all_prompts"] == ["a red square"] * 2 and info["sampler_name"] == "Euler a"
    assert (info["width"], info["height"], info["steps"], info["cfg_scale"]) == (32, 32, 3, 7.0)
    assert info["sd_model_name"] == "tiny" and len(info["sd_model_hash"]) == 10
    assert len(data["images"]) == 2 == len(info["infotexts"])
    for b64, text in zip(data["images"], info["infotexts"]):
        img = png(b64)
        assert img.format == "PNG" and img.size == (32, 32)
        assert img.info["parameters"] == text
    assert "Seed: 1235" in info["infotexts"][1] and "Negative prompt: blurry" in info["infotexts"][0]
    assert data["parameters"]["prompt"] == "a red square" and data["parameters"]["batch_size"] == 2


def test_txt2img_same_seed_same_image_and_random_seed_reported(client):
    a, _ = txt2img(client, prompt="circle", seed=7)
    b, _ = txt2img(client, prompt="circle", seed=7)
    c, _ = txt2img(client, prompt="circle", seed=8)
    assert a["images"][0] == b["images"][0]
    assert np.asarray(png(a["images"][0])).tobytes() != np.asarray(png(c["images"][0])).tobytes()
    _, info = txt2img(client, prompt="circle", seed=-1, steps=1)
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]


def test_unknown_fields_and_options_pass_with_a_note(client):
    """Keys no request model declares, and options sdlab does not have, are dropped as the web UI
    drops them (clients of newer versions and forks send their own), with a note in info."""
    _, info = txt2img(client, prompt="x", steps=1, no_such_field=[1, 2],
                      override_settings={"sd_hypernetwork": "None"})
    notes = " | ".join(info["notes"])
    assert "no_such_field" in notes and info["ignored_fields"] == ["no_such_field"] and "sd_hypernetwork" in notes


def test_hires_fix_gives_a_larger_image_whose_infotext_the_web_ui_reads(client):
    """A web-UI client's txt2img(enable_hr=True, hr_scale=2, hr_upscaler="Latent", ...): a 2x image;
    info's width/height and the infotext's Size stay the first pass's; the infotext field replays it."""
    from sdlab.infotext import parse_infotext

    body = {**SMALL, "prompt": "x", "seed": 4, "enable_hr": True, "hr_scale": 2, "hr_upscaler": "Latent",
            "denoising_strength": 0.5, "hr_second_pass_steps": 2}
    data, info = txt2img(client, **body)
    img = png(data["images"][0])
    assert img.size == (64, 64) and (info["width"], info["height"]) == (32, 32)
    params = parse_infotext(info["infotexts"][0])
    assert params["Size"] == "32x32" and params["Hires upscale"] == "2" and params["Hires steps"] == "2"
    assert params["Hires upscaler"] == "Latent" and params["Denoising strength"] == "0.5"
    assert info["denoising_strength"] == 0.5 and info["extra_generation_params"]["Hires upscale"] == 2
    again, _ = txt2img(client, infotext=info["infotexts"][0])
    assert np.array_equal(np.asarray(png(again["images"][0])), np.asarray(img))
    # Each hires field changes the image or its size (the tiny model barely hears its prompts and
    # CFG: those reach the infotext here, and the pass's conditioning in tests/test_hires.py).
    for extra in ({"hr_resize_x": 48, "hr_resize_y": 40}, {"hr_sampler_name": "DPM++ 2M"}, {"hr_scheduler": "Karras"},
                  {"hr_upscaler": "Lanczos"}, {"hr_upscaler": "Latent (nearest)"}, {"denoising_strength": 0.9}):
        other = png(txt2img(client, **{**body, **extra})[0]["images"][0])
        assert other.size != img.size or not np.array_equal(np.asarray(other), np.asarray(img)), extra
    _, info = txt2img(client, **body, hr_prompt="y", hr_negative_prompt="z", hr_cfg=2.0)
    params = parse_infotext(info["infotexts"][0])
    assert (params["Hires prompt"], params["Hires negative prompt"], params["Hires CFG Scale"]) == ("y", "z", "2")
    # Bad input: one clear message each.
    for extra, status, words in (({"hr_scale": 0}, 400, "hires scale must be above 0"),
                                 ({"hr_resize_x": 4096, "hr_resize_y": 4096}, 422, "this server allows"),
                                 ({"hr_upscaler": "4x-nothing"}, 400, "no upscaler named '4x-nothing'"),
                                 ({"hr_checkpoint_name": "other.safetensors"}, 422, "hr_checkpoint_name")):
        r = client.post(f"{API}/txt2img", json={**body, **extra})
        assert words in r.json()["detail"] and r.status_code in (400, 422), (extra, r.text)


def test_always_on_scripts_controlnet_is_read_the_others_refused(client):
    """A request for a feature sdlab does not have is a 422 that names the field, never an image
    made without the feature. ControlNet units are read (tests/server/test_controlnet_api.py has
    them at work): one naming a model the folder lacks is refused, naming it."""
    unit = {"args": [{"enabled": True, "module": "canny", "model": "control_v11p_sd15_canny"}]}
    r = client.post(f"{API}/txt2img", json={**SMALL, "alwayson_scripts": {"controlnet": unit}})
    assert r.status_code == 422 and "ControlNet model 'control_v11p_sd15_canny' not found" in r.json()["detail"]
    r = client.post(f"{API}/txt2img", json={**SMALL, "alwayson_scripts": {"adetailer": {"args": []}}})
    # The web UI's own words for a script it does not have, in its status.
    assert r.status_code == 422 and r.json()["detail"].startswith("always on script adetailer not found")
    r = client.post(f"{API}/img2img", json={"init_images": [b64_image(_init_image())], **SMALL,
                                            "script_name": "loopback", "restore_faces": True})
    detail = r.json()["detail"]
    assert r.status_code == 422 and "Script 'loopback' not found" in detail and "restore_faces=true" in detail
    assert "\n" not in detail
    txt2img(client, steps=1)  # and the server goes on serving


def test_sampler_aliases_old_combined_names_and_sampler_index(client):
    _, info = txt2img(client, steps=2, seed=1, sampler_name="DPM++ 2M Karras")
    assert info["sampler_name"] == "DPM++ 2M" and "Schedule type: Karras" in info["infotexts"][0]
    _, info = txt2img(client, steps=2, seed=1, sampler_index="k_euler_a")
    assert info["sampler_name"] == "Euler a"
    _, info = txt2img(client, steps=2, seed=1, sampler_name="Euler", scheduler="Exponential")
    assert "Schedule type: Exponential" in info["infotexts"][0]
    r = client.post(f"{API}/txt2img", json={**SMALL, "sampler_name": "No Such Sampler"})
    assert r.status_code == 422 and "No Such Sampler" in r.json()["detail"]


def test_infotext_field_fills_unset_fields(client):
    text = "a blue circle\nNegative prompt: ugly\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 99, Size: 32x32"
    r = client.post(f"{API}/txt2img", json={"infotext": text, "height": 32, "cfg_scale": 6})
    info = json.loads(r.json()["info"])  # fields the request sets win over the infotext
    assert info["prompt"] == "a blue circle" and info["negative_prompt"] == "ugly"
    assert (info["steps"], info["seed"], info["cfg_scale"], info["sampler_name"]) == (2, 99, 6.0, "Euler")
    assert (info["width"], info["height"]) == (32, 32)


def test_sd3_fields_are_refused_on_an_sd1_model(client):
    """SD3's fields act on SD3 models (tests/test_sd3_api.py: the API's image is the Python API's);
    on another family they are a 422 that says so, while their "off" values pass."""
    for fields, start in (({"shift": 2.5}, "shift is"), ({"schedulers_shift": 2.5}, "shift is"),
                          ({"slg_layers": [0]}, "slg_layers is"),
                          ({"shift": 2.5, "slg_layers": [0]}, "shift and slg_layers are")):
        r = client.post(f"{API}/txt2img", json={**SMALL, "steps": 1, **fields})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert detail.startswith(start) and "this model is Stable Diffusion 1.x" in detail, detail
    # The SLG knobs do nothing without layers, in any family.
    txt2img(client, steps=1, shift=None, slg_layers=[], slg_scale=3.0, slg_start=0.1, slg_end=0.3)


# -- img2img and inpainting ----------------------------------------------------------------------

def _init_image() -> Image.Image:
    arr = np.zeros((32, 32, 3), np.uint8)
    arr[:, :16] = (200, 30, 30)
    arr[:, 16:] = (30, 30, 200)
    return Image.fromarray(arr)


def test_img2img_returns_an_image_of_the_requested_size(client):
    init = b64_image(_init_image())
    r = client.post(f"{API}/img2img", json={"init_images": ["data:image/png;base64," + init], "width": 32,
                                            "height": 32, "steps": 4, "denoising_strength": 0.5, "seed": 3})
    assert r.status_code == 200, r.text
    data = r.json()
    info = json.loads(data["info"])
    img = png(data["images"][0])
    assert img.size == (32, 32) and img.info["parameters"] == info["infotexts"][0]
    assert "Denoising strength: 0.5" in info["infotexts"][0] and info["denoising_strength"] == 0.5
    assert data["parameters"]["init_images"] is None  # not echoed unless include_init_images


def test_inpaint_keeps_pixels_outside_the_mask(client):
    init = _init_image()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    r = client.post(f"{API}/img2img", json={
        "init_images": [b64_image(init)], "mask": b64_image(Image.fromarray(mask)), "width": 32, "height": 32,
        "steps": 3, "seed": 5, "denoising_strength": 1.0, "mask_blur": 0, "inpaint_full_res": False,
        "inpainting_fill": 1})
    assert r.status_code == 200, r.text
    out = np.asarray(png(r.json()["images"][0]).convert("RGB"))
    outside = mask == 0
    assert (out[outside] == np.asarray(init)[outside]).all()
    assert (out[~outside] != np.asarray(init)[~outside]).any()



def test_a_mask_of_another_size_is_resized_to_the_image(client):
    """Clients send masks drawn at another scale; the web UI resizes them to the image, and so does
    the pipeline under every face: the same image as with the mask sent at the image's size."""
    init = _init_image()
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    small = Image.fromarray(mask).resize((16, 16), Image.NEAREST)
    fields = {"init_images": [b64_image(init)], "width": 32, "height": 32, "steps": 3, "seed": 5,
              "denoising_strength": 1.0, "mask_blur": 0, "inpainting_fill": 1}
    images = []
    for m in (small, small.convert("L").resize((32, 32), Image.LANCZOS)):
        r = client.post(f"{API}/img2img", json={**fields, "mask": b64_image(m)})
        assert r.status_code == 200, r.text
        images.append(np.asarray(png(r.json()["images"][0]).convert("RGB")))
    assert np.array_equal(images[0], images[1])
    # outside the mask and the reach of the resize's filter (3 source pixels), the init image's pixels
    assert (images[0][:2] == np.asarray(init)[:2]).all()

# -- every request field: acted on, or refused unless off --------------------------------------------

# The fields sdlab acts on, each with the test that shows it. Every other field of the request
# models is in convert.not_acted_on() and refused unless off; the walk below checks that each
# field of the published schema is in exactly one of the two.
ACTED_ON = {  # txt2img and img2img
    "prompt": "test_txt2img_image_carries_the_infotext_of_info",
    "negative_prompt": "test_a_field_changes_the_image",
    "seed": "test_txt2img_same_seed_same_image_and_random_seed_reported",
    "subseed": "test_variation_seed_and_seed_enable_extras",
    "subseed_strength": "test_variation_seed_and_seed_enable_extras",
    "seed_enable_extras": "test_variation_seed_and_seed_enable_extras",
    "sampler_name": "test_sampler_aliases_old_combined_names_and_sampler_index",
    "sampler_index": "test_sampler_aliases_old_combined_names_and_sampler_index",
    "scheduler": "test_sampler_aliases_old_combined_names_and_sampler_index",
    "batch_size": "test_txt2img_image_carries_the_infotext_of_info",
    "n_iter": "test_skip_ends_the_current_batch_only",
    "steps": "test_a_field_changes_the_image",
    "cfg_scale": "test_a_field_changes_the_image",
    "width": "test_txt2img_image_carries_the_infotext_of_info",
    "height": "test_txt2img_image_carries_the_infotext_of_info",
    "eta": "test_a_field_changes_the_image",
    # As in the web UI's API, save_images alone decides whether images are written; these two change nothing.
    "do_not_save_samples": "test_save_images_writes_the_web_ui_outputs",
    "do_not_save_grid": "test_save_images_writes_the_web_ui_outputs",
    "save_images": "test_save_images_writes_the_web_ui_outputs",
    "styles": "test_styles_merge_into_the_prompts_as_the_web_ui_does",
    "tiling": "test_tiling_makes_images_whose_opposite_edges_continue",
    "override_settings": "test_options_switch_the_model_between_jobs",
    "disable_extra_networks": "test_disable_extra_networks_drops_the_lora_tags",
    "send_images": "test_send_images_false_answers_without_images",
    "alwayson_scripts": "test_always_on_scripts_controlnet_is_read_the_others_refused",
    "infotext": "test_infotext_field_fills_unset_fields",
    # SD3's (tests/test_sd3_api.py runs them on an SD3 model); on this SD 1.x model they are refused
    **{name: "test_sd3_fields_are_refused_on_an_sd1_model" for name in (
        "shift", "schedulers_shift", "slg_layers", "slg_scale", "slg_start", "slg_end")},
    # txt2img's hires fix (denoising_strength is img2img's too)
    **{name: "test_hires_fix_gives_a_larger_image_whose_infotext_the_web_ui_reads" for name in (
        "enable_hr", "denoising_strength", "hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x",
        "hr_resize_y", "hr_sampler_name", "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg")},
}
IMG2IMG_ACTED_ON = {
    "init_images": "test_img2img_returns_an_image_of_the_requested_size",
    "denoising_strength": "test_a_field_changes_the_image",
    "mask": "test_inpaint_keeps_pixels_outside_the_mask",
    "mask_blur": "test_mask_blur_and_its_x_y_spellings",
    "mask_blur_x": "test_mask_blur_and_its_x_y_spellings",
    "mask_blur_y": "test_mask_blur_and_its_x_y_spellings",
    "inpainting_fill": "test_inpainting_fill",
    "inpaint_full_res": "test_a_field_changes_the_image",
    "inpaint_full_res_padding": "test_a_field_changes_the_image",
    "inpainting_mask_invert": "test_a_field_changes_the_image",
    "include_init_images": "test_include_init_images_echoes_them",
    "image_cfg_scale": "test_image_cfg_scale_does_nothing_as_in_the_web_ui_for_models_not_instruct_pix2pix",
    "resize_mode": "test_resize_mode_and_latent_mask_as_the_web_ui",
    "latent_mask": "test_resize_mode_and_latent_mask_as_the_web_ui",
}
# A value that turns each refused field on (not one of its "off" values), and one for each switch.
ON_VALUES = {
    "seed_resize_from_h": 256, "seed_resize_from_w": 256, "restore_faces": True, "s_min_uncond": 0.5, "s_churn": 1.0, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 1.003,
    "override_settings_restore_afterwards": False, "refiner_checkpoint": "refiner.safetensors",
    "refiner_switch_at": 0.8, "comments": {"a": "b"}, "force_task_id": "task(1)", "script_name": "loopback",
    "script_args": [1, 2],
    "enable_hr": True, "denoising_strength": 0.5, "firstphase_width": 256, "firstphase_height": 256,
    "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 10, "hr_resize_x": 1024,
    "hr_resize_y": 1024, "hr_checkpoint_name": "other.safetensors", "hr_sampler_name": "Euler",
    "hr_scheduler": "Karras", "hr_prompt": "detailed", "hr_negative_prompt": "blurry", "firstpass_image": "abc",
    "initial_noise_multiplier": 0.9, "mask_round": False,
    # switches that sdlab acts on
    "override_settings": {"CLIP_stop_at_last_layers": 1}, "seed_enable_extras": True,
}


def _mask_b64() -> str:
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    return b64_image(Image.fromarray(mask))


ON_VALUES["mask"] = _mask_b64()


def _request(endpoint: str, **fields) -> dict:
    base = {"prompt": "x", **SMALL, "steps": 1, "seed": 1}
    if endpoint == "img2img":
        base["init_images"] = [b64_image(_init_image())]
    return {**base, **fields}


def test_every_request_field_is_acted_on_or_refused_unless_off(client):
    from sdlab.server.convert import not_acted_on
    from sdlab.server.models import Img2ImgRequest, Txt2ImgRequest

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    for model, endpoint in ((Txt2ImgRequest, "txt2img"), (Img2ImgRequest, "img2img")):
        refused = not_acted_on(model)
        acted_on = {**ACTED_ON, **(IMG2IMG_ACTED_ON if endpoint == "img2img" else {})}
        properties = schemas[model.__name__]["properties"]
        for name in properties:
            assert (name in acted_on) != (name in refused), f"{endpoint}: {name} must be in exactly one list"
        assert set(refused) <= set(properties)
        for name, rule in refused.items():
            default = model.model_fields[name].get_default(call_default_factory=True)
            assert default in rule.off, f"{name}: its default must pass"
            assert ON_VALUES[name] not in rule.off
            # Turned on (with its switch, if it has one) it is refused, by name: the field's own,
            # or its switch's where the switch is refused itself.
            switch = rule.only_with
            body = _request(endpoint, **{name: ON_VALUES[name]}, **({switch: ON_VALUES[switch]} if switch else {}))
            r = client.post(f"{API}/{endpoint}", json=body)
            assert r.status_code == 422, (name, r.text)
            assert r.json()["error"] == "Unsupported"
            assert (switch if switch in refused else name) in r.json()["detail"], (name, r.json()["detail"])
        # Every field sent with its default passes; so does every other "off" value, and any value
        # of a field whose switch is off (it does nothing then, in the web UI too).
        required = schemas[model.__name__].get("required", [])
        defaults = {k: model.model_fields[k].get_default(call_default_factory=True)
                    for k in properties if k not in required}
        # (the schema leaves out "default": null and the defaults made by a factory)
        assert all(v["default"] == defaults[k] for k, v in properties.items() if "default" in v)
        data, _ = txt2img_like(client, endpoint, _request(endpoint, **{**defaults, **SMALL, "steps": 1}))
        assert len(data["images"]) == 1
        for i in range(1, max(len(rule.off) for rule in refused.values())):
            body = {name: rule.off[min(i, len(rule.off) - 1)] for name, rule in refused.items() if not rule.only_with}
            body |= {name: ON_VALUES[name] for name, rule in refused.items()
                     if rule.only_with and rule.only_with in refused}
            body |= {"seed_enable_extras": False, "seed_resize_from_h": 256, "seed_resize_from_w": 256,
                     "override_settings_restore_afterwards": False, "mask_round": False}
            txt2img_like(client, endpoint, _request(endpoint, **body))
    for name, test in {**ACTED_ON, **IMG2IMG_ACTED_ON}.items():
        assert callable(globals().get(test)), f"{name}: no test {test}"


def txt2img_like(client, endpoint: str, body: dict) -> tuple[dict, dict]:
    r = client.post(f"{API}/{endpoint}", json=body)
    assert r.status_code == 200, r.text
    return r.json(), json.loads(r.json()["info"])


CHANGES = [  # (endpoint, field, value, other value, other fields): the two images differ
    ("txt2img", "negative_prompt", "", "blue", {}),
    ("txt2img", "steps", 2, 3, {}),
    ("txt2img", "cfg_scale", 7.0, 2.0, {}),
    ("txt2img", "eta", 1.0, 0.3, {"sampler_name": "Euler a", "steps": 3}),
    ("img2img", "denoising_strength", 0.5, 0.9, {"steps": 4}),
    ("inpaint", "inpaint_full_res", True, False, {}),
    ("inpaint", "inpaint_full_res_padding", 0, 8, {"inpaint_full_res": True}),
    ("inpaint", "inpainting_mask_invert", 0, 1, {}),
]


@pytest.mark.parametrize("endpoint,field,a,b,extra", CHANGES, ids=[c[1] for c in CHANGES])
def test_a_field_changes_the_image(client, endpoint, field, a, b, extra):
    fields = {**extra, "mask": _mask_b64(), "mask_blur": 0, "denoising_strength": 1.0} if endpoint == "inpaint" \
        else extra
    endpoint = "img2img" if endpoint == "inpaint" else endpoint
    first, _ = txt2img_like(client, endpoint, _request(endpoint, **{"steps": 2, **fields, field: a}))
    again, _ = txt2img_like(client, endpoint, _request(endpoint, **{"steps": 2, **fields, field: a}))
    other, _ = txt2img_like(client, endpoint, _request(endpoint, **{"steps": 2, **fields, field: b}))
    assert first["images"] == again["images"] and first["images"] != other["images"]
    assert [f for f in CHANGES if f[1] == field]  # and ACTED_ON names this test for it
    assert {**ACTED_ON, **IMG2IMG_ACTED_ON}[field] == "test_a_field_changes_the_image"


def test_variation_seed_and_seed_enable_extras(client):
    plain, _ = txt2img(client, seed=3, subseed=5, subseed_strength=0.0)
    varied, info = txt2img(client, seed=3, subseed=5, subseed_strength=0.5)
    other, _ = txt2img(client, seed=3, subseed=6, subseed_strength=0.5)
    assert varied["images"] != plain["images"] and other["images"] != varied["images"]
    assert info["all_subseeds"] == [5] and "Variation seed: 5, Variation seed strength: 0.5" in info["infotexts"][0]
    # The web UI's seed_enable_extras=false turns the variation seed off.
    off, info = txt2img(client, seed=3, subseed=5, subseed_strength=0.5, seed_enable_extras=False)
    assert off["images"] == plain["images"] and "Variation seed" not in info["infotexts"][0]


def test_save_images_writes_the_web_ui_outputs(client, models_dir, tmp_path, monkeypatch):
    """save_images=true writes each image as the web UI does: <outputs>/txt2img-images/YYYY-MM-DD/
    NNNNN-SEED.png (img2img-images/ for img2img), numbered on from the largest number in the day's
    folder, the infotext in the PNG's parameters chunk, no temporary file left. As in the web UI's
    API, save_images alone decides: do_not_save_samples / do_not_save_grid change nothing."""
    outputs = client.app.state.sdlab.outputs_dir
    monkeypatch.chdir(tmp_path)
    before, models_before = sorted(outputs.rglob("*")), sorted(models_dir.rglob("*"))
    txt2img(client, steps=1, do_not_save_samples=False, do_not_save_grid=False, batch_size=2)
    assert sorted(outputs.rglob("*")) == before and sorted(models_dir.rglob("*")) == models_before
    assert list(tmp_path.iterdir()) == []

    date = datetime.date.today().isoformat()
    day = outputs / "txt2img-images" / date
    day.mkdir(parents=True, exist_ok=True)
    (day / "00041-999.png").write_bytes(b"")  # made earlier today
    data, info = txt2img(client, seed=7, steps=2, batch_size=2, save_images=True, do_not_save_samples=True,
                         do_not_save_grid=True)
    assert info["saved_images"] == [f"txt2img-images/{date}/00042-7.png", f"txt2img-images/{date}/00043-8.png"]
    for name, b64, text in zip(info["saved_images"], data["images"], info["infotexts"]):
        saved = Image.open(outputs / name)
        assert saved.format == "PNG" and saved.info["parameters"] == text
        assert np.array_equal(np.asarray(saved), np.asarray(png(b64)))
    assert not [f for f in day.iterdir() if not f.name.endswith(".png")]

    data, info = txt2img_like(client, "img2img", _request("img2img", seed=5, save_images=True))
    name = info["saved_images"][0]
    assert name.startswith(f"img2img-images/{date}/") and name.endswith("-5.png")
    assert Image.open(outputs / name).info["parameters"] == info["infotexts"][0]
    assert list(tmp_path.iterdir()) == [] and sorted(models_dir.rglob("*")) == models_before


def test_styles_merge_into_the_prompts_as_the_web_ui_does(client):
    """styles name rows of the server's styles.csv (by default in the models folder; GET
    prompt-styles lists them). Each merges into the prompts in the order given, into its {prompt}
    or else after a comma; the infotext and info carry the styled prompts, as the web UI's do,
    and info the names. A name that is not in the file is refused, not skipped."""
    styled, info = txt2img(client, prompt="a cat", negative_prompt="ugly", styles=["film", "sharp"], seed=3)
    assert info["prompt"] == info["all_prompts"][0] == "a photo of a cat, film grain, sharp focus"
    assert info["negative_prompt"] == "ugly, blurry" and info["styles"] == ["film", "sharp"]
    assert info["infotexts"][0].startswith("a photo of a cat, film grain, sharp focus\nNegative prompt: ugly, blurry\n")
    written, _ = txt2img(client, prompt="a photo of a cat, film grain, sharp focus", negative_prompt="ugly, blurry",
                         seed=3)
    assert written["images"] == styled["images"]
    r = client.post(f"{API}/txt2img", json={**SMALL, "prompt": "a cat", "styles": ["film", "nope"]})
    assert r.status_code == 422 and "no style named 'nope'" in r.json()["detail"] and "'film'" in r.json()["detail"]


def test_tiling_makes_images_whose_opposite_edges_continue(client, monkeypatch):
    """tiling=true pads the UNet's and VAE's convolutions circularly (the web UI's Tiling), so the
    image is a picture on a torus: its right edge runs on into its left, its bottom into its top.
    Shown exactly: the same noise moved across the edges (by 2 latents, the UNet's downsampling
    step) gives the same image moved across the edges; with zero padding it does not. The
    infotext says "Tiling: True", and the padding is back to zeros for the next request."""
    from sdlab.sampling.rng import ImageRNG
    from tests.tiny import TINY_VAE

    body = {"prompt": "bricks", "seed": 5, "steps": 2, "width": 48, "height": 32, "sampler_name": "Euler"}
    plain, plain_info = txt2img(client, **body)
    tiled, info = txt2img(client, **body, tiling=True)
    assert "Tiling: True" in info["infotexts"][0] and "Tiling" not in plain_info["infotexts"][0]
    assert tiled["images"] != plain["images"]

    first = ImageRNG.first
    monkeypatch.setattr(ImageRNG, "first", lambda rng: torch.roll(first(rng), (2, 2), dims=(-2, -1)))
    moved_tiled, _ = txt2img(client, **body, tiling=True)
    moved_plain, _ = txt2img(client, **body)
    monkeypatch.undo()
    shift = 2 * TINY_VAE.downsample_factor

    def moved(data: dict) -> np.ndarray:
        return np.roll(np.asarray(png(data["images"][0]).convert("RGB")).astype(int), (shift, shift), axis=(0, 1))

    def image(data: dict) -> np.ndarray:
        return np.asarray(png(data["images"][0]).convert("RGB")).astype(int)

    assert np.abs(moved(tiled) - image(moved_tiled)).max() <= 1  # a level of rounding at most
    # Zero padding: the edges see zeros, not each other, and a good part of the image changes.
    assert (np.abs(moved(plain) - image(moved_plain)) > 1).mean() > 0.1
    again, _ = txt2img(client, **body)
    assert again["images"] == plain["images"]
    r = client.post(f"{API}/txt2img", json={"infotext": info["infotexts"][0]})  # "Tiling: True" fills tiling
    assert r.status_code == 200 and r.json()["images"] == tiled["images"]


def test_disable_extra_networks_drops_the_lora_tags(client):
    r = client.post(f"{API}/txt2img", json={**SMALL, "prompt": "<lora:nope:1> a square", "seed": 2})
    assert r.status_code == 422 and "nope" in r.json()["detail"]
    dropped, info = txt2img(client, prompt="<lora:nope:1> a square", seed=2, disable_extra_networks=True)
    plain, _ = txt2img(client, prompt="a square", seed=2)
    assert pixels(dropped) == pixels(plain) and info["prompt"].strip() == "a square"


def pixels(data: dict) -> list[bytes]:
    return [np.asarray(png(b64).convert("RGB")).tobytes() for b64 in data["images"]]


def test_send_images_false_answers_without_images(client):
    data, info = txt2img(client, steps=1, send_images=False)
    assert data["images"] == [] and len(info["infotexts"]) == 1


def test_include_init_images_echoes_them(client):
    init = b64_image(_init_image())
    data, _ = txt2img_like(client, "img2img", _request("img2img", include_init_images=True))
    assert data["parameters"]["init_images"] == [init]
    data, _ = txt2img_like(client, "img2img", _request("img2img"))
    assert data["parameters"]["init_images"] is None


def test_mask_blur_and_its_x_y_spellings(client):
    def inpaint(**blur):
        data, info = txt2img_like(client, "img2img", _request("img2img", mask=_mask_b64(), steps=2,
                                                                denoising_strength=1.0, **blur))
        return data["images"], info["infotexts"][0]

    sharp, _ = inpaint(mask_blur=0)
    soft, text = inpaint(mask_blur=8)
    assert sharp != soft and "Mask blur: 8" in text
    assert inpaint(mask_blur_x=8, mask_blur_y=8)[0] == soft
    assert inpaint(mask_blur=8, mask_blur_x=2, mask_blur_y=3)[0] == soft  # mask_blur sets both, as in the web UI
    r = client.post(f"{API}/img2img", json=_request("img2img", mask=_mask_b64(), mask_blur_x=4, mask_blur_y=8))
    assert r.status_code == 422 and "mask_blur_x=4, mask_blur_y=8" in r.json()["detail"]


def test_inpainting_fill(client):
    """1 (original) is what sdlab does; 0, the web UI's default, passes with a note; 2 and 3 are refused."""
    body = _request("img2img", mask=_mask_b64(), steps=2, denoising_strength=0.6)
    original, info = txt2img_like(client, "img2img", {**body, "inpainting_fill": 1})
    assert not info["notes"]
    fill, info = txt2img_like(client, "img2img", {**body, "inpainting_fill": 0})
    assert fill["images"] == original["images"] and "inpainting_fill=0" in " ".join(info["notes"])
    for value in (2, 3):
        r = client.post(f"{API}/img2img", json={**body, "inpainting_fill": value})
        assert r.status_code == 422 and f"inpainting_fill={value}" in r.json()["detail"]
    r = client.post(f"{API}/img2img", json={**body, "init_images": body["init_images"] * 2})
    assert r.status_code == 422 and "init_images: 2 images" in r.json()["detail"]


def test_image_cfg_scale_does_nothing_as_in_the_web_ui_for_models_not_instruct_pix2pix(client):
    """The web UI uses image_cfg_scale with instruct-pix2pix models only and drops it for every
    other model; sdlab loads no instruct-pix2pix model, so it has no effect (webuiapi sends 1.5)."""
    without, _ = txt2img_like(client, "img2img", _request("img2img", steps=2))
    with_it, _ = txt2img_like(client, "img2img", _request("img2img", steps=2, image_cfg_scale=1.5))
    assert with_it["images"] == without["images"]


def test_resize_mode_and_latent_mask_as_the_web_ui(client):
    """resize_mode 1 (crop and resize) and 2 (resize and fill) give the image resize mode 0 gives
    from the init image fitted to the size beforehand, by hand for 1 (scale to cover, crop the
    centre) and by sdlab.resize for 2 (tests/test_scripts.py checks it by hand); 3 (latent upscale)
    keeps the size and differs from 0, and is refused with a mask, as the web UI fails on it. A
    latent_mask equal to the mask changes nothing; another one changes the image."""
    from sdlab.resize import resize_image

    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (16, 48, 3), dtype=np.uint8))
    fitted = {1: wide.resize((96, 32), Image.LANCZOS).crop((32, 0, 64, 32)), 2: resize_image(2, wide, 32, 32)}
    plain = {}
    for mode in (0, 1, 2, 3):
        data, _ = txt2img_like(client, "img2img", _request("img2img", steps=2, resize_mode=mode,
                                                           init_images=[b64_image(wide)]))
        plain[mode] = data["images"][0]
        assert png(plain[mode]).size == (32, 32)
    for mode, image in fitted.items():
        data, _ = txt2img_like(client, "img2img", _request("img2img", steps=2, init_images=[b64_image(image)]))
        assert np.array_equal(np.asarray(png(data["images"][0])), np.asarray(png(plain[mode]))), mode
    assert len({np.asarray(png(b)).tobytes() for b in plain.values()}) == 4
    r = client.post(f"{API}/img2img", json=_request("img2img", resize_mode=3, mask=_mask_b64()))
    assert r.status_code == 422 and "latent upscale" in r.json()["detail"]

    masked = _request("img2img", steps=2, mask=_mask_b64(), denoising_strength=1.0, inpaint_full_res=False)
    alone, _ = txt2img_like(client, "img2img", masked)
    same, _ = txt2img_like(client, "img2img", {**masked, "latent_mask": _mask_b64()})
    other = np.zeros((32, 32), np.uint8)
    other[4:28, 4:28] = 255
    wider, _ = txt2img_like(client, "img2img", {**masked, "latent_mask": b64_image(Image.fromarray(other))})
    assert same["images"] == alone["images"] and wider["images"] != alone["images"]


# -- listings, options, utilities ---------------------------------------------------------------------

def test_listings(client, models_dir):
    models = client.get(f"{API}/sd-models").json()
    assert {"tiny", "other"} <= {m["model_name"] for m in models}
    tiny = next(m for m in models if m["model_name"] == "tiny")
    assert set(tiny) == {"title", "model_name", "hash", "sha256", "filename", "config"}
    assert tiny["title"] == f"tiny.safetensors [{tiny['hash']}]" and tiny["sha256"].startswith(tiny["hash"])
    samplers = {s["name"]: s for s in client.get(f"{API}/samplers").json()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM"} <= set(samplers)
    assert "k_euler_a" in samplers["Euler a"]["aliases"] and samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    schedulers = {s["name"]: s for s in client.get(f"{API}/schedulers").json()}
    assert schedulers["karras"]["label"] == "Karras" and schedulers["karras"]["default_rho"] == 7.0
    assert set(schedulers["automatic"]) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
    loras = client.get(f"{API}/loras").json()
    assert loras == [{"name": "shapes", "alias": "shapes-v1", "path": str(models_dir / "Lora" / "shapes.safetensors"),
                      "metadata": {"ss_output_name": "shapes-v1", "ss_network_dim": "4"}}]
    emb = client.get(f"{API}/embeddings").json()
    assert emb["loaded"]["mystyle"]["shape"] == 64 and emb["loaded"]["mystyle"]["vectors"] == 2
    mem = client.get(f"{API}/memory").json()
    assert mem["ram"]["total"] > mem["ram"]["used"] > 0 and "cuda" in mem
    progress = client.get(f"{API}/progress").json()
    assert set(progress) == {"progress", "eta_relative", "state", "current_image", "textinfo"}
    state_keys = {"job", "job_count", "job_no", "sampling_step", "sampling_steps", "interrupted", "skipped"}
    assert state_keys <= set(progress["state"])


def test_listing_endpoints_answer_with_the_web_ui_shapes(client, models_dir):
    """Every listing that web UI clients read at startup answers 200 in the web UI's shape: a list
    of its items (their published schema has the web UI's keys), empty where sdlab has nothing of
    the kind, never a 404. scripts is the web UI's {txt2img, img2img}, which webuiapi reads on
    connecting. interrogate says it is not implemented (501), not that the path is wrong."""
    openapi = client.get("/openapi.json").json()
    for path, keys in LISTINGS.items():
        r = client.get(f"{API}/{path}")
        assert r.status_code == 200, path
        if keys is dict:
            assert isinstance(r.json(), dict), path
            continue
        schema = openapi["paths"][f"{API}/{path}"]["get"]["responses"]["200"]["content"]["application/json"]
        item = openapi["components"]["schemas"][schema["schema"]["items"]["$ref"].rsplit("/", 1)[1]]
        assert set(item["properties"]) == keys, path
        assert isinstance(r.json(), list) and all(set(x) == keys for x in r.json()), path
    get = lambda path: client.get(f"{API}/{path}").json()  # noqa: E731
    # The web UI's built-in upscalers, first and in its order (this models folder has no upscaler
    # model files; tests/server/test_extras.py has them), and its six latent modes. No VAE to choose,
    # no hypernetworks, face restorers or extensions; the scripts sdlab runs (their arguments are in
    # tests/server/test_scripts_api.py).
    assert get("upscalers") == [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                                 "scale": 4.0} for name in ("None", "Lanczos", "Nearest")]
    assert [m["name"] for m in get("latent-upscale-modes")][:2] == ["Latent", "Latent (antialiased)"]
    for path in ("sd-vae", "hypernetworks", "face-restorers", "realesrgan-models", "extensions"):
        assert get(path) == [], path
    assert get("scripts")["txt2img"] == ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet"]
    assert get("prompt-styles") == [
        {"name": "film", "prompt": "a photo of {prompt}, film grain", "negative_prompt": "blurry"},
        {"name": "sharp", "prompt": "sharp focus", "negative_prompt": ""}]
    flags = get("cmd-flags")
    assert flags["api"] is True and (flags["server_name"], flags["port"], flags["listen"]) == ("127.0.0.1", 7860, False)
    assert flags["ckpt"] == "tiny.safetensors" and flags["api_auth"] is None
    assert flags["styles_file"] == [str((models_dir / "styles.csv").resolve())]
    r = client.post(f"{API}/interrogate", json={"image": b64_image(_init_image()), "model": "clip"})
    assert r.status_code == 501 and r.json()["error"] == "NotProvided"
    assert r.json()["detail"].startswith("interrogate (model 'clip') is not implemented by sdlab")
    assert "\n" not in r.json()["detail"]


def test_refresh_checkpoints_finds_new_files(client, models_dir):
    new = models_dir / "Stable-diffusion" / "sub" / "late.safetensors"
    new.parent.mkdir()
    new.write_bytes((models_dir / "Stable-diffusion" / "tiny.safetensors").read_bytes())
    assert "sub_late" not in {m["model_name"] for m in client.get(f"{API}/sd-models").json()}
    assert client.post(f"{API}/refresh-checkpoints").status_code == 200
    names = {m["model_name"]: m for m in client.get(f"{API}/sd-models").json()}
    assert names["sub_late"]["title"].startswith("sub/late.safetensors")


def test_options_switch_the_model_between_jobs(client):
    opts = client.get(f"{API}/options").json()
    assert opts["sd_model_checkpoint"].startswith("tiny.safetensors") and opts["CLIP_stop_at_last_layers"] == 1
    first, info = txt2img(client, seed=11)
    assert info["sd_model_name"] == "tiny"
    try:
        assert client.post(f"{API}/options", json={"sd_model_checkpoint": "other"}).status_code == 200
        assert client.get(f"{API}/options").json()["sd_model_checkpoint"].startswith("other.safetensors")
        other, info = txt2img(client, seed=11)
        assert info["sd_model_name"] == "other" and other["images"][0] != first["images"][0]
        # A per-request override uses a model for that request only.
        again, info = txt2img(client, seed=11, override_settings={"sd_model_checkpoint": "tiny.safetensors"})
        assert info["sd_model_name"] == "tiny" and again["images"][0] == first["images"][0]
        assert client.get(f"{API}/options").json()["sd_model_checkpoint"].startswith("other.safetensors")
    finally:
        client.post(f"{API}/options", json={"sd_model_checkpoint": "tiny.safetensors"})
    # Clip skip through the options, as the web UI's setting
    assert client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 2}).status_code == 200
    try:
        _, info = txt2img(client, steps=1, seed=1)
        assert info["clip_skip"] == 2 and "Clip skip: 2" in info["infotexts"][0]
    finally:
        client.post(f"{API}/options", json={"CLIP_stop_at_last_layers": 1})


def test_noise_schedule_option_and_override(client):
    """The web UI's "Noise schedule for sampling" (sd_noise_schedule): "Zero Terminal SNR" samples on
    that schedule and says so in the infotext; "Default" leaves it to the model; the infotext field
    brings it back."""
    assert client.get(f"{API}/options").json()["sd_noise_schedule"] == "Default"
    plain, info = txt2img(client, seed=5)
    assert "Noise Schedule" not in info["infotexts"][0]
    ztsnr, info = txt2img(client, seed=5, override_settings={"sd_noise_schedule": "Zero Terminal SNR"})
    assert "Noise Schedule: Zero Terminal SNR" in info["infotexts"][0] and ztsnr["images"] != plain["images"]
    assert client.post(f"{API}/options", json={"sd_noise_schedule": "Zero Terminal SNR"}).status_code == 200
    try:
        again, _ = txt2img(client, seed=5)
        assert again["images"] == ztsnr["images"]
    finally:
        client.post(f"{API}/options", json={"sd_noise_schedule": "Default"})
    from_text, _ = txt2img(client, infotext=info["infotexts"][0])
    assert from_text["images"] == ztsnr["images"]
    r = client.post(f"{API}/options", json={"sd_noise_schedule": "Karras"})
    assert r.status_code == 422 and "sd_noise_schedule must be one of" in r.text


def test_png_info_reads_the_parameters_back(client):
    data, info = txt2img(client, prompt="a green (triangle:1.2)", seed=42, steps=2)
    r = client.post(f"{API}/png-info", json={"image": data["images"][0]})
    assert r.status_code == 200
    body = r.json()
    assert body["info"] == info["infotexts"][0]
    assert body["parameters"]["Prompt"] == "a green (triangle:1.2)" and body["parameters"]["Seed"] == "42"
    plain = client.post(f"{API}/png-info", json={"image": b64_image(Image.new("RGB", (8, 8)))}).json()
    assert plain["info"] == "" and plain["parameters"] == {}


# -- the queue: progress, interrupt, skip, cancelled jobs ---------------------------------------------

def _start(client, body: dict) -> tuple[threading.Thread, dict]:
    out: dict = {}

    def run():
        out["response"] = client.post(f"{API}/txt2img", json=body)
        out["t"] = time.perf_counter()

    t = threading.Thread(target=run)
    t.start()
    return t, out


def _wait_for_step(client, step: int, timeout: float = 60.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        p = client.get(f"{API}/progress").json()
        if p["state"]["job"] and p["state"]["sampling_step"] >= step:
            return p
        time.sleep(0.01)
    raise AssertionError("the job never reached the step")


def test_interrupt_stops_within_two_steps_and_the_next_job_runs_normally(client):
    reference, _ = txt2img(client, prompt="after", seed=21)
    thread, out = _start(client, {**SMALL, "steps": LONG, "seed": 3})
    p = _wait_for_step(client, 2)
    assert 0 < p["progress"] < 1 and p["eta_relative"] > 0 and p["current_image"]
    assert png(p["current_image"]).size[0] > 0
    client.post(f"{API}/interrupt")
    at = client.get(f"{API}/progress").json()["state"]["sampling_step"]
    sent = time.perf_counter()
    thread.join(60)
    r = out["response"]
    assert r.status_code == 200
    info = json.loads(r.json()["info"])
    assert info["interrupted"] is True and 1 <= info["steps_done"] <= max(at, p["state"]["sampling_step"]) + 2
    # the image says it is unfinished, in its infotext and its PNG: Steps alone would pass it for a finished one
    stopped = f"Interrupted at step: {info['steps_done']}/{LONG}"
    assert stopped in info["infotexts"][0] and stopped in png(r.json()["images"][0]).info["parameters"]
    assert len(r.json()["images"]) == 1 and out["t"] - sent < 10
    after, info = txt2img(client, prompt="after", seed=21)
    assert info["interrupted"] is False and info["steps_done"] == SMALL["steps"]
    assert after["images"][0] == reference["images"][0] and "Interrupted" not in info["infotexts"][0]


def test_skip_ends_the_current_batch_only(client):
    thread, out = _start(client, {**SMALL, "steps": LONG, "n_iter": 2, "seed": 30})
    _wait_for_step(client, 1)
    client.post(f"{API}/skip")
    # the second batch runs to the end; interrupt it once it is under way to keep the test short
    end = time.monotonic() + 60
    while time.monotonic() < end:
        s = client.get(f"{API}/progress").json()["state"]
        if s["job_no"] == 1 and s["sampling_step"] >= 1:
            break
        time.sleep(0.01)
    assert s["job_no"] == 1
    client.post(f"{API}/interrupt")
    thread.join(60)
    info = json.loads(out["response"].json()["info"])
    assert info["all_seeds"] == [30, 31] and len(out["response"].json()["images"]) == 2


def test_a_cancelled_job_does_not_hold_the_worker(client):
    """What happens when a client disconnects: its job is cancelled, the worker moves on."""
    state = client.app.state.sdlab
    from dataclasses import replace

    from sdlab.pipeline import GenerationRequest

    long = Job("txt2img", state.selected, GenerationRequest(prompt="x", width=32, height=32, steps=LONG, seed=1,
                                                             subseed=1))
    state.worker.submit(long)
    waiting = Job("txt2img", state.selected, replace(long.request, steps=LONG))
    state.worker.submit(waiting)
    _wait_for_step(client, 1)
    waiting.cancel()  # gone before it started: never runs
    long.cancel()  # gone while running: stops at the next step
    start = time.perf_counter()
    _, info = txt2img(client, steps=2, seed=1)
    assert info["steps_done"] == 2 and time.perf_counter() - start < 20
    assert waiting.future.cancelled()


# -- bad input ----------------------------------------------------------------------------------------------

def _bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size (decoding it would allocate width*height*3)."""
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, format="PNG")
    raw = bytearray(buf.getvalue())
    ihdr = raw[12:29]  # b"IHDR" + 13 bytes
    ihdr[4:12] = struct.pack(">II", width, height)
    raw[12:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)) & 0xFFFFFFFF)
    return bytes(raw)


@pytest.mark.parametrize("method,path,body,status,words", [
    ("post", "options", {"sd_model_checkpoint": "../../etc/passwd"}, 404, "no checkpoint named"),
    ("post", "txt2img", {"override_settings": {"sd_model_checkpoint": "../../../etc/passwd"}}, 404, "models folder"),
    ("post", "txt2img", {"width": 100000, "height": 100000}, 422, "pixels"),
    ("post", "txt2img", {**SMALL, "steps": 1001}, 422, "steps"),
    ("post", "txt2img", {**SMALL, "batch_size": 4, "n_iter": 4}, 422, "batch_size x n_iter"),
    ("post", "txt2img", {**SMALL, "width": 36}, 422, "multiple of 8"),
    ("post", "txt2img", {**SMALL, "steps": "many"}, 422, "steps"),
    ("post", "txt2img", {**SMALL, "prompt": "<lora:nope:1> x"}, 422, "lora"),
    ("post", "img2img", {"init_images": ["not base64!!"]}, 400, "base64"),
    ("post", "img2img", {"init_images": [base64.b64encode(b"hello world").decode()]}, 400, "not a readable image"),
    ("post", "img2img", {"init_images": [base64.b64encode(_bomb_png(100000, 100000)).decode()]}, 413, "pixels"),
    ("post", "img2img", {"init_images": [base64.b64encode(_bomb_png(5000, 5000)).decode()]}, 413, "pixels"),
    ("post", "img2img", {"prompt": "no image"}, 422, "init_images"),
    ("post", "png-info", {}, 422, "image"),
    ("post", "png-info", {"image": "%%%"}, 400, "base64"),
    ("post", "options", {"CLIP_stop_at_last_layers": 99}, 422, "1-12"),
])
def test_bad_input_gets_a_4xx_with_a_message_and_the_server_keeps_serving(client, method, path, body, status, words):
    r = getattr(client, method)(f"{API}/{path}", json=body)
    assert r.status_code == status, r.text
    assert words.lower() in json.dumps(r.json()["detail"]).lower()
    assert client.get(f"{API}/progress").status_code == 200


ODD_BODIES = [
    {"prompt": 123}, {"prompt": None}, {"seed": 1e30}, {"seed": -5}, {"batch_size": 0}, {"steps": -1},
    {"width": 0}, {"cfg_scale": "Infinity"}, {"cfg_scale": -1}, {"sampler_index": 99}, {"sampler_index": -1},
    {"scheduler": "nope"}, {"override_settings": []}, {"override_settings": {"sd_model_checkpoint": None}},
    {"override_settings": {"CLIP_stop_at_last_layers": "x"}}, {"override_settings": {"randn_source": "TPU"}},
    {"override_settings": {"sd_noise_schedule": "Karras"}},
    {"infotext": "Steps: many, Sampler: x, Seed: y"}, {"styles": "not a list"}, {"subseed_strength": 2},
    {"eta": -1}, {"n_iter": 10**9}, ["a", "list"], "a string", None,
]


@pytest.mark.parametrize("body", ODD_BODIES, ids=[json.dumps(b)[:40] for b in ODD_BODIES])
def test_odd_values_are_4xx_never_500(client, body):
    payload = {**SMALL, **body} if isinstance(body, dict) else body
    r = client.post(f"{API}/txt2img", json=payload)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["detail"]
    r = client.post(f"{API}/img2img", json={"init_images": [b64_image(_init_image())], "mask": "bad!!", **SMALL})
    assert r.status_code == 400


def test_invalid_json_and_oversized_bodies(models_dir):
    app = create_app(ServerSettings(models_dir=models_dir, limits=Limits(max_upload_bytes=1000)))
    with TestClient(app) as c:
        r = c.post(f"{API}/txt2img", content=b"{not json", headers={"Content-Type": "application/json"})
        assert r.status_code == 422
        r = c.post(f"{API}/png-info", json={"image": "A" * 5000})
        assert r.status_code == 413 and "larger than" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit applies while reading
            for _ in range(10):
                yield b"A" * 500

        r = c.post(f"{API}/png-info", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        assert c.get(f"{API}/progress").status_code == 200


def test_api_auth_guards_every_route(models_dir):
    settings = ServerSettings(models_dir=models_dir, api_auth=parse_api_auth("alice:s3cret,bob:pw:with:colons"))
    with TestClient(create_app(settings)) as c:
        for path in ["/", "/docs", "/openapi.json", "/static/app.js", f"{API}/sd-models", f"{API}/progress"]:
            r = c.get(path)
            assert r.status_code == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Basic") and "X-Process-Time" in r.headers
        assert c.get(f"{API}/sd-models", auth=("alice", "wrong")).status_code == 401
        assert c.get(f"{API}/sd-models", auth=("mallory", "s3cret")).status_code == 401
        assert c.post(f"{API}/txt2img", json=SMALL, auth=("alice", "nope")).status_code == 401
        assert c.get(f"{API}/sd-models", headers={"Authorization": "Basic %%%"}).status_code == 401
        assert c.get(f"{API}/sd-models", auth=("alice", "s3cret")).status_code == 200
        assert c.get("/", auth=("bob", "pw:with:colons")).status_code == 200


def test_page_and_static_files(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    for needle in ['id="prompt"', 'id="negative"', 'id="generate"', 'id="gallery"', 'data-tab="inpaint"',
                   'id="mask-canvas"', 'id="lora"', 'id="seed-reuse"', 'id="dropzone-png"', 'id="png-send"',
                   'id="noise-schedule"', '<option value="Zero Terminal SNR"']:
        assert needle in r.text, needle
    script = client.get("/static/app.js")
    assert script.status_code == 200 and 'sd_noise_schedule: $("noise-schedule").value' in script.text
    assert client.get("/static/../settings.py").status_code == 404


def test_empty_folder_uses_the_demo_model_else_answers_503(tmp_path):
    from sdlab import demo_model_path

    with TestClient(create_app(ServerSettings(models_dir=tmp_path))) as c:
        state = c.app.state.sdlab
        if demo_model_path().is_file():
            assert state.selected.path == demo_model_path().resolve()
            assert [m["model_name"] for m in c.get(f"{API}/sd-models").json()] == ["demo"]
        # With no checkpoint at all (no demo model either), generation is a 503 that says what to do.
        state.selected = None
        r = c.post(f"{API}/txt2img", json=SMALL)
        assert r.status_code == 503 and "Stable-diffusion" in r.json()["detail"]


def test_server_loads_models_with_its_weight_dtype(models_dir):
    """`sdlab serve --weight-dtype bf16`: the checkpoint's matrices are kept in bf16 (computed in
    fp32 on this CPU), and `--dtype` alone keeps them in that dtype."""
    import torch

    from sdlab.models.storage import compute_dtype, storage_dtype
    from sdlab.server.state import ServerState

    for settings, want in (({"weight_dtype": "bf16", "dtype": "fp32"}, torch.bfloat16),
                           ({"dtype": "fp32"}, torch.float32)):
        state = ServerState(ServerSettings(models_dir=models_dir, model="tiny.safetensors", device="cpu", **settings))
        unet = state._load_pipeline(state.selected).bundle.unet
        assert (storage_dtype(unet), compute_dtype(unet)) == (want, torch.float32)


def test_fp8_storage_option_reloads_the_model_with_fp8_weights(models_dir):
    """The web UI's "FP8 weight" (fp8_storage): "Enable" loads the model again with its matrices
    in fp8 (embedding tables stay wide, as there), which changes the image; "Enable for SDXL"
    leaves an SD 1.x model alone; "Disable" gives the first image back."""
    import torch

    from sdlab.models.storage import storage_dtype

    app = create_app(ServerSettings(models_dir=models_dir, model="tiny.safetensors", device="cpu", dtype="fp32"))
    with TestClient(app) as c:
        state = app.state.sdlab

        def storage():
            bundle = state.worker._pipeline.bundle
            return storage_dtype(bundle.unet), storage_dtype(bundle.text_encoders[0])

        assert c.get(f"{API}/options").json()["fp8_storage"] == "Disable"
        plain, _ = txt2img(c, seed=4)
        assert storage() == (torch.float32, torch.float32)
        assert c.post(f"{API}/options", json={"fp8_storage": "Enable"}).status_code == 200
        assert storage() == (torch.float8_e4m3fn, torch.float8_e4m3fn)  # loaded again at once
        tables = state.worker._pipeline.bundle.text_encoders[0].text_model.embeddings
        assert tables.token_embedding.weight.dtype == torch.float32
        fp8, _ = txt2img(c, seed=4)
        assert fp8["images"] != plain["images"]
        c.post(f"{API}/options", json={"fp8_storage": "Enable for SDXL"})
        assert storage() == (torch.float32, torch.float32)
        c.post(f"{API}/options", json={"fp8_storage": "Disable"})
        again, _ = txt2img(c, seed=4)
        assert again["images"] == plain["images"] and storage() == (torch.float32, torch.float32)
        r = c.post(f"{API}/options", json={"fp8_storage": "On"})
        assert r.status_code == 422 and "fp8_storage must be one of" in r.text
        # For one request (override_settings): that request's model in fp8, the next one's as the options say.
        once, _ = txt2img(c, seed=4, override_settings={"fp8_storage": "Enable"})
        assert once["images"] == fp8["images"] and storage() == (torch.float8_e4m3fn, torch.float8_e4m3fn)
        after, _ = txt2img(c, seed=4)
        assert after["images"] == plain["images"] and storage() == (torch.float32, torch.float32)
        r = c.post(f"{API}/txt2img", json={"prompt": "x", "override_settings": {"fp8_storage": "On"}})
        assert r.status_code == 422 and "fp8_storage must be one of" in r.text


def test_fp8_storage_enable_for_sdxl_takes_sdxl_models(tmp_path):
    import torch

    from sdlab.models.storage import storage_dtype
    from sdlab.server.state import ServerState

    path = save_native(tiny_bundle("sdxl"), tmp_path / "xl.safetensors")
    state = ServerState(ServerSettings(models_dir=tmp_path, model=str(path), device="cpu", dtype="fp32"))
    state.set_option("fp8_storage", "Enable for SDXL")
    bundle = state._load_pipeline(state.selected).bundle
    assert {storage_dtype(n) for n in (bundle.unet, *bundle.text_encoders)} == {torch.float8_e4m3fn}


def test_serve_command_defaults_to_loopback_and_parses_auth_and_limits():
    from sdlab.cli import build_parser
    from sdlab.errors import SdlabError
    from sdlab.server.cli import settings_from_args

    s = settings_from_args(build_parser().parse_args(["serve"]))
    assert (s.host, s.port, s.api_auth, s.model) == ("127.0.0.1", 7860, (), None)
    assert settings_from_args(build_parser().parse_args(["serve", "--listen"])).host == "0.0.0.0"  # the web UI's flag
    s = settings_from_args(build_parser().parse_args(
        ["serve", "--api-auth", "a:b, c:d:e", "--max-pixels", "1000", "--max-steps", "9", "--max-batch", "2",
         "--max-upload-mb", "1.5", "--models-dir", "/srv/models", "--model", "x"]))
    assert s.api_auth == (("a", "b"), ("c", "d:e")) and s.models_dir == Path("/srv/models") and s.model == "x"
    assert (s.limits.max_pixels, s.limits.max_steps, s.limits.max_batch) == (1000, 9, 2)
    assert s.limits.max_upload_bytes == int(1.5 * 2**20)
    for bad in ["nopass", "user:", ":pw", "a:b,,c:d"]:
        with pytest.raises(SdlabError, match="user:pass"):
            parse_api_auth(bad)
    assert settings_from_args(build_parser().parse_args(["serve", "--dtype", "BF16"])).dtype == "BF16"
    with pytest.raises(SdlabError, match="unknown dtype 'fp8'; choose one of fp32, fp16, bf16"):
        settings_from_args(build_parser().parse_args(["serve", "--dtype", "fp8"]))  # at start, not at a request
    args = ["serve", "--weight-dtype", "fp8_e4m3fn"]
    assert settings_from_args(build_parser().parse_args(args)).weight_dtype == "fp8_e4m3fn"
    with pytest.raises(SdlabError, match="unknown weight dtype 'int4'"):
        settings_from_args(build_parser().parse_args(["serve", "--weight-dtype", "int4"]))


def test_serve_says_what_it_serves(models_dir, tmp_path):
    """`sdlab serve` starts with one block: the model it loads first with its family, the device,
    the dtypes it will run in, and the addresses of the page and the API docs."""
    from sdlab.cli import build_parser
    from sdlab.server.cli import settings_from_args, startup_lines
    from sdlab.server.state import ServerState

    args = build_parser().parse_args(["serve", "--models-dir", str(models_dir), "--model", "tiny.safetensors",
                                      "--device", "cpu", "--dtype", "fp32", "--weight-dtype", "bf16", "--port",
                                      "7861", "--outputs-dir", str(tmp_path / "out"), "--styles-file",
                                      str(tmp_path / "my.csv")])
    settings = settings_from_args(args)
    assert settings.outputs_dir == tmp_path / "out" and settings.styles_path == tmp_path / "my.csv"
    lines = startup_lines(ServerState(settings))
    assert lines[0].startswith("sdlab ") and lines[0].endswith("serving the web UI's API (/sdapi/v1) on 127.0.0.1:7861")
    rows = dict(line.strip().split("  ", 1) for line in lines[1:])
    rows = {k: v.strip() for k, v in rows.items()}
    assert rows == {"model": "tiny.safetensors (Stable Diffusion 1.x)", "device": "cpu",
                    "UNet / text encoder": "fp32, weights stored as bf16", "VAE": "fp32",
                    "web page": "http://127.0.0.1:7861/", "API docs": "http://127.0.0.1:7861/docs"}
    # --listen binds every interface; the address to open is this machine's.
    listen = settings_from_args(build_parser().parse_args(["serve", "--models-dir", str(models_dir), "--listen",
                                                           "--device", "cpu"]))
    assert "  web page             http://127.0.0.1:7860/" in startup_lines(ServerState(listen))


def test_serve_on_a_port_in_use_is_one_line_and_exit_code_2(models_dir, capsys, monkeypatch):
    """A port in use is found before anything loads or claims to serve: one line, exit code 2."""
    import socket

    import sdlab.device
    from sdlab.cli import main

    monkeypatch.setattr(sdlab.device, "configure_threads", lambda: None)  # main's; leave this process's threads
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["serve", "--port", str(port), "--models-dir", str(models_dir), "--model", "tiny.safetensors"])
    out = capsys.readouterr()
    assert code == 2 and out.out == ""
    assert out.err == (f"sdlab: error: port {port} on 127.0.0.1 is already in use (another sdlab or web UI?); "
                       "stop it or choose another with --port\n")


# -- sdlab's one addition for its page ---------------------------------------------------------------

def test_model_info_gives_a_checkpoints_native_size(client, models_dir, tmp_path):
    """GET /sdlab/v1/model-info: the family and native size the page starts its width and height
    at, read from the checkpoint's header (sdlab's own config first: the demo model's is 64)."""
    r = client.get("/sdlab/v1/model-info")
    assert r.status_code == 200
    selected = client.get(f"{API}/options").json()["sd_model_checkpoint"]
    assert r.json() == {"title": selected, "family": "sd1", "family_label": "Stable Diffusion 1.x",
                        "native_size": 512, "error": None}
    from tests.tiny import save_with_native_size

    small = save_with_native_size(tiny_bundle("sd1"), models_dir / "Stable-diffusion" / "small.safetensors", 64)
    try:
        client.post(f"{API}/refresh-checkpoints")
        info = client.get("/sdlab/v1/model-info", params={"checkpoint": "small.safetensors"}).json()
        assert (info["title"].startswith("small.safetensors"), info["native_size"]) == (True, 64)
    finally:
        small.unlink()
        client.post(f"{API}/refresh-checkpoints")
    r = client.get("/sdlab/v1/model-info", params={"checkpoint": "nothing-here"})
    assert r.status_code == 404 and "nothing-here" in r.json()["detail"]
