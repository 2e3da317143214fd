"""The web page in a real headless Chromium (Debian's package), driven by Playwright.

Skipped, with the reason, where Chromium or Playwright's Python package is missing. A
screenshot of each scenario is saved under $SDLAB_TEST_ARTIFACTS (default
./test-artifacts/) for a person to look at.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; or set SDLAB_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                               "(pip install playwright; no browser download is needed)")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.settings import Limits, ServerSettings  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SDLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))
# Flags that keep Chromium off the network it does not have, and quiet in a container.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1"), root / "Stable-diffusion" / "tiny.safetensors")
    (root / "Lora").mkdir()
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8)}, root / "Lora" / "shapes.safetensors")
    app = create_app(ServerSettings(models_dir=root, limits=Limits(max_steps=5000)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("the server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(15)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        profile = tempfile.mkdtemp(prefix="sdlab-chromium-")
        try:
            ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                        args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
        except Exception as e:  # a Chromium that cannot start here is an environment problem, not ours
            shutil.rmtree(profile, ignore_errors=True)
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(e).splitlines()[0][:200]}")
        yield ctx
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def page(browser, base_url):
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + "/")
    page.wait_for_function("document.querySelector('#model').options.length > 0 "
                           "&& document.querySelector('#sampler').options.length > 0")
    yield page
    page.close()
    assert not errors, errors


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def gallery_images(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#gallery img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, ok: e.complete, src: e.src}))")


def test_type_a_prompt_generate_and_see_the_image_in_the_gallery(page):
    assert page.input_value("#model").startswith("tiny.safetensors")
    page.fill("#prompt", "a red circle on a blue background")
    page.fill("#width", "64")
    page.fill("#height", "48")
    page.fill("#steps", "4")
    page.fill("#batch-size", "2")
    page.fill("#seed", "1234")
    page.click("#generate")
    page.wait_for_function("[...document.querySelectorAll('#gallery img')].length === 2 && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth)")
    images = gallery_images(page)
    assert [(i["w"], i["h"]) for i in images] == [(64, 48), (64, 48)]
    decoded = Image.open(io.BytesIO(base64.b64decode(images[0]["src"].split(",", 1)[1])))
    assert decoded.size == (64, 48) and "Seed: 1234" in decoded.info["parameters"]
    assert "Seed: 1234" in page.text_content("#infotext")
    assert page.text_content("#generate") == "Generate"
    # seed: random, then reuse the last one (of the selected image)
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#gallery img >> nth=1")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "1235"
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


def test_lora_picker_inserts_a_tag(page):
    page.fill("#prompt", "a cat")
    page.select_option("#lora", "shapes")
    page.click("#lora-insert")
    assert page.input_value("#prompt") == "a cat, <lora:shapes:1>"


def test_fp8_weight_choice_reloads_the_model(page, base_url):
    """The header's "FP8 weight" select sets the web UI's fp8_storage option: the server loads the
    model again, and the page shows the option as the server has it."""
    import json
    import urllib.request

    def server_choice():
        with urllib.request.urlopen(base_url + "/sdapi/v1/options") as r:
            return json.load(r)["fp8_storage"]

    assert page.input_value("#fp8") == "Disable"
    try:
        page.select_option("#fp8", "Enable")
        page.wait_for_function("!document.querySelector('#fp8').disabled "
                               "&& document.querySelector('#model-status').textContent === ''")
        assert server_choice() == "Enable" and page.input_value("#fp8") == "Enable"
    finally:
        page.select_option("#fp8", "Disable")
        page.wait_for_function("!document.querySelector('#fp8').disabled")
    assert server_choice() == "Disable"


def test_inpaint_with_the_brush(page, tmp_path):
    arr = Image.new("RGB", (64, 64), (30, 30, 200))
    arr.paste((200, 30, 30), (0, 0, 32, 64))
    src = tmp_path / "init.png"
    arr.save(src)
    page.click("[data-tab=inpaint]")
    page.set_input_files("#init-file", str(src))
    page.wait_for_function("document.querySelector('#image-canvas').width === 64")
    box = page.locator("#mask-canvas").bounding_box()
    page.fill("#brush", "20")
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
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1 && "
                           "document.querySelector('#gallery img').naturalWidth === 64")
    out = Image.open(io.BytesIO(base64.b64decode(gallery_images(page)[0]["src"].split(",", 1)[1]))).convert("RGB")
    assert out.getpixel((2, 2)) == (200, 30, 30) and out.getpixel((61, 61)) == (30, 30, 200)  # outside the mask
    assert "Mask blur: 0" in page.text_content("#infotext")
    screenshot(page, "inpaint")


def test_png_info_reads_a_dropped_image_and_sends_it_to_txt2img(page, tmp_path):
    page.fill("#prompt", "a yellow square")
    page.fill("#width", "64")
    page.fill("#height", "64")
    page.fill("#steps", "3")
    page.fill("#seed", "77")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('#gallery img').length === 1")
    src = gallery_images(page)[0]["src"]
    page.fill("#prompt", "")
    page.fill("#seed", "-1")
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
    screenshot(page, "pnginfo")
    page.click("#png-send")
    assert page.input_value("#prompt") == "a yellow square" and page.input_value("#seed") == "77"
    assert page.is_visible("#generate-view") and page.get_attribute("[data-tab=txt2img]", "class") == "active"
