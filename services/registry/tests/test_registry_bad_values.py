"""Free-form values (metrics, meta, job id, parent name, file names) at the API boundary, on both
backends: what no response could carry (a lone surrogate, 600-deep JSON, megabytes of metrics) is
refused with a 422 in the error shape and nothing is stored; a bad value already stored (written
before these checks) is answered repaired, so its model's listing and resolve keep working."""

import json

import pytest
from registry.db import Version
from registry_testlib import AUTH, blob, files_of, publish
from sqlalchemy import select, update


def nested(depth: int) -> dict:
    value: dict = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


BAD_BODIES = {
    "surrogate metric value": {"metrics": {"loss": "\ud800"}},
    "surrogate metric key": {"metrics": {"\ud800": 1.0}},
    "surrogate key, wrong type": {"metrics": {"\udfff": [1]}},
    "600-deep meta": {"meta": nested(600)},
    "65-deep meta": {"meta": nested(65)},
    "surrogate deep in meta": {"meta": {"a": [{"b": "x\udbff"}]}},
    "NUL in meta": {"meta": {"a": "x\x00y"}},
    "5 MiB of meta": {"meta": {"curve": "x" * (5 * 1024 * 1024)}},
    "300 KiB of metrics": {"metrics": {f"m{i}": "x" * 1000 for i in range(300)}},
    "surrogate job id": {"job_id": "job-\ud800"},
    "surrogate parent name": {"parent": {"name": "p\ud800", "version": 1}},
}


def post_raw(client, url: str, body: dict, method: str = "POST"):
    # The body goes as JSON text with \\u escapes, the way any client sends a lone surrogate.
    return client.request(method, url, content=json.dumps(body), headers={**AUTH, "Content-Type": "application/json"})


def assert_nothing_stored(client, name: str) -> None:
    listed = client.get(f"/v1/models/{name}/versions", params={"state": ["pending", "ready", "failed"]})
    assert listed.status_code == 200 and listed.json()["total"] == 0, listed.text
    assert client.get(f"/v1/resolve/{name}").status_code == 404
    assert client.get("/v1/models").status_code == 200


def assert_error_shape(r, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    return error


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_unanswerable_values_are_refused_and_not_stored(client, name, case):
    body = {"stage": "sft", "files": {"a.bin": blob(b"a" + name.encode())}, **BAD_BODIES[case]}
    error = assert_error_shape(post_raw(client, f"/v1/models/{name}/versions", body), 422)
    assert error["param"].split(".")[0] in {"metrics", "meta", "job_id", "parent"}, error
    assert_nothing_stored(client, name)


@pytest.mark.parametrize("path", ["a\ud800.bin", "dir/\udc00", "x" * 256, "d/" + "é" * 128])
def test_file_names_that_cannot_round_trip_are_refused_by_name(client, name, path):
    body = {"stage": "sft", "files": {path: blob(b"a"), "ok.bin": blob(b"b")}}
    error = assert_error_shape(post_raw(client, f"/v1/models/{name}/versions", body), 422)
    assert error["param"] == "files" and (path[:20] in error["message"] or ascii(path)[1:21] in error["message"]), error
    assert_nothing_stored(client, name)


@pytest.mark.parametrize("case", ["surrogate metric value", "surrogate metric key", "300 KiB of metrics"])
def test_a_bad_patch_is_refused_and_the_version_unchanged(client, name, case):
    v = publish(client, name, files_of("patch"), metrics={"loss": 2.0})["version"]
    url = f"/v1/models/{name}/versions/{v}"
    assert_error_shape(post_raw(client, url, BAD_BODIES[case], method="PATCH"), 422)
    # Many small patches cannot add up past the bound either.
    for i in range(2):
        big = {f"k{i}-{j}": "y" * 1000 for j in range(200)}
        r = post_raw(client, url, {"metrics": big}, method="PATCH")
    assert_error_shape(r, 422)
    got = client.get(url)
    assert got.status_code == 200 and got.json()["metrics"]["loss"] == 2.0
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v


def test_a_bad_value_stored_earlier_is_answered_repaired(client, reg, name):
    """A row written before the checks: listing, reading and resolve answer it repaired, and a
    PATCH of its metrics writes them back clean."""
    v = publish(client, name, files_of("old"), metrics={"loss": 1.0})["version"]
    with reg.sessions.begin() as s:
        s.execute(
            update(Version)
            .where(Version.name == name, Version.version == v)
            .values(metrics={"loss": 1.0, "note": "bad \ud800 text"}, meta={"deep": nested(600)})
        )
    for url in (f"/v1/models/{name}/versions", f"/v1/resolve/{name}", f"/v1/models/{name}/versions/{v}"):
        r = client.get(url)
        assert r.status_code == 200, (url, r.text)
    got = client.get(f"/v1/resolve/{name}").json()
    assert got["version"] == v and got["metrics"] == {"loss": 1.0, "note": "bad ? text"}
    deep, depth = got["meta"], 0
    while isinstance(deep, dict):
        deep, depth = next(iter(deep.values())), depth + 1
    assert deep is None and depth <= 64
    patched = client.patch(f"/v1/models/{name}/versions/{v}", headers=AUTH, json={"metrics": {"acc": 0.5}})
    assert patched.status_code == 200, patched.text
    with reg.sessions() as s:
        stored = s.scalar(select(Version.metrics).where(Version.name == name, Version.version == v))
    assert stored == {"loss": 1.0, "note": "bad ? text", "acc": 0.5}
