"""sd-webui-controlnet's routes: /controlnet/version, model_list, module_list, settings and detect
(the extension's `scripts/api.py`). Units in generation requests are `server/controlnet.py`'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel

from ...errors import SdlabError
from ..controlnet import API_VERSION, model_titles
from ..errors import Unsupported
from ..state import ServerState, get_state

router = APIRouter(prefix="/controlnet", tags=["controlnet"])


@router.get("/version", summary="The ControlNet extension's API version")
async def version():
    return {"version": API_VERSION}


@router.get("/model_list", summary="ControlNet models: \"name [hash]\"")
async def model_list(update: bool = True, state: ServerState = Depends(get_state)):
    """The files in the models folder's ControlNet/ (and ComfyUI's controlnet/), read at each call."""
    titles = await run_in_threadpool(model_titles, state.catalog.root)
    return {"model_list": list(titles)}


@router.get("/module_list", summary="Preprocessors (modules) and their sliders")
async def module_list(alias_names: bool = False):
    from ...controlnet.preprocess import module_detail, module_names

    return {"module_list": module_names(alias_names), "module_detail": module_detail(alias_names)}


@router.get("/settings", summary="The ControlNet settings clients read")
async def settings(state: ServerState = Depends(get_state)):
    return {"control_net_unit_count": state.settings.control_net_unit_count}


class DetectRequest(BaseModel):
    """The extension's `/controlnet/detect` body; `controlnet_images` is webuiapi's older name."""

    controlnet_module: str = "none"
    controlnet_input_images: list[str] = []
    controlnet_images: list[str] = []
    controlnet_masks: list[str] = []
    controlnet_processor_res: float = -1  # -1 (or out of range): the module's default
    controlnet_threshold_a: float = -1
    controlnet_threshold_b: float = -1
    low_vram: bool = False  # accepted; changes nothing here


def _detect(body: DetectRequest, state: ServerState) -> list[str]:
    import numpy as np
    from PIL import Image

    from ...controlnet.preprocess import get_preprocessor
    from ..images import decode_image, encode_png

    try:
        preprocessor = get_preprocessor(body.controlnet_module)
    except SdlabError as e:
        raise Unsupported(str(e)) from None
    images = body.controlnet_input_images or body.controlnet_images
    if not images:
        raise Unsupported("no image to run the preprocessor on; send controlnet_input_images")
    if body.controlnet_masks and len(body.controlnet_masks) != len(images):
        raise Unsupported(f"{len(body.controlnet_masks)} masks for {len(images)} images; send one mask per image")
    limits = state.settings.limits
    out = []
    for i, data in enumerate(images):
        image = decode_image(data, f"controlnet_input_images[{i}]", limits)
        mask = decode_image(body.controlnet_masks[i], f"controlnet_masks[{i}]", limits) \
            if body.controlnet_masks else None
        if preprocessor.needs_mask and mask is None and image.mode != "RGBA":
            raise Unsupported(f"the {preprocessor.name!r} preprocessor needs a mask; send controlnet_masks")
        try:
            result = preprocessor(image if preprocessor.needs_mask else image.convert("RGB"),
                                  body.controlnet_processor_res, body.controlnet_threshold_a,
                                  body.controlnet_threshold_b, mask)
        except SdlabError as e:
            raise Unsupported(str(e)) from None
        out.append(encode_png(Image.fromarray(np.ascontiguousarray(result)), None))
    return out


@router.post("/detect", summary="Run a preprocessor on images")
async def detect(body: DetectRequest, state: ServerState = Depends(get_state)) -> dict[str, Any]:
    """Each image's detected map (PNG, base64), at the size the preprocessor makes it. 422 for an
    unknown module, no image, a missing mask, or a module that needs an annotator network."""
    images = await run_in_threadpool(_detect, body, state)
    return {"info": "Success", "images": images}
