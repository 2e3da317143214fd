"""The web page in a real headless Chromium (Debian's package), driven by Playwright.

Skipped, with the reason, where Chromium or Playwright's Python package is missing. A
screenshot of each scenario is saved under $SDLAB_TEST_ARTIFACTS (default
./test-artifacts/) for a person to look at; `pytest -s` prints where.
"""

from __future__ import annotations

import json
import urllib.request

import pytest
import torch

from .browser import (chromium, english_left, gallery_images, generate_and_wait, open_page, png_of, screenshot,
                      select_checkpoint, sent_bodies, skip_without_a_browser, wait_for_page)

skip_without_a_browser()
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from tests.tiny import save_native, save_with_native_size, tiny_bundle  # noqa: E402

from .live import serving  # noqa: E402

# The models folder's checkpoints: the same tiny weights, one saved with sdlab's config
# saying it was trained at 64 px (as the demo model is) and listed first, so selected at
# start; the other a plain single file, which SD 1.x's 512 px applies to.
NATIVE_64 = "demo64.safetensors"
PLAIN_SD1 = "tiny.safetensors"
MAX_SEED_TEXT = "9223372036854775807"  # the API's upper bound for seeds (2**63 - 1)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    bundle = tiny_bundle("sd1")
    save_with_native_size(bundle, root / "Stable-diffusion" / NATIVE_64, 64)
    save_native(bundle, root / "Stable-diffusion" / PLAIN_SD1)
    (root / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, root / "Lora" / "shapes.safetensors")
    (root / "embeddings").mkdir()
    # as wide as the tiny text encoder (64), two vectors
    save_file({"emb_params": torch.randn(2, 64, generator=torch.Generator().manual_seed(0)) * 0.1},
              root / "embeddings" / "shapestyle.safetensors")
    (root / "styles.csv").write_text('name,prompt,negative_prompt\nvivid,"{prompt}, vivid colours",dull\n'
                                     'framed,with a frame,\n')
    app = create_app(ServerSettings(models_dir=root, limits=Limits(max_steps=5000)))
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def zh_browser(playwright):
    with chromium(playwright, "zh-CN") as ctx:
        yield ctx


@pytest.fixture
def zh_page(zh_browser, base_url):
    page, errors = open_page(zh_browser, base_url)
    yield page
    page.evaluate("localStorage.clear()")  # a language picked in one test is not the next one's
    page.close()
    assert not errors, errors


def server_options(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/sdapi/v1/options") as r:
        return json.load(r)


def set_server_options(base_url: str, options: dict) -> None:
    req = urllib.request.Request(base_url + "/sdapi/v1/options", data=json.dumps(options).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=60).read()


def test_type_a_prompt_generate_and_see_the_image_in_the_gallery(page, tmp_path):
    assert page.input_value("#model").startswith(NATIVE_64)
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#width", "64")
    page.fill("#height", "48")
    page.fill("#steps", "4")
    page.fill("#batch-size", "2")
    page.fill("#seed", "1234")
    generate_and_wait(page, 2)
    images = gallery_images(page)
    assert [(i["w"], i["h"]) for i in images] == [(64, 48), (64, 48)]
    decoded = png_of(images[0]["src"])
    assert decoded.size == (64, 48) and "Seed: 1234" in decoded.info["parameters"]
    assert "Seed: 1234" in page.text_content("#infotext")
    # the selected image is shown large beside the thumbnails
    assert page.get_attribute("#result-image", "src") == images[0]["src"]
    assert page.locator("#result-image").bounding_box()["width"] >= 4 * 64
    # seed buttons are icons (a die, recycling arrows), named for screen readers
    assert page.locator("#seed-random svg").count() == 1 and page.locator("#seed-reuse svg").count() == 1
    assert page.get_attribute("#seed-random", "aria-label") == "Random seed"
    assert page.get_attribute("#seed-reuse", "aria-label") == "Reuse the seed of the selected image"
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"

    # a click on the large image: the full-window view, with the other image a key away
    page.click("#result-image")
    assert page.is_visible("#lightbox")
    box = page.locator("#lightbox-image").bounding_box()
    assert box["width"] >= 600 and box["height"] >= 600  # a 64x48 image, scaled to the window
    assert page.text_content("#lightbox-caption") == "1 / 2"
    page.keyboard.press("ArrowRight")
    assert page.text_content("#lightbox-caption") == "2 / 2"
    assert page.get_attribute("#lightbox-image", "src") == images[1]["src"]
    screenshot(page, "large-view", full_page=False)
    with page.expect_download() as download:
        page.click("#lightbox-download")
    assert download.value.suggested_filename == "sdlab-1235.png"
    saved = tmp_path / "saved.png"
    download.value.save_as(saved)
    assert "Seed: 1235" in Image.open(saved).info["parameters"]
    page.keyboard.press("Escape")
    assert not page.is_visible("#lightbox")
    # the image looked at last stays selected: its seed is the one reused
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1235"
    assert "Seed: 1235" in page.text_content("#infotext")
    # the download button under the result gives the selected image too
    page.click("#gallery img >> nth=0")
    with page.expect_download() as download:
        page.click("#download")
    assert download.value.suggested_filename == "sdlab-1234.png"
    screenshot(page, "txt2img")


def test_generate_becomes_interrupt_with_live_progress(page):
    page.fill("#prompt", "a long job")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "5000")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#generate').textContent === 'Interrupt'")
    page.wait_for_function("/step [1-9]/.test(document.querySelector('#progress-text').textContent)")
    page.wait_for_function("parseFloat(document.querySelector('#progress-fill').style.width) > 0")
    page.wait_for_selector("#preview:not([hidden])")
    screenshot(page, "progress")
    page.click("#generate")  # now "Interrupt"
    page.wait_for_function("document.querySelector('#generate').textContent === 'Generate'")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1 && "
                           "document.querySelector('#gallery img').naturalWidth === 64")
    # the unfinished image says so: on its thumbnail, above its parameters, and in them
    infotext = page.text_content("#infotext")
    assert "Steps: 5000," in infotext
    done = int(infotext.split("Interrupted at step: ")[1].split("/")[0])
    assert 1 <= done < 5000 and f"Interrupted at step: {done}/5000" in infotext
    assert page.text_content("#gallery .thumb.interrupted .badge") == "interrupted"
    note = page.text_content("#result-note")
    assert note.startswith(f"Interrupted at step {done} of 5000: this image is not finished")
    assert f"Interrupted at step: {done}/5000" in png_of(gallery_images(page)[0]["src"]).info["parameters"]
    screenshot(page, "interrupted")


def test_lora_picker_inserts_a_tag(page):
    page.fill("#prompt", "a cat")
    page.select_option("#lora", "shapes")
    page.click("#lora-insert")
    assert page.input_value("#prompt") == "a cat, <lora:shapes:1>"


def test_fp8_weight_choice_reloads_the_model(page, base_url):
    """Settings' "FP8 weight" sets the web UI's fp8_storage option: the server loads the model
    again, and the page shows the option as the server has it."""
    page.click("[data-tab=settings]")
    page.wait_for_selector("#opt-fp8_storage")
    assert page.input_value("#opt-fp8_storage") == "Disable"
    try:
        page.select_option("#opt-fp8_storage", "Enable")
        page.click("#settings-apply")
        page.wait_for_function("document.querySelector('#settings-status').textContent === 'Applied: FP8 weight.'")
        assert server_options(base_url)["fp8_storage"] == "Enable" and page.input_value("#opt-fp8_storage") == "Enable"
    finally:
        set_server_options(base_url, {"fp8_storage": "Disable"})
    assert server_options(base_url)["fp8_storage"] == "Disable"


def test_inpaint_with_the_brush(page, tmp_path):
    arr = Image.new("RGB", (64, 64), (30, 30, 200))
    arr.paste((200, 30, 30), (0, 0, 32, 64))
    src = tmp_path / "init.png"
    arr.save(src)
    page.click("[data-tab=inpaint]")
    page.set_input_files("#init-file", str(src))
    page.wait_for_function("document.querySelector('#image-canvas').width === 64")
    page.fill("#brush", "20")
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] * 0.5, steps=8)
    page.mouse.up()
    painted = page.evaluate("""() => { const c = document.querySelector('#mask-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n; }""")
    assert 0 < painted < 64 * 64
    page.fill("#prompt", "a green stripe")
    page.fill("#steps", "4")
    page.fill("#mask-blur", "0")
    bodies = sent_bodies(page, "img2img")
    generate_and_wait(page)
    out = png_of(gallery_images(page)[0]["src"]).convert("RGB")
    assert out.getpixel((2, 2)) == (200, 30, 30) and out.getpixel((61, 61)) == (30, 30, 200)  # outside the mask
    assert "Mask blur: 0" in page.text_content("#infotext") and "Inpaint area" not in page.text_content("#infotext")
    # the defaults the page sends are the values the API acts on
    body = bodies[-1]
    assert (body["inpainting_fill"], body["resize_mode"], body["inpaint_full_res"], body["inpainting_mask_invert"]) \
        == (1, 0, False, 0)
    screenshot(page, "inpaint")
    # the result is inpaint's: txt2img has nothing yet
    page.click("[data-tab=txt2img]")
    assert gallery_images(page) == [] and page.text_content("#infotext") == ""
    assert page.is_visible("#result-empty") and not page.is_visible("#result-image")


def test_png_info_reads_a_dropped_image_and_sends_it_to_txt2img(page, tmp_path):
    page.fill("#prompt", "a yellow square")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "3")
    page.fill("#seed", "77")
    generate_and_wait(page)
    src = gallery_images(page)[0]["src"]
    page.fill("#prompt", "")
    page.fill("#seed", "-1")
    page.fill("#width", "512")
    page.click("[data-tab=pnginfo]")
    # a real drop event carrying the file, as when a user drags it from their file manager
    drop = page.evaluate_handle("""(b64) => {
        const bin = atob(b64), bytes = new Uint8Array(bin.length);
        for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], 'made.png', {type: 'image/png'}));
        return dt; }""", src.split(",", 1)[1])
    page.dispatch_event("#dropzone-png", "drop", {"dataTransfer": drop})
    page.wait_for_function("document.querySelector('#png-text').textContent.includes('Seed: 77')")
    # the infotext's own keys, in its order; not the parser's Size-1 / Size-2
    rows = page.eval_on_selector_all("#png-table tr", "rows => rows.map(r => [...r.cells].map(c => c.textContent))")
    keys = [k for k, _ in rows]
    assert keys[:4] == ["Prompt", "Negative prompt", "Steps", "Sampler"]
    assert ["Size", "64x64"] in rows and ["Seed", "77"] in rows
    assert "Size-1" not in keys and "Size-2" not in keys
    screenshot(page, "pnginfo")
    page.click("#png-send")
    assert page.input_value("#prompt") == "a yellow square" and page.input_value("#seed") == "77"
    assert (page.input_value("#width"), page.input_value("#height")) == ("64", "64")
    assert page.is_visible("#generate-view") and page.get_attribute("[data-tab=txt2img]", "class") == "active"


# -- issue 25: what a newcomer trips over --------------------------------------------------------------


def size_fields(page) -> tuple[str, str]:
    return page.input_value("#width"), page.input_value("#height")


def test_size_starts_at_the_models_native_size_and_follows_a_switch(page, base_url):
    # the model trained at 64 px opens at 64x64, not 512x512 (a minute of red blobs on the demo model)
    assert page.input_value("#model").startswith(NATIVE_64)
    assert size_fields(page) == ("64", "64")
    assert page.text_content("#model-status") == "Stable Diffusion 1.x, 64×64"
    assert not page.is_visible("#size-hint")
    # far from it: a hint that says what to expect, and a way back
    page.fill("#width", "512")
    page.fill("#height", "512")
    assert page.is_visible("#size-hint")
    assert page.text_content("#size-hint-text") == ("demo64.safetensors was trained at 64×64; at 512×512 expect "
                                                    "repeated or broken shapes, and a slower image.")
    page.click("#size-native")
    assert size_fields(page) == ("64", "64") and not page.is_visible("#size-hint")
    page.fill("#width", "96")  # a landscape size near the native one: no hint
    assert not page.is_visible("#size-hint")
    try:
        # a model of another native size: its size, in the same shape
        select_checkpoint(page, PLAIN_SD1)
        assert page.text_content("#model-status") == "Stable Diffusion 1.x, 512×512"
        assert size_fields(page) == ("624", "416") and not page.is_visible("#size-hint")
        page.fill("#width", "128")
        page.fill("#height", "128")
        assert "at 128×128 expect blurred or broken images" in page.text_content("#size-hint-text")
        screenshot(page, "size-hint")
    finally:
        select_checkpoint(page, NATIVE_64)
    assert size_fields(page) == ("64", "64")
    assert server_options(base_url)["sd_model_checkpoint"].startswith(NATIVE_64)


def test_an_empty_or_unreadable_field_is_an_error_on_the_field(page):
    sent = sent_bodies(page, "txt2img")
    page.fill("#cfg", "")
    page.click("#generate")
    assert page.get_attribute("#cfg", "class") == "invalid" and page.get_attribute("#cfg", "aria-invalid") == "true"
    assert page.text_content("#cfg-error") == "CFG Scale is empty: enter a number"
    assert page.text_content("#error") == "CFG Scale is empty: enter a number"
    # typing into the field takes the mark away
    page.fill("#cfg", "7")
    assert page.get_attribute("#cfg", "class") in (None, "") and page.locator("#cfg-error").count() == 0
    page.locator("#steps").fill("")
    page.locator("#steps").press_sequentially("1e")  # what a number field holds but cannot read
    page.fill("#width", "100")
    page.click("#generate")
    assert page.text_content("#error") == "Sampling steps is not a number; Width must be a multiple of 8; try 104"
    assert page.evaluate("document.activeElement.id") == "steps"
    screenshot(page, "field-errors")
    assert sent == []  # nothing went to the server: no image made with CFG 0 or 0 steps


def test_api_errors_read_as_one_line(page):
    page.fill("#steps", "2")
    # pydantic's refusal, in the page's words and on the field
    page.fill("#seed", "99999999999999999999")
    page.click("#generate")
    page.wait_for_function("!document.querySelector('#error').hidden && "
                           "document.querySelector('#generate').textContent === 'Generate'")
    assert page.text_content("#error") == f"Seed must be at most {MAX_SEED_TEXT}"
    assert page.get_attribute("#seed", "class") == "invalid"
    # sdlab's own message, as it is
    page.fill("#seed", "1")
    page.fill("#steps", "6000")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').textContent.startsWith('steps 6000')")
    assert page.text_content("#error") == "steps 6000 is more than this server allows (5000)"


def test_each_tab_keeps_its_own_results(page):
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "3")
    page.fill("#seed", "5")
    generate_and_wait(page)
    txt2img_src = gallery_images(page)[0]["src"]
    page.click("#send-img2img")
    page.wait_for_function("document.querySelector('[data-tab=img2img]').classList.contains('active')")
    # img2img has made nothing yet: it shows nothing, not txt2img's image
    assert gallery_images(page) == [] and page.text_content("#infotext") == ""
    assert page.get_attribute("#download", "aria-disabled") == "true" and page.is_disabled("#send-inpaint")
    page.fill("#denoising", "0.5")
    page.fill("#seed", "6")
    bodies = sent_bodies(page, "img2img")
    generate_and_wait(page)
    assert bodies[-1]["resize_mode"] == 0 and bodies[-1]["denoising_strength"] == 0.5
    assert "Seed: 6," in page.text_content("#infotext") and "Denoising strength: 0.5" in page.text_content("#infotext")
    img2img_src = gallery_images(page)[0]["src"]
    page.click("[data-tab=txt2img]")
    assert gallery_images(page)[0]["src"] == txt2img_src and "Seed: 5," in page.text_content("#infotext")
    page.click("[data-tab=inpaint]")
    assert gallery_images(page) == []
    page.click("[data-tab=img2img]")
    assert gallery_images(page)[0]["src"] == img2img_src


def test_clip_skip_variation_seed_and_embedding_reach_the_infotext(page):
    page.fill("#prompt", "a circle")
    page.select_option("#embedding", "shapestyle")
    page.click("#embedding-insert")
    assert page.input_value("#prompt") == "a circle, shapestyle"
    page.fill("#steps", "3")
    page.fill("#seed", "11")
    page.fill("#clip-skip", "2")
    assert not page.is_visible("#subseed")
    page.check("#seed-extras")
    page.fill("#subseed", "42")
    page.fill("#subseed-strength", "0.3")
    generate_and_wait(page)
    infotext = page.text_content("#infotext")
    assert "Seed: 11," in infotext and "Variation seed: 42, Variation seed strength: 0.3," in infotext
    assert "Clip skip: 2," in infotext
    ti = infotext.split('TI hashes: "')[1].split('"')[0]
    assert ti.startswith("shapestyle: ") and len(ti) == len("shapestyle: ") + 12
    # the variation seed's own buttons
    page.click("#subseed-random")
    assert page.input_value("#subseed") == "-1"
    page.click("#subseed-reuse")
    assert page.input_value("#subseed") == "42"
    assert page.evaluate("document.querySelector('#download').download") == "sdlab-11-42.png"
    screenshot(page, "new-controls")


def test_settings_tab_sets_the_servers_options(page, base_url):
    page.click("[data-tab=settings]")
    page.wait_for_selector("#opt-randn_source")
    assert page.is_visible("#settings-view") and not page.is_visible("#generate-view")
    labels = page.eval_on_selector_all("#settings-form label", "ls => ls.map(l => l.title)")
    assert labels[:4] == ["CLIP_stop_at_last_layers", "randn_source", "sd_noise_schedule", "fp8_storage"]
    assert "sd_model_checkpoint" in labels  # shown, read-only: the header chooses it
    try:
        page.select_option("#opt-randn_source", "NV")
        page.fill("#opt-CLIP_stop_at_last_layers", "13")
        page.click("#settings-apply")
        assert page.text_content("#settings-status") == "Clip skip must be a whole number from 1 to 12"
        page.fill("#opt-CLIP_stop_at_last_layers", "2")
        page.click("#settings-apply")
        page.wait_for_function("document.querySelector('#settings-status').textContent.startsWith('Applied')")
        assert page.text_content("#settings-status") == "Applied: Clip skip, Random number generator source."
        opts = server_options(base_url)
        assert (opts["randn_source"], opts["CLIP_stop_at_last_layers"]) == ("NV", 2)
        screenshot(page, "settings")
        page.click("[data-tab=txt2img]")
        assert page.input_value("#clip-skip") == "2"  # the form starts from the server's option
        page.fill("#steps", "2")
        generate_and_wait(page)
        assert "RNG: NV," in page.text_content("#infotext") and "Clip skip: 2," in page.text_content("#infotext")
    finally:
        set_server_options(base_url, {"randn_source": "CPU", "CLIP_stop_at_last_layers": 1})


def test_inpaint_with_an_uploaded_mask_only_masked(page, tmp_path):
    init = Image.new("RGB", (64, 64), (30, 30, 200))
    init.paste((200, 30, 30), (0, 0, 32, 64))
    init.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (40, 40, 64, 64))  # repaint the bottom-right corner only
    mask.save(tmp_path / "mask.png")
    page.click("[data-tab=inpaint]")
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.wait_for_function("document.querySelector('#image-canvas').width === 64")
    # only what the API acts on can be chosen; the rest says it is not in sdlab yet
    options = page.eval_on_selector_all("#inpainting-fill option", "os => os.map(o => [o.textContent, o.disabled])")
    assert [t for t, off in options if not off] == ["original"] and len(options) == 4
    page.set_input_files("#mask-file", str(tmp_path / "mask.png"))
    page.wait_for_function("""() => { const c = document.querySelector('#mask-canvas');
        return c.getContext('2d').getImageData(50, 50, 1, 1).data[3] === 255; }""")
    assert page.evaluate("document.querySelector('#mask-canvas').getContext('2d').getImageData(10, 10, 1, 1)"
                         ".data[3]") == 0
    page.select_option("#inpaint-area", "masked")
    page.fill("#padding", "8")
    page.fill("#mask-blur", "0")
    page.fill("#steps", "3")
    page.fill("#prompt", "a green corner")
    bodies = sent_bodies(page, "img2img")
    generate_and_wait(page)
    assert bodies[-1]["inpaint_full_res"] is True and bodies[-1]["inpaint_full_res_padding"] == 8
    infotext = page.text_content("#infotext")
    assert "Mask blur: 0, Inpaint area: Only masked, Masked area padding: 8," in infotext
    out = png_of(gallery_images(page)[0]["src"]).convert("RGB")
    assert out.getpixel((10, 10)) == (200, 30, 30) and out.getpixel((50, 10)) == (30, 30, 200)  # outside the mask
    assert out.getpixel((56, 56)) != (30, 30, 200)  # repainted
    # an empty mask asks for one instead of sending a request that changes nothing
    page.click("#mask-clear")
    page.click("#generate")
    assert page.text_content("#error") == "paint over the part of the image to repaint (or upload a mask) first"


def test_styles_are_listed_and_merged_into_the_prompt(page):
    page.wait_for_selector("#styles-box:not([hidden])")
    page.click("#styles-box summary")
    names = page.eval_on_selector_all("#styles-list input", "bs => bs.map(b => b.value)")
    assert names == ["vivid", "framed"]
    assert page.get_attribute("#styles-list label >> nth=0", "title") == "{prompt}, vivid colours\nNegative: dull"
    page.check("#styles-list input[value=vivid]")
    assert page.text_content("#styles-count") == "(1 on)"
    page.fill("#prompt", "a circle")
    page.fill("#steps", "2")
    bodies = sent_bodies(page, "txt2img")
    generate_and_wait(page)
    assert bodies[-1]["styles"] == ["vivid"]
    assert page.text_content("#infotext").startswith("a circle, vivid colours\nNegative prompt: dull\nSteps: 2,")


def test_refiner_is_shown_as_the_command_lines(page):
    """The server refuses refiner_checkpoint (tests/server/test_api.py): the page offers no
    control that would be refused, and says where the refiner is."""
    page.click("#refiner-box summary")
    assert page.is_disabled("#refiner") and page.is_disabled("#refiner-switch")
    assert "sdlab generate \"prompt\" --refiner MODEL" in page.text_content("#refiner-box")


def test_favicon_and_the_page_at_phone_width(page, base_url):
    icon = page.evaluate("""async () => { const r = await fetch(document.querySelector('link[rel=icon]').href);
        return [r.status, r.headers.get('content-type')]; }""")
    assert icon == [200, "image/svg+xml"]
    with urllib.request.urlopen(base_url + "/favicon.ico") as r:
        assert r.status == 200 and r.read().startswith(b"<svg")
    page.fill("#prompt", "a small red circle")
    page.fill("#steps", "3")
    page.fill("#seed", "3")
    generate_and_wait(page)
    screenshot(page, "width-1280")
    page.set_viewport_size({"width": 420, "height": 860})
    overflow = page.evaluate("""() => {
        const out = [];
        if (document.documentElement.scrollWidth > 420) out.push('page ' + document.documentElement.scrollWidth);
        for (const el of document.querySelectorAll('header, header *, nav, nav *')) {
            const r = el.getBoundingClientRect();
            if (r.width && (r.right > 420.5 || r.left < 0)) out.push(`${el.id || el.tagName} ${r.left}..${r.right}`);
        }
        return out; }""")
    assert overflow == []
    # the tabs, the checkpoint and the status all visible, none cut off
    assert page.locator("#model").bounding_box()["width"] >= 200
    screenshot(page, "width-420")
    page.click("#result-image")
    screenshot(page, "width-420-large-view", full_page=False)
    assert page.locator("#lightbox-image").bounding_box()["width"] >= 380


# -- issue 29: hires fix from the txt2img tab; the page in Chinese --------------------------------------


def test_hires_fix_from_the_txt2img_tab(page):
    assert not page.is_visible("#hr-scale")
    page.check("#enable-hr")
    assert page.is_visible("#hr-scale") and page.input_value("#hr-upscaler") == "Latent"
    upscalers = page.eval_on_selector_all("#hr-upscaler option", "os => os.map(o => o.value)")
    assert upscalers[:6] == ["Latent", "Latent (antialiased)", "Latent (bicubic)", "Latent (bicubic antialiased)",
                             "Latent (nearest)", "Latent (nearest-exact)"] and "Lanczos" in upscalers
    assert "None" not in upscalers
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "3")
    page.fill("#seed", "21")
    page.fill("#hr-steps", "2")
    page.fill("#hr-denoising", "0.5")
    assert page.text_content("#hr-size") == "Upscale from 64×64 to 128×128"
    page.fill("#hr-scale", "1.5")
    assert page.text_content("#hr-size") == "Upscale from 64×64 to 96×96"
    bodies = sent_bodies(page, "txt2img")
    generate_and_wait(page)
    body = bodies[-1]
    assert (body["enable_hr"], body["hr_scale"], body["hr_upscaler"], body["hr_second_pass_steps"],
            body["denoising_strength"]) == (True, 1.5, "Latent", 2, 0.5)
    assert [(i["w"], i["h"]) for i in gallery_images(page)] == [(96, 96)]
    infotext = page.text_content("#infotext")
    assert "Size: 64x64," in infotext and "Denoising strength: 0.5" in infotext
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent" in infotext
    page.uncheck("#enable-hr")
    assert not page.is_visible("#hr-scale")
    # hires fix is txt2img's: img2img neither shows nor sends it
    page.click("[data-tab=img2img]")
    assert not page.is_visible("#enable-hr")
    page.click("[data-tab=txt2img]")
    page.check("#enable-hr")
    page.fill("#hr-scale", "0")
    page.click("#generate")
    assert page.text_content("#error") == "Upscale by must be at least 1"
    screenshot(page, "hires-fix")


def test_the_page_in_chinese_from_the_browsers_language_switched_and_remembered(zh_page):
    page = zh_page
    assert page.evaluate("navigator.languages[0]") == "zh-CN"
    assert page.evaluate("document.documentElement.lang") == "zh-CN" and page.input_value("#lang") == "zh-CN"
    tabs = page.eval_on_selector_all("#tabs button", "bs => bs.map(b => b.textContent)")
    assert tabs == ["文生图", "图生图", "局部重绘", "后期处理", "PNG 图片信息", "模型融合", "设置"]
    assert page.text_content("#generate") == "生成"
    assert page.get_attribute("#prompt", "placeholder") == "提示词（按 Ctrl+Enter 生成）"
    assert page.get_attribute("#negative", "placeholder") == "反向提示词"
    labels = page.eval_on_selector_all("#generate-view label > span[data-i18n]", "ss => ss.map(s => s.textContent)")
    for word in ["采样方法 (Sampler)", "调度类型", "迭代步数 (Steps)", "提示词引导系数 (CFG Scale)", "随机种子 (Seed)",
                 "重绘幅度", "高分辨率修复 (Hires. fix)", "放大算法", "放大倍数", "高分迭代步数", "总批次数", "单批数量"]:
        assert word in labels
    assert page.text_content("#model-status") == "Stable Diffusion 1.x，64×64"
    assert page.eval_on_selector("#scheduler", "s => s.selectedOptions[0].textContent") == "自动"
    # every part of every tab shown, and nothing English left in it
    page.check("#seed-extras")
    page.check("#enable-hr")
    page.click("#styles-box summary")
    page.click("#refiner-box summary")
    page.fill("#width", "512")  # the size hint
    page.fill("#height", "512")
    assert page.text_content("#size-hint-text") == ("demo64.safetensors 的训练尺寸为 64×64；在 512×512 下"
                                                    "画面容易出现重复或崩坏的形体，且生成更慢。")
    found = {}
    for tab in ["txt2img", "img2img", "inpaint", "pnginfo", "settings"]:
        page.click(f"[data-tab={tab}]")
        if tab == "settings":
            page.wait_for_selector("#opt-randn_source")
        found[tab] = english_left(page)
    assert found == {tab: [] for tab in found}
    assert page.text_content("#settings-form label[title=fp8_storage] > span") == "FP8 权重"
    screenshot(page, "zh-CN-settings")
    # the page's own messages are Chinese too
    page.click("[data-tab=txt2img]")
    page.fill("#cfg", "")
    page.fill("#width", "100")
    page.click("#generate")
    assert page.text_content("#error") == ("“提示词引导系数 (CFG Scale)”为空，请输入一个数字；"
                                           "“宽度”必须是 8 的倍数，可以试试 104")
    assert page.text_content("#width-error") == "“宽度”必须是 8 的倍数，可以试试 104"
    screenshot(page, "zh-CN")
    # switched to English: the page and what it has said, at once
    page.select_option("#lang", "en")
    assert page.evaluate("document.documentElement.lang") == "en" and page.text_content("#generate") == "Generate"
    assert page.text_content("[data-tab=txt2img]") == "txt2img"
    assert page.text_content("#error") == "CFG Scale is empty: enter a number; Width must be a multiple of 8; try 104"
    assert page.text_content("#cfg-error") == "CFG Scale is empty: enter a number"
    assert page.text_content("#model-status") == "Stable Diffusion 1.x, 64×64"
    assert page.text_content("#hr-size") == "Upscale from 100×512 to 200×1024"
    # ... and still English after a reload, whatever the browser's language
    page.reload()
    wait_for_page(page)
    assert page.input_value("#lang") == "en" and page.text_content("#generate") == "Generate"
    assert page.get_attribute("#prompt", "placeholder") == "Prompt (press Ctrl+Enter to generate)"
    # back to 中文, remembered too
    page.select_option("#lang", "zh-CN")
    assert page.text_content("[data-tab=settings]") == "设置"
    page.reload()
    wait_for_page(page)
    assert page.text_content("#generate") == "生成"
