"""The app factory every service starts from.

    app = create_app("registry", tokens=Tokens(...), readiness=check, title=..., lifespan=lifespan)
    app.include_router(models.router, prefix="/v1")

It gives the app: the request-id/access-log/metrics/500 middleware, the body limit, the error
shape for every failure, the tokens `auth.require_read` / `require_write` check, `AuthFirstRoute`
as its route class, and `/health`, `/ready`, `/metrics`.
The service adds its routes and its own metrics (into `metrics`, the registry `/metrics` serves:
one per app, so several apps can live in one test process).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from service_kit import errors, ops
from service_kit.auth import AuthFirstRoute, Tokens
from service_kit.body_limit import BodyLimit
from service_kit.request_context import HTTPMetrics, RequestContext


def create_app(
    service: str,
    *,
    tokens: Tokens | None = None,
    readiness: ops.ReadyCheck | None = None,
    metrics: CollectorRegistry | None = None,
    max_body_bytes: int | None = None,
    validation_status: int = 422,
    **fastapi: Any,
) -> FastAPI:
    """A FastAPI app named `service` (the prefix of its metric names); `fastapi` goes to FastAPI().

    `tokens` are what `require_read` / `require_write` take (default: reads open, writes refused).
    `max_body_bytes=None` sets no limit (the registry's uploads stream files of any size).
    `validation_status` is 422, or 400 for a service that answers as OpenAI does.
    """
    app = FastAPI(**fastapi)
    app.router.route_class = AuthFirstRoute
    app.state.tokens = tokens or Tokens()
    registry = metrics if metrics is not None else CollectorRegistry()
    app.state.ops = ops.Ops(metrics=registry, readiness=readiness)
    errors.install(app, validation_status)
    if max_body_bytes is not None:
        app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    # Added last, so outermost: the 413 above and every 500 pass through it and carry the id.
    app.add_middleware(RequestContext, metrics=HTTPMetrics(service, registry))
    app.include_router(ops.router)
    return app
