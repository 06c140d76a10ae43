"""Bearer tokens: a read and a write check, compared in constant time, run before the route
reads its body.

    app = create_app("trainer", tokens=Tokens(write_token=settings.write_token), ...)
    router = APIRouter(route_class=AuthFirstRoute)
    @router.post("/jobs", dependencies=[require_write]) ...

The checks are module-level, so routers are too; each request's app says which tokens it takes
(`app.state.tokens`, set by the app factory). FastAPI reads and validates a JSON body before it
solves any dependency, so with a plain `Depends` a client without a token could make the server
read a body up to the limit and learn the schema from a 422 before it ever saw the 401.
`AuthFirstRoute` (the app factory makes it the app's route class; routers name it) runs a
route's token checks first. FastAPI then solves the same dependency again, a header compare,
which keeps the check in force and in the OpenAPI document (as the HTTPBearer scheme) wherever a
route is mounted.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Depends, Request, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from service_kit.errors import APIError

WRONG_TOKEN = "missing or wrong bearer token (Authorization: Bearer <token>)"


@dataclass(frozen=True)
class Tokens:
    """Which tokens one app takes.

    Writes need `write_token`; with none set they are refused (`no_write_token` says how to set
    one) unless `anonymous_writes`. Reads are open unless `reads_need_token`, and then take the
    read or the write token.
    """

    write_token: str | None = None
    read_token: str | None = None
    reads_need_token: bool = False
    anonymous_writes: bool = False
    no_write_token: str = "writes are disabled: no write token is set"

    def accepted(self, role: Literal["read", "write"]) -> tuple[str, ...] | None:
        """The tokens that pass; None when every request does."""
        if role == "read":
            return tuple(t for t in (self.read_token, self.write_token) if t) if self.reads_need_token else None
        if self.write_token:
            return (self.write_token,)
        return None if self.anonymous_writes else ()


class TokenCheck(HTTPBearer):
    """An HTTPBearer, so OpenAPI documents the scheme, that lets a request of `role` through or
    raises the 401; it hands the route nothing, hence the narrower `__call__`."""

    def __init__(self, role: Literal["read", "write"]):
        super().__init__(scheme_name="HTTPBearer", auto_error=False)
        self.role = role

    async def __call__(self, request: Request) -> None:  # type: ignore[override]
        tokens: Tokens = request.app.state.tokens
        accepted = tokens.accepted(self.role)
        if accepted is None:
            return
        if not accepted:
            raise unauthorized(tokens.no_write_token if self.role == "write" else WRONG_TOKEN)
        creds = await super().__call__(request)
        given = (creds.credentials if creds else "").encode()
        # Every token is compared, so the time taken tells nothing about which one was close.
        matches = [hmac.compare_digest(given, token.encode()) for token in accepted]
        if not any(matches):
            raise unauthorized(WRONG_TOKEN)


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


require_read = Depends(TokenCheck("read"))
require_write = Depends(TokenCheck("write"))


class AuthFirstRoute(APIRoute):
    """An APIRoute that runs the TokenChecks among its `dependencies=` before the body is read."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        checks = [d.dependency for d in self.dependencies if isinstance(d.dependency, TokenCheck)]
        if not checks:
            return handler

        async def checked(request: Request) -> Response:
            for check in checks:
                await check(request)
            return await handler(request)

        return checked
