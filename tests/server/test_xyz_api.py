"""The web UI's X/Y/Z plot script on /sdapi/v1/txt2img and img2img (`server/xyz.py`): script_args in
web UI 1.10's positional order, the grid first in `images`, then the cells, each the image the same
request makes alone."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from sdlab.infotext import parse_infotext  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from tests.server.test_api import png  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

API = "/sdapi/v1"
BASE = {"prompt": "a red circle", "width": 32, "height": 32, "seed": 11, "steps": 2}


def args(x_type=4, x_values="", y_type=0, y_values="", z_type=0, z_values="", *, draw_legend=True,
         include_lone_images=False, include_sub_grids=False, no_fixed_seeds=False, margin_size=0, csv_mode=False,
         x_dropdown=None, y_dropdown=None) -> list:
    """script_args in web UI 1.10's order (18 values)."""
    return [x_type, x_values, x_dropdown, y_type, y_values, y_dropdown, z_type, z_values, None, draw_legend,
            include_lone_images, include_sub_grids, no_fixed_seeds, False, False, False, margin_size, csv_mode]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
    app = create_app(ServerSettings(models_dir=root, model="tiny.safetensors",
                                    limits=Limits(max_pixels=256 * 256, max_steps=50, max_batch=4),
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with TestClient(app) as c:
        yield c


def rgb(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def post(client, endpoint: str = "txt2img", **fields) -> tuple[dict, dict]:
    r = client.post(f"{API}/{endpoint}", json={**BASE, **fields})
    assert r.status_code == 200, r.text
    data = r.json()
    return data, json.loads(data["info"])


def test_txt2img_grid_over_steps_and_cfg_equals_each_request_alone(client):
    """A 3x2 grid (x_type 4 Steps, y_type 6 CFG Scale): the grid first, then the six cells (Include
    Sub Images), each pixel-equal to the same txt2img request made alone and placed in the
    labelled grid where the web UI puts it."""
    data, info = post(client, script_name="X/Y/Z plot",
                      script_args=args(4, "1-3", 6, "5-9 (+4)", include_lone_images=True))
    images = [png(b) for b in data["images"]]
    assert len(images) == 1 + 6
    grid = images[0]
    pad_left, pad_top = 32 * 3 // 4, grid.height - 2 * 32
    assert grid.width == 3 * 32 + pad_left and pad_top > 0  # labels on top and on the left
    labels = rgb(grid)
    assert (labels[:pad_top] != 255).any() or pad_top < 4  # something drawn in the top pad
    params = parse_infotext(grid.info["parameters"])
    assert (params["Script"], params["X Type"], params["X Values"], params["Y Type"], params["Y Values"]) == (
        "X/Y/Z plot", "Steps", "1-3", "CFG Scale", "5-9 (+4)")
    assert info["index_of_first_image"] == 1 and info["steps"] == 1 and info["cfg_scale"] == 5
    assert len(info["infotexts"]) == 7 and info["infotexts"][0] == grid.info["parameters"]
    for n, cell in enumerate(images[1:]):
        ix, iy = n % 3, n // 3
        alone, alone_info = post(client, steps=ix + 1, cfg_scale=5 + 4 * iy)
        want = rgb(png(alone["images"][0]))
        assert (rgb(cell) == want).all(), (ix, iy)
        x0, y0 = pad_left + 32 * ix, pad_top + 32 * iy
        assert (labels[y0:y0 + 32, x0:x0 + 32] == want).all(), (ix, iy)
        assert cell.info["parameters"] == alone_info["infotexts"][0]


def test_without_legend_and_lone_images_the_grid_alone_of_exact_size(client):
    data, info = post(client, script_name="x/y/z plot", steps=1,
                      script_args=args(7, "red, blue", 9, "", draw_legend=False, y_dropdown=["Euler", "DDIM"]))
    assert len(data["images"]) == 1 and png(data["images"][0]).size == (2 * 32, 2 * 32)
    assert parse_infotext(info["infotexts"][0])["Y Values"] == "Euler,DDIM"  # the dropdown, as CSV


def test_z_axis_joins_one_grid_per_value_with_its_label_above(client):
    data, info = post(client, script_name="x/y/z plot", steps=1,
                      script_args=args(4, "1,2", 0, "", 1, "3, 4", include_sub_grids=True))
    z_grid, *subs = [png(b) for b in data["images"]]
    assert len(subs) == 2 and subs[0].size == subs[1].size
    assert z_grid.width == 2 * subs[0].width and z_grid.height > subs[0].height  # Seed labels on top
    pad = z_grid.height - subs[0].height
    assert (rgb(z_grid)[pad:, :subs[0].width] == rgb(subs[0])).all()
    main, sub = parse_infotext(info["infotexts"][0]), parse_infotext(info["infotexts"][2])
    assert (main["Z Type"], main["Z Values"], main["Fixed Z Values"]) == ("Seed", "3, 4", "3, 4")
    assert "Z Type" not in sub and sub["Seed"] == "4" and info["all_seeds"][:2] == [3, 4]


def test_img2img_takes_its_own_axis_indices(client):
    init = Image.new("RGB", (32, 32), (200, 30, 30))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    data, info = post(client, "img2img", init_images=[base64.b64encode(buf.getvalue()).decode()], steps=2,
                      script_name="x/y/z plot", script_args=args(5, "4, 6", draw_legend=False))  # 5: CFG Scale
    assert png(data["images"][0]).size == (64, 32)
    assert parse_infotext(info["infotexts"][0])["X Type"] == "CFG Scale"


@pytest.mark.parametrize("script_args, status, words", [
    (args(4, "1-5 (2)"), 400, "the step has its sign"),
    (args(4, "5-1"), 400, "gives no values"),
    (args(13, "1,2"), 400, "'Sigma Churn' axis is not supported"),
    (args(99, "1"), 400, "out of range"),
    (args(7, "dog, cat"), 400, "did not find 'dog'"),
    (args(9, "", csv_mode=False, x_dropdown=["Eulr"]), 400, "unknown sampler 'Eulr'"),
    (args(4, "10, 60"), 422, "steps 60 is more than this server allows"),
    (args(41, "512x1024"), 422, "more pixels than this server allows"),
    ([4, "1"] + [None] * 17, 400, "takes 18 values"),
])
def test_bad_axes_and_ranges_are_one_line_each(client, script_args, status, words):
    r = client.post(f"{API}/txt2img", json={**BASE, "script_name": "x/y/z plot", "script_args": script_args})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail


def test_other_scripts_are_still_refused(client):
    r = client.post(f"{API}/txt2img", json={**BASE, "script_name": "loopback", "script_args": []})
    assert r.status_code == 422 and "Script 'loopback' not found" in r.json()["detail"]
