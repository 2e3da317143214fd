"""POST /sdapi/v1/txt2img and /sdapi/v1/img2img: translate, queue, wait, answer."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from ..convert import Prepared, echo_parameters, info_json, prepare
from ..images import encode_png
from ..errors import NoModel
from ..models import Img2ImgRequest, ImageToImageResponse, TextToImageResponse, Txt2ImgRequest
from ..state import ServerState, get_state
from ..waiting import ClientGone, run_job
from ..worker import Job

router = APIRouter(prefix="/sdapi/v1", tags=["generation"])

async def _generate(body: Txt2ImgRequest | Img2ImgRequest, kind: str, state: ServerState,
                    request: Request) -> dict | Response:
    from ..run_scripts import run_script

    if body.script_name not in (None, "", "None"):  # the web UI's scripts: one job of many (server/scripts.py)
        return await run_script(body, kind, state, request)
    prep: Prepared = await run_in_threadpool(prepare, body, state)
    if prep.checkpoint is None:
        raise NoModel(f"no model to generate with: put a checkpoint in {state.catalog.root / 'Stable-diffusion'} "
                      "or start the server with --model")
    try:
        # save_images decides alone, as in the web UI's API (it sets do_not_save_samples to its opposite).
        save_to = state.outputs_dir if body.save_images else None
        done = await run_job(Job(kind, prep.checkpoint, prep.request, save_to=save_to, options=prep.load_options), state, request)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    def respond() -> dict:
        images = [encode_png(img, text) for img, text in zip(done.result.images, done.result.infotexts)]
        # ControlNet's detected maps after the images, as the extension appends them.
        images += [encode_png(m, None) for m, keep in zip(done.result.detected_maps, prep.control_maps) if keep]
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
