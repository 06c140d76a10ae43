"""`python -m registry` as a real process (PostgreSQL + moto S3 + Redis behind it), driven over HTTP
by the typed client, and schemathesis over its OpenAPI schema: no input may produce a 5xx."""

import os
import subprocess
import sys
import time
import uuid

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from nanochat_testing.servers import create_database, free_port
from registry_client import RegistryClient
from registry_testlib import AUTH, TOKEN

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def registry_process(postgres_server, s3_server, redis_server, tmp_path_factory):
    port = free_port()
    data_dir = tmp_path_factory.mktemp("registry-process")
    env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(data_dir),
        "REGISTRY_DATABASE_URL": create_database(postgres_server, f"proc_{uuid.uuid4().hex[:8]}"),
        "REGISTRY_BLOB_BACKEND": "s3",
        "REGISTRY_S3_ENDPOINT": s3_server.url,
        "REGISTRY_S3_BUCKET": f"proc-{uuid.uuid4().hex[:8]}",
        "REGISTRY_S3_ACCESS_KEY": "testing",
        "REGISTRY_S3_SECRET_KEY": "testing",
        "REGISTRY_REDIS_URL": redis_server.url,
        "REGISTRY_WRITE_TOKEN": TOKEN,
        "REGISTRY_LOG_LEVEL": "WARNING",
        "REGISTRY_PRESIGNED_UPLOADS": "true",
    }
    log = open(data_dir / "registry.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "registry"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"registry process did not become ready:\n{(data_dir / 'registry.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=15)
    log.close()


def uploaded_through_server(url: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith("registry_upload_bytes_total "):
            return float(line.split()[1])
    raise AssertionError("no registry_upload_bytes_total metric")


def test_real_process_round_trip(registry_process, tmp_path):
    src = tmp_path / "ckpt"
    (src / "tokenizer").mkdir(parents=True)
    (src / "model.safetensors").write_bytes(os.urandom(11 * 1024 * 1024 + 17))
    (src / "config.json").write_text('{"n_layer": 2}')
    (src / "tokenizer" / "tokenizer.json").write_text('{"pattern": "x"}')
    name = f"p-{uuid.uuid4().hex[:8]}"
    before = uploaded_through_server(registry_process)
    # Parts of 5 MiB: the big file goes straight to S3 as three presigned parts, the rest through the server.
    with RegistryClient(registry_process, token=TOKEN, cache_dir=tmp_path / "cache", part_size=5 * 1024 * 1024) as rc:
        v = rc.upload_folder(src, name, stage="rl")
        folder = rc.download(name)
        assert folder.name == f"v{v.version}"
        assert (folder / "model.safetensors").read_bytes() == (src / "model.safetensors").read_bytes()
    assert 0 < uploaded_through_server(registry_process) - before < 1024 * 1024
    assert "registry_download_bytes_total" in httpx.get(f"{registry_process}/metrics").text


def test_no_input_gives_a_server_error(registry_process):
    schema = schemathesis.openapi.from_url(f"{registry_process}/openapi.json")
    failures, statuses = [], []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            response = case.call(headers=AUTH, timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}")

        check()
    assert not failures, "\n".join(failures[:10])
    # Every operation was exercised, with both accepted and refused inputs.
    assert len(statuses) >= 2 * len(list(schema.get_all_operations()))
    assert any(s < 300 for s in statuses) and any(400 <= s < 500 for s in statuses)
