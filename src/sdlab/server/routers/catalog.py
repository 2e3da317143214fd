"""Listings: checkpoints, samplers, schedules, LoRAs, embeddings, prompt styles; the folder rescan;
and the web UI's listings of what sdlab does not have (VAEs, hypernetworks, face restorers,
Real-ESRGAN models), answered with the web UI's shapes: clients read them at startup and expect
lists. The upscalers are listed by routers/extras.py."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from ...sampling.samplers import SAMPLERS
from ...sampling.schedules import SCHEDULES
from ...styles import read_styles
from ..models import (EmbeddingItem, EmbeddingsResponse, FaceRestorerItem, HypernetworkItem, LoraItem,
                      PromptStyleItem, RealesrganItem, SamplerItem, SchedulerItem, SDModelItem, SDVaeItem)
from ..state import ServerState, get_state

router = APIRouter(prefix="/sdapi/v1", tags=["models"])

# The web UI's `default_rho` / `need_inner_model` for its schedulers of the same name.
_RHO = {"karras": 7.0, "polyexponential": 1.0}
_NEEDS_INNER_MODEL = {"uniform", "sgm_uniform", "simple", "normal", "ddim_uniform", "beta"}


@router.get("/sd-models", response_model=list[SDModelItem], summary="Checkpoints in the models folder")
async def sd_models(state: ServerState = Depends(get_state)):
    return [SDModelItem(title=e.title, model_name=e.model_name, hash=e.short_hash, sha256=e.sha256,
                        filename=str(e.path), config=None) for e in state.catalog.checkpoints()]


@router.post("/refresh-checkpoints", summary="Rescan the models folder for checkpoints")
async def refresh_checkpoints(state: ServerState = Depends(get_state)):
    await run_in_threadpool(state.catalog.refresh)
    return {}


@router.get("/samplers", response_model=list[SamplerItem], summary="Samplers")
async def samplers():
    out = []
    for info in SAMPLERS.values():
        options = {}
        if info.default_schedule:
            options["scheduler"] = info.default_schedule
        for flag in ("second_order", "brownian_noise", "discard_next_to_last_sigma"):
            if getattr(info, flag):
                options[flag] = "True"
        if info.stochastic:
            options["uses_ensd"] = "True"
        out.append(SamplerItem(name=info.name, aliases=list(info.aliases), options=options))
    return out


@router.get("/schedulers", response_model=list[SchedulerItem], summary="Schedule types")
async def schedulers():
    return [SchedulerItem(name=s.name, label=s.label, aliases=list(s.aliases) or None,
                          default_rho=_RHO.get(s.name, -1.0), need_inner_model=s.name in _NEEDS_INNER_MODEL)
            for s in SCHEDULES.values()]


@router.get("/loras", response_model=list[LoraItem], summary="LoRA files in the models folder's Lora/")
async def loras(state: ServerState = Depends(get_state)):
    entries = await run_in_threadpool(state.catalog.loras)
    return [LoraItem(name=e.name, alias=e.metadata.get("ss_output_name") or e.name, path=str(e.path),
                     metadata=e.metadata) for e in entries]


@router.get("/embeddings", response_model=EmbeddingsResponse, summary="Textual-inversion embeddings")
async def embeddings(state: ServerState = Depends(get_state)):
    def scan() -> EmbeddingsResponse:
        loaded = {}
        for e in state.catalog.embeddings():
            shape, vectors = _embedding_shape(e.path)
            loaded[e.name] = EmbeddingItem(shape=shape, vectors=vectors)
        return EmbeddingsResponse(loaded=loaded, skipped={})

    return await run_in_threadpool(scan)


@router.get("/prompt-styles", response_model=list[PromptStyleItem], summary="Saved prompt styles (styles.csv)")
async def prompt_styles(state: ServerState = Depends(get_state)):
    """The styles a request's `styles` may name, from the server's styles.csv (read afresh: an
    edited file needs no restart)."""
    styles = await run_in_threadpool(read_styles, state.styles_file)
    return [PromptStyleItem(name=s.name, prompt=s.prompt, negative_prompt=s.negative_prompt) for s in styles.values()]


@router.get("/sd-vae", response_model=list[SDVaeItem], summary="VAE files to choose from")
async def sd_vae(state: ServerState = Depends(get_state)):
    """The models folder's VAE/ files, by the names options.sd_vae takes."""
    names = await run_in_threadpool(state.vae_names)
    return [SDVaeItem(model_name=name, filename=str(path)) for name, path in names]


# What sdlab does not have is listed empty, never answered 404:
# clients fill their menus from these lists, and an entry would be a choice the server then refuses.

@router.get("/hypernetworks", response_model=list[HypernetworkItem], summary="Hypernetworks")
async def hypernetworks():
    return []  # sdlab loads no hypernetworks


@router.get("/face-restorers", response_model=list[FaceRestorerItem], summary="Face restoration models")
async def face_restorers():
    return []  # no face restoration (restore_faces is refused)


@router.get("/realesrgan-models", response_model=list[RealesrganItem], summary="Real-ESRGAN upscalers")
async def realesrgan_models():
    return []


def _embedding_shape(path) -> tuple[int | None, int | None]:
    """(width, vectors) from a .safetensors embedding's header; unknown for pickles, which
    are not opened just to list them."""
    if path.suffix.lower() != ".safetensors":
        return None, None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                if len(shape) == 2:
                    return int(shape[1]), int(shape[0])
    except Exception:
        pass
    return None, None
