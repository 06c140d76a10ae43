"""What the routes take from the request: the app's registry, metrics and settings, the path
parameter types every route shares, and the error responses they document."""

from typing import Annotated

from fastapi import Depends, Path, Request
from nanochat_contracts.names import NAME_MAX, VERSION_MAX
from service_kit.errors import ErrorResponse

from registry import core
from registry.metrics import Metrics
from registry.settings import Settings


def get_registry(request: Request) -> core.Registry:
    return request.app.state.registry


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


RegistryDep = Annotated[core.Registry, Depends(get_registry)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
SettingsDep = Annotated[Settings, Depends(get_settings)]

Name = Annotated[str, Path(min_length=1, max_length=NAME_MAX, description="model name")]
VersionNo = Annotated[int, Path(ge=1, le=VERSION_MAX)]
FilePath = Annotated[str, Path(min_length=1, description="relative path inside the version")]
UploadId = Annotated[str, Path(pattern=r"^[0-9a-f]{32}$")]

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 416, 422)}
