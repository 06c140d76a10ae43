"""Resolve: which version a name means now (an alias, or the newest ready one of some stages)."""

from fastapi import APIRouter
from nanochat_contracts.stages import STAGES
from service_kit.auth import AuthFirstRoute, require_read

from registry import core, schemas
from registry.deps import ERRORS, Name, RegistryDep

router = APIRouter(route_class=AuthFirstRoute, responses=ERRORS)


@router.get("/resolve/{name}", dependencies=[require_read])
def resolve(reg: RegistryDep, name: Name, stage: str | None = None, alias: str | None = None) -> schemas.VersionOut:
    """`?alias=serving`, or `?stage=sft,rl`: the newest ready version whose stage is one of those
    (sft or rl when neither is given: the serving rule, `nanochat_contracts.serving`)."""
    stages = [s.strip() for s in stage.split(",") if s.strip()] if stage else None
    bad = [s for s in stages or [] if s not in STAGES]
    if bad:
        raise core.BadRequest(f"unknown stage(s) {bad}; stages are {list(STAGES)}")
    return core.resolve(reg, name, stages, alias)
