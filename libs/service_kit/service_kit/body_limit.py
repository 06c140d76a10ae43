"""ASGI middleware: 413 in the error shape for a request body over the limit, announced or not.

A `Content-Length` over the limit is refused before the app runs. A body without one (chunked,
or a lying client) is counted as the app reads it, and the read that crosses the limit raises
HTTPException(413), which FastAPI passes on to the error handlers, so a route never sees more than
the limit. Starlette 1.10's RequestBodyLimitMiddleware counts the same way but answers a declared
over-long body in plain text once the app responds without reading it (a 401 say).
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service_kit.errors import error_response


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self) -> str:
        return f"the request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await error_response(413, self._message())(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted, send)
