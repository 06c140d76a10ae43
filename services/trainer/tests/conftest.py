"""Trainer test fixtures: a real registry process, real redis-server (from `nanochat_testing`),
the API in-process (FastAPI's TestClient runs its lifespan: migrations, reaper) and workers as
real `python -m trainer worker` processes that run stages under real torchrun.

Each test gets its own queue, database and folders, so tests never see each other's jobs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from nanochat_testing.servers import free_port
from trainer.api import create_app
from trainer.procs import processes_with_env
from trainer.settings import Settings
from trainer_testlib import REGISTRY_TOKEN, TOKEN, Worker


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real registry service (`python -m registry`) on a free port, local blobs + SQLite."""
    port = free_port()
    data = tmp_path_factory.mktemp("registry")
    env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(data),
        "REGISTRY_WRITE_TOKEN": REGISTRY_TOKEN,
        "REGISTRY_LOG_LEVEL": "WARNING",
    }
    log = open(data / "registry.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "registry"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"registry did not start:\n{(data / 'registry.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.fixture
def settings(tmp_path: Path, redis_server, registry_url: str) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'trainer.db'}",
        redis_url=redis_server.url,
        queue_name=f"test-{uuid.uuid4().hex[:8]}",
        redis_prefix=f"test-{uuid.uuid4().hex[:8]}:",
        registry_url=registry_url,
        registry_token=REGISTRY_TOKEN,
        write_token=TOKEN,
        data_dir=tmp_path / "data",
        runs_dir=tmp_path / "runs",
        heartbeat_interval=0.5,
        heartbeat_limit=3.0,
        db_busy_timeout=1.0,
        reap_interval=0.5,
        cancel_grace=3.0,
        upload_retries=2,
        upload_backoff=0.2,
        gang_timeout=60.0,
        job_timeout=600,
        log_level="WARNING",
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.fixture
def start_worker(settings: Settings, tmp_path: Path) -> Iterator:
    workers: list[Worker] = []

    def start(extra_env: dict[str, str] | None = None, **overrides: object) -> Worker:
        worker = Worker(settings, tmp_path / f"worker{len(workers)}.log", extra_env, **overrides)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()
    # A SIGKILLed worker leaves its stage running (own session): end what this test started.
    for pid in processes_with_env("TRAINER_QUEUE_NAME", settings.queue_name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
