"""The web UI server: health, static assets and headers, sessions, the proxy's pass-through,
auth rules, streaming without buffering, and disconnects reaching the service."""

import json
import socket
import threading
import time

import httpx
import pytest
from conftest import ADMIN_TOKEN, CHAT_TOKEN, free_port, poll
from fastapi.testclient import TestClient
from webui.app import create_app
from webui.settings import Settings

pytestmark = pytest.mark.slow


def settings_for(fake_url: str, **extra) -> Settings:
    values = dict(
        inference_url=f"{fake_url}/inference",
        trainer_url=f"{fake_url}/trainer",
        registry_url=f"{fake_url}/registry",
        inference_token="inference-secret",
        trainer_token="trainer-secret",
        registry_token="registry-secret",
        trainer_read_token="trainer-read",
        admin_token=ADMIN_TOKEN,
    )
    return Settings(**{**values, **extra})


@pytest.fixture
def client(fake):
    with TestClient(create_app(settings_for(fake.url))) as c:
        yield c


def test_health_and_page_with_strict_csp(client):
    assert client.get("/health").json() == {"status": "ok"}
    page = client.get("/")
    assert page.status_code == 200 and '<script type="module" src="/app.js">' in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert client.get("/app.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/../pyproject.toml").status_code == 404
    assert client.get("/ready").json() == {
        "status": "ready",
        "checks": {"inference": "ok", "trainer": "ok", "registry": "ok"},
    }


def test_proxy_passes_path_query_and_only_safe_headers(client):
    response = client.get(
        "/api/trainer/_test/echo/a%2Fb/c?x=1&y=%20z",
        headers={"authorization": "Bearer from-browser", "cookie": "a=b", "last-event-id": "42"},
    )
    seen = response.json()
    assert seen["raw_path"] == "/trainer/_test/echo/a%2Fb/c"
    assert seen["query"] == "x=1&y=%20z"
    assert seen["headers"]["authorization"] == "Bearer trainer-read"
    assert seen["headers"]["last-event-id"] == "42"
    assert "cookie" not in seen["headers"]
    assert seen["headers"]["x-request-id"] == response.headers["x-request-id"]
    assert "sandbox" in response.headers["content-security-policy"]
    assert client.get("/api/elsewhere/v1/x").status_code == 404


def test_an_empty_service_token_sends_no_authorization(fake, monkeypatch):
    # What compose's `WEBUI_TRAINER_READ_TOKEN: ${TRAINER_READ_TOKEN:-}` gives when the token is unset.
    monkeypatch.setenv("WEBUI_TRAINER_READ_TOKEN", "")
    settings = Settings(**{k: v for k, v in settings_for(fake.url).model_dump().items() if k != "trainer_read_token"})
    assert settings.trainer_read_token is None
    with TestClient(create_app(settings)) as client:
        seen = client.get("/api/trainer/_test/echo/x", headers={"authorization": "Bearer from-browser"}).json()
    assert "authorization" not in seen["headers"]


def test_changes_need_the_admin_session(client):
    job = {"stage": "make_data", "options": {}, "output_name": "nanochat"}
    refused = client.post("/api/trainer/v1/jobs", json=job)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_required"
    assert client.put("/api/registry/v1/models/nanochat/aliases/serving", json={"version": 5}).status_code == 403
    assert client.post("/api/session", json={"token": "wrong"}).status_code == 401
    assert client.get("/api/session").json()["role"] is None

    login = client.post("/api/session", json={"token": ADMIN_TOKEN})
    assert login.json() == {"role": "admin"}
    cookie = login.headers["set-cookie"]
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert ADMIN_TOKEN not in cookie
    assert client.get("/api/session").json()["role"] == "admin"
    created = client.post("/api/trainer/v1/jobs", json=job)
    assert created.status_code == 202 and created.json()["status"] == "queued"

    client.cookies.clear()
    client.cookies.set("nanochat_session", "admin.99999999999.forged")
    assert client.post("/api/trainer/v1/jobs", json=job).status_code == 403
    client.delete("/api/session")
    assert client.get("/api/session").json()["role"] is None


def test_chat_token_protects_inference(fake):
    with TestClient(create_app(settings_for(fake.url, chat_token="chat-token"))) as c:
        assert c.get("/api/inference/v1/models").status_code == 401
        assert c.post("/api/session", json={"token": "chat-token"}).json() == {"role": "chat"}
        assert c.get("/api/inference/v1/models").json()["data"][0]["id"] == "nanochat"
        # A chat session is not an admin one.
        assert c.post("/api/trainer/v1/jobs", json={"stage": "make_data"}).status_code == 403


def test_unreachable_service_and_oversized_body(fake):
    dead = f"http://127.0.0.1:{free_port()}"
    with TestClient(create_app(settings_for(fake.url, inference_url=dead, max_body_bytes=1000))) as c:
        c.post("/api/session", json={"token": ADMIN_TOKEN})
        down = c.get("/api/inference/v1/models")
        assert down.status_code == 502 and down.json()["error"]["code"] == "upstream_unavailable"
        assert c.get("/ready").status_code == 503
        big = c.post("/api/trainer/_test/echo/x", content=b"x" * 5000)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunked():
            yield from [b"x" * 600] * 2

        streamed = c.post("/api/trainer/_test/echo/x", content=chunked())
        assert streamed.status_code == 413 and streamed.json()["error"]["code"] == "request_too_large"
        assert c.post("/api/trainer/_test/echo/x", content=b"x" * 500).json()["body"] == "x" * 500


def test_401_404_422_share_the_error_shape(fake):
    shape = {"message", "type", "param", "code"}
    with TestClient(create_app(settings_for(fake.url, chat_token="chat-token"))) as c:
        refused = c.get("/api/inference/v1/models")
        unknown_service = c.get("/api/elsewhere/v1/x")
        unknown_file = c.get("/no-such-file.js")
        invalid = c.post("/api/session", json={"token": ""})
    for r, status in [(refused, 401), (unknown_service, 404), (unknown_file, 404), (invalid, 422)]:
        assert r.status_code == status and set(r.json()) == {"error"} and set(r.json()["error"]) == shape, r.text
    assert refused.json()["error"]["type"] == "authentication_error"
    assert unknown_service.json()["error"]["code"] == unknown_file.json()["error"]["code"] == "not_found"
    assert invalid.json()["error"]["param"] == "token" and invalid.json()["error"]["code"] == "invalid_value"


def test_upstream_errors_pass_through_with_retry_after(client):
    client.post("/api/session", json={"token": ADMIN_TOKEN})
    body = {"model": "nanochat", "messages": [{"role": "user", "content": "too much context"}]}
    too_long = client.post("/api/inference/v1/chat/completions", json=body)
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"


def test_stream_is_unbuffered_and_disconnect_frees_the_request(webui, fake):
    before = httpx.get(f"{fake.url}/inference/_test/state").json()
    body = {"model": "nanochat", "stream": True, "messages": [{"role": "user", "content": "a slow answer"}]}
    with httpx.Client(timeout=30) as http:
        assert http.post(f"{webui.url}/api/session", json={"token": CHAT_TOKEN}).status_code == 200
        with http.stream("POST", f"{webui.url}/api/inference/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            events = response.iter_lines()
            first = next(line for line in events if line.startswith("data:"))
            assert json.loads(first[5:])["choices"][0]["delta"] == {"role": "assistant"}
            # The first event reached us while the service is still generating: nothing buffered it.
            assert httpx.get(f"{fake.url}/inference/_test/state").json()["active"] == 1
            contents = [
                json.loads(line[5:])["choices"][0]["delta"]["content"]
                for line, _ in zip((e for e in events if e.startswith("data:")), range(3))
            ]
            assert contents == ["word0 ", "word1 ", "word2 "]
    state = poll(lambda: (s := httpx.get(f"{fake.url}/inference/_test/state").json())["active"] == 0 and s)
    assert state["disconnected"] == before["disconnected"] + 1
    metrics = httpx.get(f"{webui.url}/metrics").text
    assert 'webui_proxy_open_streams{service="inference"} 0.0' in metrics
    assert 'webui_proxy_requests_total{service="inference",status="200"}' in metrics


def cut_mid_event_server() -> tuple[str, threading.Thread]:
    """A one-shot 'inference' that streams a whole event, half of the next, then drops the connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, listener:
            conn.recv(65536)
            body = [b'data: {"choices": [{"delta": {"content": "Hi"}}]}\n\n', b'data: {"choices": [{"del']
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for part in body:
                conn.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            time.sleep(0.2)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}", thread


def test_a_chat_stream_cut_mid_event_ends_with_only_whole_events_and_the_error(fake):
    url, thread = cut_mid_event_server()
    with TestClient(create_app(settings_for(fake.url, inference_url=url))) as c:
        c.post("/api/session", json={"token": ADMIN_TOKEN})
        body = {"model": "nanochat", "messages": [{"role": "user", "content": "hi"}], "stream": True}
        with c.stream("POST", "/api/inference/v1/chat/completions", json=body) as r:
            text = b"".join(r.iter_raw()).decode()
    thread.join(5)
    events = [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e]
    assert events[0]["choices"][0]["delta"]["content"] == "Hi"
    assert len(events) == 2 and events[1]["error"]["code"] == "upstream_stream_broken", text
