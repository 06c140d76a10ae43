"""Housekeeping on demand (the app also runs it on a timer)."""

from typing import Annotated

from fastapi import APIRouter, Query
from service_kit.auth import AuthFirstRoute, require_write

from registry import core
from registry.deps import ERRORS, RegistryDep, SettingsDep

router = APIRouter(prefix="/admin", route_class=AuthFirstRoute, responses=ERRORS)


@router.post("/sweep", dependencies=[require_write])
def sweep(
    reg: RegistryDep,
    settings: SettingsDep,
    older_than_s: Annotated[float | None, Query(ge=0, le=10**9, description="default REGISTRY_PENDING_TTL_S")] = None,
) -> dict:
    """Fail abandoned pending versions, delete unreferenced blobs, abort stale uploads."""
    return core.sweep(reg, settings.pending_ttl_s if older_than_s is None else older_than_s)
