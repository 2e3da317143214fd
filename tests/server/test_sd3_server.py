"""SD3 on the server and the page (issue 27, item 7): a VAE-less SD3 file (as sd3.5_large.safetensors
ships) served with the VAE the web UI's sd_vae option or `sdlab serve --vae` chooses gives the Python
API's image with load(..., vae=...); without one, the switch answers one line naming both. The page
shows SD3's shift and skip-layer guidance controls for an SD3 model only, and sends them as the API's
`shift` / `slg_*` fields.

The models folder: the tiny random SD3 model (`sd3_folder` in conftest.py) saved as one file without
its `first_stage_model.*`, that VAE alone in VAE/, and the tiny SD 1.x model.
"""

from __future__ import annotations

import base64
import functools
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

from fastapi.testclient import TestClient  # noqa: E402

from sdlab.checkpoints.io import save_safetensors  # noqa: E402
from sdlab.checkpoints.loader import load_bundle  # noqa: E402
from sdlab.errors import UsageError  # noqa: E402
from sdlab.infotext import read_infotext  # noqa: E402
from sdlab.pipeline import GenerationRequest  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.cli import settings_from_args, startup_lines  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.test_sd3 import PROMPT, SIZE  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

API = "/sdapi/v1"
VAE_PREFIX = "first_stage_model."
BARE = "sd3_no_vae.safetensors"  # an SD3 file without a VAE, as SD3.5's
VAE_FILE = "sd3_vae.safetensors"
SD1 = "tiny_sd1.safetensors"
FP32 = {"device": "cpu", "dtype": "fp32", "weight_dtype": "fp32"}
BODY = {"prompt": PROMPT, "steps": 2, "sampler_name": "Euler", "scheduler": "Normal", "cfg_scale": 3.0, "seed": 4,
        "width": SIZE, "height": SIZE}


@pytest.fixture(scope="module")
def models(tmp_path_factory, sd3_folder):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    (root / "VAE").mkdir()
    native = load_bundle(sd3_folder, device="cpu", dtype=torch.float32).state_dict()
    save_safetensors({k: v.clone() for k, v in native.items() if not k.startswith(VAE_PREFIX)},
                     root / "Stable-diffusion" / BARE)
    save_safetensors({k[len(VAE_PREFIX):]: v.clone() for k, v in native.items() if k.startswith(VAE_PREFIX)},
                     root / "VAE" / VAE_FILE)
    save_native(tiny_bundle("sd1"), root / "Stable-diffusion" / SD1)
    return root


@functools.cache  # each is made once for the module
def _python(models, t5_max_length: int) -> tuple[np.ndarray, str]:
    """The Python API's image and infotext: sdlab.load(file, vae=...) and BODY's settings."""
    import sdlab

    pipe = sdlab.load(models / "Stable-diffusion" / BARE, device="cpu", dtype=torch.float32,
                      weight_dtype=torch.float32, models_dir=models, vae=models / "VAE" / VAE_FILE,
                      t5_max_length=t5_max_length)
    res = pipe.generate(GenerationRequest(PROMPT, steps=2, sampler="Euler", schedule="normal", cfg_scale=3.0, seed=4,
                                          width=SIZE, height=SIZE))
    return np.asarray(res.images[0].convert("RGB")), res.infotexts[0]


def _txt2img(client, **fields) -> tuple[np.ndarray, str]:
    r = client.post(f"{API}/txt2img", json={**BODY, **fields})
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    image.load()
    assert read_infotext(image) == json.loads(r.json()["info"])["infotexts"][0]
    return np.asarray(image.convert("RGB")), read_infotext(image)


def test_sd_vae_option_loads_a_vae_less_sd3_file(models, tmp_path):
    app = create_app(ServerSettings(models_dir=models, model=SD1, outputs_dir=tmp_path, **FP32))
    with TestClient(app) as client:
        vae_path = str((models / "VAE" / VAE_FILE).resolve())
        assert client.get(f"{API}/sd-vae").json() == [{"model_name": VAE_FILE, "filename": vae_path}]
        info = client.get("/sdlab/v1/model-info", params={"checkpoint": BARE}).json()
        assert (info["family"], info["native_size"], info["error"]) == ("sd3", 1024, None)
        assert client.get(f"{API}/options").json()["sd_vae"] == "Automatic"

        # no VAE chosen: one line naming the option and the flag (a 422: the client's to fix), and the
        # model stays the one loaded
        r = client.post(f"{API}/options", json={"sd_model_checkpoint": BARE})
        assert r.status_code == 422
        detail = r.json()["detail"]
        assert "holds no VAE" in detail and "sd_vae" in detail and "--vae" in detail and "\n" not in detail
        assert client.get(f"{API}/options").json()["sd_model_checkpoint"].startswith(SD1)
        r = client.post(f"{API}/options", json={"sd_vae": "nope"})
        assert r.status_code == 422 and "sd_vae" in r.json()["detail"] and "\n" not in r.json()["detail"]

        r = client.post(f"{API}/options", json={"sd_model_checkpoint": BARE, "sd_vae": VAE_FILE})
        assert r.status_code == 200, r.text
        options = client.get(f"{API}/options").json()
        assert options["sd_model_checkpoint"].startswith(BARE) and options["sd_vae"] == VAE_FILE
        pixels, infotext = _txt2img(client)
    ours, our_infotext = _python(models, 77)
    assert np.array_equal(pixels, ours)
    assert infotext == our_infotext and f"VAE: {VAE_FILE.removesuffix('.safetensors')}" in infotext


def test_override_settings_sd_vae_is_this_requests_vae(models, tmp_path):
    """The web UI's override_settings {"sd_vae": NAME}: this request's model is loaded with that VAE
    (the Python API's image with load(..., vae=NAME)), and the next request without it gets the
    options' choice again (here none: the VAE-less file is refused), as the web UI restores them."""
    app = create_app(ServerSettings(models_dir=models, model=SD1, outputs_dir=tmp_path, **FP32))
    with TestClient(app) as client:
        pixels, infotext = _txt2img(client, override_settings={"sd_model_checkpoint": BARE, "sd_vae": VAE_FILE})
        ours, our_infotext = _python(models, 77)
        assert np.array_equal(pixels, ours) and infotext == our_infotext
        assert client.get(f"{API}/options").json()["sd_vae"] == "Automatic"  # the option itself is unchanged
        r = client.post(f"{API}/txt2img", json={**BODY, "override_settings": {"sd_model_checkpoint": BARE}})
        assert r.status_code == 422 and "holds no VAE" in r.json()["detail"]
        r = client.post(f"{API}/txt2img", json={**BODY, "override_settings": {"sd_vae": "nope"}})
        assert r.status_code == 422 and "sd_vae" in r.json()["detail"] and "\n" not in r.json()["detail"]


def test_serve_vae_and_t5_max_length_flags(models, tmp_path):
    from sdlab.cli import build_parser

    argv = ["serve", "--models-dir", str(models), "--model", BARE, "--device", "cpu", "--dtype", "fp32",
            "--weight-dtype", "fp32", "--outputs-dir", str(tmp_path)]
    with pytest.raises(UsageError, match="--vae: .*nope"):
        settings_from_args(build_parser().parse_args([*argv, "--vae", "nope"]))
    with pytest.raises(UsageError, match="--t5-max-length must be at least 1"):
        settings_from_args(build_parser().parse_args([*argv, "--t5-max-length", "0"]))

    app = create_app(settings_from_args(build_parser().parse_args([*argv, "--vae", "sd3_vae", "--t5-max-length",
                                                                    "16"])))
    rows = {k.strip(): v.strip() for k, v in (line.strip().split("  ", 1) for line in startup_lines(app.state.sdlab)[1:])}
    assert rows["model"] == f"{BARE} (Stable Diffusion 3)" and rows["VAE"] == f"fp32, from {VAE_FILE}"
    with TestClient(app) as client:
        pixels, infotext = _txt2img(client)
    ours, our_infotext = _python(models, 16)
    assert np.array_equal(pixels, ours) and infotext == our_infotext
    assert not np.array_equal(ours, _python(models, 77)[0])  # the T5 length reached the model


def test_the_page_shows_sd3_controls_for_sd3_only_and_sends_them(models, tmp_path):
    from .browser import (chromium, english_left, gallery_images, generate_and_wait, open_page, png_of,
                          select_checkpoint, sent_bodies, skip_without_a_browser)
    from .live import serving

    skip_without_a_browser()
    sync_api = pytest.importorskip("playwright.sync_api")

    app = create_app(ServerSettings(models_dir=models, model=BARE, vae=VAE_FILE, outputs_dir=tmp_path / "out",
                                    **FP32))
    with serving(app) as port, sync_api.sync_playwright() as pw, chromium(pw, "en-US") as ctx:
        page, errors = open_page(ctx, f"http://127.0.0.1:{port}")
        assert page.text_content("#model-status") == "Stable Diffusion 3, 1024×1024"
        assert page.is_visible("#sd3-box")
        for field, value in (("#width", SIZE), ("#height", SIZE), ("#steps", 2), ("#sd3-shift", 2.5),
                             ("#slg-layers", "0"), ("#slg-end", 0.6)):
            page.fill(field, str(value))
        bodies = sent_bodies(page, "txt2img")
        generate_and_wait(page)
        sent = bodies[0]
        assert (sent["shift"], sent["slg_layers"], sent["slg_scale"], sent["slg_start"], sent["slg_end"]) == (
            2.5, [0], 2.8, 0.01, 0.6)
        infotext = png_of(gallery_images(page)[0]["src"]).text["parameters"]
        assert "Shift: 2.5, SLG layers: 0, SLG scale: 2.8, SLG start: 0.01, SLG end: 0.6" in infotext

        # img2img sends them too; a bad layer list is an error on its field
        page.click("#tabs button[data-tab='img2img']")
        init = tmp_path / "init.png"
        Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(init)
        page.set_input_files("#init-file", str(init))
        page.wait_for_selector("#canvas-wrap:not([hidden])")
        body = page.evaluate("buildPayload('img2img')")
        assert (body["shift"], body["slg_layers"], body["slg_end"]) == (2.5, [0], 0.6)
        page.fill("#slg-layers", "7;8")
        assert page.evaluate("(() => { try { buildPayload('img2img'); } catch (e) { return e.message; } })()") == (
            "Skip layers must be layer numbers separated by commas, such as 7,8,9")
        page.fill("#slg-layers", "7, 8,9")
        assert page.evaluate("buildPayload('img2img')")["slg_layers"] == [7, 8, 9]

        # in Chinese, nothing English left on the SD3 controls
        page.select_option("#lang", "zh-CN")
        assert [t for t in english_left(page) if t in page.inner_text("#sd3-box") or "Skip" in t] == []
        assert page.text_content("#sd3-box label > span[data-i18n='sd3.shift']") == "采样偏移"
        page.select_option("#lang", "en")

        # another family: hidden, and not sent though the fields still hold values
        select_checkpoint(page, SD1)
        assert not page.is_visible("#sd3-box")
        page.click("#tabs button[data-tab='txt2img']")
        body = page.evaluate("buildPayload('txt2img')")
        assert not {"shift", "slg_layers", "slg_scale", "slg_start", "slg_end"} & set(body)
        page.close()
        assert not errors, errors
