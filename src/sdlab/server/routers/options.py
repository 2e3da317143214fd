"""GET/POST /sdapi/v1/options; setting sd_model_checkpoint switches the model, fp8_storage or sd_vae reloads it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Depends, Request

from ..state import ServerState, get_state
from ..worker import Job
from ..waiting import ClientGone, run_job

router = APIRouter(prefix="/sdapi/v1", tags=["options"])


@router.get("/options", response_model=dict[str, Any], summary="Server options")
async def get_options(state: ServerState = Depends(get_state)):
    return state.options()


@router.post("/options", summary="Set options; sd_model_checkpoint loads that checkpoint")
async def set_options(request: Request, body: dict[str, Any] = Body(...), state: ServerState = Depends(get_state)):
    """Options sdlab does not have are ignored, as in the web UI. A new sd_model_checkpoint is
    loaded by the worker between jobs: jobs queued before keep the model they asked for."""
    name = body.get("sd_model_checkpoint")
    entry = state.catalog.find_checkpoint(str(name)) if name is not None else None  # 404 before changing anything
    load_before = state.load_options()
    for key, value in body.items():
        if key != "sd_model_checkpoint":
            state.set_option(key, value)
    if entry is None and state.load_options() != load_before:
        entry = state.selected  # load it again with its weights stored / its VAE as now asked, as the web UI does
    if entry is not None:
        try:
            await run_job(Job("load", entry), state, request)
        except ClientGone:
            pass
        state.selected = entry
    return None
