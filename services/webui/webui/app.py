"""The web UI server: static assets, a login session, and a same-origin proxy to the services.

`/api/inference/...`, `/api/trainer/...` and `/api/registry/...` go to the service named by the
prefix with the rest of the raw path and the query unchanged; responses stream through as they
arrive (chat tokens, SSE logs), streams over connections of their own and at most
`WEBUI_MAX_STREAMS` of them per service. The server adds each service's bearer token itself (a
read token for reads), so no service token ever reaches the browser. Reads are open; changes on
the trainer and registry need the admin session (the UI's admin token, entered once, a signed
session id in an HTTP-only cookie); chat needs a session when the inference service has a token
or `WEBUI_CHAT_TOKEN` is set. There is no CORS: the browser only ever talks to this origin. Run
it with `python -m webui`.

The routes live in `webui.routes` (session, proxy), what they take from the request in
`webui.deps`; this module builds the app around them.
"""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from service_kit.app import create_app as create_service_app
from service_kit.ops import Readiness

from webui.login_limit import LoginLimit
from webui.pools import Pools
from webui.routes import proxy, session
from webui.security import SecurityHeaders
from webui.sessions import Sessions
from webui.settings import SERVICES, Settings
from webui.upstream import Metrics

STATIC_DIR = Path(__file__).parent / "static"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.pools = Pools(app.state.settings)
    try:
        yield
    finally:
        await app.state.pools.aclose()


async def readiness(request: Request) -> Readiness:
    """Each service answers its /health (liveness: the UI can reach it; its own /ready is its business)."""
    pools: Pools = request.app.state.pools
    settings: Settings = request.app.state.settings

    async def probe(service: str) -> str:
        try:
            response = await pools.client(service, stream=False).get(
                f"{settings.upstream(service)}/health", timeout=2.0
            )
        except httpx.HTTPError as e:
            return f"unreachable: {type(e).__name__}"
        return "ok" if response.status_code == 200 else f"/health answered {response.status_code}"

    return Readiness(dict(zip(SERVICES, await asyncio.gather(*(probe(s) for s in SERVICES)))))


def create_app(settings: Settings | None = None) -> FastAPI:
    """The ASGI app; `settings` default to the `WEBUI_` environment."""
    settings = settings or Settings()
    metrics = Metrics()
    app = create_service_app(
        "webui",
        readiness=readiness,
        metrics=metrics.registry,
        max_body_bytes=settings.max_body_bytes,
        title="nanochat web UI",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_middleware(SecurityHeaders)
    app.state.settings, app.state.sessions, app.state.metrics = settings, Sessions(settings), metrics
    app.state.login_limit = LoginLimit(settings)
    app.include_router(session.router)
    app.include_router(proxy.router)
    app.mount("/", StaticFiles(directory=STATIC_DIR, html=True), name="static")
    return app
