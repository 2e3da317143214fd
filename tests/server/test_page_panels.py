"""The page's Extras, X/Y/Z, Checkpoint Merger and ControlNet panels in a real headless Chromium
(issues 29 and 30), against one live server on a models folder made here: the demo-sized tiny
SD 1.x checkpoint, a second one to merge with it, and a random tiny ControlNet for it.

What each panel sends is the web UI's API request (checked field by field), and what comes back
is checked against the library: the upscaled size, the merge's arithmetic, the preprocessor's map.
Screenshots (1280 and 420 px wide) go where test_browser.py puts its own.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from .browser import (english_left, gallery_images, generate_and_wait, png_of, screenshot, sent_bodies,
                      skip_without_a_browser)

skip_without_a_browser()

pytest.importorskip("cv2")

from PIL import Image, ImageDraw, PngImagePlugin  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from sdlab.checkpoints.io import save_safetensors  # noqa: E402
from sdlab.controlnet.preprocess import get_preprocessor  # noqa: E402
from sdlab.models.controlnet import ControlNetConfig  # noqa: E402
from sdlab.recipes.xyz import axis_options  # noqa: E402
from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.models.test_controlnet import random_controlnet  # noqa: E402
from tests.tiny import save_native, save_with_native_size, tiny_bundle  # noqa: E402

from .live import serving  # noqa: E402

DEMO = "demo64.safetensors"   # trained at 64 px, as the demo model: the page opens at 64x64
OTHER = "other.safetensors"   # the same family, other weights: the merge's B


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    bundle = tiny_bundle("sd1")
    save_with_native_size(bundle, root / "Stable-diffusion" / DEMO, 64)
    (root / "ControlNet").mkdir()
    # the tiny VAE scales by 4: two stride-2 convs in the hint encoder
    net = random_controlnet(ControlNetConfig(bundle.config.unet, hint_block_channels=(16, 32, 64)))
    save_safetensors({"control_model." + k: v for k, v in net.state_dict().items()},
                     root / "ControlNet" / "tiny_canny.safetensors")
    with torch.no_grad():  # B: the same model, its UNet moved (cheaper than a second tiny model)
        for p in bundle.unet.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    save_native(bundle, root / "Stable-diffusion" / OTHER)
    return root


@pytest.fixture(scope="module")
def base_url(models, tmp_path_factory):
    app = create_app(ServerSettings(models_dir=models, outputs_dir=tmp_path_factory.mktemp("outputs")))
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


def shape(path, size=(48, 40), parameters: str | None = None):
    """A red disc on blue, whose edges canny finds; saved with an infotext if one is given."""
    image = Image.new("RGB", size, (20, 40, 200))
    ImageDraw.Draw(image).ellipse((8, 6, 36, 34), fill=(230, 30, 30))
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    image.save(path, pnginfo=info)
    return image


def no_overflow(page, width: int) -> list[str]:
    """What sticks out of a window `width` px wide: the page, or any element of the views shown."""
    return page.evaluate("""(width) => {
        const out = [];
        if (document.documentElement.scrollWidth > width) out.push('page ' + document.documentElement.scrollWidth);
        for (const el of document.querySelectorAll('main:not([hidden]) *')) {
            const r = el.getBoundingClientRect();
            if (r.width && el.checkVisibility() && (r.right > width + 0.5 || r.left < 0))
                out.push(`${el.id || el.tagName} ${r.left}..${r.right}`);
        }
        return out; }""", width)


def at_phone_width(page, name: str) -> None:
    page.set_viewport_size({"width": 420, "height": 860})
    assert no_overflow(page, 420) == []
    screenshot(page, name + "-420")
    page.set_viewport_size({"width": 1280, "height": 900})


def test_the_pages_axes_are_the_servers(page):
    """The X/Y/Z axes the page offers are the supported ones of recipes/xyz.py, under their
    web UI 1.10 txt2img indices (the API's x_type)."""
    offered = page.evaluate("XYZ_AXES.map(a => [a.index, a.name, Boolean(a.choices)])")
    supported = [[i, o.label, o.choices] for i, o in enumerate(axis_options("txt2img")) if o.supported]
    assert offered == supported


def test_extras_upscales_with_lanczos(page, tmp_path):
    src = tmp_path / "in.png"
    shape(src, parameters="a red disc\nSteps: 3, Seed: 5, Size: 48x40")
    page.click("[data-tab=extras]")
    assert page.is_visible("#extras-view") and not page.is_visible("#generate-view")
    # a field the API would refuse is said on the field, nothing sent
    page.fill("#extras-scale", "0")
    page.click("#extras-run")
    assert page.text_content("#extras-error") == "Scale factor must be at least 1"
    assert page.text_content("#extras-scale-error") == "Scale factor must be at least 1"
    page.fill("#extras-scale", "2")
    page.click("#extras-run")
    assert page.text_content("#extras-error") == "drop an image into the image box first"
    page.set_input_files("#extras-file", str(src))
    page.wait_for_function("document.querySelector('#extras-size').textContent === '48×40 px'")
    assert page.input_value("#extras-upscaler-1") == "Lanczos" and page.input_value("#extras-upscaler-2") == "None"
    bodies = sent_bodies(page, "extra-single-image")
    page.click("#extras-run")
    page.wait_for_selector("#extras-result:not([hidden])")
    body = bodies[-1]
    assert {k: v for k, v in body.items() if k != "image"} == {
        "resize_mode": 0, "upscaler_1": "Lanczos", "upscaler_2": "None", "extras_upscaler_2_visibility": 0,
        "upscaling_resize": 2}
    out = png_of(page.get_attribute("#extras-result", "src"))
    assert out.size == (96, 80) and page.text_content("#extras-result-size") == "96×80 px"
    assert out.info["postprocessing"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert out.info["parameters"].startswith("a red disc")  # the input's infotext kept
    assert page.text_content("#extras-info") == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert page.get_attribute("#extras-download", "href").startswith("data:image/png;base64,")
    # "Scale to" 60x50 without cropping: the web UI scales by max(60/48, 50/40) = 1.25 and rounds the
    # size down to multiples of 8
    page.select_option("#extras-resize-mode", "1")
    assert page.is_visible("#extras-width") and not page.is_visible("#extras-scale")
    page.fill("#extras-width", "60")
    page.fill("#extras-height", "50")
    page.uncheck("#extras-crop")
    page.click("#extras-run")
    page.wait_for_function("document.querySelector('#extras-result-size').textContent === '56×48 px'")
    assert "Postprocess upscale to: 60x50" in page.text_content("#extras-info")
    assert {k: bodies[-1][k] for k in ("resize_mode", "upscaling_resize_w", "upscaling_resize_h", "upscaling_crop")} \
        == {"resize_mode": 1, "upscaling_resize_w": 60, "upscaling_resize_h": 50, "upscaling_crop": False}
    screenshot(page, "extras")
    at_phone_width(page, "extras")


def test_xyz_plot_over_steps_and_cfg(page):
    assert not page.is_visible("#xyz-fields")
    page.select_option("#script", "x/y/z plot")
    assert page.input_value("#xyz-x-type") == "1" and page.input_value("#xyz-y-type") == "0"  # Seed, Nothing
    assert not page.is_visible("#xyz-y-values")
    page.fill("#prompt", "a red disc")
    page.fill("#seed", "11")
    page.select_option("#xyz-x-type", "4")   # Steps
    page.fill("#xyz-x-values", "1-2 (2)")    # the web UI's syntax wants the step's sign
    page.select_option("#xyz-y-type", "6")   # CFG Scale
    page.fill("#xyz-y-values", "3,7")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#xyz-x-values-error')")
    said = page.text_content("#xyz-x-values-error")
    assert said.startswith("x/y/z plot: X values") and "'1-2 (2)' is not" in said and said == page.text_content("#error")
    page.fill("#xyz-x-values", "1,2")
    assert not page.is_visible("#xyz-x-values-error")
    bodies = sent_bodies(page, "txt2img")
    generate_and_wait(page, 5)
    body = bodies[-1]
    assert body["script_name"] == "x/y/z plot"
    assert body["script_args"] == [4, "1,2", None, 6, "3,7", None, 0, "", None,
                                   True, True, False, False, False, False, False, 0, False]
    sizes = [(i["w"], i["h"]) for i in gallery_images(page)]
    # the grid first, labelled (so larger than its 2x2 cells of 64 px), then the cells
    assert sizes[0][0] > 128 and sizes[0][1] > 128 and sizes[1:] == [(64, 64)] * 4
    page.click("#gallery img >> nth=0")
    assert "Script: X/Y/Z plot, X Type: Steps, X Values: \"1,2\", Y Type: CFG Scale" in page.text_content("#infotext")
    page.click("#gallery img >> nth=2")  # x second, y first: steps 2, CFG 3
    infotext = page.text_content("#infotext")
    assert "Steps: 2," in infotext and "CFG scale: 3," in infotext and "Seed: 11," in infotext
    # an axis with choices is picked from the page's list, sent as the dropdown list
    page.select_option("#xyz-y-type", "9")   # Sampler
    assert not page.is_visible("#xyz-y-values") and page.is_visible("#xyz-y-choices")
    page.check("#xyz-y-choices input[value='Euler']")
    page.check("#xyz-y-choices input[value='Euler a']")
    page.uncheck("#xyz-legend")
    page.uncheck("#xyz-cells")
    page.fill("#xyz-x-values", "1")
    generate_and_wait(page, 1)
    assert bodies[-1]["script_args"][3:6] == [9, "", ["Euler a", "Euler"]]
    assert bodies[-1]["script_args"][9:11] == [False, False]
    assert [(i["w"], i["h"]) for i in gallery_images(page)] == [(64, 128)]  # no legend: exactly 1x2 cells
    screenshot(page, "xyz")
    at_phone_width(page, "xyz")


def test_merge_two_models_into_the_models_folder(page, models):
    page.click("[data-tab=merge]")
    assert page.is_visible("#merge-view")
    a = page.input_value("#merge-a")
    b_value = page.evaluate("(n) => [...document.querySelector('#merge-b').options].map(o => o.value)"
                            ".find(v => v.startsWith(n))", OTHER)
    page.select_option("#merge-b", b_value)
    # Add difference needs C
    page.select_option("#merge-method", "Add difference")
    assert page.is_enabled("#merge-c")
    page.click("#merge-run")
    assert page.text_content("#merge-error") == "Tertiary model (C) is needed by Add difference"
    page.select_option("#merge-method", "Weighted sum")
    assert page.is_disabled("#merge-c")
    assert page.text_content("#merge-formula") == "Result = A·(1 − M) + B·M"
    page.fill("#merge-multiplier", "0.25")
    page.fill("#merge-name", "quarter")
    bodies = sent_bodies(page, "merge")
    page.click("#merge-run")
    page.wait_for_selector("#merge-result:not([hidden])")
    assert bodies[-1] == {"primary_model_name": a, "interp_method": "Weighted sum", "save_as_half": False,
                          "custom_name": "quarter", "bake_in_vae": "None", "discard_weights": "",
                          "multiplier": 0.25, "secondary_model_name": b_value}
    assert page.text_content("#merge-result-name") == "quarter.safetensors"
    assert not page.is_visible("#merge-error") and page.text_content("#merge-status") == ""
    out = models / "Stable-diffusion" / "quarter.safetensors"
    merged = load_file(out)
    sd_a, sd_b = (load_file(models / "Stable-diffusion" / n) for n in (DEMO, OTHER))
    key = next(k for k in merged if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    assert torch.allclose(merged[key], 0.75 * sd_a[key] + 0.25 * sd_b[key], atol=1e-6)
    assert not torch.equal(sd_a[key], sd_b[key])
    # listed at once: in the header and the merger's own lists
    listed = page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert any(v.startswith("quarter.safetensors") for v in listed)
    screenshot(page, "merge")
    at_phone_width(page, "merge")


def test_controlnet_preview_and_a_unit_on_txt2img(page, tmp_path):
    src = tmp_path / "control.png"
    image = shape(src)
    page.click("#cn-box summary")
    page.set_input_files("#cn-file", str(src))
    page.wait_for_selector("#cn-image:not([hidden])")
    page.select_option("#cn-module", "canny")
    # canny's sliders, under the extension's names and defaults
    assert page.text_content("#cn-a-name") == "Low Threshold" and page.input_value("#cn-a") == "100"
    assert page.text_content("#cn-b-name") == "High Threshold" and page.input_value("#cn-b") == "200"
    page.fill("#cn-res", "64")
    page.fill("#cn-a", "50")
    page.click("#cn-preview")
    page.wait_for_selector("#cn-map:not([hidden])")
    shown = np.asarray(png_of(page.get_attribute("#cn-map", "src")).convert("RGB"))
    expected = get_preprocessor("canny")(image, 64, 50, 200)
    assert shown.shape[:2] == expected.shape[:2] and np.array_equal(shown, np.broadcast_to(
        expected[..., None] if expected.ndim == 2 else expected, shown.shape))
    assert shown.max() == 255
    assert page.text_content("#cn-status") == f"Map: {shown.shape[1]}×{shown.shape[0]}"
    # the unit on, with its model: sent in alwayson_scripts; the map comes back after the image
    page.check("#cn-enable")
    assert page.is_visible("#cn-on")
    model = page.input_value("#cn-model")
    assert model.startswith("tiny_canny [")
    page.fill("#cn-weight", "0.8")
    page.fill("#cn-end", "0.75")
    page.select_option("#cn-control-mode", "My prompt is more important")
    page.fill("#prompt", "a red disc")
    page.fill("#steps", "2")
    bodies = sent_bodies(page, "txt2img")
    generate_and_wait(page, 2)
    unit = bodies[-1]["alwayson_scripts"]["controlnet"]["args"][0]
    assert unit.pop("image").startswith("data:image/png;base64,")
    assert unit == {"enabled": True, "module": "canny", "model": model, "weight": 0.8, "guidance_start": 0,
                    "guidance_end": 0.75, "control_mode": "My prompt is more important", "resize_mode": "Crop and Resize",
                    "pixel_perfect": False, "processor_res": 64, "threshold_a": 50, "threshold_b": 200}
    assert [(i["w"], i["h"]) for i in gallery_images(page)] == [(64, 64), (64, 64)]
    assert 'ControlNet 0: "Module: canny, Model: ' + model in page.text_content("#infotext")
    # a start after the end is said on the field
    page.fill("#cn-start", "0.9")
    page.click("#generate")
    assert page.text_content("#cn-end-error") == "Ending Control Step must be at least 0.9"
    screenshot(page, "controlnet")
    at_phone_width(page, "controlnet")


def test_the_new_panels_in_chinese(page):
    """Switched to 中文 (the browser's language picks it too: test_browser.py), nothing English is
    left on the new panels, their messages included."""
    page.select_option("#lang", "zh-CN")
    try:
        tabs = page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.textContent)")
        assert tabs[3] == "后期处理" and tabs[5] == "模型融合"
        page.select_option("#script", "x/y/z plot")
        page.select_option("#xyz-y-type", "9")  # a list of choices shown too
        page.click("#cn-box summary")
        page.select_option("#cn-module", "canny")
        assert page.text_content("#cn-a-name") == "低阈值"
        found = {"txt2img": english_left(page)}
        page.click("[data-tab=img2img]")
        found["img2img"] = english_left(page)
        page.click("[data-tab=extras]")
        page.select_option("#extras-resize-mode", "1")
        found["extras"] = english_left(page)
        page.click("[data-tab=merge]")
        page.select_option("#merge-method", "Add difference")
        page.click("#merge-run")
        found["merge"] = english_left(page)
        assert found == {tab: [] for tab in found}
        assert page.text_content("#merge-error") == "“第三模型 (C)”在差额叠加模式下为必选项"
        screenshot(page, "zh-CN-merge")
        page.click("[data-tab=txt2img]")
        screenshot(page, "zh-CN-panels")
        # back to English: the merger's message and the sliders' names too
        page.select_option("#lang", "en")
        assert page.text_content("#cn-a-name") == "Low Threshold"
        page.click("[data-tab=merge]")
        assert page.text_content("#merge-error") == "Tertiary model (C) is needed by Add difference"
    finally:
        page.evaluate("localStorage.clear()")  # the language picked here is not the next test's
