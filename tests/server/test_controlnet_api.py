"""sd-webui-controlnet's API on a real `sdlab serve`, through webuiapi's ControlNetUnit unchanged:
a canny unit on txt2img returns the image, the detected map and the infotext line, and the image is
the Python API's with the same unit; the /controlnet routes answer in the extension's shapes; bad
units are one 422 each."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

webuiapi = pytest.importorskip("webuiapi")
pytest.importorskip("uvicorn")
pytest.importorskip("cv2")

from PIL import Image  # noqa: E402

from sdlab.controlnet.preprocess import get_preprocessor, module_names  # noqa: E402
from sdlab.controlnet.units import ControlRequest  # noqa: E402
from sdlab.merge import legacy_hash  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.test_controlnet_cli import control_image, make_models  # noqa: E402

from .live import serving  # noqa: E402

SIZE = 32


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    model = make_models(root)
    app = create_app(ServerSettings(models_dir=root, outputs_dir=tmp_path_factory.mktemp("outputs"),
                                    control_net_unit_count=2))
    with serving(app) as port:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=port, steps=3), root, model


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_a_canny_unit_returns_the_image_the_map_and_the_infotext(server):
    import sdlab

    api, root, model = server
    # webuiapi's own defaults: Resize and Fill, processor_res 512, thresholds 64 / 64, hr_option "Both".
    unit = webuiapi.ControlNetUnit(image=control_image(), module="canny", model="tiny_canny", weight=0.9,
                                   guidance_end=0.8)
    result = api.txt2img(prompt="a red circle", seed=4, width=SIZE, height=SIZE, controlnet_units=[unit],
                         alwayson_scripts={})
    assert len(result.images) == 2 and [i.size for i in result.images] == [(SIZE, SIZE)] * 2
    title = f"tiny_canny [{legacy_hash(root / 'ControlNet' / 'tiny_canny.safetensors')}]"
    assert (f'ControlNet 0: "Module: canny, Model: {title}, Weight: 0.9, Resize Mode: Resize and Fill, '
            'Processor Res: 512, Threshold A: 64.0, Threshold B: 64.0, Guidance Start: 0.0, Guidance End: 0.8, '
            'Pixel Perfect: False, Control Mode: Balanced"') in result.info["infotexts"][0]
    request = ControlRequest("tiny_canny", image=control_image(), module="canny", weight=0.9, guidance_end=0.8,
                             resize_mode="Resize and Fill", processor_res=512, threshold_a=64, threshold_b=64)
    pipe = sdlab.load(model, models_dir=root)
    res = pipe.generate(sdlab.pipeline.GenerationRequest("a red circle", seed=4, steps=3, width=SIZE, height=SIZE,
                                                         controls=[request]))
    assert np.array_equal(np.asarray(result.images[0].convert("RGB")), np.asarray(res.images[0]))
    # The map: canny's edges brought to the image's size, as the extension appends it.
    detected = np.asarray(result.images[1].convert("RGB"))
    assert np.array_equal(detected, np.asarray(res.detected_maps[0])) and detected.max() > 0
    # save_detected_map false, or the option, leave it out.
    for extra in ({"save_detected_map": False}, {}):
        data = {**unit.to_dict(), **extra}
        body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE,
                "alwayson_scripts": {"ControlNet": {"args": [data]}},
                "override_settings": {} if extra else {"control_net_no_detectmap": True}}
        r = api.session.post(f"{api.baseurl}/txt2img", json=body)
        assert r.status_code == 200 and len(r.json()["images"]) == 1, r.text


def test_img2img_unit_without_an_image_uses_the_init_image(server):
    api, _, _ = server
    init = control_image().resize((SIZE, SIZE))
    disabled = webuiapi.ControlNetUnit(image=init, model="nothing", enabled=False)
    unit = webuiapi.ControlNetUnit(module="invert", model="tiny_canny", resize_mode="Just Resize")
    result = api.img2img(images=[init], prompt="x", seed=1, width=SIZE, height=SIZE, steps=2,
                         controlnet_units=[disabled, unit], alwayson_scripts={})
    assert len(result.images) == 2
    assert np.array_equal(np.asarray(result.images[1].convert("RGB")), 255 - np.asarray(init))


def test_routes_answer_in_the_extensions_shapes(server):
    api, root, _ = server
    assert api.controlnet_version() == 3
    assert api.controlnet_model_list() == [
        f"{n} [{legacy_hash(root / 'ControlNet' / f'{n}.safetensors')}]" for n in ("tiny_canny", "xl_canny")]
    modules = api.custom_get("controlnet/module_list")
    assert modules["module_list"] == module_names() and modules["module_list"][0] == "none"
    assert modules["module_detail"]["canny"]["sliders"][1] == {"name": "Low Threshold", "value": 100, "min": 1,
                                                             "max": 255, "step": 1}
    aliases = api.custom_get("controlnet/module_list?alias_names=true")["module_list"]
    assert "softedge_pidinet" in aliases and "pidinet" not in aliases
    assert api.custom_get("controlnet/settings") == {"control_net_unit_count": 2}
    r = api.controlnet_detect([control_image()], module="canny", processor_res=64, threshold_a=50, threshold_b=150)
    assert r.info == "Success" and len(r.images) == 1
    got = np.asarray(r.images[0])
    assert np.array_equal(got, get_preprocessor("canny")(control_image(), 64, 50, 150))


BAD = [  # (unit fields, words of the 422)
    ({"model": "nothing"}, "ControlNet model 'nothing' not found"),
    ({"module": "edges"}, "unknown ControlNet preprocessor (module) 'edges'"),
    ({"model": "xl_canny"}, "cannot control this SD 1.x model"),
    ({"image": ""}, "ControlNet unit 0: no image"),
    ({"guessmode": 1}, "guessmode"),
    ({"weigth": 0.5}, "unknown field 'weigth'"),
    ({"control_mode": "Loud"}, "unknown control mode 'Loud'"),
    ({"advanced_weighting": [1.0] * 13}, "advanced_weighting"),
]


@pytest.mark.parametrize("fields,words", BAD, ids=[w for _, w in BAD])
def test_bad_units_are_one_422_each(server, fields, words):
    api, _, _ = server
    unit = {"enabled": True, "module": "canny", "model": "tiny_canny", "image": _b64(control_image()), **fields}
    body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE,
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}
    r = api.session.post(f"{api.baseurl}/txt2img", json=body)
    assert r.status_code == 422 and words in r.json()["detail"] and "\n" not in r.json()["detail"], r.text


def test_more_units_than_the_setting_other_scripts_and_bad_detects(server):
    api, _, _ = server
    unit = {"enabled": True, "model": "tiny_canny", "image": _b64(control_image())}
    for scripts, words in (({"controlnet": {"args": [unit] * 3}}, "3 ControlNet units enabled; this server allows 2"),
                           ({"ADetailer": {"args": []}}, "always on script ADetailer not found"),
                           ({"controlnet": {"args": [{**unit, "hr_option": "Twice"}]}, "enable_hr": True},
                            "hr_option 'Twice' is not one of Both, Low res only, High res only")):
        scripts = dict(scripts)
        hires = {"enable_hr": scripts.pop("enable_hr")} if "enable_hr" in scripts else {}
        body = {"prompt": "x", "steps": 1, "width": SIZE, "height": SIZE, "alwayson_scripts": scripts, **hires}
        r = api.session.post(f"{api.baseurl}/txt2img", json=body)
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    for body, words in (({"controlnet_module": "edges", "controlnet_input_images": [_b64(control_image())]},
                         "unknown ControlNet preprocessor"),
                        ({"controlnet_module": "canny"}, "no image"),
                        ({"controlnet_module": "inpaint_only", "controlnet_input_images": [_b64(control_image())]},
                         "needs a mask"),
                        ({"controlnet_module": "depth", "controlnet_input_images": [_b64(control_image())]},
                         "needs the annotator file")):
        r = api.session.post(f"{api.baseurl.rsplit('/sdapi', 1)[0]}/controlnet/detect", json=body)
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    assert api.txt2img(prompt="x", steps=1, width=SIZE, height=SIZE).info["seed"] >= 0  # and it goes on serving
