"""The web UI server: static assets, a login session, and a same-origin proxy to the services.

`/api/inference/...`, `/api/trainer/...` and `/api/registry/...` go to the service named by the
prefix with the rest of the raw path and the query unchanged; responses stream through as they
arrive (chat tokens, SSE logs). The server adds each service's bearer token itself, so no
service token ever reaches the browser. Reads are open; changes on the trainer and registry need
the admin session (the UI's admin token, entered once, kept in an HTTP-only cookie); chat needs
a session only when `WEBUI_CHAT_TOKEN` is set. There is no CORS: the browser only ever talks to
this origin. Run it with `python -m webui`.
"""

import asyncio
import hashlib
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Literal

import httpx
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import BaseModel, Field
from service_kit.app import create_app as create_service_app
from service_kit.errors import error_response
from service_kit.ops import Readiness
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from webui.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
SERVICES = ("inference", "trainer", "registry")
SESSION_COOKIE = "nanochat_session"
Role = Literal["admin", "chat"]

# Only these request headers reach a service: the browser's cookies and Authorization stay here.
FORWARDED_REQUEST_HEADERS = ("accept", "content-type", "last-event-id", "if-none-match", "range")
# Connection-level headers (RFC 9110 7.6.1) and the ones the ASGI server sets itself.
DROPPED_RESPONSE_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
    "transfer-encoding", "upgrade", "content-length", "set-cookie", "www-authenticate", "server", "date",
}
PAGE_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
# A proxied file (say an HTML report attachment opened in a tab) must never run script here.
PROXY_CSP = "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'"

log = logging.getLogger("webui")


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=4096)


class Sessions:
    """Signed, expiring session cookies: `role.expiry.hmac`; nothing to store server-side."""

    def __init__(self, settings: Settings):
        self.admin = settings.admin_token.get_secret_value() if settings.admin_token else None
        self.chat = settings.chat_token.get_secret_value() if settings.chat_token else None
        self.max_age = settings.session_max_age_s
        if settings.session_secret:
            secret = settings.session_secret.get_secret_value()
        else:
            secret = f"nanochat-webui-session\0{self.admin or ''}\0{self.chat or ''}"
        self.key = hashlib.sha256(secret.encode()).digest()

    def role_for_token(self, token: str) -> Role | None:
        if self.admin and hmac.compare_digest(token.encode(), self.admin.encode()):
            return "admin"
        if self.chat and hmac.compare_digest(token.encode(), self.chat.encode()):
            return "chat"
        return None

    def issue(self, role: Role) -> str:
        payload = f"{role}.{int(time.time()) + self.max_age}"
        return f"{payload}.{self._sign(payload)}"

    def role_of(self, cookie: str | None) -> Role | None:
        if not cookie or cookie.count(".") != 2:
            return None
        role, expiry, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(f"{role}.{expiry}")):
            return None
        if role not in ("admin", "chat") or not expiry.isdigit() or int(expiry) < time.time():
            return None
        return role  # type: ignore[return-value]

    def _sign(self, payload: str) -> str:
        return hmac.new(self.key, payload.encode(), hashlib.sha256).hexdigest()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("webui_proxy_requests", "Proxied requests by service and status",
                                ["service", "status"], registry=self.registry)
        self.open_streams = Gauge("webui_proxy_open_streams", "Proxied responses still streaming",
                                  ["service"], registry=self.registry)


class SecurityHeaders:
    """The browser-facing headers of every answer: no sniffing, no referrer, and a CSP that is
    strict for the UI's pages and a sandbox for proxied files."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        is_proxy = scope["path"].startswith("/api/") and not scope["path"].startswith("/api/session")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                extra = [
                    (b"x-content-type-options", b"nosniff"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"content-security-policy", (PROXY_CSP if is_proxy else PAGE_CSP).encode()),
                ]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        await self.app(scope, receive, send_with_headers)


class UpstreamStream(Response):
    """Streams an upstream response to the browser chunk by chunk, without buffering.

    It watches for the browser going away at the same time, so a client that stops reading
    (the chat's Stop button, a closed tab) closes the upstream connection at once, even while
    the service sends nothing; the service sees the disconnect and frees the request.
    """

    def __init__(self, upstream: httpx.Response, service: str, metrics: Metrics):
        super().__init__(status_code=upstream.status_code)
        self.upstream = upstream
        self.service = service
        self.metrics = metrics
        self.raw_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in upstream.headers.multi_items() if k.lower() not in DROPPED_RESPONSE_HEADERS
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
                log.warning("upstream stream broke", extra={"service": self.service,
                                                            "error": repr(forward.exception())})
        finally:
            await self.upstream.aclose()
            gauge.dec()

    async def _forward(self, send: Send) -> None:
        try:
            async for chunk in self.upstream.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except httpx.HTTPError:
            pass  # the service went away mid-stream: end the response, the browser sees it cut short
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    async def _watch_disconnect(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass


async def readiness(request: Request) -> Readiness:
    """Each service answers its /health (liveness: the UI can reach it; its own /ready is its business)."""
    client: httpx.AsyncClient = request.app.state.client
    bases: dict[str, str] = request.app.state.bases

    async def probe(service: str) -> str:
        try:
            response = await client.get(f"{bases[service]}/health", timeout=2.0)
        except httpx.HTTPError as e:
            return f"unreachable: {type(e).__name__}"
        return "ok" if response.status_code == 200 else f"/health answered {response.status_code}"

    return Readiness(dict(zip(SERVICES, await asyncio.gather(*(probe(s) for s in SERVICES)))))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; `settings` default to the `WEBUI_` environment."""
    settings = settings or Settings()
    sessions = Sessions(settings)
    metrics = Metrics()
    bases = {
        "inference": str(settings.inference_url).rstrip("/"),
        "trainer": str(settings.trainer_url).rstrip("/"),
        "registry": str(settings.registry_url).rstrip("/"),
    }
    tokens = {
        "inference": settings.inference_token, "trainer": settings.trainer_token,
        "registry": settings.registry_token,
    }

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # No read timeout: a log follow or a long generation may be quiet for a long time.
        timeout = httpx.Timeout(None, connect=settings.connect_timeout_s)
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            app.state.client = client
            yield

    app = create_service_app("webui", readiness=readiness, metrics=metrics.registry,
                             max_body_bytes=settings.max_body_bytes, title="nanochat web UI", lifespan=lifespan,
                             docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(SecurityHeaders)
    app.state.bases = bases

    def role_of(request: Request) -> Role | None:
        return sessions.role_of(request.cookies.get(SESSION_COOKIE))

    @app.get("/api/session")
    async def session(request: Request) -> dict:
        return {
            "role": role_of(request),
            "admin_enabled": sessions.admin is not None,
            "chat_needs_login": sessions.chat is not None,
        }

    @app.post("/api/session")
    async def login(body: Login) -> JSONResponse:
        role = sessions.role_for_token(body.token)
        if role is None:
            return error_response(401, "That token is not valid here.", code="invalid_token")
        response = JSONResponse({"role": role})
        response.set_cookie(SESSION_COOKIE, sessions.issue(role), max_age=sessions.max_age, httponly=True,
                            samesite="strict", secure=settings.secure_cookies, path="/")
        return response

    @app.delete("/api/session")
    async def logout() -> JSONResponse:
        response = JSONResponse({"role": None})
        response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
        return response

    @app.api_route("/api/{service}/{path:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"])
    async def proxy(service: str, path: str, request: Request) -> Response:
        if service not in bases:
            return error_response(404, f"Unknown service {service!r}; the UI proxies {', '.join(SERVICES)}.")
        role = role_of(request)
        if service == "inference" and sessions.chat is not None and role is None:
            return error_response(401, "Chat needs a token here: sign in first.", code="login_required")
        if service != "inference" and request.method not in ("GET", "HEAD") and role != "admin":
            return error_response(403, "Changing jobs or models needs the admin token: sign in as admin.",
                                  code="admin_required")
        # The service kit's body limit stops this read at WEBUI_MAX_BODY_BYTES, chunked or not.
        body = await request.body()

        # The raw path keeps the browser's percent-encoding: the service gets exactly what was typed.
        raw_path = request.scope["raw_path"].decode("latin-1")
        rest = raw_path[len(f"/api/{service}"):]
        query = request.scope["query_string"].decode("latin-1")
        url = bases[service] + rest + (f"?{query}" if query else "")
        headers = {k: v for k, v in request.headers.items() if k in FORWARDED_REQUEST_HEADERS}
        headers["x-request-id"] = request.state.request_id
        if tokens[service] is not None:
            headers["authorization"] = f"Bearer {tokens[service].get_secret_value()}"
        client: httpx.AsyncClient = request.app.state.client
        upstream_request = client.build_request(request.method, url, headers=headers, content=body)
        try:
            upstream = await client.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            metrics.requests.labels(service, "unreachable").inc()
            log.warning("upstream unreachable", extra={"service": service, "error": repr(exc)})
            return error_response(502, f"The {service} service cannot be reached right now.")
        metrics.requests.labels(service, str(upstream.status_code)).inc()
        return UpstreamStream(upstream, service, metrics)

    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
