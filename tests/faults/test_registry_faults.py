"""The registry under faults, as `python -m registry` processes with real stores behind them
(PostgreSQL and moto's S3 server from `nanochat_testing`), each test bounded in time.

- The S3 server killed, or stopped (SIGSTOP), in the middle of an upload: the upload answers a
  503 in the error shape with Retry-After, no half version is visible, and after the sweep nothing
  is left pending (nor, once S3 answers again, any multipart upload or stray object).
- The database killed: reads and writes answer 503 with Retry-After, /ready names it.
- An unauthenticated 200 MB body, announced by Content-Length or chunked: the 401 (404, 405 for
  no route) comes before the body is sent, and the process's memory does not grow with what the
  client pushes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import httpx
import pytest
from nanochat_testing.servers import Server, create_database, free_port, start_postgres, start_s3

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

TOKEN = "fault-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PART = 5 * 1024 * 1024
MiB = 1024 * 1024


@dataclass
class Registry:
    url: str
    proc: subprocess.Popen
    log_path: Path

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS line")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


def start_registry(data_dir: Path, env: dict[str, str]) -> Registry:
    port = free_port()
    log_path = data_dir / "registry.log"
    full_env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(data_dir),
        "REGISTRY_WRITE_TOKEN": TOKEN,
        "REGISTRY_LOG_LEVEL": "WARNING",
        **env,
    }
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "registry"], env=full_env, stdout=log, stderr=subprocess.STDOUT)
    reg = Registry(f"http://127.0.0.1:{port}", proc, log_path)
    # Generous: on a loaded 2-core machine the import and migrations alone can take half a minute.
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{reg.url}/ready", timeout=2).status_code == 200:
                return reg
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            reg.stop()
            pytest.fail(f"the registry did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.fixture
def s3() -> Iterator[Server]:
    """An S3 server of this test's own: the tests kill or stop it."""
    server = start_s3()
    yield server
    if server.proc.poll() is None:
        os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


@pytest.fixture
def registry_on_s3(postgres_server, s3, tmp_path) -> Iterator[tuple[Registry, dict]]:
    bucket = f"faults-{uuid.uuid4().hex[:8]}"
    reg = start_registry(
        tmp_path,
        {
            "REGISTRY_DATABASE_URL": create_database(postgres_server, f"faults_{uuid.uuid4().hex[:8]}"),
            "REGISTRY_BLOB_BACKEND": "s3",
            "REGISTRY_S3_ENDPOINT": s3.url,
            "REGISTRY_S3_BUCKET": bucket,
            "REGISTRY_S3_ACCESS_KEY": "testing",
            "REGISTRY_S3_SECRET_KEY": "testing",
            "REGISTRY_S3_PART_SIZE": str(PART),
            # A stopped store must fail a call within seconds here (the defaults allow a slow one a minute).
            "REGISTRY_S3_CONNECT_TIMEOUT_S": "2",
            "REGISTRY_S3_READ_TIMEOUT_S": "2",
            "REGISTRY_S3_MAX_ATTEMPTS": "2",
        },
    )
    yield reg, {"bucket": bucket}
    reg.stop()


def new_version(reg: Registry, name: str, data: bytes) -> int:
    spec = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    r = httpx.post(
        f"{reg.url}/v1/models/{name}/versions", headers=AUTH, json={"stage": "sft", "files": {"w.bin": spec}}
    )
    assert r.status_code == 201, r.text
    return r.json()["version"]


def upload_while(reg: Registry, name: str, version: int, data: bytes, fault) -> httpx.Response:
    """PUT `data`, calling `fault()` once the first full part has gone to S3 and before the rest."""

    def body() -> Iterator[bytes]:
        for start in range(0, PART, MiB):
            yield data[start : start + MiB]
        time.sleep(1.0)  # the first part's upload runs in the registry's background pool
        fault()
        yield data[PART:]

    return httpx.put(
        f"{reg.url}/v1/models/{name}/versions/{version}/files/w.bin",
        content=body(),
        headers={**AUTH, "Content-Length": str(len(data))},
        timeout=60,
    )


def assert_unavailable(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["type"] == "service_unavailable" and error["code"] == "blob_store_unavailable", error
    assert int(r.headers["retry-after"]) > 0


def assert_invisible(reg: Registry, name: str, version: int) -> None:
    assert httpx.get(f"{reg.url}/v1/models/{name}/versions").json()["total"] == 0
    assert httpx.get(f"{reg.url}/v1/models/{name}/versions/{version}").status_code == 404
    assert httpx.get(f"{reg.url}/v1/resolve/{name}").status_code == 404
    commit = httpx.post(f"{reg.url}/v1/models/{name}/versions/{version}/commit", headers=AUTH)
    assert commit.status_code == 409, commit.text


def pending(reg: Registry, name: str) -> int:
    return httpx.get(f"{reg.url}/v1/models/{name}/versions", params={"state": "pending"}).json()["total"]


def test_s3_killed_during_an_upload(registry_on_s3, s3):
    reg, _ = registry_on_s3
    kept = f"kept-{uuid.uuid4().hex[:6]}"
    small = os.urandom(1000)
    committed = new_version(reg, kept, small)
    file_url = f"{reg.url}/v1/models/{kept}/versions/{committed}/files/w.bin"
    assert httpx.put(file_url, content=small, headers=AUTH).status_code == 200
    assert httpx.post(f"{reg.url}/v1/models/{kept}/versions/{committed}/commit", headers=AUTH).status_code == 200
    name = f"kill-{uuid.uuid4().hex[:6]}"
    data = os.urandom(PART + 300_000)
    version = new_version(reg, name, data)
    started = time.monotonic()
    r = upload_while(reg, name, version, data, lambda: (s3.proc.kill(), s3.proc.wait()))
    assert time.monotonic() - started < 30
    assert_unavailable(r)
    # A download of a committed file is a 503 too, not a 200 whose body breaks off.
    assert_unavailable(httpx.get(file_url, timeout=30))
    assert httpx.get(f"{reg.url}/v1/resolve/{kept}").json()["version"] == committed
    assert_invisible(reg, name, version)
    assert pending(reg, name) == 1
    # The store is still away: the sweep fails the abandoned version, then says S3 could not be cleaned.
    sweep = httpx.post(f"{reg.url}/v1/admin/sweep", params={"older_than_s": 0}, headers=AUTH, timeout=60)
    assert_unavailable(sweep)
    assert pending(reg, name) == 0
    assert httpx.get(f"{reg.url}/v1/models/{name}/versions/{version}/upload", headers=AUTH).status_code == 404
    ready = httpx.get(f"{reg.url}/ready").json()
    assert ready["status"] == "not_ready" and ready["checks"]["database"] == "ok", ready


def test_s3_stopped_during_an_upload_then_back(registry_on_s3, s3):
    reg, store = registry_on_s3
    name = f"stop-{uuid.uuid4().hex[:6]}"
    data = os.urandom(PART + 300_000)
    version = new_version(reg, name, data)
    started = time.monotonic()
    r = upload_while(reg, name, version, data, lambda: os.kill(s3.proc.pid, signal.SIGSTOP))
    assert time.monotonic() - started < 40
    assert_unavailable(r)
    os.kill(s3.proc.pid, signal.SIGCONT)
    assert_invisible(reg, name, version)

    sweep = httpx.post(f"{reg.url}/v1/admin/sweep", params={"older_than_s": 0}, headers=AUTH, timeout=60)
    assert sweep.status_code == 200, sweep.text
    assert sweep.json()["failed_versions"] == 1 and sweep.json()["aborted_uploads"] >= 1, sweep.json()
    assert pending(reg, name) == 0
    client = boto3.client(
        "s3", endpoint_url=s3.url, aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    )
    assert client.list_multipart_uploads(Bucket=store["bucket"]).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=store["bucket"]).get("KeyCount", 0) == 0
    # Back to normal: the same bytes upload and commit.
    again = new_version(reg, name, data)
    put = httpx.put(f"{reg.url}/v1/models/{name}/versions/{again}/files/w.bin", content=data, headers=AUTH, timeout=60)
    assert put.status_code == 200, put.text
    assert httpx.post(f"{reg.url}/v1/models/{name}/versions/{again}/commit", headers=AUTH).status_code == 200


def test_database_killed(s3, tmp_path):
    """The database gone: reads and writes answer 503 in the error shape (not 500), /ready says which."""
    pg = start_postgres()
    try:
        reg = start_registry(
            tmp_path,
            {
                "REGISTRY_DATABASE_URL": create_database(pg, "faults_db"),
                "REGISTRY_BLOB_BACKEND": "s3",
                "REGISTRY_S3_ENDPOINT": s3.url,
                "REGISTRY_S3_BUCKET": f"faults-{uuid.uuid4().hex[:8]}",
                "REGISTRY_S3_ACCESS_KEY": "testing",
                "REGISTRY_S3_SECRET_KEY": "testing",
            },
        )
        try:
            assert httpx.get(f"{reg.url}/v1/models").status_code == 200
            pg.proc.kill()
            pg.proc.wait()
            for method, path, body in [
                ("GET", "/v1/models", None),
                ("GET", "/v1/resolve/m", None),
                ("POST", "/v1/models/m/versions", {"stage": "sft", "files": {"a": {"size": 1, "sha256": "0" * 64}}}),
            ]:
                r = httpx.request(method, f"{reg.url}{path}", json=body, headers=AUTH, timeout=30)
                assert r.status_code == 503, (path, r.text)
                assert r.json()["error"]["code"] == "database_unavailable" and r.headers["retry-after"]
            ready = httpx.get(f"{reg.url}/ready", timeout=30)
            assert ready.status_code == 503 and ready.json()["checks"]["database"] != "ok"
        finally:
            reg.stop()
    finally:
        pg.stop()


@pytest.fixture(scope="module")
def registry_local(tmp_path_factory) -> Iterator[Registry]:
    reg = start_registry(tmp_path_factory.mktemp("registry-local"), {"REGISTRY_BLOB_BACKEND": "local"})
    yield reg
    reg.stop()


BIG = 200 * MiB


def _request_head(method: str, path: str, port: int, chunked: bool) -> bytes:
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {BIG}"
    return (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/octet-stream\r\n{framing}\r\n\r\n"
    ).encode()


def _push(sock: socket.socket, chunked: bool, total: int) -> int:
    """Send up to `total` body bytes until the server stops taking them; returns how many went."""
    block = b"x" * MiB
    frame = f"{len(block):x}\r\n".encode() + block + b"\r\n" if chunked else block
    sent = 0
    sock.settimeout(5)
    try:
        while sent < total:
            sock.sendall(frame)
            sent += len(block)
    except OSError:
        pass
    return sent


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(
    "method,path,status",
    [
        ("POST", "/v1/models/m/versions", 401),
        ("PUT", "/v1/models/m/versions/1/files/w.bin", 401),
        ("PUT", "/v1/models/m/versions/1/attachments/r.md", 401),
        ("POST", "/v1/admin/sweep", 401),
        ("POST", "/v1/models", 405),
        ("POST", "/v1/no-such-route", 404),
    ],
)
def test_an_unauthenticated_big_body_is_refused_before_it_is_read(registry_local, method, path, status, chunked):
    reg = registry_local
    port = int(reg.url.rsplit(":", 1)[1])
    before = reg.rss_bytes()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        started = time.monotonic()
        sock.sendall(_request_head(method, path, port, chunked))
        # Only the head was sent: the answer cannot have waited for the body.
        head = sock.recv(65536)
        answered_s = time.monotonic() - started
        assert head.startswith(f"HTTP/1.1 {status}".encode()), head[:200]
        pushed = _push(sock, chunked, BIG)
    grown = reg.rss_bytes() - before
    print(
        f"{method} {path} chunked={chunked}: 401 after {answered_s * 1000:.0f} ms, pushed {pushed // MiB} MiB, RSS +{grown / MiB:.1f} MiB"
    )
    assert answered_s < 2
    assert grown < 32 * MiB, f"RSS grew by {grown / MiB:.0f} MiB while the client pushed {pushed // MiB} MiB"
    assert httpx.get(f"{reg.url}/health").status_code == 200
