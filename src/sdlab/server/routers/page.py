"""GET / : the web page (static HTML + JS talking to the same /sdapi/v1 API), and the one
thing the page needs that the web UI's API does not say: a checkpoint's native size."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, Depends, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field

from ...errors import SdlabError
from ..state import ServerState, checkpoint_family, get_state

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["page"])


@router.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    # Browsers ask for it whatever the page links; the page's own icon is this SVG.
    return FileResponse(STATIC_DIR / "favicon.svg", media_type="image/svg+xml")


class ModelInfo(BaseModel):
    title: str = Field(description="The checkpoint, as options.sd_model_checkpoint names it.")
    family: str | None = Field(description="sdlab's family name (sd1, sd2-v, sdxl, sd3, sd3.5-large, sd3.5-medium, "
                                           "...); None if unreadable. The page shows SD3's shift and skip-layer "
                                           "guidance for the sd3 ones.")
    family_label: str | None = Field(description="The family for people: 'Stable Diffusion XL', ...")
    native_size: int | None = Field(
        description="The side, in pixels, the model was trained at (64 for the demo model, 512 for SD 1.x, 768 for "
                    "SD 2.x v-prediction, 1024 for SDXL): the page's default width and height.")
    error: str | None = Field(None, description="Why the family could not be read, if it could not.")


@lru_cache(maxsize=64)
def _family_of(path: str, mtime_ns: int, size: int) -> tuple[str, str, int]:
    # Keyed on the file's mtime and size, so a replaced file is read again. Only the header is
    # read (safetensors), or the pickle memory-mapped (ckpt): no weights are loaded into memory.
    family = checkpoint_family(Path(path))[0]  # an SD3 file without a VAE has a family too
    return family.name, family.label, family.default_size


@router.get("/sdlab/v1/model-info", response_model=ModelInfo, summary="A checkpoint's family and native size")
async def model_info(checkpoint: str | None = Query(None, description="A checkpoint name or title; default: the "
                                                                         "selected one (options.sd_model_checkpoint)."),
                     state: ServerState = Depends(get_state)):
    entry = state.catalog.find_checkpoint(checkpoint) if checkpoint else state.selected
    if entry is None:
        return ModelInfo(title="", family=None, family_label=None, native_size=None,
                         error="no checkpoint is selected")
    # the listing's entry: its title gains the hash once the file was hashed, as options' does
    entry = next((e for e in state.catalog.checkpoints() if e.path == entry.path), entry)
    stat = entry.path.stat()
    try:
        name, label, size = await run_in_threadpool(_family_of, str(entry.path), stat.st_mtime_ns, stat.st_size)
    except SdlabError as e:
        return ModelInfo(title=entry.title, family=None, family_label=None, native_size=None, error=str(e))
    return ModelInfo(title=entry.title, family=name, family_label=label, native_size=size)
