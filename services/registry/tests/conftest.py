"""Registry test fixtures: the app over each backend pair, with the stores as real processes.

`backend` is parametrized over "sqlite-local" (SQLite file + local blob folder, no Redis) and
"postgres-s3" (PostgreSQL + moto's S3 server + redis-server, from `nanochat_testing`). Each backend
gets one app for the session; tests keep apart by using their own model names.
"""

import uuid

import pytest
from fastapi.testclient import TestClient
from nanochat_testing.servers import create_database
from registry.api import create_app
from registry.settings import Settings
from registry_testlib import TOKEN


@pytest.fixture(scope="session", params=["sqlite-local", "postgres-s3"])
def backend(request, tmp_path_factory):
    if request.param == "sqlite-local":
        settings = Settings(data_dir=tmp_path_factory.mktemp("registry-sqlite"), write_token=TOKEN, log_level="WARNING")
        yield {"kind": request.param, "settings": settings}
        return
    pg = request.getfixturevalue("postgres_server")
    s3 = request.getfixturevalue("s3_server")
    redis = request.getfixturevalue("redis_server")
    db_url = create_database(pg, f"registry_{uuid.uuid4().hex[:8]}")
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("registry-pg"),
        database_url=db_url,
        blob_backend="s3",
        s3_endpoint=s3.url,
        s3_bucket=f"reg-{uuid.uuid4().hex[:8]}",
        s3_access_key="testing",
        s3_secret_key="testing",
        s3_part_size=5 * 1024 * 1024,
        presigned_uploads=True,
        redis_url=redis.url,
        write_token=TOKEN,
        log_level="WARNING",
    )
    yield {"kind": request.param, "settings": settings, "redis": redis, "s3": s3}


@pytest.fixture(scope="session")
def client(backend):
    with TestClient(create_app(backend["settings"])) as c:
        yield c


@pytest.fixture
def reg(client):
    """The `registry.core.Registry` behind `client`, for calling logic functions directly."""
    return client.app.state.registry


@pytest.fixture
def name():
    return f"m-{uuid.uuid4().hex[:10]}"
