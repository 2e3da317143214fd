"""POST /sdapi/v1/png-info and GET /sdapi/v1/memory."""

from __future__ import annotations

import os
import resource

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ...infotext import parse_infotext, read_infotext
from ..convert import decode_image
from ..models import MemoryResponse, PNGInfoRequest, PNGInfoResponse
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
