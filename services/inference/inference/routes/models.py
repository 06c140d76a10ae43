"""`GET /models`: the served model and the pinned versions loaded beside it; `GET /models/{id}`: one.

The served model's id is the bare name (a client sending it back follows hot swaps); a pinned
version's is `<name>:<version>`. Every card says its exact `version`. `GET /models/{id}` takes the
three forms of `inference.model_ref` and answers the card under the id asked for: the served or
pinned model it would run on, or, for a registry version not loaded now, a card with
`loaded: false` (a request naming it loads it). Unknown ids are 404s in OpenAI's shape.
"""

from fastapi import APIRouter
from service_kit.auth import AuthFirstRoute, require_read
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference import schemas
from inference.deps import ManagerDep
from inference.model_choice import not_found, parse, registry_version
from inference.served import ServedModel

router = APIRouter(route_class=AuthFirstRoute, dependencies=[require_read])


def card(served: ServedModel, id: str, pinned: bool) -> schemas.ModelCard:
    info = served.info
    return schemas.ModelCard(
        id=id,
        created=int(info.loaded_at),
        version=info.version,
        stage=info.stage,
        context_length=served.context_length,
        max_model_len=served.context_length,
        pinned=pinned,
    )


@router.get("/models")
async def list_models(manager: ManagerDep) -> schemas.ModelList:
    served = manager.current
    cards = [] if served is None else [card(served, served.info.name, pinned=False)]
    cards += [card(p, p.model_id, pinned=True) for p in manager.pinned.loaded()]
    return schemas.ModelList(data=cards)


@router.get("/models/{model:path}")
async def get_model(model: str, manager: ManagerDep) -> schemas.ModelCard:
    try:
        ref = parse(manager, model)
    except APIError as e:
        raise not_found(e.message) from None
    served = manager.current
    if ref.served:
        if served is None:
            raise not_found(f"{model!r} is not loaded: {manager.load_error or 'loading'}")
        return card(served, model, pinned=False)
    if manager.registry is None and (served is None or ref.version is None or ref.version != served.info.version):
        raise not_found(f"{model!r} is not loaded, and this server serves a local folder, not registry versions")
    # A loaded version number is answered without the registry; an alias is always resolved there.
    info, version = None, ref.version
    if version is None:
        info = await run_in_threadpool(registry_version, manager, ref, model)
        version = info.version
    if served is not None and served.info.version == version:
        return card(served, model, pinned=False)
    if (pinned := manager.pinned.get(version)) is not None:
        return card(pinned, model, pinned=True)
    info = info or await run_in_threadpool(registry_version, manager, ref, model)
    return schemas.ModelCard(
        id=model,
        created=0,
        version=info.version,
        stage=info.stage,
        context_length=None,
        max_model_len=None,
        loaded=False,
    )
