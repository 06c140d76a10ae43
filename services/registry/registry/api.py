"""The registry's HTTP app: the service kit's app with the routes of `registry.routes` under /v1.

`create_app(settings)` builds the app; `python -m registry` serves it with uvicorn. OpenAPI at
/docs. Writes need `Authorization: Bearer <REGISTRY_WRITE_TOKEN>`; with no write token set they
are refused, unless REGISTRY_ALLOW_ANONYMOUS_WRITES=true. Reads need a token too when
REGISTRY_READ_TOKEN_REQUIRED is set (the read or the write token).
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from service_kit.app import create_app as create_service_app
from service_kit.auth import Tokens
from service_kit.errors import error_response
from service_kit.ops import Readiness, probe
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from registry import core, unavailable
from registry.blobs import LocalBlobs, S3Blobs
from registry.db import make_engine, make_sessionmaker, migrate
from registry.events import EventPublisher
from registry.metrics import Metrics
from registry.routes import admin, aliases, files, models, resolve, uploads
from registry.settings import Settings

log = logging.getLogger("registry.api")

NO_WRITE_TOKEN = (
    "writes are disabled: the registry has no REGISTRY_WRITE_TOKEN set "
    "(set one, or REGISTRY_ALLOW_ANONYMOUS_WRITES=true for a private dev setup)"
)


def make_registry(settings: Settings) -> core.Registry:
    engine = make_engine(settings.resolved_database_url())
    migrate(engine)
    if settings.blob_backend == "s3":
        blobs = S3Blobs.connect(
            settings.s3_endpoint,
            settings.s3_bucket,
            settings.s3_access_key,
            settings.s3_secret_key,
            settings.s3_region,
            settings.s3_prefix,
            settings.s3_part_size,
            settings.s3_parts_in_flight,
            settings.data_dir / "spool",
            settings.s3_public_endpoint,
            timeouts=(settings.s3_connect_timeout_s, settings.s3_read_timeout_s, settings.s3_max_attempts),
        )
        blobs.ensure_bucket()
    else:
        blobs = LocalBlobs(settings.resolved_blob_dir())
    events = EventPublisher(
        settings.redis_url, settings.events_channel, settings.events_stream, settings.events_stream_maxlen
    )
    return core.Registry(
        make_sessionmaker(engine),
        blobs,
        events,
        settings.max_path_length,
        presigned_uploads=settings.presigned_uploads and settings.blob_backend == "s3",
        presign_expiry_s=settings.presign_expiry_s,
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    reg = await run_in_threadpool(make_registry, settings)
    app.state.registry = reg
    app.state.metrics.events_pending.set_function(reg.events.pending)
    if not settings.write_token and settings.allow_anonymous_writes:
        log.warning(
            "REGISTRY_ALLOW_ANONYMOUS_WRITES is set and no write token: anyone who can reach this port can write"
        )
    elif not settings.write_token:
        log.warning("REGISTRY_WRITE_TOKEN is not set: every write is refused (401)")

    async def sweeper() -> None:
        while True:
            await asyncio.sleep(settings.sweep_interval_s)
            try:
                await run_in_threadpool(core.sweep, reg, settings.pending_ttl_s)
            except Exception:
                log.exception("sweep failed")

    task = asyncio.create_task(sweeper())
    try:
        yield
    finally:
        task.cancel()
        await run_in_threadpool(reg.events.close)


def readiness(request: Request) -> Readiness:
    reg: core.Registry = request.app.state.registry

    def database() -> None:
        with reg.sessions() as s:
            s.execute(text("SELECT 1"))

    return Readiness({"database": probe(database), "blobs": probe(reg.blobs.check)})


async def registry_error(request: Request, e: core.RegistryError) -> JSONResponse:
    return error_response(e.status, e.message, code=e.type, param=e.param)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    tokens = Tokens(
        write_token=settings.write_token,
        read_token=settings.read_token,
        reads_need_token=settings.read_token_required,
        anonymous_writes=settings.allow_anonymous_writes,
        no_write_token=NO_WRITE_TOKEN,
    )
    # No body limit: uploads stream model files of any size, counted against their manifest.
    app = create_service_app(
        "registry",
        tokens=tokens,
        readiness=readiness,
        metrics=metrics.registry,
        title="nanochat model registry",
        version="0.1.0",
        lifespan=lifespan,
        description="Versioned, verified checkpoints with aliases, lineage and events.",
    )
    app.state.settings, app.state.metrics = settings, metrics
    app.exception_handler(core.RegistryError)(registry_error)
    unavailable.install(app)
    for routes in (models, uploads, files, aliases, resolve, admin):
        app.include_router(routes.router, prefix="/v1")
    return app
