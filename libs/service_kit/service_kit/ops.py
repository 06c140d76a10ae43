"""`/health` (liveness: the process answers), `/ready` (its dependencies answer), `/metrics`.

`/ready` asks the service's readiness check, a callable of the request (sync ones run in a
thread, they may block on a database) returning a `Readiness`: one line per part it depends on,
"ok" or what is wrong. The answer is `{"status": "ready" | "not_ready", "checks": {...}, ...info}`
with 200 or 503; `info` carries what else a caller wants to know (inference: the served model).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool


@dataclass
class Readiness:
    checks: dict[str, str]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(v == "ok" for v in self.checks.values())


ReadyCheck = Callable[[Request], "Readiness | Awaitable[Readiness]"]


def probe(check: Callable[[], object]) -> str:
    """ "ok" when `check()` returns, else the error it raised, for a `Readiness` line."""
    try:
        check()
    except Exception as e:
        return f"unavailable: {type(e).__name__}: {e}"
    return "ok"


@dataclass
class Ops:
    """What the ops routes read, kept on `app.state.ops` by the app factory."""

    metrics: CollectorRegistry
    readiness: ReadyCheck | None


router = APIRouter(tags=["ops"])


@router.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    check = request.app.state.ops.readiness
    if check is None:
        result = Readiness(checks={})
    elif inspect.iscoroutinefunction(check):
        result = await check(request)
    else:
        result = await run_in_threadpool(check, request)
    body = {"status": "ready" if result.ok else "not_ready", "checks": result.checks, **result.info}
    return JSONResponse(body, status_code=200 if result.ok else 503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.ops.metrics), media_type=CONTENT_TYPE_LATEST)
