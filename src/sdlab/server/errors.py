"""Errors the HTTP layer answers with a status code and a one-line message.

Each is an `SdlabError`, so a message written for the CLI reads the same over HTTP;
`app.py` maps the classes to status codes in one place.
"""

from __future__ import annotations

from ..errors import MissingDependency, SdlabError
from .catalog import NotFound


class BadInput(SdlabError):
    """Undecodable input (invalid base64, not an image): 400."""


class TooLarge(SdlabError):
    """A body or an image over the server's size limits: 413."""


class OverLimit(SdlabError):
    """A request over a configured limit (size, steps, batch): 422."""


class Unsupported(SdlabError):
    """A request that turns on a feature sdlab does not have (hires fix, scripts, ...): 422,
    the status the web UI answers for a script it does not have."""


class NotProvided(SdlabError):
    """An endpoint of the web UI for something sdlab has no model for (interrogate): 501, which
    tells a client the server cannot do it, where a 404 would say the path is wrong."""


class NoModel(SdlabError):
    """Nothing to generate with: no checkpoint in the folder and none named: 503."""


class ModelLoadError(SdlabError):
    """A checkpoint in the folder could not be loaded: 500, with the loader's message."""


class NeedsOption(SdlabError):
    """A checkpoint that loads only with an option the client has not set (an SD3.5 file with no
    VAE chosen): 422, since the client can fix it, unlike a damaged file (`ModelLoadError`)."""


STATUS = (  # checked in order: subclasses first
    (NotFound, 404),
    (BadInput, 400),
    (TooLarge, 413),
    (OverLimit, 422),
    (Unsupported, 422),
    (MissingDependency, 500),  # a package the server's installation lacks: not the client's doing
    (NotProvided, 501),
    (NoModel, 503),
    (NeedsOption, 422),
    (ModelLoadError, 500),
    (SdlabError, 422),  # any other user-facing error is a request the pipeline refused
)


def status_of(error: SdlabError) -> int:
    for cls, status in STATUS:
        if isinstance(error, cls):
            return status
    return 422
