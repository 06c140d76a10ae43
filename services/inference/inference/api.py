"""The OpenAI-compatible HTTP API (FastAPI) in front of the served model's scheduler.

Routes: `POST /v1/chat/completions` and `POST /v1/completions` (also without `/v1`, the seed's
spelling), `GET /v1/models`, `POST /tokenize` and `POST /detokenize` (vLLM's), `/health`
(liveness, never touches the model), `/ready` (a model is loaded), `/metrics` (Prometheus).
Streams are SSE as OpenAI sends them: a role chunk per choice, content deltas, a chunk with
`finish_reason`, the usage chunk when asked, `data: [DONE]`.
Calculator use arrives as `delta.nanochat_tool` in streams and `message.nanochat_parts` otherwise.

Everything about a request is checked (and the request queued) before any byte of a response is
sent, so bad input never gets a 200-then-cut stream; a failure mid-stream sends an error event,
then closes. Errors are OpenAI's JSON: 400 bad values or a prompt longer than the context
(`context_length_exceeded`), 401 wrong token, 404 unknown model, 413 body too large, 429 with
Retry-After when the waiting queue is full, 503 while no model is loaded.

Every completion carries its id (`chatcmpl-...`/`cmpl-...`) in an `X-Request-Id` header, and the
log line of its end (outcome, token counts, duration) carries it as `request_id`.

The routes live in `inference.routes` (chat, completions, models); a request's run (its checks,
the generation, the stream, the release of the model) in `inference.runs`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from nanochat.scheduler import Stats
from service_kit.app import create_app as create_service_app
from service_kit.auth import Tokens
from service_kit.ops import Readiness

from inference.metrics import Metrics, PinnedMetrics
from inference.routes import chat, completions, models, tokenize
from inference.runs import Runner
from inference.served import ModelManager
from inference.settings import Settings


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    manager: ModelManager = app.state.manager
    manager.start()
    yield
    await asyncio.to_thread(manager.close)


def readiness(request: Request) -> Readiness:
    manager: ModelManager = request.app.state.manager
    manager.check_alive()
    served = manager.current
    if served is None:
        return Readiness({"model": manager.load_error or "loading"})
    info = served.info
    return Readiness({"model": "ok"}, {"model": info.name, "version": info.version, "stage": info.stage})


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    manager = ModelManager(settings)

    def stats() -> Stats | None:
        served = manager.current
        return served.scheduler.stats() if served is not None else None

    metrics = Metrics(stats)
    metrics.registry.register(PinnedMetrics(manager.pinned))
    # OpenAI answers a request it cannot parse with 400, and so does this server (not 422).
    app = create_service_app(
        "inference",
        tokens=Tokens(read_token=settings.api_token, reads_need_token=settings.api_token is not None),
        readiness=readiness,
        metrics=metrics.registry,
        max_body_bytes=settings.max_body_bytes,
        validation_status=400,
        title="nanochat inference",
        lifespan=lifespan,
        description="OpenAI-compatible chat and completions over a continuous-batching engine.",
    )
    app.state.manager, app.state.metrics, app.state.settings = manager, metrics, settings
    app.state.runner = Runner(manager, settings, metrics)
    for routes in (chat, completions, models):
        app.include_router(routes.router, prefix="/v1")
        # The bare paths are the seed's spelling, which existing clients of nanochat's server use.
        app.include_router(routes.router, include_in_schema=False)
    # vLLM serves these at the bare paths only, and so does this server.
    app.include_router(tokenize.router)
    return app
