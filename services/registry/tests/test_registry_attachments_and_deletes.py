"""Two consistency rules over HTTP on both backends: an attachment can be replaced, so it is never
served as `immutable` (a cache revalidates it by its ETag); a deleted version is never resolved,
listed or served, whether it was the newest or behind an alias."""

import uuid

from registry_testlib import AUTH, blob, files_of, publish


def attach(client, name: str, version: int, path: str, data: bytes):
    url = f"/v1/models/{name}/versions/{version}/attachments/{path}"
    return client.put(url, content=data, headers={**AUTH, "X-Content-SHA256": blob(data)["sha256"]})


def test_a_replaced_attachment_is_revalidated_not_cached_for_good(client, name):
    files = files_of("att")
    v = publish(client, name, files)["version"]
    first, second = b"# report v1 " + uuid.uuid4().bytes, b"# report v2 " + uuid.uuid4().bytes
    assert attach(client, name, v, "report.md", first).status_code == 200
    url = f"/v1/models/{name}/versions/{v}/attachments/report.md"
    got = client.get(url)
    assert got.content == first and got.headers["etag"] == f'"{blob(first)["sha256"]}"'
    assert "immutable" not in got.headers["cache-control"] and "no-cache" in got.headers["cache-control"]
    assert client.get(url, headers={"If-None-Match": got.headers["etag"]}).status_code == 304

    assert attach(client, name, v, "report.md", second).status_code == 200
    again = client.get(url, headers={"If-None-Match": got.headers["etag"]})
    assert again.status_code == 200 and again.content == second
    assert again.headers["etag"] == f'"{blob(second)["sha256"]}"'
    # The same attachment under /files/ answers the same headers; model files stay immutable.
    same = client.head(f"/v1/models/{name}/versions/{v}/files/report.md")
    assert same.headers["cache-control"] == again.headers["cache-control"]
    model = client.head(f"/v1/models/{name}/versions/{v}/files/config.json")
    assert "immutable" in model.headers["cache-control"]


def test_a_deleted_version_is_never_resolved(client, name):
    v1 = publish(client, name, files_of("a"), stage="sft")["version"]
    v2 = publish(client, name, files_of("b"), stage="sft")["version"]
    v3 = publish(client, name, files_of("c"), stage="rl")["version"]
    assert client.put(f"/v1/models/{name}/aliases/serving", headers=AUTH, json={"version": v3}).status_code == 200
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v3

    assert client.delete(f"/v1/models/{name}/versions/{v3}", headers=AUTH).status_code == 409
    assert client.delete(f"/v1/models/{name}/versions/{v3}", headers=AUTH, params={"force": "true"}).status_code == 200
    assert client.get(f"/v1/resolve/{name}", params={"alias": "serving"}).status_code == 404
    assert client.get(f"/v1/resolve/{name}", params={"stage": "rl"}).status_code == 404
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v2

    assert client.delete(f"/v1/models/{name}/versions/{v2}", headers=AUTH).status_code == 200
    assert client.get(f"/v1/resolve/{name}").json()["version"] == v1
    assert client.put(f"/v1/models/{name}/aliases/serving", headers=AUTH, json={"version": v2}).status_code == 404
    for gone in (v2, v3):
        assert client.get(f"/v1/models/{name}/versions/{gone}").status_code == 404
        assert client.get(f"/v1/models/{name}/versions/{gone}/files/config.json").status_code == 404
    assert [x["version"] for x in client.get(f"/v1/models/{name}/versions").json()["items"]] == [v1]

    assert client.delete(f"/v1/models/{name}/versions/{v1}", headers=AUTH).status_code == 200
    assert client.get(f"/v1/resolve/{name}").status_code == 404
    assert client.get(f"/v1/resolve/{name}", params={"stage": "sft,rl"}).status_code == 404
