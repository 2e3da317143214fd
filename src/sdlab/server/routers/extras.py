"""The web UI's upscaler listing and Extras endpoints, and the checkpoint merger (ours: the web UI
has no merge route).

- GET /sdapi/v1/upscalers, /sdapi/v1/latent-upscale-modes
- POST /sdapi/v1/extra-single-image, /sdapi/v1/extra-batch-images: the Extras tab's upscale,
  with A1111's request fields and defaults (`modules/api/models.py` ExtrasBaseRequest) and its
  answer: the PNG (with the `postprocessing` text, and the input's `parameters`) and `html_info`.
  Face restoration (GFPGAN, CodeFormer) is not in sdlab: a request that turns it on is refused
  (422) naming the field; `upscale_first` and `show_extras_results` change nothing in the web UI's
  API either, and are accepted.
- POST /sdapi/v1/merge: `sdlab.merge` with the web UI's `run_modelmerger` argument names.

Upscales and merges are jobs in the server's one queue (`worker.Job` with a task), between the
generations: GET /sdapi/v1/progress reports them and they never compete with a generation.
"""

from __future__ import annotations

import base64
import html
import io
import json
import threading
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image, PngImagePlugin
from pydantic import BaseModel, ConfigDict, Field

from ...errors import SdlabError
from ...upscalers import LATENT_UPSCALE_MODES, ExtrasUpscale, Upscalers, postprocess_infotext, upscale_extras
from ..images import decode_image
from ..errors import BadInput, Unsupported
from ..models import LatentUpscalerModeItem, UpscalerItem
from ..state import ServerState, get_state

router = APIRouter(prefix="/sdapi/v1", tags=["extras"])


# -- request and response bodies (A1111 modules/api/models.py) -----------------------------------

class ExtrasBaseRequest(BaseModel):
    resize_mode: Literal[0, 1] = Field(0, description="0: upscale by upscaling_resize; 1: up to upscaling_resize_w x "
                                                      "upscaling_resize_h.")
    show_extras_results: bool = Field(True, description="Accepted; the API always returns the images (as the web "
                                                        "UI's does).")
    gfpgan_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False,
                                     description="GFPGAN face restoration: not in sdlab; refused unless 0.")
    codeformer_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False,
                                         description="CodeFormer face restoration: not in sdlab; refused unless 0.")
    codeformer_weight: float = Field(0, ge=0, le=1, allow_inf_nan=False,
                                     description="CodeFormer's weight (used with codeformer_visibility only).")
    upscaling_resize: float = Field(2, gt=0, allow_inf_nan=False,
                                    description="By how much to upscale (resize_mode 0).")
    upscaling_resize_w: int = Field(512, ge=1, description="Target width (resize_mode 1).")
    upscaling_resize_h: int = Field(512, ge=1, description="Target height (resize_mode 1).")
    upscaling_crop: bool = Field(True, description="resize_mode 1: centre the result on a black canvas of exactly "
                                                   "the target size.")
    upscaler_1: str = Field("None", description="The main upscaler (GET /sdapi/v1/upscalers); 'None': no upscale.")
    upscaler_2: str = Field("None", description="A second upscaler, blended in over the first.")
    extras_upscaler_2_visibility: float = Field(0, ge=0, le=1, allow_inf_nan=False,
                                                description="How much of upscaler_2's result to blend in.")
    upscale_first: bool = Field(False, description="Accepted and ignored, as by the web UI since 1.6.")


class ExtrasSingleImageRequest(ExtrasBaseRequest):
    image: str = Field("", description="The image, base64 (a data: URL prefix is accepted).")


class FileData(BaseModel):
    data: str = Field(description="The image, base64.")
    name: str = Field(description="Its file name.")


class ExtrasBatchImagesRequest(ExtrasBaseRequest):
    imageList: list[FileData] = Field(description="The images, base64.")  # noqa: N815 (the web UI's name)


class ExtrasSingleImageResponse(BaseModel):
    html_info: str = Field(description="The postprocessing infotext as HTML.")
    image: str | None = Field(None, description="The result, a base64 PNG.")


class ExtrasBatchImagesResponse(BaseModel):
    html_info: str = Field(description="The last image's postprocessing infotext as HTML.")
    images: list[str] = Field(description="The results, base64 PNGs.")


class MergeRequest(BaseModel):
    """The web UI's `run_modelmerger` arguments (its Checkpoint Merger tab)."""

    model_config = ConfigDict(protected_namespaces=())

    primary_model_name: str = Field(description="Model A: a checkpoint name as GET /sdapi/v1/sd-models lists it.")
    secondary_model_name: str | None = Field(None, description="Model B (not with 'No interpolation').")
    tertiary_model_name: str | None = Field(None, description="Model C ('Add difference' only).")
    interp_method: Literal["Weighted sum", "Add difference", "No interpolation"] = Field(
        "Weighted sum", description="A*(1-M) + B*M; A + (B-C)*M; or A alone.")
    multiplier: float = Field(0.3, allow_inf_nan=False, description="M.")
    save_as_half: bool = Field(False, description="Store fp32 tensors as fp16.")
    custom_name: str = Field("", description="The output's file name without extension; '': the web UI's name.")
    checkpoint_format: Literal["safetensors", "ckpt"] = Field("safetensors",
                                                              description="sdlab writes safetensors only.")
    config_source: Literal[0, 1, 2, 3] = Field(0, description="Copy the .yaml of: 0 A, B or C; 1 B; 2 C; 3 none.")
    bake_in_vae: str = Field("None", description="A VAE in the models folder's VAE/ to replace A's, or 'None'.")
    discard_weights: str = Field("", description="A regular expression: matching weights are left out.")
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True
    metadata_json: str = Field("", description="More safetensors metadata, a JSON object.")


class MergeResponse(BaseModel):
    info: str = Field(description="'Checkpoint saved to PATH', as the web UI's tab says.")
    checkpoint: str = Field(description="The new checkpoint's name, as sd_model_checkpoint takes it.")
    filename: str
    sha256: str


# -- what one app keeps for these routes ----------------------------------------------------------

class ExtrasState:
    """The app's upscalers (the model loaded last stays loaded) and the lock that lets one merge
    run at a time. Made on first use and kept on `app.state`."""

    def __init__(self, state: ServerState):
        self.upscalers = Upscalers(state.catalog.root, device=state.settings.device,
                                   max_pixels=state.settings.limits.max_image_pixels)
        self.merge_lock = threading.Lock()


_MAKE_LOCK = threading.Lock()


def get_extras(request: Request) -> ExtrasState:
    with _MAKE_LOCK:
        found = getattr(request.app.state, "sdlab_extras", None)
        if found is None:
            found = request.app.state.sdlab_extras = ExtrasState(request.app.state.sdlab)
        return found


def get_upscalers(extras: ExtrasState = Depends(get_extras)) -> Upscalers:
    return extras.upscalers


@router.get("/upscalers", response_model=list[UpscalerItem], summary="Upscalers")
async def upscalers(upscalers: Upscalers = Depends(get_upscalers)):
    """None, Lanczos and Nearest, then the model files of ESRGAN/, RealESRGAN/, SwinIR/, DAT/, HAT/ and
    upscale_models/ in the models folder (the file name without extension is the name)."""
    entries = await run_in_threadpool(upscalers.list)
    return [UpscalerItem(name=e.name, model_name=e.model_name, model_path=str(e.path) if e.path else None,
                         model_url=None, scale=e.scale) for e in entries]


@router.get("/latent-upscale-modes", response_model=list[LatentUpscalerModeItem],
            summary="Latent upscale modes of hires fix")
async def latent_upscale_modes():
    return [LatentUpscalerModeItem(name=name) for name in LATENT_UPSCALE_MODES]


# -- Extras ----------------------------------------------------------------------------------

def _refuse_face_restoration(body: ExtrasBaseRequest) -> None:
    fields = (("gfpgan_visibility", "GFPGAN"), ("codeformer_visibility", "CodeFormer"))
    problems = [f"{name}={getattr(body, name):g}: face restoration ({what}) is not available in sdlab; send 0 or "
                "leave it out" for name, what in fields if getattr(body, name) > 0]
    if problems:
        raise Unsupported("; ".join(problems))


def _options(body: ExtrasBaseRequest) -> ExtrasUpscale:
    return ExtrasUpscale(body.upscaler_1, body.upscaler_2, body.extras_upscaler_2_visibility, body.resize_mode,
                         body.upscaling_resize, body.upscaling_resize_w, body.upscaling_resize_h, body.upscaling_crop)


def _html(text: str) -> str:
    """The web UI's `plaintext_to_html`."""
    return "<p>" + "<br>\n".join(html.escape(line) for line in text.split("\n")) + "</p>"


def _png(image: Image.Image, source: Image.Image, text: str) -> str:
    """The web UI's `encode_pil_to_base64` of an Extras result: a PNG with the input's text
    chunks (its `parameters`) and the `postprocessing` text."""
    info = PngImagePlugin.PngInfo()
    chunks = {k: v for k, v in source.info.items() if isinstance(k, str) and isinstance(v, str)}
    if text:
        chunks["postprocessing"] = text
    for k, v in chunks.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info if chunks else None)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _run(images: list[tuple[str, Image.Image]], body: ExtrasBaseRequest, upscalers: Upscalers) -> tuple[list[str], str]:
    options = _options(body)
    out, text = [], ""
    for _, image in images:
        result, info = upscale_extras(image, options, upscalers)
        text = postprocess_infotext(info)
        out.append(_png(result, image, text))
    return out, text


async def _queued(kind: str, work, state: ServerState, request: Request):
    """Run `work` in the worker's queue, one job among the generations (one queue for the whole
    server: /progress reports it, and it never competes with a generation for the cores)."""
    from ..worker import Job
    from ..waiting import run_job

    return await run_job(Job(kind, None, task=lambda context: work()), state, request)


@router.post("/extra-single-image", response_model=ExtrasSingleImageResponse, summary="Upscale one image (Extras)")
async def extra_single_image(body: ExtrasSingleImageRequest, request: Request, state: ServerState = Depends(get_state),
                             upscalers: Upscalers = Depends(get_upscalers)):
    _refuse_face_restoration(body)
    if not body.image:
        raise BadInput("image: no image given (a base64 PNG or JPEG)")

    def work() -> ExtrasSingleImageResponse:
        image = decode_image(body.image, "image", state.settings.limits)
        encoded, text = _run([("", image)], body, upscalers)
        return ExtrasSingleImageResponse(html_info=_html(text), image=encoded[0])

    return await _queued("extras", work, state, request)


@router.post("/extra-batch-images", response_model=ExtrasBatchImagesResponse, summary="Upscale images (Extras)")
async def extra_batch_images(body: ExtrasBatchImagesRequest, request: Request, state: ServerState = Depends(get_state),
                             upscalers: Upscalers = Depends(get_upscalers)):
    _refuse_face_restoration(body)
    if len(body.imageList) > state.settings.limits.max_batch:
        raise Unsupported(f"imageList: {len(body.imageList)} images, more than this server takes in one request "
                          f"({state.settings.limits.max_batch})")

    def work() -> ExtrasBatchImagesResponse:
        images = [(f.name, decode_image(f.data, f"imageList[{i}] ({f.name})", state.settings.limits))
                  for i, f in enumerate(body.imageList)]
        encoded, text = _run(images, body, upscalers)
        return ExtrasBatchImagesResponse(html_info=_html(text), images=encoded)

    return await _queued("extras", work, state, request)


# -- the merger ------------------------------------------------------------------------------

@router.post("/merge", response_model=MergeResponse, summary="Merge checkpoints (sdlab's; the web UI has no route)")
async def merge(body: MergeRequest, request: Request, state: ServerState = Depends(get_state),
                extras: ExtrasState = Depends(get_extras)):
    """The web UI's Checkpoint Merger: the result is written to the models folder's
    Stable-diffusion/ (under `custom_name`, or the web UI's name) and listed at once."""
    from ...merge import MergeInput, MergeOptions, merge_checkpoints

    if body.checkpoint_format != "safetensors":
        raise Unsupported("checkpoint_format='ckpt': sdlab writes merged checkpoints as .safetensors only; send "
                          "'safetensors'")
    try:
        extra: Any = json.loads(body.metadata_json) if body.metadata_json.strip() else {}
    except ValueError as e:
        raise BadInput(f"metadata_json: not JSON ({e})") from None
    if not isinstance(extra, dict):
        raise BadInput("metadata_json: give a JSON object")
    catalog = state.catalog

    def named(name: str | None) -> MergeInput | None:
        if not name:
            return None
        entry = catalog.find_checkpoint(name)
        sha = catalog.sha256(entry) if entry.path.is_file() else None
        return MergeInput(entry.path, entry.name, sha)

    def work() -> MergeResponse:
        a, b, c = named(body.primary_model_name), named(body.secondary_model_name), named(body.tertiary_model_name)
        if body.interp_method == "No interpolation":
            b = c = None  # the web UI reads only A then
        elif body.interp_method == "Weighted sum":
            c = None
        vae = None if body.bake_in_vae in ("", "None") else catalog.models.resolve_vae(body.bake_in_vae)
        options = MergeOptions(body.interp_method, body.multiplier, body.save_as_half, vae, body.discard_weights,
                               body.save_metadata, body.add_merge_recipe, body.copy_metadata_fields, extra,
                               body.config_source, body.custom_name, body.bake_in_vae if vae else "None")
        with extras.merge_lock:
            result = merge_checkpoints(a, b, c, catalog.models.folder("checkpoint"), options)
        catalog.refresh()
        entry = next((e for e in catalog.checkpoints() if e.path == result.path.resolve()), None)
        if entry is None:  # written outside the listing: cannot happen unless the folder is a link
            raise SdlabError(f"{result.path} was written but is not in the checkpoint listing")
        sha = catalog.sha256(entry)
        title = next(e.title for e in catalog.checkpoints() if e.path == entry.path)  # now with its hash
        return MergeResponse(info=f"Checkpoint saved to {result.path}", checkpoint=title, filename=str(result.path),
                             sha256=sha)

    return await _queued("merge", work, state, request)
