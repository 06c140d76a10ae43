"""The service kit on a small app of its own: error shapes, tokens checked before the body is
read, the body limit against a real uvicorn (chunked too), request ids, logs, health/ready/metrics."""

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field
from service_kit.app import create_app
from service_kit.auth import AuthFirstRoute, Tokens, require_read, require_write
from service_kit.errors import APIError
from service_kit.logs import JsonFormatter
from service_kit.ops import Readiness, probe

SHAPE = {"message", "type", "param", "code"}
LIMIT = 1000


class Options(BaseModel):
    depth: int = Field(ge=1)


class Job(BaseModel):
    stage: str
    options: Options


router = APIRouter(route_class=AuthFirstRoute)


@router.post("/jobs", dependencies=[require_write])
def submit(job: Job) -> dict:
    return {"stage": job.stage}


@router.get("/jobs", dependencies=[require_read])
def jobs() -> dict:
    return {"items": []}


@router.post("/echo")
async def echo(request: Request) -> dict:
    return {"size": len(await request.body())}


@router.get("/conflict")
def conflict() -> dict:
    raise HTTPException(409, "already there")


@router.get("/busy")
def busy() -> dict:
    raise APIError(429, "the queue is full", code="queue_full", headers={"Retry-After": "1"})


@router.get("/boom")
def boom() -> dict:
    raise RuntimeError("the database password is hunter2")


@router.get("/named")
def named() -> JSONResponse:
    return JSONResponse({"id": "cmpl-1"}, headers={"X-Request-ID": "cmpl-1"})


def build(tokens: Tokens | None = None, readiness=None, validation_status: int = 422):
    app = create_app(
        "demo",
        tokens=tokens or Tokens(write_token="w-token"),
        readiness=readiness,
        max_body_bytes=LIMIT,
        validation_status=validation_status,
    )
    app.include_router(router, prefix="/v1")
    return app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(build()) as c:
        yield c


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == SHAPE, body
    return body["error"]


def test_every_failure_has_the_one_shape(client):
    assert error_of(client.get("/v1/nowhere"), 404)["code"] == "not_found"
    assert error_of(client.delete("/v1/jobs"), 405)["code"] == "method_not_allowed"
    assert error_of(client.get("/v1/conflict"), 409) == {
        "message": "already there",
        "type": "invalid_request_error",
        "param": None,
        "code": "conflict",
    }
    busy = client.get("/v1/busy")
    assert error_of(busy, 429) == {
        "message": "the queue is full",
        "type": "rate_limit_error",
        "param": None,
        "code": "queue_full",
    }
    assert busy.headers["retry-after"] == "1"
    refused = client.post("/v1/jobs", json={"stage": "x", "options": {"depth": 1}})
    assert error_of(refused, 401)["type"] == "authentication_error"
    assert refused.headers["www-authenticate"] == "Bearer"


def test_validation_names_the_field_path(client):
    auth = {"Authorization": "Bearer w-token"}
    bad = error_of(client.post("/v1/jobs", json={"stage": "x", "options": {"depth": 0}}, headers=auth), 422)
    assert bad["param"] == "options.depth" and bad["code"] == "invalid_value"
    assert bad["message"].startswith("options.depth: ")
    two = error_of(client.post("/v1/jobs", json={"options": {"depth": "deep"}}, headers=auth), 422)
    assert two["param"] == "stage" and "options.depth: " in two["message"]
    not_json = client.post("/v1/jobs", content=b"{nope", headers={**auth, "Content-Type": "application/json"})
    assert error_of(not_json, 422)["code"] == "invalid_json"


def test_openai_dialect_answers_validation_with_400():
    with TestClient(build(validation_status=400)) as c:
        r = c.post(
            "/v1/jobs", json={"stage": "x", "options": {"depth": 0}}, headers={"Authorization": "Bearer w-token"}
        )
    assert error_of(r, 400)["param"] == "options.depth"


def test_a_crash_is_a_500_without_its_traceback_and_logged_with_the_request_id(client, caplog):
    caplog.set_level(logging.INFO)
    r = client.get("/v1/boom", headers={"X-Request-ID": "crash-1"})
    error = error_of(r, 500)
    assert error["type"] == "server_error" and "crash-1" in error["message"]
    assert "hunter2" not in r.text and "Traceback" not in r.text
    assert r.headers["x-request-id"] == "crash-1"
    crash = next(rec for rec in caplog.records if rec.exc_info)
    line = json.loads(JsonFormatter().format(crash))
    assert line["request_id"] == "crash-1" and "hunter2" in line["exc"]


def test_the_token_is_checked_before_the_body_is_read():
    app = build()

    async def call(headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        reads, sent = [], []

        async def receive() -> dict:
            reads.append(1)
            return {"type": "http.request", "body": b'{"stage": 1}', "more_body": False}

        async def send(message: dict) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/jobs",
            "raw_path": b"/v1/jobs",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"application/json"), *headers],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
            "state": {},
        }
        await app(scope, receive, send)
        return sent[0]["status"], len(reads)

    async def run() -> None:
        async with app.router.lifespan_context(app):
            # Without a token: 401, and not one byte of the (invalid) body was asked for.
            assert await call([]) == (401, 0)
            assert await call([(b"authorization", b"Bearer wrong")]) == (401, 0)
            # With it the body is read and found wanting.
            status, reads = await call([(b"authorization", b"Bearer w-token")])
            assert status == 422 and reads >= 1

    asyncio.run(run())


def test_read_and_write_tokens():
    # (read status, write status) by token; a write that passes the check is a 422 (empty job).
    cases = [
        (Tokens(write_token="w"), {None: (200, 401), "w": (200, 422), "r": (200, 401)}),
        (
            Tokens(write_token="w", read_token="r", reads_need_token=True),
            {None: (401, 401), "w": (200, 422), "r": (200, 401)},
        ),
        (Tokens(anonymous_writes=True), {None: (200, 422)}),
    ]
    for tokens, expected in cases:
        with TestClient(build(tokens)) as c:
            for token, (read, write) in expected.items():
                headers = {"Authorization": f"Bearer {token}"} if token else {}
                assert c.get("/v1/jobs", headers=headers).status_code == read, (tokens, token)
                assert c.post("/v1/jobs", json={}, headers=headers).status_code == write, (tokens, token)
    with TestClient(build(Tokens(no_write_token="set DEMO_WRITE_TOKEN"))) as c:
        r = c.post("/v1/jobs", json={}, headers={"Authorization": "Bearer anything"})
        assert error_of(r, 401)["message"] == "set DEMO_WRITE_TOKEN"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served() -> Iterator[str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_the_body_limit_counts_chunked_bytes_on_a_real_server(served):
    def chunks(n: int) -> Iterator[bytes]:
        for _ in range(n):
            yield b"x" * 300

    small = httpx.post(f"{served}/v1/echo", content=chunks(3))
    assert small.status_code == 200 and small.json() == {"size": 900}
    big = httpx.post(f"{served}/v1/echo", content=chunks(4))
    assert error_of(big, 413)["code"] == "request_too_large"
    announced = httpx.post(f"{served}/v1/echo", content=b"x" * (LIMIT + 1))
    assert error_of(announced, 413)["message"] == f"the request body is larger than {LIMIT} bytes"
    assert httpx.post(f"{served}/v1/echo", content=b"x" * LIMIT).json() == {"size": LIMIT}


def test_request_ids_in_and_out(client, caplog):
    caplog.set_level(logging.INFO, logger="service_kit.access")
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["x-request-id"] == "abc-123"
    made = client.get("/health", headers={"X-Request-ID": "no spaces allowed"}).headers["x-request-id"]
    assert len(made) == 32 and made != "no spaces allowed"
    # A route that names the request itself keeps its id, and the access line carries that one.
    assert client.get("/v1/named", headers={"X-Request-ID": "abc-456"}).headers["x-request-id"] == "cmpl-1"
    lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records]
    assert {"abc-123", "cmpl-1"} <= {line["request_id"] for line in lines}
    line = next(line for line in lines if line["request_id"] == "cmpl-1")
    assert line["path"] == "/v1/named" and line["status"] == 200 and line["method"] == "GET"


def test_one_log_format():
    record = logging.LogRecord("svc", logging.WARNING, __file__, 1, "hello %s", ("there",), None)
    record.job_id = "j-1"
    line = json.loads(JsonFormatter().format(record))
    assert list(line)[:5] == ["ts", "level", "logger", "message", "request_id"]
    assert line["message"] == "hello there" and line["level"] == "WARNING" and line["job_id"] == "j-1"


def test_health_ready_and_metrics():
    def failing() -> None:
        raise ConnectionError("refused")

    def sync_check(request: Request) -> Readiness:
        return Readiness({"database": probe(lambda: None), "redis": probe(failing)})

    async def async_check(request: Request) -> Readiness:
        return Readiness({"model": "ok"}, {"version": 3})

    with TestClient(build(readiness=sync_check)) as c:
        assert c.get("/health").json() == {"status": "ok"}
        r = c.get("/ready")
        assert r.status_code == 503 and r.json() == {
            "status": "not_ready",
            "checks": {"database": "ok", "redis": "unavailable: ConnectionError: refused"},
        }
        metrics = c.get("/metrics").text
        assert 'demo_http_requests_total{method="GET",route="/ready",status="503"} 1.0' in metrics
        assert "demo_http_request_seconds_bucket" in metrics
    with TestClient(build(readiness=async_check)) as c:
        assert c.get("/ready").json() == {"status": "ready", "checks": {"model": "ok"}, "version": 3}
