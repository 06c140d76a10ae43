"""Presigned part uploads straight to S3 (moto's server): round trip, a wrong part caught when the
upload completes, parts missing, the sweeper aborting an abandoned upload, and the local backend
refusing the presigned path.

moto stores parts without checking `x-amz-checksum-sha256` (nor the URL's signature), so here the
registry's own check of the assembled file against the manifest is what must catch a bad part."""

import hashlib
import os
import uuid

import httpx
from registry_testlib import AUTH, blob

MiB = 1024 * 1024
PART = 5 * MiB


def start(client, name, files, path):
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "files": {p: blob(d) for p, d in files.items()}},
    )
    assert r.status_code == 201, r.text
    v = r.json()["version"]
    up = client.post(f"/v1/models/{name}/versions/{v}/uploads", headers=AUTH, json={"path": path, "part_size": PART})
    return r.json(), v, up


def put_part(client, name, v, upload, number, data, declared=None):
    """Ask for part `number`'s URL (declaring the sha256 of `declared`, default `data`), PUT `data` to S3."""
    r = client.post(
        f"/v1/models/{name}/versions/{v}/uploads/{upload}/parts/{number}",
        headers=AUTH,
        json={"sha256": hashlib.sha256(declared if declared is not None else data).hexdigest()},
    )
    assert r.status_code == 200, r.text
    part = r.json()
    assert part["size"] == len(data) and "x-amz-checksum-sha256" in part["headers"]
    return httpx.put(part["url"], content=data, headers=part["headers"])


def parts_of(data):
    return [data[i : i + PART] for i in range(0, len(data), PART)]


def staged_leftovers(reg):
    s3, bucket, prefix = reg.blobs.s3, reg.blobs.bucket, reg.blobs.staging_key("")
    objects = s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])
    uploads = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return objects + uploads


def test_presigned_round_trip_or_refused_on_local(client, backend, reg, name):
    big = uuid.uuid4().bytes + os.urandom(2 * PART + 1234)
    files = {"model.safetensors": big, "config.json": b'{"n_layer": 2}'}
    created, v, up = start(client, name, files, "model.safetensors")
    if backend["kind"] == "sqlite-local":
        assert created["presigned_uploads"] is False
        assert up.status_code == 400 and "PUT" in up.json()["error"]["message"]
        return
    assert created["presigned_uploads"] is True and up.status_code == 200, up.text
    upload = up.json()
    assert upload["parts"] == 3 and upload["stored"] is False
    for number, data in enumerate(parts_of(big), 1):
        assert put_part(client, name, v, upload["id"], number, data).status_code == 200
    done = client.post(f"/v1/models/{name}/versions/{v}/uploads/{upload['id']}/complete", headers=AUTH)
    assert done.status_code == 200 and done.json() == {"path": "model.safetensors", **blob(big), "stored": True}
    client.put(f"/v1/models/{name}/versions/{v}/files/config.json", content=files["config.json"], headers=AUTH)
    assert client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).status_code == 200
    assert client.get(f"/v1/models/{name}/versions/{v}/files/model.safetensors").content == big
    assert not staged_leftovers(reg)
    # The same bytes in a new version are already stored: no upload is opened.
    _, v2, again = start(client, name, files, "model.safetensors")
    assert again.json()["stored"] is True and again.json()["id"] is None


def test_a_wrong_part_is_caught_when_the_upload_completes(client, backend, reg, name):
    if backend["kind"] == "sqlite-local":
        return  # the local backend has no presigned path (refusal tested above)
    big = uuid.uuid4().bytes + os.urandom(PART + 4321)
    _, v, up = start(client, name, {"w.bin": big}, "w.bin")
    upload = up.json()["id"]
    first, second = parts_of(big)
    assert put_part(client, name, v, upload, 1, first).status_code == 200
    wrong = bytes([second[0] ^ 1]) + second[1:]
    sent = put_part(client, name, v, upload, 2, wrong, declared=second)
    # Real S3 refuses the part itself (its checksum does not match the signed header); moto does not.
    if sent.status_code < 300:
        done = client.post(f"/v1/models/{name}/versions/{v}/uploads/{upload}/complete", headers=AUTH)
        assert done.status_code == 400 and "sha256" in done.json()["error"]["message"]
    commit = client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH)
    assert commit.status_code == 409 and "w.bin" in commit.json()["error"]["message"]
    assert reg.blobs.size(blob(big)["sha256"]) is None and not staged_leftovers(reg)


def test_missing_parts_keep_the_upload_open(client, backend, name):
    if backend["kind"] == "sqlite-local":
        return
    big = uuid.uuid4().bytes + os.urandom(PART + 99)
    _, v, up = start(client, name, {"w.bin": big}, "w.bin")
    upload = up.json()["id"]
    first, second = parts_of(big)
    put_part(client, name, v, upload, 2, second)
    early = client.post(f"/v1/models/{name}/versions/{v}/uploads/{upload}/complete", headers=AUTH)
    assert early.status_code == 409 and "[1]" in early.json()["error"]["message"]
    put_part(client, name, v, upload, 1, first)
    assert client.post(f"/v1/models/{name}/versions/{v}/uploads/{upload}/complete", headers=AUTH).status_code == 200
    assert client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).status_code == 200
    bad_number = client.post(
        f"/v1/models/{name}/versions/{v}/uploads/{upload}/parts/3", headers=AUTH, json={"sha256": "0" * 64}
    )
    assert bad_number.status_code == 404  # completed: the upload is closed


def test_an_abandoned_presigned_upload_is_aborted_by_the_sweeper(client, backend, reg, name):
    if backend["kind"] == "sqlite-local":
        return
    big = uuid.uuid4().bytes + os.urandom(PART + 7)
    _, v, up = start(client, name, {"w.bin": big}, "w.bin")
    put_part(client, name, v, up.json()["id"], 1, parts_of(big)[0])
    assert staged_leftovers(reg)
    swept = client.post("/v1/admin/sweep", params={"older_than_s": 0}, headers=AUTH).json()
    assert swept["aborted_uploads"] >= 1 and not staged_leftovers(reg)
    gone = client.post(f"/v1/models/{name}/versions/{v}/uploads/{up.json()['id']}/complete", headers=AUTH)
    assert gone.status_code == 404
