"""Models and their versions: list, create, read, patch metrics, delete, commit, lineage."""

from typing import Annotated

from fastapi import APIRouter, Query
from service_kit.auth import AuthFirstRoute, require_read, require_write

from registry import core, schemas
from registry.deps import ERRORS, Name, RegistryDep, VersionNo

router = APIRouter(prefix="/models", route_class=AuthFirstRoute, responses=ERRORS)


@router.get("", dependencies=[require_read])
def list_models(reg: RegistryDep) -> schemas.ModelList:
    return {"items": core.list_models(reg)}


@router.post("/{name}/versions", dependencies=[require_write], status_code=201)
def create_version(reg: RegistryDep, name: Name, body: schemas.VersionCreate) -> schemas.VersionCreated:
    return {**core.create_version(reg, name, body), "presigned_uploads": reg.presigned_uploads}


@router.get("/{name}/versions", dependencies=[require_read])
def list_versions(
    reg: RegistryDep,
    name: Name,
    stage: Annotated[list[schemas.Stage] | None, Query()] = None,
    state: Annotated[list[schemas.State] | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> schemas.VersionPage:
    return core.list_versions(reg, name, stage, state, limit, offset)


@router.get("/{name}/versions/{version}", dependencies=[require_read])
def get_version(reg: RegistryDep, name: Name, version: VersionNo) -> schemas.VersionOut:
    return core.get_version(reg, name, version)


@router.patch("/{name}/versions/{version}", dependencies=[require_write])
def patch_version(reg: RegistryDep, name: Name, version: VersionNo, body: schemas.VersionPatch) -> schemas.VersionOut:
    return core.patch_version(reg, name, version, body.metrics)


@router.delete("/{name}/versions/{version}", dependencies=[require_write])
def delete_version(reg: RegistryDep, name: Name, version: VersionNo, force: bool = False) -> schemas.VersionOut:
    return core.delete_version(reg, name, version, force)


@router.post("/{name}/versions/{version}/commit", dependencies=[require_write])
def commit(reg: RegistryDep, name: Name, version: VersionNo) -> schemas.VersionOut:
    return core.commit(reg, name, version)


@router.get("/{name}/versions/{version}/lineage", dependencies=[require_read])
def lineage(reg: RegistryDep, name: Name, version: VersionNo) -> schemas.Lineage:
    return core.lineage(reg, name, version)
