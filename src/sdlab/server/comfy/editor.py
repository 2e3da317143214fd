"""ComfyUI's official editor at /comfy/: the `comfyui-frontend-package` (the `comfy` extra) served
as static files, and the routes it calls that the API itself does not have: users, settings,
user files (saved workflows), extensions, i18n, templates (docs/comfyui.md, "The editor").

The frontend takes its API base from the page's path, `location.pathname` less its last segment
(src/scripts/api.ts `api_base`), so at /comfy/ it calls /comfy/api/..., /comfy/ws and
/comfy/templates/...: app.py includes the API routers under /comfy and /comfy/api as well as at
the root and /api. The page must be opened with its trailing slash; /comfy redirects there.

The user's files live where ComfyUI keeps them, in a `user/default/` folder (here under
`<outputs>/comfy/`): settings in `comfy.settings.json`, workflows in `workflows/NAME.json`. Sources:
ComfyUI's app/user_manager.py, app/app_settings.py, app/frontend_management.py, server.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import mimetypes
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path
from urllib.parse import unquote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response

from .routes import MODEL_FOLDERS, comfy, read_json

log = logging.getLogger(__name__)

FRONTEND_PACKAGE = "comfyui_frontend_package"
NOT_INSTALLED = 'ComfyUI\'s editor is not installed: pip install "sdlab[comfy]", then restart sdlab serve.'
TEMPLATES_DIR = Path(__file__).resolve().parent / "templates"
SETTINGS_FILE = "comfy.settings.json"  # ComfyUI's name, so a user's file can be copied across
# The template browser's one entry; titles by locale (index.<locale>.json), English otherwise.
TEMPLATE_TITLES = {"en": ("Getting started", "Text to image (SD 1.x)"),
                   "zh": ("入门", "文生图 (SD 1.x)")}
TEMPLATE_DESCRIPTIONS = {"en": "The classic graph: load the server's model, encode two prompts, sample, decode, save.",
                         "zh": "经典流程：加载服务器的模型，编码正反两个提示词，采样，解码，保存。"}
# Settings that differ from the editor's defaults until the user sets them: release notes are
# ComfyUI's, fetched from api.comfy.org, and say nothing about sdlab.
SETTING_DEFAULTS = {"Comfy.Notification.ShowVersionUpdates": False}
# Settings answered whatever the editor writes. With the tutorial "completed", a browser with no
# workflow of its own opens the editor's default graph, ComfyUI's Z-Image, whose nodes and models
# sdlab does not have; "not completed", it opens a blank graph and the template browser, which
# lists sdlab's SD graph.
SETTING_OVERRIDES = {"Comfy.TutorialCompleted": False}
# Files the editor reads at every start, and what they hold until the user saves one: the page's
# own stylesheet, the legacy node templates and the bookmarked workflows (ComfyUI answers 404,
# which the editor reads as these).
BOOT_FILES = {"user.css": ("text/css", b""), "comfy.templates.json": ("application/json", b"[]"),
              "workflows/.index.json": ("application/json", b'{"favorites": []}')}
# A module script served with another type is refused by the browser (ComfyUI forces these too).
SCRIPT_TYPES = {".js": "application/javascript; charset=utf-8", ".mjs": "application/javascript; charset=utf-8"}


def frontend_root() -> Path | None:
    """The frontend package's `static` folder, found as ComfyUI finds it
    (FrontendManager.default_frontend_path); None without the extra."""
    if importlib.util.find_spec(FRONTEND_PACKAGE) is None:
        return None
    root = Path(str(resources.files(FRONTEND_PACKAGE) / "static"))
    return root if (root / "index.html").is_file() else None


# -- the user's files -----------------------------------------------------------------------


class UserFiles:
    """One user's folder (ComfyUI's user/default/). Paths given by a client are resolved inside it
    or refused; every write goes to a temporary file in the same folder, renamed into place, so a
    reader sees the old file or the new one, never part of one."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, relative: str) -> Path | None:
        """`relative` inside the folder, or None if it leads outside (.., an absolute path, NUL)."""
        if "\x00" in relative:
            return None
        base = self.root.resolve()
        path = (base / relative).resolve()
        return path if path.is_relative_to(base) else None

    def write(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A dot name: hidden from the listings while it exists.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def info(self, path: Path) -> dict:
        """ComfyUI's FileInfo: the path relative to the user folder, size, times in ms."""
        st = path.stat()
        return {"path": self.relative(path), "size": st.st_size, "modified": int(st.st_mtime * 1000),
                "created": int(st.st_ctime * 1000)}

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root.resolve()).as_posix()

    def files(self, folder: Path, recurse: bool) -> list[Path]:
        """The files of `folder` (and below it with `recurse`), as ComfyUI's glob lists them:
        names starting with a dot are left out."""
        found = folder.rglob("*") if recurse else folder.glob("*")
        return sorted(p for p in found if p.is_file()
                      and not any(part.startswith(".") for part in p.relative_to(folder).parts))

    # settings: one JSON object in comfy.settings.json, over SETTING_DEFAULTS
    def settings(self) -> dict:
        return {**SETTING_DEFAULTS, **self.saved_settings(), **SETTING_OVERRIDES}

    def saved_settings(self) -> dict:
        path = self.root / SETTINGS_FILE
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError:
            log.warning("%s is not JSON; the editor starts from its defaults", path)
            return {}
        return value if isinstance(value, dict) else {}

    def update_settings(self, changes: dict) -> None:
        # Called from the event loop with no await between the read and the write, so two
        # requests changing different settings cannot lose one another's change.
        kept = {k: v for k, v in {**self.saved_settings(), **changes}.items() if k not in SETTING_OVERRIDES}
        self.write(self.root / SETTINGS_FILE, json.dumps(kept, indent=4, ensure_ascii=False).encode("utf-8"))


def user_files(request: Request) -> UserFiles:
    return UserFiles(comfy(request).root / "user" / "default")


def _userdata_names(request: Request) -> tuple[str, str | None]:
    """The file (and the move's destination) of /userdata/{file}[/move/{dest}]. The editor
    URL-encodes each name whole (`workflows%2Fa.json`), and the server has already decoded the
    path, so the names are split on the raw path, where "/move/" is the one unencoded separator."""
    raw = (request.scope.get("raw_path") or b"").decode("latin-1").split("?", 1)[0]
    if "/userdata/" not in raw:  # "/userdata%2F...": only the decoded path has the route's slash
        raw = request.url.path
    source, sep, dest = raw.split("/userdata/", 1)[1].partition("/move/")
    return unquote(source), (unquote(dest) if sep else None)


def _user_path(files: UserFiles, name: str, *, folder_ok: bool = True) -> Path | Response:
    """The path of a user file, or the answer that refuses it: 400 for no name, 403 for a name
    outside the user folder (and, where `folder_ok` is false, for the user folder itself)."""
    path = files.path(name) if name else None
    if path is None or (not folder_ok and path == files.root.resolve()):
        return Response(status_code=403 if name else 400)
    return path


def _flag(request: Request, name: str, default: bool) -> bool:
    value = request.query_params.get(name)
    return default if value is None else value.lower() == "true"


async def _json_body(request: Request):
    """The body as JSON whatever its Content-Type (the editor posts settings as text/plain);
    a 400 response if it is not JSON."""
    try:
        return await read_json(request)
    except (ValueError, UnicodeDecodeError) as e:
        return JSONResponse({"error": f"the body is not JSON: {e}"}, status_code=400)


# -- the routes -------------------------------------------------------------------------------


def make_router() -> APIRouter:
    """The editor's boot routes; included at the root, /api, /comfy and /comfy/api beside the API."""
    router = APIRouter(tags=["comfyui editor"], include_in_schema=False)

    @router.get("/users")
    async def users(request: Request):
        # One user: no `users` key, so the editor shows no login screen.
        return {"storage": "server", "migrated": user_files(request).root.is_dir()}

    @router.post("/users")
    async def add_user(request: Request):
        return JSONResponse({"error": "sdlab serves one user; there are no user profiles to add"}, status_code=400)

    @router.get("/settings")
    async def get_settings(request: Request):
        return user_files(request).settings()

    @router.post("/settings")
    async def post_settings(request: Request):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        if not isinstance(body, dict):
            return JSONResponse({"error": "POST /settings takes a JSON object of setting id -> value"},
                                status_code=400)
        user_files(request).update_settings(body)
        return Response(status_code=200)

    @router.get("/settings/{setting_id}")
    async def get_setting(request: Request, setting_id: str):
        return JSONResponse(user_files(request).settings().get(setting_id))

    @router.post("/settings/{setting_id}")
    async def post_setting(request: Request, setting_id: str):
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        user_files(request).update_settings({setting_id: body})
        return Response(status_code=200)

    @router.get("/userdata")
    async def list_userdata(request: Request):
        files = user_files(request)
        directory = request.query_params.get("dir", "")
        if not directory:
            return PlainTextResponse("Directory not provided", status_code=400)
        folder = files.path(directory)
        if folder is None:
            return PlainTextResponse("Invalid directory", status_code=403)
        if not folder.exists():
            return []  # not made yet: nothing saved there (ComfyUI's 404, which the editor reads as [])
        if not folder.is_dir():
            return PlainTextResponse("Not a directory", status_code=400)
        full_info, split = _flag(request, "full_info", False), _flag(request, "split", False)
        out = []
        for path in files.files(folder, _flag(request, "recurse", False)):
            if full_info:
                out.append({**files.info(path), "path": path.relative_to(folder).as_posix()})
            else:
                rel = path.relative_to(folder).as_posix()
                out.append([rel, *rel.split("/")] if split else rel)
        return out

    @router.get("/v2/userdata")
    async def list_userdata_v2(request: Request):
        files = user_files(request)
        relative = request.query_params.get("path", "")
        folder = files.path(relative)
        if folder is None:
            return PlainTextResponse("Invalid path requested", status_code=400)
        if not folder.exists():
            return [] if not relative else PlainTextResponse("Requested path not found", status_code=404)
        if not folder.is_dir():
            return PlainTextResponse("Requested path is not a directory", status_code=400)
        out = []
        for path in sorted(folder.rglob("*")):
            entry = {"name": path.name, "path": files.relative(path),
                     "type": "directory" if path.is_dir() else "file"}
            if path.is_file():
                st = path.stat()
                entry.update(size=st.st_size, modified=st.st_mtime)
            out.append(entry)
        out.sort(key=lambda e: (e["type"] != "directory", e["name"].lower()))
        return out

    @router.get("/userdata/{file:path}")
    async def get_userdata(request: Request):
        files = user_files(request)
        name, _ = _userdata_names(request)
        path = _user_path(files, name)
        if isinstance(path, Response):
            return path
        if not path.is_file():
            if name in BOOT_FILES:
                media, empty = BOOT_FILES[name]
                return Response(empty, media_type=media)
            return Response(status_code=404)
        # User files are arbitrary content: downloaded, never rendered in the editor's origin
        # (ComfyUI's guard against stored XSS); user.css is the one file meant to apply.
        if path == files.path("user.css"):
            return FileResponse(path, media_type="text/css", headers={"X-Content-Type-Options": "nosniff"})
        media = "application/json" if path.suffix.lower() == ".json" else "application/octet-stream"
        return FileResponse(path, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                             "Content-Disposition": "attachment"})

    @router.post("/userdata/{file:path}")
    async def post_userdata(request: Request):
        files = user_files(request)
        name, dest_name = _userdata_names(request)
        path = _user_path(files, name, folder_ok=False)
        if isinstance(path, Response):
            return path
        overwrite, full_info = _flag(request, "overwrite", True), _flag(request, "full_info", False)
        if dest_name is not None:  # /userdata/{file}/move/{dest}
            dest = _user_path(files, dest_name, folder_ok=False)
            if isinstance(dest, Response):
                return dest
            if not path.is_file():
                return Response(status_code=404)
            if not overwrite and dest.exists():
                return PlainTextResponse("File already exists", status_code=409)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, dest)
            path = dest
        else:
            if not overwrite and path.exists():
                return PlainTextResponse("File already exists", status_code=409)
            body = await request.body()
            try:
                files.write(path, body)
            except OSError as e:
                log.warning("cannot save %s: %s", path, e)
                return PlainTextResponse(f"Cannot save {name!r}: {e.strerror}; choose another name",
                                         status_code=400)
        return files.info(path) if full_info else files.relative(path)

    @router.delete("/userdata/{file:path}")
    async def delete_userdata(request: Request):
        files = user_files(request)
        name, _ = _userdata_names(request)
        path = _user_path(files, name)
        if isinstance(path, Response):
            return path
        if not path.is_file():
            return Response(status_code=404)
        path.unlink()
        return Response(status_code=204)

    # What sdlab has none of: custom-node scripts, their translations, their templates, and
    # global subgraph blueprints. The editor's own core extensions and locales are bundled.
    @router.get("/extensions")
    async def extensions():
        return []

    @router.get("/i18n")
    async def i18n():
        return {}

    @router.get("/workflow_templates")
    async def workflow_templates():
        return {}

    @router.get("/global_subgraphs")
    async def global_subgraphs():
        return {}

    @router.get("/global_subgraphs/{subgraph_id}")
    async def global_subgraph(subgraph_id: str):
        return JSONResponse({"error": f"no global subgraph {subgraph_id!r}: sdlab has none"}, status_code=404)

    @router.get("/internal/folder_paths")
    async def folder_paths(request: Request):
        # the missing-models notice says where to put a file (ComfyUI's internal_routes.py)
        models = comfy(request).server.catalog.models
        return {folder: [str(models.folder(kind).resolve())] for folder, kind in MODEL_FOLDERS.items()}

    @router.get("/experiment/models")
    async def model_folders(request: Request):
        return [{"name": folder, "folders": paths} for folder, paths in (await folder_paths(request)).items()]

    @router.get("/experiment/models/{folder}")
    async def model_files(request: Request, folder: str):
        kind = MODEL_FOLDERS.get(folder)
        if kind is None:
            return Response(status_code=404)
        out = []
        for m in comfy(request).server.catalog.models.list(kind):
            st = m.path.stat()
            out.append({"name": m.name + (m.path.suffix if m.path.is_file() else ""), "pathIndex": 0,
                        "modified": st.st_mtime, "created": st.st_ctime, "size": m.size})
        return out

    return router


def make_page_router() -> APIRouter:
    """The editor's files at /comfy/ and its templates at /comfy/templates/. Included after every
    /comfy/api route, since /comfy/{path} would match those paths too."""
    router = APIRouter(tags=["comfyui editor"], include_in_schema=False)
    root = frontend_root()

    @router.get("/comfy")
    async def without_slash(request: Request):
        # The frontend's API base is the page's folder: without the slash it would be the site root.
        return RedirectResponse(request.url.replace(path="/comfy/"), status_code=307)

    # The editor names its favicon and a few images from the site root (/assets/...), not from
    # its own folder; those are served there too.
    @router.get("/assets/favicon.ico")
    async def root_favicon():
        return _static_file(root, "assets/favicon.ico")

    @router.get("/assets/images/{path:path}")
    async def root_images(path: str):
        return _static_file(root, f"assets/images/{path}")

    @router.get("/comfy/user.css")
    async def site_css():
        # Linked by the editor's index.html beside api/userdata/user.css; sdlab has no site style.
        return Response(b"", media_type="text/css")

    @router.get("/comfy/templates/{name}")
    async def template(request: Request, name: str):
        if name == "index_logo.json":
            return {}
        if name.startswith("index") and name.endswith(".json"):
            locale = name[len("index."):-len(".json")] if name != "index.json" else "en"
            return _template_index(locale)
        if name == "default.json":
            return _default_template(request)
        file = (TEMPLATES_DIR / name).resolve()
        if file.parent != TEMPLATES_DIR or not file.is_file():  # the thumbnail; nothing else is there
            return PlainTextResponse(f"no template file {name!r}; sdlab ships one template: default",
                                     status_code=404)
        return FileResponse(file, media_type=mimetypes.guess_type(file.name)[0] or "application/octet-stream")

    @router.api_route("/comfy/{path:path}", methods=["GET", "HEAD"])
    async def files(path: str):
        return _static_file(root, path or "index.html")

    return router


def _static_file(root: Path | None, relative: str) -> Response:
    """A file of the frontend package, confined to its folder."""
    if root is None:
        return PlainTextResponse(NOT_INSTALLED, status_code=404)
    base = root.resolve()
    file = (base / relative).resolve()
    if not file.is_relative_to(base) or not file.is_file():
        return PlainTextResponse(f"not found: {relative}", status_code=404)
    if file == base / "index.html":  # names the hashed bundle of the installed version: always re-read
        return FileResponse(file, media_type="text/html", headers={"Cache-Control": "no-cache"})
    media = SCRIPT_TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
    return FileResponse(file, media_type=media)


def _template_index(locale: str) -> list[dict]:
    """templates/index.json as the template browser reads it: one category, one template."""
    category, title = TEMPLATE_TITLES.get(locale, TEMPLATE_TITLES["en"])
    description = TEMPLATE_DESCRIPTIONS.get(locale, TEMPLATE_DESCRIPTIONS["en"])
    return [{"moduleName": "default", "category": "GettingStarted", "title": category, "type": "image",
             "isEssential": True,
             "templates": [{"name": "default", "title": title, "description": description, "mediaType": "image",
                            "mediaSubtype": "svg", "tags": ["Text to Image", "Image"], "models": ["SD1.5"],
                            "openSource": True}]}]


def _default_template(request: Request) -> dict:
    """templates/default.json with its checkpoint replaced by the one the server has selected (or
    the folder's first), so the graph runs as it opens."""
    workflow = json.loads((TEMPLATES_DIR / "default.json").read_text(encoding="utf-8"))
    server = comfy(request).server
    entry = server.selected or next(iter(server.catalog.checkpoints()), None)
    if entry is not None:
        for node in workflow["nodes"]:
            if node["type"] == "CheckpointLoaderSimple":
                node["widgets_values"][0] = entry.name
    return workflow
