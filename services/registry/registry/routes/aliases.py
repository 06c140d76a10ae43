"""Aliases (`serving`, ...): names that point at one version of a model."""

from fastapi import APIRouter, Response
from service_kit.auth import AuthFirstRoute, require_read, require_write

from registry import core, schemas
from registry.deps import ERRORS, Name, RegistryDep

router = APIRouter(prefix="/models/{name}/aliases", route_class=AuthFirstRoute, responses=ERRORS)


@router.put("/{alias}", dependencies=[require_write])
def set_alias(reg: RegistryDep, name: Name, alias: str, body: schemas.AliasSet) -> schemas.AliasOut:
    return core.set_alias(reg, name, alias, body.version)


@router.get("/{alias}", dependencies=[require_read])
def get_alias(reg: RegistryDep, name: Name, alias: str) -> schemas.AliasOut:
    return core.get_alias(reg, name, alias)


@router.delete("/{alias}", dependencies=[require_write], status_code=204)
def delete_alias(reg: RegistryDep, name: Name, alias: str) -> Response:
    core.delete_alias(reg, name, alias)
    return Response(status_code=204)
