"""The login session: who the browser is (`GET`), sign in with a token (`POST`), sign out."""

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from service_kit.errors import error_response

from webui.deps import RoleDep, SessionsDep, SettingsDep
from webui.sessions import SESSION_COOKIE

router = APIRouter(prefix="/api/session")


class Login(BaseModel):
    token: str = Field(min_length=1, max_length=4096)


@router.get("")
async def session(role: RoleDep, sessions: SessionsDep) -> dict:
    return {
        "role": role,
        "admin_enabled": sessions.admin is not None,
        "chat_needs_login": sessions.chat is not None,
    }


@router.post("")
async def login(body: Login, sessions: SessionsDep, settings: SettingsDep) -> JSONResponse:
    role = sessions.role_for_token(body.token)
    if role is None:
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
async def logout() -> JSONResponse:
    response = JSONResponse({"role": None})
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
