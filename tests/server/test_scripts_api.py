"""The web UI's scripts through /sdapi/v1 (`server/scripts.py`, `server/run_scripts.py`): the listings
(GET /scripts, /script-info), and "Prompt matrix", "Prompts from file or textbox", "Poor man's
outpainting" and "Outpainting mk2" by script_name / script_args in web UI 1.10's positional order,
each image the one a plain request makes alone. The rules themselves are tests/test_scripts.py's."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from tests.server.test_api import b64_image, png  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

API = "/sdapi/v1"
BASE = {"prompt": "a red circle", "width": 32, "height": 32, "seed": 11, "steps": 2, "sampler_name": "Euler"}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
    save_native(tiny_bundle("sd1", seed=1), root / "Stable-diffusion" / "other.safetensors")
    app = create_app(ServerSettings(models_dir=root, model="tiny.safetensors",
                                    limits=Limits(max_pixels=256 * 256, max_steps=50, max_batch=4),
                                    outputs_dir=tmp_path_factory.mktemp("outputs")))
    with TestClient(app) as c:
        yield c


def post(client, endpoint: str = "txt2img", **fields) -> tuple[list[Image.Image], dict]:
    r = client.post(f"{API}/{endpoint}", json={**BASE, **fields})
    assert r.status_code == 200, r.text
    data = r.json()
    return [png(b) for b in data["images"]], json.loads(data["info"])


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def noise_b64(w: int, h: int, seed: int) -> tuple[Image.Image, str]:
    img = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))
    return img, b64_image(img)


def test_scripts_and_script_info_list_what_sdlab_runs(client):
    """Lowercase titles per tab, as the web UI lists them, ControlNet (always on) last; script-info
    has each script's ui() controls in script_args order with the web UI's labels and defaults."""
    scripts = client.get(f"{API}/scripts").json()
    assert scripts == {
        "txt2img": ["prompt matrix", "prompts from file or textbox", "x/y/z plot", "controlnet"],
        "img2img": ["outpainting mk2", "poor man's outpainting", "prompt matrix", "prompts from file or textbox",
                    "x/y/z plot", "controlnet"]}
    info = client.get(f"{API}/script-info").json()
    by = {(s["name"], s["is_img2img"]): s for s in info}
    assert {(n, False) for n in scripts["txt2img"]} | {(n, True) for n in scripts["img2img"]} == set(by)
    poor = by["poor man's outpainting", True]["args"]
    assert [(a["label"], a["value"], a["minimum"], a["maximum"], a["step"]) for a in poor[:2]] == [
        ("Pixels to expand", 128, 8, 256, 8), ("Mask blur", 4, 0, 64, 1)]
    assert poor[2]["choices"] == ["fill", "original", "latent noise", "latent nothing"]
    assert poor[3] == {"label": "Outpainting direction", "value": ["left", "right", "up", "down"], "minimum": None,
                       "maximum": None, "step": None, "choices": ["left", "right", "up", "down"]}
    mk2 = by["outpainting mk2", True]["args"]
    assert len(mk2) == 6 and mk2[0]["label"] == "" and "Recommended settings" in mk2[0]["value"]
    assert [a["label"] for a in by["prompt matrix", False]["args"]] == [
        "Set at prompt start", "Random seeds", "Prompt type", "Joining char", "Grid margins"]
    assert [a["value"] for a in by["prompts from file or textbox", True]["args"]] == [False, False, "start", ""]
    xyz = by["x/y/z plot", False]["args"]
    assert len(xyz) == 18 and xyz[0]["value"] == "Seed" and xyz[0]["choices"][:2] == ["Nothing", "Seed"]
    assert xyz[16]["label"] == "Grid margins (px)"
    cn = by["controlnet", True]
    assert cn["is_alwayson"] and len(cn["args"]) == 3 and cn["args"][0]["value"]["module"] == "none"
    assert not any(s["is_alwayson"] for s in info if s["name"] != "controlnet")


def test_prompt_matrix_cells_equal_plain_requests(client):
    """"a red circle|blue|big": the grid (2x2 cells, labelled) first, then the four cells, each the
    txt2img request with that prompt and the same seed; info as the web UI's Processed."""
    images, info = post(client, prompt="a red circle|blue|big", script_name="Prompt matrix",
                        script_args=[False, False, "positive", "comma", 0])
    prompts = ["a red circle", "a red circle, blue", "a red circle, big", "a red circle, blue, big"]
    assert len(images) == 5 and info["index_of_first_image"] == 1 and info["all_prompts"] == prompts
    assert info["all_seeds"] == [11] * 4 and info["infotexts"][0] == info["infotexts"][1]
    alone, alone_info = post(client, prompt=prompts[3])
    assert arr(images[4]).tolist() == arr(alone[0]).tolist()
    assert [i.info["parameters"].split("\n")[0] for i in images[1:]] == prompts
    assert images[4].info["parameters"] == alone_info["infotexts"][0]
    grid = images[0]
    assert grid.width == 2 * 32 + 32 * 3 // 4 and grid.height > 2 * 32
    assert arr(grid)[-32:, -32:].tolist() == arr(images[4]).tolist()  # "blue, big" bottom right
    # img2img too, with seeds seed + n and the parts first
    init, b64 = noise_b64(32, 32, 1)
    images, info = post(client, "img2img", prompt="x|y", init_images=[b64], script_name="prompt matrix",
                        script_args=[True, True, "positive", "space"])
    alone, _ = post(client, "img2img", prompt="y x", init_images=[b64], seed=12)
    assert len(images) == 3 and info["all_prompts"] == ["x", "y x"] and info["all_seeds"] == [11, 12]
    assert arr(images[2]).tolist() == arr(alone[0]).tolist()


def test_poor_mans_outpainting_tile_equals_the_plain_inpaint_request(client):
    """32x32 grown 8 px left and right (a 64x64 canvas, the image at x 16): six 32x32 tiles
    inpainted (the middle column lies in the image), joined into one 64x64 image; the first tile is
    the img2img request with that part of the canvas, the mask inset mask_blur * 2 and the latent
    mask inset mask_blur // 2, mask blur 4 and seed 40."""
    init, b64 = noise_b64(32, 32, 2)
    fields = dict(init_images=[b64], seed=40, subseed=3, denoising_strength=0.8, inpaint_full_res=False)
    images, info = post(client, "img2img", script_name="poor man's outpainting",
                        script_args=[8, 2, 1, ["left", "right"]], **fields)
    assert len(images) == 1 and images[0].size == (64, 64) and info["seed"] == 40
    assert info["all_seeds"] == list(range(40, 46))
    assert arr(images[0])[:32, 24:32].tolist() == arr(init)[:, 8:16].tolist()
    canvas = Image.new("RGB", (64, 64))
    canvas.paste(init, (16, 0))
    mask, latent = Image.new("L", (64, 64), 255), Image.new("L", (64, 64), 255)
    ImageDraw.Draw(mask).rectangle((16 + 4, 0, 64 - 16 - 4, 64), fill=0)
    ImageDraw.Draw(latent).rectangle((16 + 1, 0, 64 - 16 - 1, 64), fill=0)
    box = (0, 0, 32, 32)
    tile, _ = post(client, "img2img", **{**fields, "init_images": [b64_image(canvas.crop(box))]},
                   mask=b64_image(mask.crop(box)), latent_mask=b64_image(latent.crop(box)), mask_blur=4,
                   inpainting_fill=1)
    # The top-left 24x8 of the result is that tile's alone: no other tile overlaps it.
    assert arr(images[0])[:16, :16].tolist() == arr(tile[0])[:16, :16].tolist()


def test_outpainting_mk2_strip_equals_the_plain_inpaint_request(client):
    """64x64 grown 64 px right with a 96x64 request, batch size 2: the grid, then two 128x64 images
    (seeds 11, 12); image 0's new part is the inpainted 96x64 strip of the matched-noise canvas, the
    img2img request with that strip, mask and latent mask, mask blur 4 * 4."""
    from sdlab.recipes.outpaint_scripts import matched_noise

    init, b64 = noise_b64(64, 64, 3)
    fields = dict(init_images=[b64], width=96, height=64, denoising_strength=0.8, inpaint_full_res=False, subseed=1)
    images, info = post(client, "img2img", script_name="outpainting mk2",
                        script_args=[None, 64, 4, ["right"], 1.0, 0.05], batch_size=2, **fields)
    assert len(images) == 3 and [i.size for i in images[1:]] == [(128, 64)] * 2 and images[0].size == (256, 64)
    assert info["all_seeds"] == [11, 12] and arr(images[1])[:, :32].tolist() == arr(init)[:, :32].tolist()
    canvas = Image.new("RGB", (128, 64))
    canvas.paste(init, (0, 0))
    mask = Image.new("RGB", (128, 64), "white")
    ImageDraw.Draw(mask).rectangle((0, 0, 128 - 64 - 4, 64), fill="black")
    start = Image.fromarray(np.clip(matched_noise(np.asarray(canvas) / 255.0, np.asarray(mask) / 255.0) * 255.0, 0,
                                    255).astype(np.uint8))
    latent = Image.new("RGB", (96, 64), "white")
    ImageDraw.Draw(latent).rectangle((0, 0, 96 - 64 - 8, 64), fill="black")
    strip, _ = post(client, "img2img", **{**fields, "init_images": [b64_image(start.crop((32, 0, 128, 64)))]},
                    mask=b64_image(mask.crop((32, 0, 128, 64))), latent_mask=b64_image(latent), mask_blur=16,
                    inpainting_fill=1)
    assert arr(images[1])[:, 32:].tolist() == arr(strip[0]).tolist()


def test_prompts_from_file_lines_equal_plain_requests(client):
    """Three lines: a prompt; options (--steps, --cfg_scale, --negative_prompt); and --sd_model
    naming the other checkpoint. Iterate seed every line: 11, 12, 13. The prompts go at the end."""
    text = "blue\n\n--prompt big one --steps 1 --cfg_scale 4 --negative_prompt dull\n--sd_model other --prompt x\n"
    images, info = post(client, prompt="a circle", script_name="prompts from file or textbox",
                        script_args=[True, False, "end", text])
    assert len(images) == 3 and info["all_prompts"] == ["a circle blue", "a circle big one", "a circle x"]
    assert info["all_seeds"] == [11, 12, 13] and info["index_of_first_image"] == 0
    plain = [dict(prompt="a circle blue"),
             dict(prompt="a circle big one", steps=1, cfg_scale=4, negative_prompt="dull", seed=12),
             dict(prompt="a circle x", seed=13, override_settings={"sd_model_checkpoint": "other"})]
    for image, fields in reversed(list(zip(images, plain))):  # "other" first: it is still loaded
        alone, alone_info = post(client, **fields)
        assert arr(image).tolist() == arr(alone[0]).tolist()
        assert image.info["parameters"] == alone_info["infotexts"][0]
    assert "Model: other" in images[2].info["parameters"] and "Model: tiny" in images[1].info["parameters"]
    # without "Iterate seed every line" / "Use same random seed", each line of a -1 seed draws its own
    _, info = post(client, seed=-1, steps=1, script_name="prompts from file or textbox", script_args=[False, False,
                                                                                                      "start", "a\nb"])
    assert len(set(info["all_seeds"])) == 2


@pytest.mark.parametrize("endpoint, name, args, extra, words", [
    ("img2img", "outpainting mk2", [128, 8, ["left"]], {}, "script_args[0] is 128, but it is the script's info"),
    ("img2img", "poor man's outpainting", [8, 2, 2, ["left"]], {}, "masked content 'latent noise' is not"),
    ("img2img", "poor man's outpainting", [8, 2, 1, ["sideways"]], {}, "unknown direction 'sideways'"),
    ("img2img", "poor man's outpainting", [8, 2, 1, ["left"]], {"mask": "MASK"}, "draws its own mask"),
    ("img2img", "poor man's outpainting", [8, 2, 1, ["left"], 5], {}, "takes 4 values (pixels, mask_blur"),
    ("txt2img", "poor man's outpainting", [], {}, "Script \"poor man's outpainting\" not found"),
    ("txt2img", "prompt matrix", [False, False, "both"], {}, "unknown prompt type 'both'"),
    ("txt2img", "prompts from file or textbox", [False, False, "start", "--stepz 3"], {}, "unknown option --stepz"),
    ("txt2img", "prompts from file or textbox", [False, False, "start", "--sd_model nope"], {}, "sd_model"),
    ("txt2img", "prompts from file or textbox", [False, False, "start", "--steps 500"], {}, "this server allows"),
])
def test_bad_script_args_are_one_line_each(client, endpoint, name, args, extra, words):
    body = {**BASE, "script_name": name, "script_args": args, **extra}
    if endpoint == "img2img":
        body["init_images"] = [noise_b64(32, 32, 0)[1]]
        if extra.get("mask"):
            body["mask"] = body["init_images"][0]
    r = client.post(f"{API}/{endpoint}", json=body)
    # a wrong number of values is a malformed request (400, as for the X/Y/Z plot); a value refused, 422
    assert r.status_code == (400 if "takes 4 values" in words else 422), r.text
    detail = r.json()["detail"]
    assert words in detail and "\n" not in detail, detail
