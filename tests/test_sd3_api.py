"""SD3's fields on the web UI's HTTP API (`shift`, SD.Next's `schedulers_shift`, `slg_*`), on a
server holding the tiny random SD3 model (`sd3_folder` in conftest.py, saved as one file): the API's image is the Python API's with the same settings
(txt2img, img2img, inpaint), the infotext carries them and the `infotext` field replays them. On an
SD 1.x model they are refused (tests/server/test_api.py, `test_sd3_fields_are_refused_on_an_sd1_model`)."""

from __future__ import annotations

import base64
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
from sdlab.infotext import read_infotext  # noqa: E402
from sdlab.pipeline import GenerationRequest, Pipeline  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402

from .test_sd3 import PROMPT, SIZE  # noqa: E402

API = "/sdapi/v1"
# Settings where shift and skip-layer guidance both change the image (SLG applies at steps 1 and 2).
BASE = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 4, "sampler_name": "Euler", "scheduler": "Normal",
        "cfg_scale": 5.0, "seed": 42, "width": SIZE, "height": SIZE}
SD3_FIELDS = {"shift": 2.5, "slg_layers": [0], "slg_scale": 2.8, "slg_start": 0.01, "slg_end": 0.6}


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, sd3_folder):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    bundle = load_bundle(sd3_folder, device="cpu", dtype=torch.float32)
    save_safetensors({k: v.clone() for k, v in bundle.state_dict().items()},
                     root / "Stable-diffusion" / "tiny_sd3.safetensors")
    return root


@pytest.fixture(scope="module")
def client(models_dir, tmp_path_factory):
    app = create_app(ServerSettings(models_dir=models_dir, model="tiny_sd3.safetensors", device="cpu", dtype="fp32",
                                    weight_dtype="fp32", outputs_dir=tmp_path_factory.mktemp("outputs")))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(models_dir):
    import sdlab

    return sdlab.load(models_dir / "Stable-diffusion" / "tiny_sd3.safetensors", device="cpu", dtype=torch.float32,
                      weight_dtype=torch.float32, models_dir=models_dir)


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(client, endpoint: str, body: dict) -> tuple[Image.Image, dict]:
    r = client.post(f"{API}/{endpoint}", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    image.load()
    return image, r.json()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _python(pipe: Pipeline, **fields) -> tuple[np.ndarray, str]:
    req = GenerationRequest(PROMPT, negative_prompt="blurry", steps=4, sampler="Euler", schedule="normal",
                            cfg_scale=5.0, seed=42, width=SIZE, height=SIZE, **fields)
    res = pipe.generate(req)
    return _pixels(res.images[0]), res.infotexts[0]


def _init_and_mask() -> tuple[Image.Image, Image.Image]:
    init = Image.fromarray((np.random.default_rng(0).random((SIZE, SIZE, 3)) * 255).astype(np.uint8))
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[8:24, 4:20] = 255
    return init, Image.fromarray(mask)


def test_shift_and_slg_give_the_python_api_image_and_infotext(client, pipe):
    image, data = _post(client, "txt2img", {**BASE, **SD3_FIELDS})
    ours, infotext = _python(pipe, shift=2.5, slg_layers=(0,), slg_scale=2.8, slg_start=0.01, slg_end=0.6)
    assert np.array_equal(_pixels(image), ours)
    assert read_infotext(image) == infotext == json.loads(data["info"])["infotexts"][0]
    for key in ("Shift: 2.5", "SLG layers: 0", "SLG scale: 2.8", "SLG start: 0.01", "SLG end: 0.6"):
        assert key in infotext, key
    # Each field acts: without it the image differs (so equality above is no accident).
    for drop in ("shift", "slg_layers"):
        other, _ = _post(client, "txt2img", {**BASE, **{k: v for k, v in SD3_FIELDS.items() if k != drop}})
        assert not np.array_equal(_pixels(other), ours), drop
    plain, plain_info = _python(pipe)
    assert "Shift" not in plain_info and "SLG" not in plain_info  # the model's own shift (3) is not written


def test_schedulers_shift_is_sd_nexts_name_for_shift(client, pipe):
    image, _ = _post(client, "txt2img", {**BASE, "schedulers_shift": 2.5})
    ours, infotext = _python(pipe, shift=2.5)
    assert np.array_equal(_pixels(image), ours) and "Shift: 2.5" in read_infotext(image)
    # shift wins over schedulers_shift when both are sent
    both, _ = _post(client, "txt2img", {**BASE, "shift": 2.5, "schedulers_shift": 5.0})
    assert np.array_equal(_pixels(both), ours)


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpaint"])
def test_img2img_and_inpaint_with_shift_give_the_python_api_image(client, pipe, masked):
    init, mask = _init_and_mask()
    body = {**BASE, "init_images": [_b64(init)], "denoising_strength": 0.6, "shift": 2.5, "slg_layers": [1],
            "slg_end": 0.6}
    fields = dict(init_image=init, denoising_strength=0.6, shift=2.5, slg_layers=(1,), slg_end=0.6)
    if masked:
        body.update(mask=_b64(mask), mask_blur=2, inpaint_full_res=False)
        fields.update(mask=mask, mask_blur=2)
    image, _ = _post(client, "img2img", body)
    ours, infotext = _python(pipe, **fields)
    assert np.array_equal(_pixels(image), ours)
    assert "Shift: 2.5" in read_infotext(image) and "SLG layers: 1" in read_infotext(image)


def test_the_infotext_field_replays_shift_and_slg(client):
    first, _ = _post(client, "txt2img", {**BASE, **SD3_FIELDS, "seed": 7})
    again, _ = _post(client, "txt2img", {"infotext": read_infotext(first)})
    assert np.array_equal(_pixels(again), _pixels(first)) and read_infotext(again) == read_infotext(first)
    # A field the request sets wins over the infotext's value; SD.Next's "Sampler shift" reads as the shift.
    other, _ = _post(client, "txt2img", {"infotext": read_infotext(first), "shift": 4.0})
    assert not np.array_equal(_pixels(other), _pixels(first))
    sdnext = read_infotext(first).replace("Shift: 2.5", "Sampler shift: 2.5")
    assert np.array_equal(_pixels(_post(client, "txt2img", {"infotext": sdnext})[0]), _pixels(first))


def test_bad_sd3_fields_are_one_line_422s(client):
    cases = [({"slg_layers": [5]}, "not layers of this 2-layer MMDiT"),
             ({"slg_layers": [0], "slg_start": 0.5, "slg_end": 0.2}, "slg_start < slg_end"),
             ({"shift": 0}, "shift"), ({"slg_end": 1.5}, "slg_end")]
    for fields, message in cases:
        r = client.post(f"{API}/txt2img", json={**BASE, "steps": 1, **fields})
        assert r.status_code == 422 and message in r.text, (fields, r.text)
