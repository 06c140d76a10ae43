"""Helpers the registry tests share: the write token, manifest entries, and publishing a version."""

import hashlib
import json
import os
import uuid

TOKEN = "test-write-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def blob(data: bytes) -> dict:
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def publish(client, name: str, files: dict[str, bytes], stage: str = "sft", **extra) -> dict:
    """Create, upload and commit a version; returns the committed version."""
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": stage, "files": {p: blob(d) for p, d in files.items()}, **extra},
    )
    assert r.status_code == 201, r.text
    v = r.json()["version"]
    for path in r.json()["missing"]:
        up = client.put(f"/v1/models/{name}/versions/{v}/files/{path}", content=files[path], headers=AUTH)
        assert up.status_code == 200, up.text
    r = client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()


def files_of(tag: str) -> dict[str, bytes]:
    """A small checkpoint whose bytes are unique to this call, so tests never share blobs."""
    salt = uuid.uuid4().bytes
    return {
        "model.safetensors": salt + os.urandom(300_000) + tag.encode(),
        "config.json": json.dumps({"n_layer": 2, "salt": salt.hex()}).encode(),
        "tokenizer/tokenizer.json": salt + b'{"pattern": "x"}',
        "meta.json": json.dumps({"stage": tag}).encode(),
    }
