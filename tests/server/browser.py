"""What the tests that drive the page in a real headless Chromium (Debian's package) through
Playwright share: starting the browser, opening the page, and reading what it shows and sends.
The fixtures built on them (`playwright`, `browser`, `page`) are in conftest.py.

A test module calls `skip_without_a_browser()` first: skipped, with the reason, where Chromium or
Playwright's Python package is missing. Screenshots go under $SDLAB_TEST_ARTIFACTS (default
./test-artifacts/) for a person to look at; `pytest -s` prints where.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SDLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))
# Flags that keep Chromium off the network it does not have, and quiet in a container.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000


def skip_without_a_browser() -> None:
    """Skip the calling test module where Chromium or Playwright's Python package is missing."""
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; or set SDLAB_CHROMIUM)",
                    allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed "
                        "(pip install playwright; no browser download is needed)")


@contextmanager
def chromium(pw, locale: str):
    """A Chromium whose browser language is `locale` (navigator.languages, Accept-Language)."""
    profile = tempfile.mkdtemp(prefix="sdlab-chromium-")
    try:
        ctx = pw.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True, locale=locale,
                                                    args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900})
    except Exception as e:  # a Chromium that cannot start here is an environment problem, not ours
        shutil.rmtree(profile, ignore_errors=True)
        pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(e).splitlines()[0][:200]}")
    try:
        yield ctx
    finally:
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(ctx, base_url):
    page = ctx.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(base_url + "/")
    wait_for_page(page)
    return page, errors


def wait_for_page(page) -> None:
    page.wait_for_function("document.querySelector('#model').options.length > 0 "
                           "&& document.querySelector('#sampler').options.length > 0 "
                           "&& document.querySelector('#model-status').textContent !== ''")


def screenshot(page, name: str, full_page: bool = True) -> Path:
    """full_page=False for what is on screen only (the large view covers the window, not the page)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    print(f"screenshot: {path}")
    return path


def gallery_images(page) -> list[dict]:
    return page.eval_on_selector_all(
        "#gallery img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, ok: e.complete, src: e.src}))")


def png_of(data_url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))


def generate_and_wait(page, n: int = 1) -> None:
    """Click Generate and wait for `n` decoded images in the tab's gallery and the button back."""
    page.click("#generate")
    page.wait_for_function(f"[...document.querySelectorAll('#gallery img')].length === {n} && "
                           "[...document.querySelectorAll('#gallery img')].every(i => i.complete && i.naturalWidth) "
                           "&& document.querySelector('#generate').textContent === 'Generate'")


def sent_bodies(page, path: str) -> list[dict]:
    """The JSON bodies the page POSTs to /sdapi/v1/<path> from now on."""
    bodies: list[dict] = []
    page.on("request", lambda r: bodies.append(json.loads(r.post_data)) if r.url.endswith("/sdapi/v1/" + path)
            and r.method == "POST" else None)
    return bodies


def select_checkpoint(page, name: str) -> None:
    """Pick a checkpoint in the header by file name; wait until the server has loaded it."""
    value = page.evaluate("(name) => [...document.querySelector('#model').options].map(o => o.value)"
                          ".find(v => v.startsWith(name))", name)
    page.select_option("#model", value)
    page.wait_for_function("(name) => !document.querySelector('#model').disabled && "
                           "document.querySelector('#model').value.startsWith(name) && "
                           "!document.querySelector('#model-status').textContent.includes('loading')", arg=name)


# Latin words the Chinese page keeps: names of things, keys, and the English the community keeps
# beside its Chinese terms ("提示词引导系数 (CFG Scale)").
KEPT_WORDS = {"CFG", "Scale", "LoRA", "VAE", "CLIP", "Steps", "Sampler", "Seed", "Hires", "fix", "Embedding",
              "Refiner", "Latent", "PNG", "SHA", "Ctrl", "Enter", "Esc", "sdlab", "Stable", "Diffusion", "GPU", "CPU",
              "NV", "NVIDIA", "NoobAI-XL", "v-pred", "FP8", "FP16", "SDXL", "English", "ControlNet", "Eta",
              "ComfyUI"}

# Every visible text of the page that a person reads as words: text nodes, the options of the
# page's own choices, and the titles, placeholders, ARIA labels and alt texts of what is shown.
# Left out: what the server lists (checkpoints, samplers, LoRAs...; [data-list] marks the others),
# what the user or the model wrote (prompts, infotexts), and code.
VISIBLE_TEXTS = """() => {
  const data = "#model, #sampler, #scheduler, #lora, #embedding, #refiner, #hr-upscaler, #lang, #model-status, " +
               "textarea, #infotext, #png-text, #png-table, code, .readonly, #styles-list, [data-list], " +
               "#extras-info";
  const shown = (el) => el.tagName === "OPTION" ? el.parentElement.checkVisibility() : el.checkVisibility();
  const out = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  for (let n; (n = walker.nextNode());) {
    const el = n.parentElement, text = n.textContent.trim();
    if (text && !el.closest(data + ", script, style, svg") && shown(el)) out.push(text);
  }
  for (const el of document.querySelectorAll("[title], [placeholder], [aria-label], [alt]")) {
    // the switch names each language in its own; a setting's title is its key in the API
    if (el.matches("#lang, #settings-form label") || el.closest(data) || !shown(el)) continue;
    for (const a of ["title", "placeholder", "aria-label", "alt"]) if (el.getAttribute(a)) out.push(el.getAttribute(a));
  }
  return out;
}"""


def english_left(page) -> list[str]:
    """The visible texts that are still English: an English entry of the table (one the
    Chinese table writes otherwise), or a Latin word that is not a kept name."""
    en, zh = page.evaluate("[I18N.en, I18N['zh-CN']]")
    english = {v.strip() for k, v in en.items() if v != zh.get(k)}
    left = []
    for text in page.evaluate(VISIBLE_TEXTS):
        prose = re.sub(r"<[^>]*>", "", text)  # prompt syntax (<lora:name:1>) is the same in every language
        words = [w for w in re.findall(r"[A-Za-z][A-Za-z0-9_.-]*[A-Za-z0-9]", prose)
                 if w not in KEPT_WORDS and not re.search(r"[0-9_]", w)]  # keys and file names carry _ or digits
        if text in english or words:
            left.append(text)
    return left
