"""GET /sdapi/v1/progress, POST /sdapi/v1/interrupt and /sdapi/v1/skip."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ..images import encode_png
from ..models import ProgressResponse
from ..state import ServerState, get_state

router = APIRouter(prefix="/sdapi/v1", tags=["queue"])


@router.get("/progress", response_model=ProgressResponse, summary="Progress of the running job")
async def progress(skip_current_image: bool = False, state: ServerState = Depends(get_state)):
    snap = state.worker.snapshot()
    current = None
    if snap.preview is not None and not skip_current_image:
        def render() -> str | None:
            img = snap.preview()  # made on demand from the latest denoised latent: cheap, and only when asked
            return encode_png(img, None) if img is not None else None

        current = await run_in_threadpool(render)
    return ProgressResponse(progress=snap.progress, eta_relative=snap.eta_relative, state=snap.state,
                            current_image=current, textinfo=snap.textinfo)


@router.post("/interrupt", summary="Stop the running job at the next step; it returns what it has")
async def interrupt(state: ServerState = Depends(get_state)):
    state.worker.interrupt()
    return {}


@router.post("/skip", summary="End the current batch of the running job and go on with the next")
async def skip(state: ServerState = Depends(get_state)):
    state.worker.skip()
    return {}
