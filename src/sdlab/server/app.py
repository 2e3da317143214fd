"""Build the FastAPI app: middleware, error handlers, routers, static files, lifespan.
Nothing else lives here (STYLE habit 14)."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from .._version import __version__
from ..errors import SdlabError
from .comfy.editor import make_page_router as make_editor_page_router
from .comfy.editor import make_router as make_editor_router
from .comfy.routes import make_router as make_comfy_router
from .errors import status_of
from .middleware import BasicAuthMiddleware, BodyLimitMiddleware, ProcessTimeMiddleware
from .routers import catalog, controlnet, extras, generation, jobs, options, page, system
from .routers.page import STATIC_DIR
from .settings import ServerSettings
from .state import ServerState
from .worker import Job

log = logging.getLogger(__name__)


def _log_load_failure(future) -> None:
    # Nobody waits for the first load; say here why the first request will fail.
    if not future.cancelled() and future.exception() is not None:
        log.warning("%s", future.exception())


def create_app(settings: ServerSettings) -> FastAPI:
    """The app for one server. Raises SdlabError if --model names nothing."""
    state = ServerState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.worker.start()
        if state.selected is not None:
            # Load the first model in the worker, so the server answers at once and the
            # first generation waits for the load in the queue like any other job.
            job = state.worker.submit(Job("load", state.selected))
            job.future.add_done_callback(_log_load_failure)
        else:
            log.warning("no checkpoint in %s; add one and POST /sdapi/v1/refresh-checkpoints",
                        state.catalog.root / "Stable-diffusion")
        yield
        state.worker.stop()

    app = FastAPI(title="sdlab", version=__version__, lifespan=lifespan,
                  description="Stable Diffusion in Python: the web UI's API (/sdapi/v1), ComfyUI's API "
                              "(/prompt, /ws, ... and /api/...) and a web page (/).")
    app.state.sdlab = state

    @app.exception_handler(SdlabError)
    async def sdlab_error(request: Request, exc: SdlabError):
        return JSONResponse({"detail": str(exc), "error": type(exc).__name__}, status_code=status_of(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}: {str(exc)[:300]}",
                             "error": type(exc).__name__}, status_code=500)

    for module in (generation, jobs, catalog, extras, options, system, controlnet, page):
        app.include_router(module.router)
    # ComfyUI's API: at the root for its clients and under /api for its editor, as ComfyUI does.
    comfy_routes = make_comfy_router()
    app.include_router(comfy_routes)
    app.include_router(comfy_routes, prefix="/api")
    # Its editor at /comfy/ calls the same API under the page's folder (/comfy/api/..., /comfy/ws).
    app.include_router(comfy_routes, prefix="/comfy")
    app.include_router(comfy_routes, prefix="/comfy/api")
    editor_routes = make_editor_router()
    for prefix in ("", "/api", "/comfy", "/comfy/api"):
        app.include_router(editor_routes, prefix=prefix)
    app.include_router(make_editor_page_router())  # after the /comfy/api routes: /comfy/{path} matches them too
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Added last = outermost: time everything, then authenticate, then limit the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.limits.max_upload_bytes)
    app.add_middleware(BasicAuthMiddleware, settings=settings)
    app.add_middleware(ProcessTimeMiddleware)
    return app
