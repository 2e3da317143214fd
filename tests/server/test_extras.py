"""The upscaler listing, the Extras endpoints and the merge endpoint, through FastAPI's test client on
a models folder made here (tiny random checkpoints, a tiny Real-ESRGAN Compact file); and webuiapi's
Extras calls against a live server."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, PngImagePlugin  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from sdlab.upscalers import ExtrasUpscale, Upscalers, upscale_extras  # noqa: E402
from tests.test_upscalers import compact, image, needs_spandrel  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

API = "/sdapi/v1"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    base = tiny_bundle("sd1", seed=0)
    save_native(base, root / "Stable-diffusion" / "tiny.safetensors")
    with torch.no_grad():  # a second model of the same family: the first, moved a little
        for p in base.unet.parameters():
            p.add_(0.01)
    save_native(base, root / "Stable-diffusion" / "other.safetensors")
    save_native(tiny_bundle("sd2", seed=1), root / "Stable-diffusion" / "v2.safetensors")
    (root / "RealESRGAN").mkdir()
    torch.save({"params": compact(num_conv=1)}, root / "RealESRGAN" / "compact_x2.pth")
    return root


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    app = create_app(ServerSettings(models_dir=models_dir, model="tiny.safetensors",
                                    limits=Limits(max_image_pixels=600 * 600, max_batch=4),
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with TestClient(app) as c:
        yield c


def b64(img: Image.Image, parameters: str | None = None) -> str:
    buf = io.BytesIO()
    info = None
    if parameters is not None:
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", parameters)
    img.save(buf, format="PNG", pnginfo=info)
    return base64.b64encode(buf.getvalue()).decode()


def png(data: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(data)))
    img.load()
    return img


def test_upscalers_and_latent_modes_are_listed_as_the_web_ui_lists_them(client, models_dir):
    listed = client.get(f"{API}/upscalers").json()
    assert [u["name"] for u in listed] == ["None", "Lanczos", "Nearest", "compact_x2"]
    assert listed[0] == {"name": "None", "model_name": None, "model_path": None, "model_url": None, "scale": 4.0}
    assert listed[3] == {"name": "compact_x2", "model_name": None, "scale": 2.0, "model_url": None,
                         "model_path": str(models_dir / "RealESRGAN" / "compact_x2.pth")}
    assert [m["name"] for m in client.get(f"{API}/latent-upscale-modes").json()] == [
        "Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)", "Latent (nearest)",
        "Latent (nearest-exact)"]


def test_single_image_keeps_the_parameters_and_adds_the_postprocessing_text(client):
    r = client.post(f"{API}/extra-single-image", json={"image": b64(image(40, 30), "a cat\nSteps: 20"),
                                                       "upscaler_1": "Lanczos", "upscaling_resize": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    out = png(body["image"])
    assert out.size == (80, 56)  # 60 rounds down to a multiple of 8, as the web UI's
    assert out.info["parameters"] == "a cat\nSteps: 20"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert body["html_info"] == "<p>Postprocess upscale by: 2, Postprocess upscaler: Lanczos</p>"
    # The web UI's defaults: upscaler_1 "None" is no upscale at all.
    r = client.post(f"{API}/extra-single-image", json={"image": b64(image(40, 30))})
    assert r.status_code == 200 and png(r.json()["image"]).size == (40, 30) and r.json()["html_info"] == "<p></p>"


@needs_spandrel
def test_a_model_file_gives_what_the_library_gives(client, models_dir):
    img = image(50, 40)
    fields = {"upscaler_1": "compact_x2", "upscaler_2": "Nearest", "extras_upscaler_2_visibility": 0.3,
              "resize_mode": 1, "upscaling_resize_w": 120, "upscaling_resize_h": 90, "upscaling_crop": True}
    r = client.post(f"{API}/extra-single-image", json={"image": b64(img), **fields})
    assert r.status_code == 200, r.text
    expect, _ = upscale_extras(img, ExtrasUpscale("compact_x2", "Nearest", 0.3, 1, 2.0, 120, 90, True),
                               Upscalers(models_dir, device="cpu"))
    assert np.array_equal(np.asarray(png(r.json()["image"])), np.asarray(expect))
    assert r.json()["html_info"] == ("<p>Postprocess upscale to: 120x90, Postprocess crop to: 120x90, "
                                     "Postprocess upscaler: compact_x2, Postprocess upscaler 2: Nearest</p>")


def test_batch_images(client):
    r = client.post(f"{API}/extra-batch-images", json={
        "imageList": [{"data": b64(image(32, 32)), "name": "a.png"}, {"data": b64(image(16, 24, 1)), "name": "b.png"}],
        "upscaler_1": "Nearest", "resize_mode": 1, "upscaling_resize_w": 64, "upscaling_resize_h": 48,
        "upscaling_crop": False})
    assert r.status_code == 200, r.text
    # scale to without crop: by max(W/w, H/h), floored to multiples of 8, not cut to 64x48
    assert [png(x).size for x in r.json()["images"]] == [(64, 64), (64, 96)]
    assert r.json()["html_info"] == "<p>Postprocess upscale to: 64x48, Postprocess upscaler: Nearest</p>"


@pytest.mark.parametrize("fields, status, message", [
    ({"upscaler_1": "4x-Nothing"}, 422, "no upscaler named '4x-Nothing' (available: None, Lanczos, Nearest"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, 422,
     "gfpgan_visibility=0.5: face restoration (GFPGAN) is not available in sdlab; send 0 or leave it out"),
    ({"upscaler_1": "Lanczos", "codeformer_visibility": 1, "codeformer_weight": 0.5}, 422,
     "codeformer_visibility=1: face restoration (CodeFormer) is not available in sdlab"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 20}, 422, "more pixels than this server allows (360000)"),
    ({"upscaler_1": "Lanczos", "image": "not base64!"}, 400, "image: not valid base64"),
])
def test_bad_requests_are_one_line(client, fields, status, message):
    r = client.post(f"{API}/extra-single-image", json={"image": b64(image(40, 30)), **fields})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_merge_writes_into_the_models_folder_and_lists_it(client, models_dir):
    r = client.post(f"{API}/merge", json={"primary_model_name": "tiny.safetensors",
                                          "secondary_model_name": "other", "multiplier": 0.5,
                                          "custom_name": "half-half", "metadata_json": '{"author": "me"}'})
    assert r.status_code == 200, r.text
    path = models_dir / "Stable-diffusion" / "half-half.safetensors"
    assert r.json()["info"] == f"Checkpoint saved to {path}" and r.json()["filename"] == str(path)
    assert r.json()["checkpoint"] == f"half-half.safetensors [{r.json()['sha256'][:10]}]"
    assert "half-half.safetensors" in [m["model_name"] + ".safetensors" for m in client.get(f"{API}/sd-models").json()]
    a, b, out = (load_file(str(models_dir / "Stable-diffusion" / n)) for n in
                 ("tiny.safetensors", "other.safetensors", "half-half.safetensors"))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(out[key], 0.5 * a[key] + 0.5 * b[key])
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["author"] == "me" and json.loads(meta["sd_merge_recipe"])["multiplier"] == 0.5


@pytest.mark.parametrize("fields, status, message", [
    ({"secondary_model_name": "v2"}, 422, "models of different families cannot be merged"),
    ({"secondary_model_name": "nothing"}, 404, "no checkpoint named 'nothing'"),
    ({"secondary_model_name": "other", "checkpoint_format": "ckpt"}, 422, "as .safetensors only"),
    ({"secondary_model_name": "other", "custom_name": "../escape"}, 422, "give a file name, without folders"),
    ({"interp_method": "Add difference", "secondary_model_name": "other"}, 422, "needs a third model (C)"),
])
def test_bad_merges_are_refused(client, models_dir, fields, status, message):
    r = client.post(f"{API}/merge", json={"primary_model_name": "tiny", **fields})
    assert r.status_code == status, r.text
    assert message in r.json()["detail"]
    assert not (models_dir / "escape.safetensors").exists()


def test_webuiapi_extras_calls(models_dir, tmp_path_factory):
    """webuiapi (PyPI), unchanged, sends every Extras field with its own defaults."""
    webuiapi = pytest.importorskip("webuiapi")
    pytest.importorskip("uvicorn")
    from .live import serving

    app = create_app(ServerSettings(models_dir=models_dir, model="tiny.safetensors",
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with serving(app) as port:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port)
        assert [u["name"] for u in api.get_upscalers()][:3] == ["None", "Lanczos", "Nearest"]
        result = api.extra_single_image(image(40, 32), upscaler_1="Lanczos", upscaling_resize=1.5)
        assert result.image.size == (56, 48)
        result = api.extra_batch_images([image(16, 16), image(24, 16)], upscaler_1="Nearest", upscaling_resize=2)
        assert [im.size for im in result.images] == [(32, 32), (48, 32)]
