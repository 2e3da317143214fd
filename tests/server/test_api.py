"""The web UI's API under /sdapi/v1, through FastAPI's test client, on tiny random models."""

from __future__ import annotations

import base64
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
    return root


@pytest.fixture(scope="module")
def client(models_dir):
    app = create_app(ServerSettings(models_dir=models_dir, model="tiny.safetensors",
                                    limits=Limits(max_pixels=512 * 512, max_steps=1000, max_batch=8)))
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
              "progress", "interrupt", "skip", "png-info", "refresh-checkpoints", "memory"]:
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


def test_unknown_and_unimplemented_fields_are_ignored_with_a_note(client):
    _, info = txt2img(client, prompt="x", steps=1, no_such_field=[1, 2], restore_faces=True, enable_hr=True,
                      alwayson_scripts={"controlnet": {"args": []}}, override_settings={"sd_vae": "x.pt"})
    notes = " | ".join(info["notes"])
    assert "no_such_field" in notes and info["ignored_fields"] == ["no_such_field"]
    for name in ("restore_faces", "enable_hr", "alwayson_scripts", "sd_vae"):
        assert name in notes


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
    assert len(r.json()["images"]) == 1 and out["t"] - sent < 10
    after, info = txt2img(client, prompt="after", seed=21)
    assert info["interrupted"] is False and info["steps_done"] == SMALL["steps"]
    assert after["images"][0] == reference["images"][0]


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
                   'id="noise-schedule"', "<option>Zero Terminal SNR</option>"]:
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
