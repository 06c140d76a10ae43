"""What the routes take from the request: the app's settings, sessions, HTTP client and
metrics, and the role of the browser's session cookie."""

from typing import Annotated

import httpx
from fastapi import Depends, Request

from webui.sessions import SESSION_COOKIE, Role, Sessions
from webui.settings import Settings
from webui.upstream import Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def get_client(request: Request) -> httpx.AsyncClient:
    return request.app.state.client


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[Sessions, Depends(get_sessions)]
ClientDep = Annotated[httpx.AsyncClient, Depends(get_client)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_role(request: Request, sessions: SessionsDep) -> Role | None:
    return sessions.role_of(request.cookies.get(SESSION_COOKIE))


RoleDep = Annotated[Role | None, Depends(get_role)]
