"""Which loaded model answers a request's `model` (`inference.model_ref` has the three forms).

`<name>` (or no model) is the served model. `<name>:<version>` and `<name>@<alias>` name one
registry version: the served model when it is that version, else a pinned model
(`inference.pinned_pool`), loaded on demand. An alias is resolved at the registry when the request
arrives, so a moved alias is followed at once; a version number already loaded is answered
without asking the registry. Every refusal is an APIError in OpenAI's shape, param `model`:
404 for another name, an unknown version or alias (the registry's own words), 400 when pinning is
off (INFERENCE_MAX_PINNED=0, or no registry), 503 with Retry-After while the registry is away,
every pinned model is busy, or the version is still loading past the wait bound.
"""

from __future__ import annotations

import re

import httpx
from registry_client import RegistryError
from registry_client.client import VersionInfo
from service_kit.errors import APIError
from starlette.concurrency import run_in_threadpool

from inference.model_ref import BadModelRef, ModelRef, parse_model_ref
from inference.pinned_pool import PinnedBusy, PinnedLoadFailed, PinnedLoading
from inference.served import ModelManager, NoModel, ServedModel


def not_found(message: str) -> APIError:
    return APIError(404, message, code="model_not_found", param="model")


def parse(manager: ModelManager, model: str) -> ModelRef:
    """The ref `model` names, if it names this server's model; 404 for another model, 400 for a bad form."""
    name = manager.settings.model_name
    try:
        ref = parse_model_ref(model)
    except BadModelRef as e:
        if re.split("[:@]", model, maxsplit=1)[0] != name:
            raise not_found(f"the model {model!r} does not exist; this server serves {name!r}") from None
        raise APIError(400, str(e), code="invalid_value", param="model") from None
    if ref.name != name:
        raise not_found(f"the model {model!r} does not exist; this server serves {name!r}")
    return ref


def hold_served(manager: ModelManager) -> ServedModel:
    """Hold the served model (it stays loaded until `manager.release`)."""
    try:
        return manager.acquire()
    except NoModel as e:
        raise APIError(
            503, f"no model is loaded yet: {e}", code="model_not_loaded", headers={"Retry-After": "5"}
        ) from None


def registry_version(manager: ModelManager, ref: ModelRef, model: str) -> VersionInfo:
    """The registry's ready version `ref` names (blocking: call off the event loop)."""
    registry = manager.registry
    if registry is None:
        raise pinning_off(model, "this server serves a local folder, not registry versions")
    try:
        if ref.alias is not None:
            return registry.resolve(ref.name, alias=ref.alias)
        return registry.get_version(ref.name, ref.version)
    except RegistryError as e:
        if e.status in (404, 409):
            code = "model_not_found" if e.status == 404 else "model_not_ready"
            raise APIError(e.status, f"{model}: {e}", code=code, param="model") from None
        if e.status in (401, 403):
            # Our own token is wrong: a retry will not help, and the operator must hear it.
            raise APIError(
                502,
                f"the registry refused this server's token ({e}); check INFERENCE_REGISTRY_TOKEN",
                code="registry_auth_failed",
            ) from None
        raise registry_away(e) from None
    except httpx.HTTPError as e:
        raise registry_away(e) from None


def registry_away(e: Exception) -> APIError:
    return APIError(
        503,
        f"the registry is unavailable ({e}); retry shortly",
        code="registry_unavailable",
        headers={"Retry-After": "5"},
    )


def pinning_off(model: str, why: str) -> APIError:
    return APIError(
        400,
        f"{model!r} names a version other than the served one, and pinning versions is off: {why}",
        code="pinning_disabled",
        param="model",
    )


async def acquire(manager: ModelManager, model: str | None) -> ServedModel:
    """Hold the model that answers `model`; release it with `manager.release`."""
    ref = ModelRef(manager.settings.model_name) if model is None else parse(manager, model)
    if ref.served:
        return hold_served(manager)
    version = ref.version
    if version is None:
        version = (await run_in_threadpool(registry_version, manager, ref, model)).version
    if is_served(manager, version):
        served = hold_served(manager)
        if served.info.version == version:
            return served
        manager.release(served)  # swapped away meanwhile: pin it instead
    settings = manager.settings
    if settings.max_pinned == 0:
        raise pinning_off(model, "INFERENCE_MAX_PINNED is 0")
    if manager.registry is None:
        raise pinning_off(model, "this server serves a local folder, not registry versions")
    if ref.alias is None and manager.pinned.get(version) is None:
        await run_in_threadpool(registry_version, manager, ref, model)  # 404 before any load starts
    try:
        return await manager.pinned.acquire(version, settings.pinned_load_timeout_s)
    except PinnedBusy as e:
        raise APIError(503, str(e), code="pinned_models_busy", headers={"Retry-After": "5"}) from None
    except PinnedLoading as e:
        raise APIError(503, str(e), code="model_loading", headers={"Retry-After": "5"}) from None
    except PinnedLoadFailed as e:
        raise APIError(503, str(e), code="model_load_failed", headers={"Retry-After": "30"}) from None


def is_served(manager: ModelManager, version: int) -> bool:
    current = manager.current
    return current is not None and current.info.version == version
