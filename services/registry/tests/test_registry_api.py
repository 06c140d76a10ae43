"""The registry's HTTP API on both backends: round trip, integrity, visibility, aliases, lineage,
auth, path validation, Range downloads, attachments, events and the sweeper."""

import os
import uuid
from datetime import timedelta
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient
from nanochat_contracts import serving
from registry import core
from registry.api import create_app
from registry.db import Blob, Version, utcnow
from registry.ranges import parse_range
from registry.schemas import VersionCreate
from registry.settings import Settings
from registry_testlib import AUTH, blob, files_of, publish
from sqlalchemy import select, update


def test_round_trip_and_pending_is_invisible(client, name):
    files = files_of("rt")
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={
            "stage": "sft",
            "step": 7,
            "metrics": {"loss": 1.5},
            "job_id": "job-1",
            "files": {p: blob(d) for p, d in files.items()},
        },
    )
    assert r.status_code == 201
    created = r.json()
    v = created["version"]
    assert created["state"] == "pending" and sorted(created["missing"]) == sorted(files)
    for path, data in files.items():
        assert client.put(f"/v1/models/{name}/versions/{v}/files/{path}", content=data, headers=AUTH).status_code == 200
    # Uploaded but not committed: nothing is visible yet.
    assert client.get(f"/v1/models/{name}/versions").json()["total"] == 0
    assert client.get(f"/v1/resolve/{name}").status_code == 404
    assert client.get(f"/v1/models/{name}/versions/{v}").status_code == 404
    assert client.get(f"/v1/models/{name}/versions/{v}/files/config.json").status_code == 404

    committed = client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).json()
    assert committed["state"] == "ready"
    assert {f["path"]: f["sha256"] for f in committed["files"]} == {p: blob(d)["sha256"] for p, d in files.items()}
    assert client.get(f"/v1/resolve/{name}", params={"stage": "rl,sft"}).json()["version"] == v
    listed = client.get(f"/v1/models/{name}/versions", params={"stage": "sft"}).json()
    assert [x["version"] for x in listed["items"]] == [v] and listed["items"][0]["metrics"] == {"loss": 1.5}
    for path, data in files.items():
        got = client.get(f"/v1/models/{name}/versions/{v}/files/{path}")
        assert got.status_code == 200 and got.content == data
        assert got.headers["etag"] == f'"{blob(data)["sha256"]}"'
    assert name in [m["name"] for m in client.get("/v1/models").json()["items"]]


def test_equal_files_are_stored_once(client, name):
    files = files_of("dedup")
    publish(client, name, files)
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "files": {p: blob(d) for p, d in files.items()}},
    )
    assert r.json()["missing"] == []
    assert client.post(f"/v1/models/{name}/versions/{r.json()['version']}/commit", headers=AUTH).status_code == 200


def test_wrong_bytes_are_refused_and_commit_needs_every_file(client, name):
    files = files_of("bad")
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "base", "files": {p: blob(d) for p, d in files.items()}},
    )
    v = r.json()["version"]
    data = files["model.safetensors"]
    flipped = bytes([data[0] ^ 1]) + data[1:]
    bad = client.put(f"/v1/models/{name}/versions/{v}/files/model.safetensors", content=flipped, headers=AUTH)
    assert bad.status_code == 400 and "sha256" in bad.json()["error"]["message"]
    short = client.put(
        f"/v1/models/{name}/versions/{v}/files/config.json", content=files["config.json"][:-1], headers=AUTH
    )
    assert short.status_code == 400
    commit = client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH)
    assert commit.status_code == 409 and "model.safetensors" in commit.json()["error"]["message"]
    assert client.get(f"/v1/resolve/{name}", params={"stage": "base"}).status_code == 404
    not_listed = client.put(f"/v1/models/{name}/versions/{v}/files/extra.bin", content=b"x", headers=AUTH)
    assert not_listed.status_code == 400


def test_abandoned_upload_is_swept_and_never_visible(client, reg, name):
    files = files_of("crash")
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "files": {p: blob(d) for p, d in files.items()}},
    )
    v = r.json()["version"]
    client.put(
        f"/v1/models/{name}/versions/{v}/files/model.safetensors", content=files["model.safetensors"], headers=AUTH
    )
    sha = blob(files["model.safetensors"])["sha256"]
    assert reg.blobs.size(sha) == len(files["model.safetensors"])
    # The "crash": the client never commits. The sweeper fails the version and drops its blobs.
    swept = client.post("/v1/admin/sweep", params={"older_than_s": 0}, headers=AUTH).json()
    assert swept["failed_versions"] >= 1
    assert reg.blobs.size(sha) is None
    assert client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).status_code == 404
    assert client.get(f"/v1/models/{name}/versions", params={"state": ["ready", "pending"]}).json()["total"] == 0
    assert client.get(f"/v1/models/{name}/versions", params={"state": "failed"}).json()["total"] == 1


def test_corrupted_blob_is_not_committable(client, reg, name):
    files = files_of("lost")
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "files": {p: blob(d) for p, d in files.items()}},
    )
    v = r.json()["version"]
    for path, data in files.items():
        client.put(f"/v1/models/{name}/versions/{v}/files/{path}", content=data, headers=AUTH)
    reg.blobs.delete(blob(files["config.json"])["sha256"])
    r = client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH)
    assert r.status_code == 409 and "config.json" in r.json()["error"]["message"]


def test_aliases_move_and_guard_deletes(client, name):
    v1 = publish(client, name, files_of("a1"))["version"]
    v2 = publish(client, name, files_of("a2"), stage="rl")["version"]
    assert client.put(f"/v1/models/{name}/aliases/serving", json={"version": v1}, headers=AUTH).status_code == 200
    assert client.get(f"/v1/resolve/{name}", params={"alias": "serving"}).json()["version"] == v1
    client.put(f"/v1/models/{name}/aliases/serving", json={"version": v2}, headers=AUTH)
    assert client.get(f"/v1/resolve/{name}", params={"alias": "serving"}).json()["version"] == v2
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v2
    assert client.get(f"/v1/resolve/{name}", params={"stage": "sft"}).json()["version"] == v1
    assert client.get(f"/v1/models/{name}/versions/{v2}").json()["aliases"] == ["serving"]

    refused = client.delete(f"/v1/models/{name}/versions/{v2}", headers=AUTH)
    assert refused.status_code == 409 and "serving" in refused.json()["error"]["message"]
    assert client.delete(f"/v1/models/{name}/versions/{v2}", params={"force": "true"}, headers=AUTH).status_code == 200
    assert client.get(f"/v1/resolve/{name}", params={"alias": "serving"}).status_code == 404
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v1
    assert client.put(f"/v1/models/{name}/aliases/serving", json={"version": v2}, headers=AUTH).status_code == 404
    assert client.put(f"/v1/models/{name}/aliases/serving", json={"version": 999}, headers=AUTH).status_code == 404


def test_resolve_is_the_serving_rule(client, name):
    """With no stage, resolve answers `nanochat_contracts.serving.newest` over the model's versions:
    the newest ready sft/rl version, an SFT after an RL included (inference serves this answer)."""
    for stage in ("sft", "rl", "sft", "base"):
        publish(client, name, files_of(stage), stage=stage)
    # A newer rl version still uploading is passed over.
    pending = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "rl", "files": {p: blob(d) for p, d in files_of("up").items()}},
    ).json()
    listed = client.get(f"/v1/models/{name}/versions", params={"state": ["ready", "pending"]}).json()["items"]
    versions = [SimpleNamespace(version=v["version"], stage=v["stage"], state=v["state"]) for v in listed]
    expected = serving.newest(versions)
    assert expected is not None and expected.stage == "sft" and expected.version < pending["version"]
    assert client.get(f"/v1/resolve/{name}").json()["version"] == expected.version
    assert client.get(f"/v1/resolve/{name}", params={"stage": "rl,sft"}).json()["version"] == expected.version
    assert (
        client.get(f"/v1/resolve/{name}", params={"stage": "rl"}).json()["version"]
        == serving.newest(versions, ["rl"]).version
    )


def test_lineage_and_metrics_patch(client, name):
    tok = publish(client, name, files_of("tok"), stage="tokenizer")["version"]
    base = publish(client, name, files_of("base"), stage="base", parent={"version": tok})["version"]
    sft = publish(client, name, files_of("sft"), stage="sft", parent={"version": base})["version"]
    lin = client.get(f"/v1/models/{name}/versions/{sft}/lineage").json()
    assert [p["version"] for p in lin["parents"]] == [base, tok]
    assert [c["version"] for c in client.get(f"/v1/models/{name}/versions/{base}/lineage").json()["children"]] == [sft]
    bad_parent = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "parent": {"version": 999}, "files": {"a": blob(b"a")}},
    )
    assert bad_parent.status_code == 404

    client.patch(f"/v1/models/{name}/versions/{base}", json={"metrics": {"core": 0.2}}, headers=AUTH)
    patched = client.patch(f"/v1/models/{name}/versions/{base}", json={"metrics": {"bpb": 0.9}}, headers=AUTH).json()
    assert patched["metrics"] == {"core": 0.2, "bpb": 0.9}


def test_attachments_are_hash_checked_and_listed_apart(client, name):
    v = publish(client, name, files_of("att"))["version"]
    report = b"# report card\n" + uuid.uuid4().bytes
    url = f"/v1/models/{name}/versions/{v}/attachments/report.md"
    wrong = client.put(url, content=report, headers={**AUTH, "X-Content-SHA256": "0" * 64})
    assert wrong.status_code == 400
    assert (
        client.put(url, content=report, headers={**AUTH, "X-Content-SHA256": blob(report)["sha256"]}).status_code == 200
    )
    got = client.get(f"/v1/models/{name}/versions/{v}").json()
    assert got["attachments"] == [{"path": "report.md", **blob(report)}]
    assert "report.md" not in [f["path"] for f in got["files"]]
    assert client.get(url).content == report
    overwrite_model = client.put(
        f"/v1/models/{name}/versions/{v}/attachments/config.json",
        content=b"x",
        headers={**AUTH, "X-Content-SHA256": blob(b"x")["sha256"]},
    )
    assert overwrite_model.status_code == 409


def test_writes_need_the_token(client, name):
    body = {"stage": "sft", "files": {"a": blob(b"a")}}
    assert client.post(f"/v1/models/{name}/versions", json=body).status_code == 401
    wrong = client.post(f"/v1/models/{name}/versions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert client.put(f"/v1/models/{name}/aliases/x", json={"version": 1}).status_code == 401
    assert client.get("/v1/models").status_code == 200


@pytest.mark.parametrize("allow_anonymous", [False, True])
def test_no_write_token_refuses_writes_unless_anonymous_is_opted_in(tmp_path, name, allow_anonymous):
    settings = Settings(data_dir=tmp_path, allow_anonymous_writes=allow_anonymous, log_level="ERROR")
    with TestClient(create_app(settings)) as c:
        for token in (None, "anything"):
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            r = c.post(
                f"/v1/models/{name}/versions", json={"stage": "sft", "files": {"a": blob(b"a")}}, headers=headers
            )
            if allow_anonymous:
                assert r.status_code == 201, r.text
            else:
                assert r.status_code == 401 and "REGISTRY_WRITE_TOKEN" in r.json()["error"]["message"]
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 200


@pytest.mark.parametrize(
    "path", ["../etc/passwd", "a/../../b", "/abs/path", "a//b", "./a", "a\\b", "a\x00b", "C:/x", "x" * 600]
)
def test_bad_paths_are_refused(client, name, path):
    r = client.post(f"/v1/models/{name}/versions", headers=AUTH, json={"stage": "sft", "files": {path: blob(b"a")}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["message"] and r.json()["error"]["param"] == "files"


def test_traversal_in_url_is_refused(client, name):
    v = publish(client, name, {"a.bin": uuid.uuid4().bytes})["version"]
    for raw in ["%2e%2e/%2e%2e/secret", "a/%2e%2e/%2e%2e/x", "%00"]:
        assert client.get(f"/v1/models/{name}/versions/{v}/files/{raw}").status_code == 422
    assert (
        client.post(
            "/v1/models/bad%20name/versions", headers=AUTH, json={"stage": "sft", "files": {"a": blob(b"a")}}
        ).status_code
        == 400
    )


def test_parse_range_forms():
    assert parse_range("bytes=0-9", 100) == (0, 10) and parse_range("bytes=90-", 100) == (90, 100)
    assert parse_range("bytes=-5", 100) == (95, 100) and parse_range("bytes=50-500", 100) == (50, 100)
    for unsatisfiable in ["bytes=100-", "bytes=9-3", "bytes=-0", "bytes=-", "items=0-1", "bytes=0-1,4-5"]:
        assert parse_range(unsatisfiable, 100) is None, unsatisfiable


def test_range_downloads(client, name):
    data = os.urandom(100_000)
    v = publish(client, name, {"w.bin": data})["version"]
    url = f"/v1/models/{name}/versions/{v}/files/w.bin"
    for header, want in [
        ("bytes=0-9", data[:10]),
        ("bytes=99990-", data[99990:]),
        ("bytes=-5", data[-5:]),
        ("bytes=500-200000", data[500:]),
    ]:
        r = client.get(url, headers={"Range": header})
        assert r.status_code == 206 and r.content == want
        assert r.headers["content-range"].endswith("/100000")
    assert client.get(url, headers={"Range": "bytes=100000-"}).status_code == 416
    assert client.get(url, headers={"Range": "bytes=9-3"}).status_code == 416
    etag = client.head(url).headers["etag"]
    assert client.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert client.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}).status_code == 200


def test_concurrent_creates_get_distinct_numbers(reg, name):
    from concurrent.futures import ThreadPoolExecutor

    req = VersionCreate(stage="sft", files={"a": blob(b"a")})
    with ThreadPoolExecutor(20) as pool:
        numbers = list(pool.map(lambda _: core.create_version(reg, name, req)["version"], range(20)))
    assert sorted(numbers) == list(range(1, 21))


def test_health_ready_metrics_openapi(client):
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["checks"] == {"database": "ok", "blobs": "ok"}
    r = client.get("/health", headers={"X-Request-ID": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
    text = client.get("/metrics").text
    assert 'registry_http_requests_total{method="GET",route="/health",status="200"}' in text
    assert "/v1/models/{name}/versions" in client.get("/openapi.json").json()["paths"]
    assert client.get("/docs").status_code == 200


def test_bad_json_bodies_are_4xx(client, name):
    url = f"/v1/models/{name}/versions"
    for body in [
        b"not json",
        b'{"stage": "sft", "files": {"a": {"size": 1, "sha256": "xyz"}}}',
        b'{"stage": "xx", "files": {}}',
        b'{"stage": "sft", "files": {"a": {"size": -1, "sha256": "' + b"a" * 64 + b'"}}}',
        b'{"stage": "sft", "files": {"a": {"size": 1, "sha256": "' + b"a" * 64 + b'"}}, "metrics": {"x": NaN}}',
    ]:
        r = client.post(url, content=body, headers={**AUTH, "Content-Type": "application/json"})
        assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        assert r.json()["error"]["message"]


def test_a_file_bigger_than_a_part_round_trips(client, name):
    # On S3 the part size is 5 MiB here: this upload goes up as a three-part multipart upload.
    data = uuid.uuid4().bytes + os.urandom(11 * 1024 * 1024)
    v = publish(client, name, {"big.bin": data})["version"]
    got = client.get(f"/v1/models/{name}/versions/{v}/files/big.bin")
    assert got.content == data
    tail = client.get(f"/v1/models/{name}/versions/{v}/files/big.bin", headers={"Range": "bytes=6000000-6000099"})
    assert tail.content == data[6000000:6000100]


def age(reg, sha=None, version_id=None, days=2):
    """Move a blob's last claim / a version's last touch `days` into the past."""
    then = utcnow() - timedelta(days=days)
    with reg.sessions.begin() as s:
        if sha is not None:
            s.execute(update(Blob).where(Blob.sha256 == sha).values(claimed_at=then))
        if version_id is not None:
            s.execute(update(Version).where(Version.id == version_id).values(updated_at=then))


def abandon(client, reg, name, files, upload):
    """A pending version with `upload` sent, then left alone for two days."""
    r = client.post(
        f"/v1/models/{name}/versions",
        headers=AUTH,
        json={"stage": "sft", "files": {p: blob(d) for p, d in files.items()}},
    )
    v = r.json()["version"]
    for path in upload:
        assert (
            client.put(f"/v1/models/{name}/versions/{v}/files/{path}", content=files[path], headers=AUTH).status_code
            == 200
        )
    with reg.sessions() as s:
        age(reg, version_id=s.scalar(select(Version.id).where(Version.name == name, Version.version == v)))
    return v


def test_unreferenced_blobs_are_kept_until_their_last_claim_is_old(client, reg, name):
    files = {"w.bin": uuid.uuid4().bytes + os.urandom(1000)}
    sha = blob(files["w.bin"])["sha256"]
    abandon(client, reg, name, files, ["w.bin"])
    assert core.sweep(reg, 3600)["failed_versions"] >= 1
    assert reg.blobs.size(sha) == len(files["w.bin"])  # unreferenced now, but claimed a moment ago
    age(reg, sha=sha)
    core.sweep(reg, 3600)
    assert reg.blobs.size(sha) is None


def test_a_blob_claimed_while_the_sweeper_runs_is_kept(client, reg, name, monkeypatch):
    files = files_of("claim")
    sha = blob(files["model.safetensors"])["sha256"]
    abandon(client, reg, name, files, ["model.safetensors"])
    age(reg, sha=sha)
    created = {}
    real_orphans = core._orphans

    def orphans_then_a_new_version_claims_one(s, cutoff):
        found = real_orphans(s, cutoff)
        assert sha in found
        # The sweeper has picked its candidates; now a new version counts on one of them.
        req = VersionCreate(stage="sft", files={p: blob(d) for p, d in files.items()})
        created.update(core.create_version(reg, name, req))
        return found

    monkeypatch.setattr(core, "_orphans", orphans_then_a_new_version_claims_one)
    core.sweep(reg, 3600)
    assert "model.safetensors" not in created["missing"]
    v = created["version"]
    for path in created["missing"]:
        client.put(f"/v1/models/{name}/versions/{v}/files/{path}", content=files[path], headers=AUTH)
    assert client.post(f"/v1/models/{name}/versions/{v}/commit", headers=AUTH).status_code == 200
    assert client.get(f"/v1/models/{name}/versions/{v}/files/model.safetensors").content == files["model.safetensors"]


def test_401_404_422_share_the_error_shape(client, name):
    shape = {"message", "type", "param", "code"}
    refused = client.post(f"/v1/models/{name}/versions", json={"stage": "sft", "files": {}})
    missing = client.get(f"/v1/models/{name}/versions/999999")
    unknown_route = client.get("/v1/no-such-route")
    invalid = client.get(f"/v1/models/{name}/versions", params={"limit": 0})
    for r, status in [(refused, 401), (missing, 404), (unknown_route, 404), (invalid, 422)]:
        assert r.status_code == status and set(r.json()) == {"error"} and set(r.json()["error"]) == shape, r.text
    assert refused.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == unknown_route.json()["error"]["code"] == "not_found"
    assert invalid.json()["error"]["param"] == "limit" and invalid.json()["error"]["code"] == "invalid_value"


def test_timestamps_carry_their_time_zone(client, name):
    """RFC 3339 date-times, as the OpenAPI document says: SQLite hands DateTime columns back without
    their zone, which was answered as a bare local-looking time."""
    from datetime import datetime

    v = publish(client, name, files_of("tz"))["version"]
    answers = [
        client.get(f"/v1/models/{name}/versions/{v}").json(),
        client.get(f"/v1/models/{name}/versions").json()["items"][0],
        client.get(f"/v1/resolve/{name}").json(),
        client.patch(f"/v1/models/{name}/versions/{v}", headers=AUTH, json={"metrics": {"x": 1}}).json(),
        client.get(f"/v1/models/{name}/versions/{v}/lineage").json()["version"],
    ]
    for answer in answers:
        for key in ("created_at", "committed_at"):
            assert datetime.fromisoformat(answer[key].replace("Z", "+00:00")).utcoffset() is not None, answer[key]
