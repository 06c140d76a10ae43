"""The login session: who the browser is (`GET`), sign in with a token (`POST`, failures rate
limited per client address), sign out (`DELETE`, which revokes the session on the server)."""

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from service_kit.errors import error_response

from webui.deps import LoginLimitDep, RoleDep, SessionsDep, SettingsDep
from webui.sessions import SESSION_COOKIE

router = APIRouter(prefix="/api/session")


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=4096)


@router.get("")
async def session(role: RoleDep, sessions: SessionsDep, settings: SettingsDep) -> dict:
    return {
        "role": role,
        "admin_enabled": sessions.admin is not None,
        "chat_needs_login": settings.chat_needs_login,
    }


@router.post("")
async def login(
    body: Login, request: Request, sessions: SessionsDep, settings: SettingsDep, limit: LoginLimitDep
) -> JSONResponse:
    client = request.client.host if request.client else "unknown"
    wait = limit.retry_after(client)
    if wait is not None:
        return error_response(
            429,
            f"Too many failed sign-ins from this address; try again in {wait} s.",
            code="too_many_attempts",
            headers={"Retry-After": str(wait)},
        )
    role = sessions.role_for_token(body.token)
    if role is None:
        limit.failed(client)
        return error_response(401, "That token is not valid here.", code="invalid_token")
    response = JSONResponse({"role": role})
    response.set_cookie(
        SESSION_COOKIE,
        sessions.issue(role),
        max_age=sessions.max_age,
        httponly=True,
        samesite="strict",
        secure=settings.secure_cookies,
        path="/",
    )
    return response


@router.delete("")
async def logout(request: Request, sessions: SessionsDep) -> JSONResponse:
    sessions.revoke(request.cookies.get(SESSION_COOKIE))
    response = JSONResponse({"role": None})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
