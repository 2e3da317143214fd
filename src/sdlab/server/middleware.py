"""Plain ASGI middleware: HTTP Basic auth on every route, a body size limit, and the
web UI's X-Process-Time header. ASGI rather than FastAPI dependencies so they cover
everything the app serves: the page, static files and /docs too."""

from __future__ import annotations

import base64
import binascii
import json
import time

from fastapi import HTTPException

from .settings import ServerSettings


async def _send_json(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class ProcessTimeMiddleware:
    """X-Process-Time: seconds the server spent on the request, as the web UI reports it."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()

        async def timed_send(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []),
                                      (b"x-process-time", f"{time.perf_counter() - start:.4f}".encode())]
            await send(message)

        await self.app(scope, receive, timed_send)


class BasicAuthMiddleware:
    """With --api-auth, every request needs one of the user:password pairs."""

    def __init__(self, app, settings: ServerSettings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.settings.api_auth:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers", [])).get(b"authorization", b"")
        if not self._allowed(header):
            return await _send_json(send, 401, "Incorrect username or password",
                                    [(b"www-authenticate", b'Basic realm="sdlab"')])
        await self.app(scope, receive, send)

    def _allowed(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic":
            return False
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return False
        return bool(sep) and self.settings.check_credentials(user, password)


class BodyLimitMiddleware:
    """Refuse bodies over the limit: at once from Content-Length, or while reading a chunked one."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        message = (f"request body is larger than this server accepts ({self.max_bytes // (1024 * 1024)} MiB); "
                   "send smaller images")
        if length is not None:
            try:
                too_big = int(length) > self.max_bytes
            except ValueError:
                return await _send_json(send, 400, "invalid Content-Length header")
            if too_big:
                return await _send_json(send, 413, message)
        seen = 0

        async def limited_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the handler's body read; FastAPI passes HTTPException through.
                    raise HTTPException(413, message)
            return msg

        await self.app(scope, limited_receive, send)
