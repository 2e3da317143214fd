"""ComfyUI's routes (server.py PromptServer), registered at the root and again under /api as
ComfyUI does. Bodies are read raw, whatever their Content-Type: ComfyUI's own examples post
form-encoded JSON and several clients send none."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import platform
import sys
import time
import uuid
from pathlib import Path

from fastapi import APIRouter, Request, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response

from ..._version import __version__
from .graph import validate_prompt
from .registry import NODES, node_info
from .state import ComfyState, QueueItem, strip_sensitive

log = logging.getLogger(__name__)

# ComfyUI's model folder names -> sdlab's model kinds (models_dir.KINDS).
MODEL_FOLDERS = {"checkpoints": "checkpoint", "loras": "lora", "vae": "vae", "embeddings": "embedding"}


def comfy(request: Request | WebSocket) -> ComfyState:
    return request.app.state.sdlab.comfy


async def read_json(request: Request):
    raw = await request.body()
    if not raw.strip():
        return {}
    return json.loads(raw)


async def _clear_or_delete(request: Request, clear, delete) -> Response:
    """ComfyUI's POST /queue and /history body: `{"clear": true}` and / or `{"delete": [ids]}`."""
    try:
        body = await read_json(request)
    except (ValueError, UnicodeDecodeError) as e:
        return _bad_json(e)
    if isinstance(body, dict):
        if body.get("clear"):
            clear()
        if isinstance(body.get("delete"), list):
            delete([str(p) for p in body["delete"]])
    return Response(status_code=200)


def _bad_json(e: Exception) -> JSONResponse:
    return JSONResponse({"error": {"type": "invalid_prompt", "message": f"Invalid JSON body: {e}", "details": str(e),
                                   "extra_info": {}}, "node_errors": {}}, status_code=400)


def make_router() -> APIRouter:
    router = APIRouter(tags=["comfyui"], include_in_schema=False)

    @router.get("/prompt")
    async def get_prompt(request: Request):
        return {"exec_info": {"queue_remaining": comfy(request).queue_remaining()}}

    @router.post("/prompt")
    async def post_prompt(request: Request):
        state = comfy(request)
        try:
            body = await read_json(request)
        except (ValueError, UnicodeDecodeError) as e:
            return _bad_json(e)
        if not isinstance(body, dict):
            return _bad_json(ValueError("the body must be a JSON object"))
        number = state.next_number(body.get("number"), bool(body.get("front")))
        if "prompt" not in body:
            return JSONResponse({"error": {"type": "no_prompt", "message": "No prompt provided",
                                           "details": "No prompt provided", "extra_info": {}}, "node_errors": {}},
                                status_code=400)
        prompt = body["prompt"]
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        targets = body.get("partial_execution_targets")
        valid, error, outputs, node_errors = await run_in_threadpool(validate_prompt, prompt, state.env,
                                                                     targets if isinstance(targets, list) else None)
        extra_data = body.get("extra_data") if isinstance(body.get("extra_data"), dict) else {}
        if "client_id" in body:
            extra_data["client_id"] = body["client_id"]
        if not valid:
            return JSONResponse({"error": error, "node_errors": node_errors}, status_code=400)
        extra_data["create_time"] = int(time.time() * 1000)
        state.enqueue(QueueItem(number, prompt_id, prompt, strip_sensitive(extra_data), outputs))
        return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}

    @router.get("/queue")
    async def get_queue(request: Request):
        return comfy(request).queue()

    @router.post("/queue")
    async def post_queue(request: Request):
        state = comfy(request)
        return await _clear_or_delete(request, state.clear, state.delete)

    @router.post("/interrupt")
    async def interrupt(request: Request):
        try:
            body = await read_json(request)
        except (ValueError, UnicodeDecodeError):
            body = {}
        prompt_id = body.get("prompt_id") if isinstance(body, dict) else None
        comfy(request).interrupt(prompt_id)
        return Response(status_code=200)

    @router.post("/free")
    async def free(request: Request):
        try:
            body = await read_json(request)
        except (ValueError, UnicodeDecodeError):
            body = {}
        if isinstance(body, dict) and (body.get("free_memory") or body.get("unload_models")):
            comfy(request).cache.clear()
        return Response(status_code=200)

    @router.get("/history")
    async def get_history(request: Request, max_items: int | None = None, offset: int = -1):
        return comfy(request).get_history(None, max_items, offset)

    @router.get("/history/{prompt_id}")
    async def get_history_item(request: Request, prompt_id: str):
        return comfy(request).get_history(prompt_id)

    @router.post("/history")
    async def post_history(request: Request):
        state = comfy(request)
        return await _clear_or_delete(request, lambda: state.delete_history(None), state.delete_history)

    @router.get("/object_info")
    async def object_info(request: Request):
        env = comfy(request).env
        return await run_in_threadpool(lambda: {name: node_info(name, cls, env) for name, cls in NODES.items()})

    @router.get("/object_info/{node_class}")
    async def object_info_one(request: Request, node_class: str):
        cls = NODES.get(node_class)
        if cls is None:
            return {}
        return {node_class: node_info(node_class, cls, comfy(request).env)}

    @router.get("/view")
    async def view(request: Request, filename: str | None = None, type: str | None = None,
                   subfolder: str | None = None, preview: str | None = None, channel: str | None = None):
        state = comfy(request)
        if not filename:
            return Response(status_code=404)
        kind = type or "output"
        for k in ("output", "input", "temp"):
            if filename.endswith(f" [{k}]"):
                filename, kind = filename[: -len(k) - 3], k
        if not filename or filename[0] in "/\\" or ".." in filename or "\x00" in filename:
            return Response(status_code=400)
        if kind not in ("output", "input", "temp"):
            return Response(status_code=400)
        folder = state.folder(kind).resolve()
        if subfolder:
            folder = state.inside(kind, subfolder)
            if folder is None:
                return Response(status_code=403)
        path = folder / os.path.basename(filename.replace("\\", "/"))
        if not path.resolve().is_relative_to(state.folder(kind).resolve()):
            return Response(status_code=403)
        if not path.is_file():
            return Response(status_code=404)
        if not preview and channel in (None, "rgba"):
            return FileResponse(path, headers={"Content-Disposition": f'filename="{path.name}"'})
        return await run_in_threadpool(_converted, path, preview, channel)

    @router.post("/upload/image")
    async def upload_image(request: Request):
        return await _upload(request, comfy(request))

    @router.post("/upload/mask")
    async def upload_mask(request: Request):
        return await _upload(request, comfy(request), mask=True)

    @router.get("/system_stats")
    async def system_stats(request: Request):
        return await run_in_threadpool(_system_stats, request)

    @router.get("/features")
    async def features(request: Request):
        return _server_features(request)

    @router.get("/embeddings")
    async def embeddings(request: Request):
        return [e.name for e in comfy(request).server.catalog.embeddings()]

    @router.get("/models")
    async def models(request: Request):
        return list(MODEL_FOLDERS)

    @router.get("/models/{folder}")
    async def models_folder(request: Request, folder: str):
        kind = MODEL_FOLDERS.get(folder)
        if kind is None:
            return Response(status_code=404)
        listing = comfy(request).server.catalog.models.list(kind)
        return [m.name + (m.path.suffix if m.path.is_file() else "") for m in listing]

    @router.get("/jobs")
    async def jobs(request: Request, status: str | None = None, limit: int = 200, offset: int = 0):
        items = comfy(request).jobs()
        if status:
            wanted = set(status.split(","))
            items = [j for j in items if j["status"] in wanted]
        items.sort(key=lambda j: j["create_time"], reverse=True)
        page = items[offset:offset + limit]
        return {"jobs": page, "pagination": {"offset": offset, "limit": limit, "total": len(items),
                                             "has_more": offset + len(page) < len(items)}}

    @router.get("/jobs/{job_id}")
    async def job(request: Request, job_id: str):
        state = comfy(request)
        found = next((j for j in state.jobs() if j["id"] == job_id), None)
        if found is None:
            return JSONResponse({"error": "Job not found"}, status_code=404)
        entry = state.get_history(job_id).get(job_id)
        if entry is not None:
            found = {**found, "outputs": entry["outputs"], "execution_status": entry["status"],
                     "workflow": {"prompt": entry["prompt"][2], "extra_data": entry["prompt"][3]}}
        return found

    @router.websocket("/ws")
    async def websocket(ws: WebSocket):
        await _websocket(ws, comfy(ws))

    return router


def _server_features(request) -> dict:
    limit = request.app.state.sdlab.settings.limits.max_upload_bytes
    return {"supports_preview_metadata": False, "max_upload_size": limit}


async def _websocket(ws: WebSocket, state: ComfyState) -> None:
    await ws.accept()
    sid = ws.query_params.get("clientId") or uuid.uuid4().hex
    queue = state.hub.connect(sid)

    async def sender():
        while True:
            message = await queue.get()
            if isinstance(message, bytes):  # a preview frame
                await ws.send_bytes(message)
            else:
                await ws.send_text(message)

    task = asyncio.create_task(sender())
    queue.put_nowait(json.dumps({"type": "status", "data": {"status": state.status(), "sid": sid}}))
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text:
                try:
                    data = json.loads(text)
                except ValueError:
                    continue
                if isinstance(data, dict) and data.get("type") == "feature_flags":
                    queue.put_nowait(json.dumps({"type": "feature_flags", "data": _server_features(ws)}))
    except WebSocketDisconnect:
        pass
    finally:
        state.hub.disconnect(sid, queue)
        task.cancel()


def _converted(path, preview: str | None, channel: str | None) -> Response:
    from PIL import Image

    with Image.open(path) as img:
        img.load()
    if channel == "rgb":
        img = img.convert("RGB")
    elif channel == "a":
        alpha = img.getchannel("A") if "A" in img.getbands() else Image.new("L", img.size, 255)
        img = Image.merge("RGBA", (alpha, alpha, alpha, alpha))
    buf = io.BytesIO()
    if preview:
        fmt, _, quality = preview.partition(";")
        fmt = "jpeg" if fmt.lower() in ("jpeg", "jpg") else "webp"
        q = int(quality) if quality.isdigit() else 90
        (img.convert("RGB") if fmt == "jpeg" else img).save(buf, format=fmt.upper(), quality=q)
        media = f"image/{fmt}"
    else:
        img.save(buf, format="PNG")
        media = "image/png"
    return Response(buf.getvalue(), media_type=media, headers={"Content-Disposition": f'filename="{path.name}"'})


async def _upload(request: Request, state: ComfyState, mask: bool = False) -> Response:
    """ComfyUI's image_upload: the file written into input (or `type`) / `subfolder` under its
    own name, the same bytes again not written twice, another file of that name renamed
    `name (1).ext`. `mask` (POST /upload/mask): what is written is the image named by
    `original_ref` ({filename, subfolder, type}) with the upload's alpha channel as its alpha, its
    PNG text chunks kept (the editor's mask painter)."""
    try:
        form = await request.form()
    except Exception:  # noqa: BLE001 - not a multipart body
        return Response(status_code=400)
    image = form.get("image")
    if image is None or not hasattr(image, "read") or not image.filename:
        return Response(status_code=400)
    kind = form.get("type") or "input"
    if kind not in ("input", "output", "temp"):
        kind = "input"
    subfolder = str(form.get("subfolder") or "")
    overwrite = str(form.get("overwrite") or "") in ("true", "1")
    data = await image.read()
    folder = state.inside(kind, os.path.normpath(subfolder)) if subfolder else state.folder(kind).resolve()
    filename = image.filename
    if folder is None or "\x00" in filename:
        return Response(status_code=400)
    path = (folder / filename).resolve()
    base = state.folder(kind).resolve()
    if not path.is_relative_to(base) or path.parent != folder.resolve():
        return Response(status_code=400)
    original = None
    if mask:
        original = _mask_original(state, form.get("original_ref"))
        if isinstance(original, Response):
            return original
    limit = request.app.state.sdlab.settings.limits.max_image_pixels

    def write() -> str | Response:
        nonlocal path
        folder.mkdir(parents=True, exist_ok=True)
        name = filename
        stem, ext = os.path.splitext(filename)
        if not overwrite:
            i = 1
            while path.exists():
                if path.is_file() and path.read_bytes() == data:
                    return name  # the same upload again: not written twice
                name = f"{stem} ({i}){ext}"
                path = folder / name
                i += 1
        tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
        try:
            if original is None:
                tmp.write_bytes(data)
            else:
                refused = _write_with_alpha(original, data, tmp, limit)
                if refused is not None:
                    return refused
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return name

    name = await run_in_threadpool(write)
    if isinstance(name, Response):
        return name
    return JSONResponse({"name": name, "subfolder": subfolder, "type": kind})


def _mask_original(state: ComfyState, ref) -> Path | Response:
    """The file `original_ref` names, inside its folder; 400 for a malformed or leading-outside
    reference (ComfyUI's checks: a leading "/" or ".." in the name), 403 for a subfolder outside,
    404 when there is no such file (ComfyUI answers 200 and writes nothing)."""
    try:
        ref = json.loads(str(ref))
    except (TypeError, ValueError):
        return PlainTextResponse("original_ref must be JSON: {\"filename\", \"subfolder\", \"type\"}", 400)
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        return PlainTextResponse("original_ref needs a filename", 400)
    filename, kind = ref["filename"], ref.get("type") or "output"
    for k in ("output", "input", "temp"):
        if filename.endswith(f" [{k}]"):
            filename, kind = filename[: -len(k) - 3], k
    if not filename or filename[0] in "/\\" or ".." in filename or "\x00" in filename or kind not in (
            "output", "input", "temp"):
        return PlainTextResponse("original_ref: a file name inside output, input or temp", 400)
    subfolder = str(ref.get("subfolder") or "")
    folder = state.inside(kind, subfolder) if subfolder else state.folder(kind).resolve()
    if folder is None:
        return Response(status_code=403)
    path = (folder / filename).resolve()
    if not path.is_relative_to(state.folder(kind).resolve()):
        return Response(status_code=403)
    if not path.is_file():
        return PlainTextResponse(f"original_ref: no {kind} image {ref['filename']!r}", 404)
    return path


def _write_with_alpha(original: Path, upload: bytes, out: Path, max_pixels: int) -> Response | None:
    """The original image as RGBA with the upload's alpha (its RGBA conversion's), its PNG text
    chunks kept, saved as ComfyUI saves it (PNG compress level 4)."""
    from PIL import Image, PngImagePlugin, UnidentifiedImageError

    try:
        with Image.open(original) as img, Image.open(io.BytesIO(upload)) as painted:
            if max(img.width * img.height, painted.width * painted.height) > max_pixels:
                return PlainTextResponse(f"an image over {max_pixels} pixels; refused", 413)
            if painted.size != img.size:
                return PlainTextResponse(f"the mask is {painted.width}x{painted.height} and the original image "
                                         f"{img.width}x{img.height}; they must be the same size", 400)
            meta = PngImagePlugin.PngInfo()
            for key, value in getattr(img, "text", {}).items():
                meta.add_text(key, value)
            result = img.convert("RGBA")
            result.putalpha(painted.convert("RGBA").getchannel("A"))
        result.save(out, format="PNG", compress_level=4, pnginfo=meta)
    except Image.DecompressionBombError:
        return PlainTextResponse(f"an image over {max_pixels} pixels; refused", 413)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return PlainTextResponse(f"not an image: {e}", 400)
    return None


def _system_stats(request: Request) -> dict:
    import torch

    ram_total = ram_free = 0
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        ram_total = pages * size
        ram_free = os.sysconf("SC_AVPHYS_PAGES") * size
    except (ValueError, OSError, AttributeError):
        pass
    devices = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            devices.append({"name": f"cuda:{i} {torch.cuda.get_device_name(i)}", "type": "cuda", "index": i,
                            "vram_total": total, "vram_free": free, "torch_vram_total": total,
                            "torch_vram_free": free})
    else:
        devices.append({"name": "cpu", "type": "cpu", "index": None, "vram_total": ram_total,
                        "vram_free": ram_free, "torch_vram_total": ram_total, "torch_vram_free": ram_free})
    return {"system": {"os": os.name, "ram_total": ram_total, "ram_free": ram_free,
                       "comfyui_version": f"sdlab {__version__}", "required_frontend_version": "",
                       "installed_templates_version": "", "required_templates_version": "",
                       "python_version": sys.version, "pytorch_version": torch.__version__,
                       "embedded_python": False, "argv": list(sys.argv), "platform": platform.platform()},
            "devices": devices}
