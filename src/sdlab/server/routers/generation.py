"""POST /sdapi/v1/txt2img and /sdapi/v1/img2img: translate, queue, wait, answer."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..convert import Prepared, echo_parameters, encode_png, info_json, prepare
from ..errors import NoModel
from ..models import Img2ImgRequest, ImageToImageResponse, TextToImageResponse, Txt2ImgRequest
from ..state import ServerState, get_state
from ..worker import Job, JobResult

router = APIRouter(prefix="/sdapi/v1", tags=["generation"])

# How often a waiting handler checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    pass


async def run_job(job: Job, state: ServerState, request: Request) -> JobResult:
    """Queue a job and wait for it; if the client hangs up, cancel the job so the worker
    does not spend minutes on an image nobody will receive. A job that saves its images
    (save_images) runs on: they still have somewhere to go, as in the web UI."""
    state.worker.submit(job)
    waiter = asyncio.wrap_future(job.future)
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
            if done:
                try:
                    return waiter.result()
                except asyncio.CancelledError:  # the worker was stopped (server shutting down)
                    raise NoModel("the server is shutting down; the request was not run") from None
            if await request.is_disconnected():
                if job.save_to is None:
                    job.cancel()
                raise ClientGone()
    except asyncio.CancelledError:
        if job.save_to is None:
            job.cancel()
        raise


async def _generate(body: Txt2ImgRequest | Img2ImgRequest, kind: str, state: ServerState,
                    request: Request) -> dict | Response:
    prep: Prepared = await run_in_threadpool(prepare, body, state)
    if prep.checkpoint is None:
        raise NoModel(f"no model to generate with: put a checkpoint in {state.catalog.root / 'Stable-diffusion'} "
                      "or start the server with --model")
    try:
        # save_images decides alone, as in the web UI's API (it sets do_not_save_samples to its opposite).
        save_to = state.outputs_dir if body.save_images else None
        done = await run_job(Job(kind, prep.checkpoint, prep.request, save_to=save_to), state, request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    def respond() -> dict:
        images = [encode_png(img, text) for img, text in zip(done.result.images, done.result.infotexts)]
        return {"images": images if body.send_images else [], "parameters": echo_parameters(body),
                "info": info_json(done, prep)}

    return await run_in_threadpool(respond)


@router.post("/txt2img", response_model=TextToImageResponse, summary="Text to image")
async def txt2img(body: Txt2ImgRequest, request: Request, state: ServerState = Depends(get_state)):
    """Generate images from a prompt. Runs in the server's queue, one job at a time."""
    return await _generate(body, "txt2img", state, request)


@router.post("/img2img", response_model=ImageToImageResponse, summary="Image to image / inpainting")
async def img2img(body: Img2ImgRequest, request: Request, state: ServerState = Depends(get_state)):
    """Change init_images[0] by the prompt; with a mask (white = repaint), inpaint it."""
    return await _generate(body, "img2img", state, request)
