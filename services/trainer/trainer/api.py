"""The jobs API (FastAPI): submit, list, inspect, follow and cancel training jobs.

    python -m trainer api        # or: uvicorn --factory trainer.api:create_app

Every route answers under `/v1/...` (canonical, in the OpenAPI document at /docs) and under the
bare path (`POST /jobs`, `GET /jobs/{id}`, ...), the spelling the mission uses. Writes need
`Authorization: Bearer <TRAINER_WRITE_TOKEN>`. Logs and events stream as SSE whose event ids are
byte offsets into the job's files, so a client that reconnects with `Last-Event-ID` loses nothing.

The routes live in `trainer.routes` (stages, jobs), what they take from the request in
`trainer.deps`, file tailing in `trainer.tail`, curves in `trainer.curves`, the scraped job
metrics in `trainer.collector`; this module builds the app around them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from redis.exceptions import RedisError
from service_kit import logs
from service_kit.app import create_app as create_service_app
from service_kit.auth import Tokens
from service_kit.errors import error_response
from service_kit.ops import Readiness, probe
from sqlalchemy.exc import OperationalError

from trainer.collector import JobCollector
from trainer.db import migrate
from trainer.deps import State, get_state
from trainer.registry import Registry
from trainer.routes import jobs, stages
from trainer.settings import Settings, get_settings

log = logging.getLogger(__name__)


def readiness(request: Request) -> Readiness:
    state = get_state(request)
    return Readiness(
        {"database": probe(state.db.ping), "redis": probe(state.redis.ping), "registry": probe(state.registry.ping)}
    )


# Seconds a client waits before trying again when the database or Redis cannot be reached.
STORE_RETRY_AFTER_S = 5


async def store_unavailable(request: Request, e: Exception) -> JSONResponse:
    """A database or Redis that cannot be reached (down, restarting, locked past the busy timeout)
    answers 503 with Retry-After, not a 500: the request was fine and may simply be sent again."""
    store = "Redis" if isinstance(e, RedisError) else "the job database"
    log.warning("%s unavailable for %s %s: %s", store, request.method, request.url.path, e)
    return error_response(
        503,
        f"{store} cannot be reached right now; try again shortly",
        headers={"Retry-After": str(STORE_RETRY_AFTER_S)},
    )


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(settings.database_url)
        state = State(settings, registry)
        app.state.trainer = state
        state.reaper.start()
        collector = JobCollector(state)
        metrics.register(collector)
        yield
        metrics.unregister(collector)
        state.reaper.stop()
        state.db.engine.dispose()

    tokens = Tokens(
        write_token=settings.write_token, no_write_token="writes are disabled: the server has no TRAINER_WRITE_TOKEN"
    )
    app = create_service_app(
        "trainer",
        tokens=tokens,
        readiness=readiness,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        title="nanochat trainer",
        version="0.1.0",
        lifespan=lifespan,
        description="Launch and watch nanochat training jobs: stages and pipelines run under torchrun.",
    )
    app.add_exception_handler(OperationalError, store_unavailable)
    app.add_exception_handler(RedisError, store_unavailable)
    for routes in (stages, jobs):
        app.include_router(routes.router, prefix="/v1")
        # The bare paths are the mission's spelling (`POST /jobs`); /v1 is canonical and documented.
        app.include_router(routes.router, include_in_schema=False)
    return app


def main() -> None:
    import uvicorn

    settings = get_settings()
    logs.configure(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None, access_log=False)
