"""Queue a job in the server's one worker and wait for it, watching for the client hanging up."""

from __future__ import annotations

import asyncio

from fastapi import Request

from .errors import NoModel
from .state import ServerState
from .worker import Job, JobResult

__all__ = ["ClientGone", "DISCONNECT_POLL_S", "run_job"]

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
