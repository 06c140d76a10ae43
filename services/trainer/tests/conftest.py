"""Trainer test fixtures: a real registry process, real redis-server (from `nanochat_testing`),
the API in-process (FastAPI's TestClient runs its lifespan: migrations, reaper) and workers as
real `python -m trainer worker` processes that run stages under real torchrun.

Each test gets its own queue, database and folders, so tests never see each other's jobs.
"""

from __future__ import annotations

import contextlib
import json
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
from trainer.db import TERMINAL
from trainer.procs import processes_with_env
from trainer.settings import Settings

TOKEN = "trainer-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REGISTRY_TOKEN = "registry-test-token"
TESTS = Path(__file__).parent
# make_data options small enough for a few seconds on a busy 2-core CPU.
TINY_DATA = {"source": "synthetic", "synthetic_docs": 300, "docs_per_shard": 100, "val_docs": 50,
             "chat_train": 20, "chat_test": 10, "math_train": 20, "math_test": 10, "mc_train": 20,
             "mc_test": 10, "identity_train": 10, "identity_test": 10, "core_items": 8}


@pytest.fixture(scope="session")
def registry_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real registry service (`python -m registry`) on a free port, local blobs + SQLite."""
    port = free_port()
    data = tmp_path_factory.mktemp("registry")
    env = {**os.environ, "REGISTRY_PORT": str(port), "REGISTRY_DATA_DIR": str(data),
           "REGISTRY_WRITE_TOKEN": REGISTRY_TOKEN, "REGISTRY_LOG_LEVEL": "WARNING"}
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
        database_url=f"sqlite:///{tmp_path / 'trainer.db'}", redis_url=redis_server.url,
        queue_name=f"test-{uuid.uuid4().hex[:8]}", redis_prefix=f"test-{uuid.uuid4().hex[:8]}:",
        registry_url=registry_url, registry_token=REGISTRY_TOKEN, write_token=TOKEN,
        data_dir=tmp_path / "data", runs_dir=tmp_path / "runs", heartbeat_interval=0.5,
        heartbeat_limit=3.0, reap_interval=0.5, cancel_grace=3.0, upload_retries=2, upload_backoff=0.2,
        gang_timeout=60.0, rdzv_endpoint=f"127.0.0.1:{free_port()}", job_timeout=600,
        log_level="WARNING",
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def settings_env(settings: Settings, **overrides: object) -> dict[str, str]:
    """The TRAINER_* environment that gives a worker process these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    values = {**settings.model_dump(mode="json"), **overrides}
    for key, value in values.items():
        if value is None:
            continue
        env[f"TRAINER_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
    return env


class Worker:
    """A `python -m trainer worker` process; its output is kept in a file for failure messages."""

    def __init__(self, settings: Settings, log: Path, extra_env: dict[str, str] | None = None, **overrides: object):
        env = {**settings_env(settings, **overrides), **(extra_env or {})}
        self.log_path = log
        self.log = open(log, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "trainer", "worker"], env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            # RQ's warm stop would wait for the running job; tests end workers at once.
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


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


def wait_job(api: TestClient, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120,
             worker: Worker | None = None) -> dict:
    """Poll the job until its status is in `until`; fail with the job and worker output otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            extra = worker.output() if worker else ""
            pytest.fail(f"job {job_id} still {job['status']} after {timeout} s: {job}\n{extra}")
        time.sleep(0.2)


def wait_progress(api: TestClient, job_id: str, timeout: float = 90, worker: Worker | None = None) -> dict:
    """Wait until the job runs and its stage has reported a progress step."""
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["step"] and all(n["pgid"] for n in job["nodes"]):
            return job
        if job["status"] in TERMINAL or time.monotonic() > deadline:
            pytest.fail(f"job {job_id} never reported progress: {job}\n{worker.output() if worker else ''}")
        time.sleep(0.2)
