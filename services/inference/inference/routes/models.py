"""`GET /models`: the model this server serves now (none while it loads)."""

from fastapi import APIRouter
from service_kit.auth import AuthFirstRoute, require_read

from inference import schemas
from inference.deps import ManagerDep

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


@router.get("/models")
async def list_models(manager: ManagerDep) -> schemas.ModelList:
    served = manager.current
    if served is None:
        return schemas.ModelList(data=[])
    info = served.info
    return schemas.ModelList(
        data=[
            schemas.ModelCard(
                id=info.name,
                created=int(info.loaded_at),
                version=info.version,
                stage=info.stage,
                context_length=served.context_length,
                max_model_len=served.context_length,
            )
        ]
    )
