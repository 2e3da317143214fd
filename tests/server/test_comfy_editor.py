"""ComfyUI's official editor at /comfy/ (sdlab.server.comfy.editor): its boot routes (users,
settings, userdata, templates ...) over HTTP against a real server on loopback, and the editor
itself in headless Chromium: it boots at /comfy/?template=default with nothing failing, its Run
button puts an image on the Save Image node, and a workflow it saved and its switch to Chinese are
still there in a new browser (so kept by the server, not by the browser's storage).

The browser tests are skipped, with the reason, without Chromium, Playwright or the `comfy` extra.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from sdlab.server.app import create_app  # noqa: E402
from sdlab.server.comfy import editor  # noqa: E402
from sdlab.server.settings import ServerSettings  # noqa: E402
from tests.tiny import save_native, tiny_bundle  # noqa: E402

from .live import serving  # noqa: E402

CHROMIUM = os.environ.get("SDLAB_CHROMIUM", "/usr/bin/chromium")
REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("SDLAB_TEST_ARTIFACTS", REPO / "test-artifacts"))  # screenshots for a person
# Keep Chromium off the network it does not have, and quiet in a container (as test_browser.py).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
BOOTED = "window.app && window.app.graph && window.app.graph.nodes.length > 0"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base URL, outputs folder) of one live server on the tiny SD1 model."""
    root = tmp_path_factory.mktemp("models")
    (root / "Stable-diffusion").mkdir()
    save_native(tiny_bundle("sd1", seed=0), root / "Stable-diffusion" / "tiny.safetensors")
    outputs = tmp_path_factory.mktemp("outputs")
    app = create_app(ServerSettings(models_dir=root, model="tiny.safetensors", outputs_dir=outputs))
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}", outputs


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server[0], timeout=60) as client:
        yield client


def user_folder(server) -> Path:
    return server[1] / "comfy" / "user" / "default"


# -- the routes, over HTTP ----------------------------------------------------------------------


def test_settings_are_kept_in_the_data_folder(http, server):
    # The editor posts each setting's JSON value as text/plain.
    assert http.post("/comfy/api/settings/Comfy.ColorPalette", content='"light"',
                     headers={"Content-Type": "text/plain;charset=UTF-8"}).status_code == 200
    assert http.post("/api/settings", content=json.dumps({"Comfy.TextareaWidget.FontSize": 12})).status_code == 200
    assert http.get("/comfy/api/settings/Comfy.ColorPalette").json() == "light"
    assert http.get("/settings/Not.Set").json() is None
    saved = json.loads((user_folder(server) / "comfy.settings.json").read_text())
    assert saved["Comfy.ColorPalette"] == "light" and saved["Comfy.TextareaWidget.FontSize"] == 12
    # ComfyUI's release notes are off until the user turns them on; the tutorial stays "not
    # completed", so a new browser opens sdlab's templates rather than ComfyUI's Z-Image graph
    everything = http.get("/comfy/api/settings").json()
    assert everything == {**saved, "Comfy.Notification.ShowVersionUpdates": False, "Comfy.TutorialCompleted": False}
    assert http.post("/comfy/api/settings/Comfy.Notification.ShowVersionUpdates", content="true").status_code == 200
    assert http.get("/api/settings/Comfy.Notification.ShowVersionUpdates").json() is True
    assert http.post("/comfy/api/settings/Comfy.TutorialCompleted", content="true").status_code == 200
    assert http.get("/api/settings/Comfy.TutorialCompleted").json() is False
    saved = json.loads((user_folder(server) / "comfy.settings.json").read_text())
    assert saved["Comfy.Notification.ShowVersionUpdates"] is True and "Comfy.TutorialCompleted" not in saved
    http.post("/api/settings/Comfy.Notification.ShowVersionUpdates", content="false")  # the browser tests run offline

    assert http.post("/api/settings/Comfy.ColorPalette", content="{not json").status_code == 400
    assert http.post("/api/settings", content="[1, 2]").status_code == 400
    assert http.get("/api/settings/Comfy.ColorPalette").json() == "light"
    assert not list(user_folder(server).glob(".*.tmp"))  # written under a temporary name, then renamed


def test_userdata_saves_lists_moves_and_deletes_workflows(http, server):
    workflow = json.dumps({"nodes": [], "links": [], "version": 0.4})
    # as the editor saves one: the name URL-encoded whole
    r = http.post("/comfy/api/userdata/workflows%2Fmy%20cat.json?overwrite=false&full_info=true", content=workflow)
    assert r.status_code == 200
    info = r.json()
    assert info["path"] == "workflows/my cat.json" and info["size"] == len(workflow)
    assert isinstance(info["modified"], int) and isinstance(info["created"], int)
    assert (user_folder(server) / "workflows" / "my cat.json").read_text() == workflow
    assert http.post("/comfy/api/userdata/workflows%2Fmy%20cat.json?overwrite=false", content="{}").status_code == 409
    assert http.post("/api/userdata/workflows%2Fsub%2Fb.json", content="{}").json() == "workflows/sub/b.json"

    r = http.get("/comfy/api/userdata/workflows%2Fmy%20cat.json")
    assert r.status_code == 200 and r.text == workflow and r.headers["content-type"] == "application/json"
    listing = http.get("/api/userdata", params={"dir": "workflows", "recurse": "true", "full_info": "true",
                                               "split": "false"}).json()
    assert sorted(e["path"] for e in listing) == ["my cat.json", "sub/b.json"]
    assert http.get("/userdata", params={"dir": "workflows"}).json() == ["my cat.json"]
    assert http.get("/userdata", params={"dir": "workflows", "recurse": "true", "split": "true"}).json() == [
        ["my cat.json", "my cat.json"], ["sub/b.json", "sub", "b.json"]]
    assert http.get("/api/userdata%2Fworkflows%2Fsub%2Fb.json").text == "{}"  # the route's own slash encoded
    assert http.get("/userdata", params={"dir": "not-made-yet"}).json() == []
    assert http.get("/userdata").status_code == 400

    r = http.post("/comfy/api/userdata/workflows%2Fmy%20cat.json/move/workflows%2Fold%2Fcat.json?overwrite=false")
    assert r.status_code == 200 and r.json() == "workflows/old/cat.json"
    assert http.get("/comfy/api/userdata/workflows%2Fmy%20cat.json").status_code == 404
    assert http.post("/api/userdata/workflows%2Fsub%2Fb.json/move/workflows%2Fold%2Fcat.json"
                     "?overwrite=false").status_code == 409
    assert http.delete("/comfy/api/userdata/workflows%2Fold%2Fcat.json").status_code == 204
    assert http.delete("/comfy/api/userdata/workflows%2Fold%2Fcat.json").status_code == 404
    assert http.get("/api/v2/userdata", params={"path": "workflows"}).json() == [
        {"name": "old", "path": "workflows/old", "type": "directory"},
        {"name": "sub", "path": "workflows/sub", "type": "directory"},
        {**{"name": "b.json", "path": "workflows/sub/b.json", "type": "file", "size": 2},
         "modified": pytest.approx((user_folder(server) / "workflows/sub/b.json").stat().st_mtime)}]

    # What the editor reads at every start reads as empty until the user saves one.
    assert http.get("/comfy/api/userdata/comfy.templates.json").json() == []
    assert http.get("/comfy/api/userdata/workflows%2F.index.json").json() == {"favorites": []}
    css = http.get("/comfy/api/userdata/user.css")
    assert css.status_code == 200 and css.text == "" and css.headers["content-type"].startswith("text/css")


def test_userdata_paths_leading_outside_are_refused(http, server):
    outside = server[1] / "comfy" / "user" / "escaped.json"
    for path in ("..%2Fescaped.json", "workflows%2F..%2F..%2Fescaped.json", "%2Ftmp%2Fescaped.json",
                 "a%00b.json"):
        r = http.post(f"/comfy/api/userdata/{path}", content="{}")
        assert 400 <= r.status_code < 500, (path, r.status_code)
        assert 400 <= http.get(f"/api/userdata/{path}").status_code < 500
        assert 400 <= http.delete(f"/api/userdata/{path}").status_code < 500
    assert http.post("/api/userdata/x.json", content="{}").status_code == 200
    assert 400 <= http.post("/api/userdata/x.json/move/..%2F..%2Fescaped.json").status_code < 500
    assert http.get("/userdata", params={"dir": "../.."}).status_code == 403
    assert not outside.exists() and not Path("/tmp/escaped.json").exists()
    assert (user_folder(server) / "x.json").is_file()  # the refused move left it where it was


def test_boot_routes_answer_as_comfyui_does_with_nothing_installed(http, server):
    for prefix in ("", "/api", "/comfy/api"):
        # one user: no `users` key (no login screen); `migrated` once the user folder exists
        assert http.get(f"{prefix}/users").json() == {"storage": "server", "migrated": user_folder(server).is_dir()}
        assert http.get(f"{prefix}/extensions").json() == []
        assert http.get(f"{prefix}/i18n").json() == {}
        assert http.get(f"{prefix}/workflow_templates").json() == {}
        assert http.get(f"{prefix}/global_subgraphs").json() == {}
    assert http.post("/api/users", content=json.dumps({"username": "x"})).status_code == 400
    folders = http.get("/comfy/api/experiment/models").json()
    assert {"checkpoints", "loras", "vae", "embeddings"} <= {f["name"] for f in folders}
    files = http.get("/comfy/api/experiment/models/checkpoints").json()
    assert [(f["name"], f["pathIndex"]) for f in files] == [("tiny.safetensors", 0)] and files[0]["size"] > 0
    assert http.get("/comfy/api/experiment/models/nope").status_code == 404
    paths = http.get("/comfy/internal/folder_paths").json()  # the editor puts no /api before /internal
    assert paths == {f["name"]: f["folders"] for f in folders}
    assert paths["checkpoints"][0].endswith("Stable-diffusion")
    # Under the editor's folder the API is the API's own (the browser test's Run goes through
    # /comfy/api/prompt and the image comes through /comfy/ws).
    assert http.get("/comfy/api/object_info/KSampler").json()["KSampler"]["name"] == "KSampler"
    assert http.get("/comfy/api/prompt").json() == {"exec_info": {"queue_remaining": 0}}


def test_the_default_template_is_the_classic_graph_on_the_servers_model(http):
    workflow = http.get("/comfy/templates/default.json").json()
    types = sorted(n["type"] for n in workflow["nodes"])
    assert types == ["CLIPTextEncode", "CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "KSampler",
                     "SaveImage", "VAEDecode"]
    loader = next(n for n in workflow["nodes"] if n["type"] == "CheckpointLoaderSimple")
    assert loader["widgets_values"] == ["tiny.safetensors"]
    assert workflow["version"] == 0.4 and len(workflow["links"]) == 9
    index = http.get("/comfy/templates/index.json")
    assert index.headers["content-type"] == "application/json"  # the editor reads nothing else
    assert [t["name"] for t in index.json()[0]["templates"]] == ["default"]
    assert http.get("/comfy/templates/index.zh.json").json()[0]["templates"][0]["title"] == "文生图 (SD 1.x)"
    assert http.get("/comfy/templates/default-1.svg").headers["content-type"] == "image/svg+xml"
    assert http.get("/comfy/templates/other.json").status_code == 404
    assert http.get("/comfy/templates/..%2Feditor.py").status_code == 404


def test_the_editors_files_are_served_at_comfy(http):
    pytest.importorskip(editor.FRONTEND_PACKAGE, reason='the comfy extra is not installed (pip install "sdlab[comfy]")')
    r = http.get("/comfy", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"].endswith("/comfy/")
    page = http.get("/comfy/")
    assert page.headers["cache-control"] == "no-cache" and 'id="vue-app"' in page.text
    script = page.text.split('<script type="module" crossorigin src="./', 1)[1].split('"', 1)[0]
    assert http.get(f"/comfy/{script}").headers["content-type"].startswith("application/javascript")
    assert http.get("/assets/favicon.ico").status_code == 200  # the editor names it from the site root
    assert http.get("/comfy/..%2F..%2F__init__.py").status_code == 404
    assert http.get("/comfy/assets/nothing-here.js").status_code == 404



def test_our_page_links_to_the_editor(http):
    page = http.get("/").text
    assert "<title>sdlab</title>" in page  # our own page is still at /
    assert '<a id="comfy-editor" href="/comfy/?template=default"' in page


def test_without_the_extra_comfy_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(editor, "frontend_root", lambda: None)
    app = create_app(ServerSettings(models_dir=tmp_path, outputs_dir=tmp_path / "outputs"))
    client = TestClient(app)  # no lifespan: nothing is loaded
    r = client.get("/comfy/")
    assert r.status_code == 404 and r.text == editor.NOT_INSTALLED and 'pip install "sdlab[comfy]"' in r.text
    assert client.get("/comfy/api/users").status_code == 200  # the API does not need the extra


# -- the editor in Chromium -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def chromium():
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.skip(f"Chromium not found at {CHROMIUM} (apt-get install chromium; or set SDLAB_CHROMIUM)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    pytest.importorskip(editor.FRONTEND_PACKAGE, reason='the comfy extra is not installed (pip install "sdlab[comfy]")')
    with sync_api.sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except Exception as e:  # a Chromium that cannot start here is the environment's problem
            pytest.skip(f"Chromium at {CHROMIUM} does not start: {str(e).splitlines()[0][:200]}")
        yield browser
        browser.close()


@contextmanager
def editor_page(chromium, base: str, path: str):
    """A new browser (empty storage) on the editor, booted; yields (page, problems): console errors,
    page errors, answers >= 400 and requests leaving the server, which the test asserts are none."""
    context = chromium.new_context(viewport={"width": 1280, "height": 900}, locale="en-US")
    page = context.new_page()
    page.set_default_timeout(60_000)
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console: {m.text} {m.location.get('url', '')}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("response", lambda r: problems.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    page.on("request", lambda r: problems.append(f"left the server: {r.url}")
            if not r.url.startswith((base, "blob:", "data:")) else None)
    try:
        page.goto(base + path)
        page.wait_for_function(BOOTED)
        yield page, problems
    finally:
        context.close()


def test_the_editor_runs_the_template_and_keeps_a_saved_workflow_and_chinese(chromium, server):
    """The issue's scenario in two page loads: boot at ?template=default, Run, save the workflow,
    switch to Chinese; then a new browser (nothing in its storage) is in Chinese and lists it."""
    base, outputs = server
    with editor_page(chromium, base, "/comfy/?template=default") as (page, problems):
        page.wait_for_function("app.graph.nodes.some(n => n.type === 'SaveImage')")
        assert page.evaluate("app.graph.nodes.find(n => n.type === 'CheckpointLoaderSimple').widgets[0].value") \
            == "tiny.safetensors"
        assert page.locator("[data-testid=queue-button]").inner_text().strip() == "Run"
        # a small image: the tiny model's size, two steps
        page.evaluate("""() => {
            const widget = (type, name) => app.graph.nodes.find(n => n.type === type).widgets.find(w => w.name === name)
            widget('EmptyLatentImage', 'width').value = 64
            widget('EmptyLatentImage', 'height').value = 64
            widget('KSampler', 'steps').value = 2
        }""")
        before = set((outputs / "comfy" / "output").glob("*.png"))
        page.locator("[data-testid=queue-button]").click()  # Run
        page.wait_for_function("""(() => {
            const images = app.graph.nodes.find(n => n.type === 'SaveImage').imgs
            return images && images.length === 1 && images[0].complete && images[0].naturalWidth > 0
        })()""")
        src = page.evaluate("app.graph.nodes.find(n => n.type === 'SaveImage').imgs[0].src")
        (png,) = set((outputs / "comfy" / "output").glob("*.png")) - before
        assert f"filename={png.name}" in src and "type=output" in src
        # the graph the editor queued, and its own workflow, ride in the PNG (dropped on the editor, it reopens)
        with Image.open(png) as image:
            prompt, workflow = json.loads(image.info["prompt"]), json.loads(image.info["workflow"])
        assert {n["class_type"] for n in prompt.values()} == {n["type"] for n in workflow["nodes"]}
        (sampler,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "KSampler"]
        assert (sampler["steps"], sampler["sampler_name"]) == (2, "euler")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "comfy-editor-run.png"))

        page.locator("#graph-canvas").click(position={"x": 640, "y": 800})  # the canvas has the keyboard
        page.keyboard.press("Control+s")  # the editor asks for a name, and POSTs /userdata/workflows%2F<name>.json
        with page.expect_response(lambda r: "/api/userdata/workflows%2F" in r.url and r.request.method == "POST"):
            page.get_by_role("dialog").get_by_role("textbox").fill("my cat workflow")
            page.keyboard.press("Enter")
        with page.expect_response(lambda r: r.url.endswith("/api/settings/Comfy.Locale")):
            page.evaluate("app.extensionManager.setting.set('Comfy.Locale', 'zh')")  # what the settings panel calls
        assert not problems, problems
    assert (user_folder(server) / "workflows" / "my cat workflow.json").is_file()

    with editor_page(chromium, base, "/comfy/?template=default") as (page, problems):
        page.locator("[data-testid=queue-button]", has_text="运行").wait_for()  # Run, in Chinese
        page.keyboard.press("w")  # the workflows panel
        page.get_by_text("my cat workflow", exact=True).wait_for()
        assert page.get_by_text("工作流").count() > 0
        assert not problems, problems
