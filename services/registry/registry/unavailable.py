"""503s for a store that is away: the blob store (S3 unreachable, timing out, or answering 5xx)
or the database (connection refused, lost, locked past its timeout).

Without these a request that meets a stopped S3 server or database fails as a 500 with a
traceback, which tells a client nothing it can act on; a 503 with Retry-After says "the request
was fine, try again shortly" (the registry client retries such answers). What the request had
written stays invisible: an upload that fails leaves its version pending, which the sweeper
marks failed once it is abandoned.
"""

from __future__ import annotations

import logging

from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as S3ConnectionError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from service_kit.errors import error_response
from sqlalchemy.exc import OperationalError

log = logging.getLogger("registry.unavailable")
RETRY_AFTER_S = 5


def _unavailable(what: str, e: Exception) -> JSONResponse:
    log.warning("%s unavailable: %s: %s", what, type(e).__name__, e)
    return error_response(
        503,
        f"the registry's {what} is unavailable ({type(e).__name__}); nothing was stored, try again shortly",
        code=f"{what.replace(' ', '_')}_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def blob_store_away(request: Request, e: Exception) -> JSONResponse:
    return _unavailable("blob store", e)


async def blob_store_error(request: Request, e: ClientError) -> JSONResponse:
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if status >= 500:
        return _unavailable("blob store", e)
    # Any other refusal is the registry's own mistake (a missing bucket, wrong keys): a 500.
    log.error("blob store refused a request", exc_info=e)
    return error_response(500, f"the blob store refused a request: {e.response.get('Error', {}).get('Code')}")


async def database_away(request: Request, e: OperationalError) -> JSONResponse:
    return _unavailable("database", e)


def install(app: FastAPI) -> None:
    app.exception_handler(S3ConnectionError)(blob_store_away)
    app.exception_handler(HTTPClientError)(blob_store_away)
    app.exception_handler(ClientError)(blob_store_error)
    app.exception_handler(OperationalError)(database_away)
