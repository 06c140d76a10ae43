"""Inference serves what the registry's resolve names (the serving rule, `nanochat_contracts.serving`).

`ModelManager.resolve` runs against the real registry app (SQLite, local blobs) through a
TestClient: the versions it picks are the registry's default resolve and `serving.newest` of the
versions listed, an SFT after an RL included; the `serving` alias overrides both. The registry's
event payloads are the ones inference's listener acts on.
"""

from __future__ import annotations

import hashlib
import json
from types import SimpleNamespace

from fastapi.testclient import TestClient
from inference.served import ModelManager
from inference.settings import Settings
from nanochat_contracts import serving
from nanochat_contracts.registry_events import CHANNEL, STREAM
from registry.api import create_app as create_registry
from registry.events import EventPublisher
from registry.settings import Settings as RegistrySettings

TOKEN = "registry-write"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def publish(client: TestClient, name: str, stage: str, commit: bool = True) -> int:
    """One version holding one small file of its own; left pending when `commit` is false."""
    data = f"{name} {stage} {id(object())}".encode()
    spec = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    v = client.post(
        f"/v1/models/{name}/versions", headers=AUTH, json={"stage": stage, "files": {"model.bin": spec}}
    ).json()["version"]
    assert client.put(f"/v1/models/{name}/versions/{v}/files/model.bin", content=data, headers=AUTH).status_code == 200
    if commit:
        assert client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).status_code == 200
    return v


def test_inference_serves_the_registrys_resolve(tmp_path) -> None:
    app = create_registry(RegistrySettings(data_dir=tmp_path / "registry", write_token=TOKEN, log_level="WARNING"))
    manager = ModelManager(Settings(registry_url="http://testserver", model_cache_dir=tmp_path / "cache"))
    with TestClient(app) as registry:
        manager._registry.http.close()
        manager._registry.http = registry  # a TestClient is an httpx.Client: the same requests, in process
        assert manager.resolve() is None  # no model yet
        publish(registry, "nanochat", "base")
        assert manager.resolve() is None  # a base model is never served
        publish(registry, "nanochat", "sft")
        rl = publish(registry, "nanochat", "rl")
        sft = publish(registry, "nanochat", "sft")
        publish(registry, "nanochat", "base")
        publish(registry, "nanochat", "rl", commit=False)

        listed = registry.get("/v1/models/nanochat/versions", params={"state": ["ready", "pending"]}).json()["items"]
        rule = serving.newest([SimpleNamespace(**{k: v[k] for k in ("version", "stage", "state")}) for v in listed])
        chosen = manager.resolve()
        assert chosen is not None and chosen.version == sft == rule.version
        assert chosen.version == registry.get("/v1/resolve/nanochat").json()["version"]

        assert (
            registry.put(
                f"/v1/models/nanochat/aliases/{serving.SERVING_ALIAS}", json={"version": rl}, headers=AUTH
            ).status_code
            == 200
        )
        assert manager.resolve().version == rl
    manager._registry.close()


def test_the_registrys_events_that_make_inference_resolve_again() -> None:
    """The payloads the registry's publisher makes (without Redis it returns them) against
    inference's filter: a served stage registered, or its serving alias moved, of its model."""
    publisher = EventPublisher(None, CHANNEL, STREAM, stream_maxlen=10)
    manager = ModelManager(Settings())
    cases = [
        (publisher.publish("model.registered", "nanochat", 3, "sft"), True),
        (publisher.publish("model.registered", "nanochat", 4, "rl"), True),
        (publisher.publish("model.registered", "nanochat", 5, "base"), False),
        (publisher.publish("model.registered", "other", 6, "sft"), False),
        (publisher.publish("alias.moved", "nanochat", 3, "sft", alias=serving.SERVING_ALIAS), True),
        (publisher.publish("alias.moved", "nanochat", 3, "sft", alias="best"), False),
        (publisher.publish("version.deleted", "nanochat", 4, "rl"), True),
        (publisher.publish("version.deleted", "other", 4, "rl"), False),
    ]
    assert [manager._relevant(json.dumps(event)) for event, _ in cases] == [want for _, want in cases]
    assert not manager._relevant(b"not json") and not manager._relevant('{"type": "model.registered"}')
