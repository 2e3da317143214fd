"""POST /sdapi/v1/png-info, GET /sdapi/v1/memory and /cmd-flags, the web UI's script and extension
listings (the scripts sdlab runs; no extensions), and POST /sdapi/v1/interrogate (501: no captioning
model)."""

from __future__ import annotations

import os
import resource
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ...infotext import parse_infotext, read_infotext
from ..images import decode_image
from ..errors import NotProvided
from ..models import (ExtensionItem, InterrogateRequest, MemoryResponse, PNGInfoRequest, PNGInfoResponse, ScriptInfo,
                      ScriptsList)
from ..state import ServerState, get_state

router = APIRouter(prefix="/sdapi/v1", tags=["utilities"])


@router.post("/png-info", response_model=PNGInfoResponse, summary="Read an image's generation parameters")
async def png_info(body: PNGInfoRequest, state: ServerState = Depends(get_state)):
    def read() -> PNGInfoResponse:
        img = decode_image(body.image, "image", state.settings.limits)
        info = read_infotext(img) or ""
        items = {k: v for k, v in img.info.items() if k != "parameters" and isinstance(v, (str, int, float))}
        return PNGInfoResponse(info=info, items=items, parameters=parse_infotext(info) if info else {})

    return await run_in_threadpool(read)


@router.post("/interrogate", summary="Caption an image (not implemented: 501)",
             responses={501: {"description": "sdlab has no interrogation model"}})
async def interrogate(body: InterrogateRequest):
    raise NotProvided(f"interrogate (model {body.model!r}) is not implemented by sdlab: it has no CLIP interrogator "
                      "or DeepDanbooru model to caption images with")


@router.get("/cmd-flags", response_model=dict[str, Any], summary="The flags the server was started with")
async def cmd_flags(state: ServerState = Depends(get_state)):
    """Under the web UI's flag names where sdlab has the same setting, then sdlab's own."""
    s = state.settings
    models = state.catalog.models
    return {
        "api": True, "nowebui": False, "api_server_stop": False,
        "listen": s.host == "0.0.0.0", "server_name": s.host, "port": s.port,
        # Whether there is a login, never the credentials (the web UI's own answer carries them).
        "api_auth": "***" if s.api_auth else None,
        "ckpt": s.model, "ckpt_dir": str(models.folder("checkpoint")), "lora_dir": str(models.folder("lora")),
        "embeddings_dir": str(models.folder("embedding")), "vae_dir": str(models.folder("vae")),
        "styles_file": [str(state.styles_file)],
        "models_dir": str(state.catalog.root), "outputs_dir": str(state.outputs_dir),
        "device": s.device, "dtype": s.dtype, "weight_dtype": s.weight_dtype, "compile": s.compile,
        "offload": s.offload,
    }


@router.get("/scripts", response_model=ScriptsList, summary="Script titles")
async def scripts():
    """The scripts sdlab runs by script_name (server/scripts.py), lowercase as the web UI lists
    them, and ControlNet, the always-on script of alwayson_scripts."""
    from ..scripts import script_lists

    return ScriptsList(**script_lists())


@router.get("/script-info", response_model=list[ScriptInfo], summary="Scripts and their arguments")
async def script_info(state: ServerState = Depends(get_state)):
    """Each script on each tab with its arguments in script_args order (label, value, minimum,
    maximum, step, choices), as the web UI's ScriptInfo."""
    from ..scripts import script_info

    return script_info(state.settings.control_net_unit_count)


@router.get("/extensions", response_model=list[ExtensionItem], summary="Installed extensions")
async def extensions():
    return []


@router.get("/memory", response_model=MemoryResponse, summary="Memory use")
async def memory():
    return MemoryResponse(ram=_ram(), cuda=_cuda())


def _ram() -> dict:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return {"error": "unavailable"}
    used = _rss()
    return {"free": total - used, "used": used, "total": total}


def _rss() -> int:
    # Resident set size of this process: /proc when there is one, else the peak from getrusage.
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda() -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"error": "unavailable"}
    free, total = torch.cuda.mem_get_info()
    s = torch.cuda.memory_stats()
    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": {"current": s.get("active_bytes.all.current", 0), "peak": s.get("active_bytes.all.peak", 0)},
        "allocated": {"current": s.get("allocated_bytes.all.current", 0), "peak": s.get("allocated_bytes.all.peak", 0)},
        "reserved": {"current": s.get("reserved_bytes.all.current", 0), "peak": s.get("reserved_bytes.all.peak", 0)},
        "inactive": {"current": s.get("inactive_split_bytes.all.current", 0),
                     "peak": s.get("inactive_split_bytes.all.peak", 0)},
        "events": {"retries": s.get("num_alloc_retries", 0), "oom": s.get("num_ooms", 0)},
    }
