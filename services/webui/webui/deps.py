"""What the routes take from the request: the app's settings, sessions, sign-in limit, upstream
pools and metrics, and the role of the browser's session cookie."""

from typing import Annotated

from fastapi import Depends, Request

from webui.login_limit import LoginLimit
from webui.pools import Pools
from webui.sessions import SESSION_COOKIE, Role, Sessions
from webui.settings import Settings
from webui.upstream import Metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_sessions(request: Request) -> Sessions:
    return request.app.state.sessions


def get_login_limit(request: Request) -> LoginLimit:
    return request.app.state.login_limit


def get_pools(request: Request) -> Pools:
    return request.app.state.pools


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionsDep = Annotated[Sessions, Depends(get_sessions)]
LoginLimitDep = Annotated[LoginLimit, Depends(get_login_limit)]
PoolsDep = Annotated[Pools, Depends(get_pools)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]


def get_role(request: Request, sessions: SessionsDep) -> Role | None:
    return sessions.role_of(request.cookies.get(SESSION_COOKIE))


RoleDep = Annotated[Role | None, Depends(get_role)]
