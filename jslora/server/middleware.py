"""ASGI middleware of the server: the request-body size limit and API-key authentication."""
from __future__ import annotations

import secrets

from jslora.server.errors import error_response


class BodySizeLimit:
    """A request body over max_bytes gets a 413 before any of it is parsed (the Content-Length is
    checked first; a chunked body is counted as it arrives)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(scope, receive, send)
        parts, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        body, replayed = b"".join(parts), False

        async def replay():  # the whole body once, then the client's own messages (its disconnect)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, f"request body larger than {self.max_bytes} bytes (--max-request-body-bytes)")
        await response(scope, receive, send)


class ApiKeyAuth:
    """Requests under /v1 need `Authorization: Bearer <key>` (compared in constant time)."""

    def __init__(self, app, api_key: str, on_refused=None):
        self.app, self.expected, self.on_refused = app, f"Bearer {api_key}".encode(), on_refused

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                if self.on_refused is not None:
                    self.on_refused()
                return await error_response(401, "invalid or missing API key")(scope, receive, send)
        await self.app(scope, receive, send)
