"""Resolve: which version a name means now (an alias, or the newest ready one of some stages)."""

from fastapi import APIRouter
from service_kit.auth import AuthFirstRoute, require_read

from registry import core, schemas
from registry.db import STAGES
from registry.deps import ERRORS, Name, RegistryDep

router = APIRouter(route_class=AuthFirstRoute, responses=ERRORS)


@router.get("/resolve/{name}", dependencies=[require_read])
def resolve(reg: RegistryDep, name: Name, stage: str | None = None, alias: str | None = None) -> schemas.VersionOut:
    """`?alias=serving`, or `?stage=rl,sft`: the newest ready version of the first stage present
    (rl, then sft when neither is given)."""
    stages = [s.strip() for s in stage.split(",") if s.strip()] if stage else None
    bad = [s for s in stages or [] if s not in STAGES]
    if bad:
        raise core.BadRequest(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
    return core.resolve(reg, name, stages, alias)
