"""Responses of the proxied services, streamed through to the browser, and the proxy's metrics."""

import asyncio
import json
import logging
from collections.abc import Callable

import httpx
from fastapi import Response
from prometheus_client import CollectorRegistry, Counter, Gauge
from service_kit.errors import error_body
from starlette.types import Receive, Scope, Send

# Only these request headers reach a service: the browser's cookies and Authorization stay here.
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "last-event-id", "if-none-match", "range")
# Connection-level headers (RFC 9110 7.6.1) and the ones the ASGI server sets itself.
DROPPED_RESPONSE_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "set-cookie",
    "www-authenticate",
    "server",
    "date",
}

log = logging.getLogger("webui.upstream")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "webui_proxy_requests",
            "Proxied requests by service and status",
            ["service", "status"],
            registry=self.registry,
        )
        self.open_streams = Gauge(
            "webui_proxy_open_streams", "Proxied responses still streaming", ["service"], registry=self.registry
        )


class UpstreamStream(Response):
    """Streams an upstream response to the browser chunk by chunk, without buffering.

    It watches for the browser going away at the same time, so a client that stops reading
    (the chat's Stop button, a closed tab) closes the upstream connection at once, even while
    the service sends nothing; the service sees the disconnect and frees the request.
    """

    def __init__(
        self, upstream: httpx.Response, service: str, metrics: Metrics, on_close: Callable[[], None] | None = None
    ):
        super().__init__(status_code=upstream.status_code)
        self.upstream = upstream
        self.on_close = on_close
        self.service = service
        self.metrics = metrics
        self.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items()
            if k.lower() not in DROPPED_RESPONSE_HEADERS
        ] + [(b"cache-control", b"no-store"), (b"x-accel-buffering", b"no")]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        gauge = self.metrics.open_streams.labels(self.service)
        gauge.inc()
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            forward = asyncio.create_task(self._forward(send))
            watch = asyncio.create_task(self._watch_disconnect(receive))
            done, pending = await asyncio.wait({forward, watch}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if forward in done and forward.exception() is not None and not isinstance(forward.exception(), OSError):
                log.warning(
                    "upstream stream broke", extra={"service": self.service, "error": repr(forward.exception())}
                )
        finally:
            await self.upstream.aclose()
            gauge.dec()
            if self.on_close is not None:
                self.on_close()

    async def _forward(self, send: Send) -> None:
        # Of a completion stream only whole events (ending in a blank line) go on, so a cut leaves
        # no half event in front of the error event below, one a client would fail to parse before
        # reaching ours. Everything else (files, log follows) goes on chunk by chunk.
        completion = self._is_completion_stream()
        pending = b""
        try:
            async for chunk in self.upstream.aiter_raw():
                pending += chunk
                cut = _whole_events_end(pending) if completion else len(pending)
                if cut:
                    await send({"type": "http.response.body", "body": pending[:cut], "more_body": True})
                    pending = pending[cut:]
        except httpx.HTTPError:
            # The service went away mid-stream (killed, restarted). A completion stream then ends
            # as inference ends one that fails, with an error event in OpenAI's shape, so a client
            # learns why; other streams just end (a log follow's EventSource reconnects by itself).
            if completion:
                await send({"type": "http.response.body", "body": self._broken_event(), "more_body": True})
        else:
            if pending:
                await send({"type": "http.response.body", "body": pending, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _is_completion_stream(self) -> bool:
        headers = self.upstream.headers
        event_stream = headers.get("content-type", "").startswith("text/event-stream")
        return self.service == "inference" and event_stream and "content-encoding" not in headers

    def _broken_event(self) -> bytes:
        error = error_body(
            502,
            f"The connection to the {self.service} service ended in the middle of the answer; try again.",
            code="upstream_stream_broken",
        )
        return b"data: " + json.dumps(error).encode() + b"\n\n"

    @staticmethod
    async def _watch_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


def _whole_events_end(data: bytes) -> int:
    """Where the last complete server-sent event in `data` ends (0 if none does yet)."""
    ends = [at + len(blank) for blank in (b"\n\n", b"\r\n\r\n") if (at := data.rfind(blank)) >= 0]
    return max(ends, default=0)
