"""What the UI lets through to the services: routing on the decoded path, which token each call
carries, who may chat, sign-in limits and revocable sessions, and no 5xx for malformed input.
The web UI server runs in-process (TestClient) or as a process (raw requests), in front of the
fake upstream process, whose echo route answers what it was sent."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from conftest import ADMIN_TOKEN, CHAT_TOKEN, Proc, free_port, start_webui, wait_healthy
from fastapi.testclient import TestClient
from test_webui_server import settings_for
from webui.app import create_app

pytestmark = pytest.mark.slow

SHAPE = {"message", "type", "param", "code"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == SHAPE and (code is None or error["code"] == code), error


def raw_get(url: str, target: bytes) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (httpx would normalise it)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def test_the_service_is_read_from_the_decoded_path(fake):
    with TestClient(create_app(settings_for(fake.url, inference_token=None))) as c:
        # An encoded letter in the service's name: the router matched "inference", so does the proxy.
        models = c.get("/api/inferenc%65/v1/models")
        assert models.status_code == 200 and models.json()["data"][0]["id"] == "nanochat"
        assert c.get("/api/traine%72/_test/echo/a%2Fb").json()["raw_path"] == "/trainer/_test/echo/a%2Fb"
        assert_error(c.get("/api/inference%2Fv1/models"), 404, "not_found")
        assert_error(c.get("/api/elsewhere/v1/x"), 404, "not_found")
        assert_error(c.get("/api/trainer/%2e%2e/registry/v1/models"), 400, "invalid_path")


def test_odd_paths_get_no_5xx(webui):
    targets = [
        b"/api/inferenc%65/v1/models",
        b"/api/trainer/../registry/v1/models",
        b"/api/trainer/./v1/jobs",
        b"/api/%",
        b"/api//v1",
        b"/api/",
        b"/api/trainer",
        b"/api/trainer/v1/jobs%00",
        b"/api/trainer/v1/jobs/%ff%fe",
        b"/api/trainer/v1/jobs/\xc3\xa9",
        b"/api/inf\xc3\xa9rence/v1/models",
        b"/api/trainer/v1/jobs?offset=%zz&x",
        b"/api/trainer/" + b"a" * 8000,
        b"//api//trainer//v1",
        b"/api/session/extra",
    ]
    for target in targets:
        status, body = raw_get(webui.url, target)
        assert status < 500, (target, status, body[:300])
    assert raw_get(webui.url, b"/api/trainer/../registry/v1/models")[0] == 400


def test_reads_carry_the_read_token_and_only_changes_the_write_token(fake):
    settings = settings_for(fake.url, registry_read_token="registry-read", trainer_read_token="trainer-read")
    with TestClient(create_app(settings)) as c:
        seen = lambda r: r.json()["headers"].get("authorization")  # noqa: E731
        assert seen(c.get("/api/registry/_test/echo/x")) == "Bearer registry-read"
        assert seen(c.get("/api/trainer/_test/echo/x")) == "Bearer trainer-read"
        assert_error(c.put("/api/registry/_test/echo/x", json={}), 403, "admin_required")
        assert c.post("/api/session", json={"token": ADMIN_TOKEN}).status_code == 200
        assert seen(c.get("/api/registry/_test/echo/x")) == "Bearer registry-read"
        assert seen(c.put("/api/registry/_test/echo/x", json={})) == "Bearer registry-secret"
        assert seen(c.post("/api/trainer/_test/echo/x", json={})) == "Bearer trainer-secret"
    # Without a read token, reads carry none: never the write token.
    with TestClient(create_app(settings_for(fake.url, trainer_read_token=None))) as c:
        assert "authorization" not in c.get("/api/registry/_test/echo/x").json()["headers"]
        assert "authorization" not in c.get("/api/trainer/_test/echo/x").json()["headers"]


@pytest.fixture
def registry(tmp_path):
    """The real registry, whose reads need a token: the read token or the write token."""
    port = free_port()
    env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(tmp_path / "registry"),
        "REGISTRY_WRITE_TOKEN": "registry-secret",
        "REGISTRY_READ_TOKEN": "registry-read",
        "REGISTRY_READ_TOKEN_REQUIRED": "true",
    }
    with open(tmp_path / "registry.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "registry"], env=env, stdout=log, stderr=log)
    proc = Proc(f"http://127.0.0.1:{port}", process)
    try:
        wait_healthy(f"{proc.url}/health", process, limit_s=60)
        yield proc
    finally:
        proc.stop()


def test_the_real_registry_is_read_with_the_read_token(fake, registry):
    services = {"inference": f"{fake.url}/inference", "trainer": f"{fake.url}/trainer", "registry": registry.url}
    webui = start_webui(None, services, WEBUI_REGISTRY_READ_TOKEN="registry-read")
    try:
        assert httpx.get(f"{webui.url}/api/registry/v1/models").json()["items"] == []
        with httpx.Client(base_url=webui.url) as admin:
            admin.post("/api/session", json={"token": ADMIN_TOKEN})
            # A change goes with the write token: the registry takes it (no such model: 404, not 401).
            moved = admin.put("/api/registry/v1/models/nanochat/aliases/serving", json={"version": 1})
            assert moved.status_code == 404, moved.text
    finally:
        webui.stop()
    # A UI without the read token is refused by the registry: it never falls back to the write token.
    webui = start_webui(None, services)
    try:
        assert_error(httpx.get(f"{webui.url}/api/registry/v1/models"), 401, "invalid_api_key")
    finally:
        webui.stop()


def test_model_files_need_the_admin_session(fake):
    files = "/api/registry/v1/models/nanochat/versions/4/files/model.pt"
    with TestClient(create_app(settings_for(fake.url))) as c:
        assert_error(c.get(files), 403, "admin_required")
        assert_error(c.get(files.replace("files/", "fil%65s/")), 403, "admin_required")
        assert c.head(files).status_code == 403
        # What the UI itself reads stays open: listings, lineage, report attachments.
        assert c.get("/api/registry/v1/models/nanochat/versions").status_code == 200
        assert c.get("/api/registry/v1/models/nanochat/versions/4/attachments/report.md").status_code == 200
        c.post("/api/session", json={"token": ADMIN_TOKEN})
        assert c.get(files).status_code == 404  # through to the fake, which holds no files


def test_chat_needs_a_session_when_inference_has_a_token(fake):
    # No chat token: the inference token alone closes chat to visitors without a session.
    with TestClient(create_app(settings_for(fake.url))) as c:
        assert c.get("/api/session").json()["chat_needs_login"] is True
        assert_error(c.get("/api/inference/v1/models"), 401, "login_required")
        body = {"model": "nanochat", "messages": [{"role": "user", "content": "hi"}]}
        assert_error(c.post("/api/inference/v1/chat/completions", json=body), 401, "login_required")
        c.post("/api/session", json={"token": ADMIN_TOKEN})
        assert c.get("/api/inference/v1/models").status_code == 200
    with TestClient(create_app(settings_for(fake.url, inference_token=None))) as c:
        assert c.get("/api/session").json()["chat_needs_login"] is False
        assert c.get("/api/inference/v1/models").status_code == 200
    with TestClient(create_app(settings_for(fake.url, chat_token=CHAT_TOKEN))) as c:
        assert c.post("/api/session", json={"token": CHAT_TOKEN}).json() == {"role": "chat"}
        assert c.get("/api/inference/v1/models").status_code == 200


def test_failed_sign_ins_are_rate_limited_per_client(fake):
    with TestClient(create_app(settings_for(fake.url, login_max_failures=3, login_window_s=2))) as c:
        for _ in range(3):
            assert_error(c.post("/api/session", json={"token": "guess"}), 401, "invalid_token")
        # Past the limit even the right token waits: guessing learns nothing more.
        refused = c.post("/api/session", json={"token": ADMIN_TOKEN})
        assert_error(refused, 429, "too_many_attempts")
        wait = int(refused.headers["retry-after"])
        assert 1 <= wait <= 2
        time.sleep(wait)
        assert c.post("/api/session", json={"token": ADMIN_TOKEN}).json() == {"role": "admin"}
    # The default: 10 failures a minute.
    with TestClient(create_app(settings_for(fake.url))) as c:
        statuses = [c.post("/api/session", json={"token": "guess"}).status_code for _ in range(11)]
        assert statuses == [401] * 10 + [429]


def test_the_sign_in_limit_is_per_client_address(webui):
    # The test runs on 127.0.0.1, which uvicorn trusts as a proxy: X-Forwarded-For names the client.
    def sign_in(client: str, token: str = "guess") -> httpx.Response:
        return httpx.post(f"{webui.url}/api/session", json={"token": token}, headers={"x-forwarded-for": client})

    assert [sign_in("203.0.113.1").status_code for _ in range(10)] == [401] * 10
    assert_error(sign_in("203.0.113.1", ADMIN_TOKEN), 429, "too_many_attempts")
    assert sign_in("203.0.113.2").status_code == 401
    assert sign_in("203.0.113.2", ADMIN_TOKEN).json() == {"role": "admin"}


def test_sign_out_revokes_the_cookie_on_the_server(fake):
    job = {"stage": "make_data", "options": {}, "output_name": "nanochat"}
    with TestClient(create_app(settings_for(fake.url))) as c:
        c.post("/api/session", json={"token": ADMIN_TOKEN})
        cookie = c.cookies["nanochat_session"]
        assert c.post("/api/trainer/v1/jobs", json=job).status_code == 202
        c.delete("/api/session")
        # The browser forgot it; someone who kept a copy finds it dead as well.
        c.cookies.set("nanochat_session", cookie)
        assert c.get("/api/session").json()["role"] is None
        assert_error(c.post("/api/trainer/v1/jobs", json=job), 403, "admin_required")
        # Nor is a forged one, or the old `role.expiry.hmac` format.
        for forged in ("made-up-id.c2lnbmF0dXJl", "admin.99999999999.forged"):
            c.cookies.set("nanochat_session", forged)
            assert c.get("/api/session").json()["role"] is None


def test_malformed_sign_in_bodies_get_4xx(fake):
    with TestClient(create_app(settings_for(fake.url))) as c:
        bodies = [b"{", b"[]", b'{"token": 5}', b"\xff\xfe", b'{"token": "' + b"x" * 5000 + b'"}', b"[" * 100_000, b""]
        for body in bodies:
            r = c.post("/api/session", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500 and set(r.json()["error"]) == SHAPE, (body[:20], r.status_code, r.text)
        assert_error(
            c.post("/api/session", content=b"{", headers={"content-type": "application/json"}), 422, "invalid_json"
        )
        assert c.post("/api/session", content=b"token=x").status_code == 422
        c.cookies.set("nanochat_session", "not-a-session!")
        assert c.delete("/api/session").status_code == 200
