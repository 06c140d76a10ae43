"""ASGI middleware around every request: its id, its access-log line, its metrics, and the 500.

The id comes from the client's `X-Request-ID` when that is a sane token (visible ASCII, at most
128 characters), else a fresh one; it is in `logs.request_id` and `request.state.request_id`
while the request runs and in the response's `X-Request-ID`. A route that names the request
itself (inference answers with its completion id) sets that header, and the access line then
carries its id. An exception no handler took becomes a 500 in the error shape with the request
id in its message, and its traceback goes to the log, never to the client.
"""

from __future__ import annotations

import logging
import re
import time
import uuid

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service_kit import logs
from service_kit.errors import error_response

HEADER = b"x-request-id"
_SANE_ID = re.compile(rb"[!-~]{1,128}")

log = logging.getLogger("service_kit.access")


class HTTPMetrics:
    """`<service>_http_requests_total{method, route, status}` and `<service>_http_request_seconds{route}`."""

    def __init__(self, service: str, registry: CollectorRegistry):
        self.requests = Counter(
            f"{service}_http_requests", "HTTP requests.", ["method", "route", "status"], registry=registry
        )
        self.latency = Histogram(
            f"{service}_http_request_seconds", "HTTP request latency.", ["route"], registry=registry
        )


class RequestContext:
    def __init__(self, app: ASGIApp, metrics: HTTPMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(HEADER, b"")
        rid = given.decode() if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        token = logs.request_id.set(rid)
        start, status, started = time.perf_counter(), 500, False

        async def send_with_id(message: Message) -> None:
            nonlocal rid, status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                own = next((v for k, v in headers if k.lower() == HEADER), None)
                if own is None:
                    headers.append((HEADER, rid.encode()))
                else:
                    rid = own.decode("latin-1")
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope["method"], scope["path"], extra={"request_id": rid})
            if started:
                raise
            await error_response(500, f"internal error (request id {rid})")(scope, receive, send_with_id)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(route).observe(elapsed)
            log.info(
                "request",
                extra={
                    "request_id": rid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 1),
                },
            )
            logs.request_id.reset(token)
