"""`python -m trainer doctor` against real local parts: redis-server, the registry process, a
trainer API process, the trainer's SQLite database and PostgreSQL, and the stand-in Docker engine
(`standin_engine`); inference and the web UI are left down on purpose (not required by default).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from nanochat_testing.servers import create_database, free_port
from standin_engine import ENGINE_VERSION, StandinEngine
from trainer.db import migrate
from trainer.doctor import Down, check_database
from trainer_testlib import settings_env


def doctor(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "trainer", "doctor", *args], env=env, capture_output=True, text=True, timeout=60
    )


def gpus_expected() -> str:
    if shutil.which("nvidia-smi"):
        return "up"
    import torch

    return "up" if torch.cuda.is_available() else "none"


@pytest.fixture
def trainer_api(settings, tmp_path: Path):
    """A real `python -m trainer api` process on a free port; yields its base URL."""
    port = free_port()
    log = open(tmp_path / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer", "api"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=settings_env(settings, api_port=port),
    )
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
            pytest.fail(f"trainer API did not start:\n{(tmp_path / 'api.log').read_text()[-3000:]}")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)
    log.close()


@pytest.mark.slow
def test_doctor_reports_every_part_and_fails_when_a_required_one_is_down(settings, trainer_api, tmp_path):
    engine = StandinEngine(tmp_path / "docker.sock").start()
    try:
        migrate(settings.database_url)
        env = settings_env(
            settings,
            executor="docker",
            docker_host=engine.url,
            api_url=trainer_api,
            inference_url=f"http://127.0.0.1:{free_port()}",
            webui_url=f"http://127.0.0.1:{free_port()}",
        )
        r = doctor(env, "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        checks = {c["part"]: c for c in report["checks"]}
        assert report["ok"] is True and list(checks) == [
            "engine",
            "gpus",
            "database",
            "redis",
            "registry",
            "trainer-api",
            "inference",
            "webui",
            "sandbox",
        ]
        assert {p: checks[p]["status"] for p in checks} == {
            "engine": "up",
            "gpus": gpus_expected(),
            "database": "up",
            "redis": "up",
            "registry": "up",
            "trainer-api": "up",
            "inference": "down",
            "webui": "down",
            "sandbox": "up",
        }
        assert {p for p in checks if checks[p]["required"]} == {
            "engine",
            "database",
            "redis",
            "registry",
            "trainer-api",
        }
        assert f"Docker {ENGINE_VERSION} (API 1.47" in checks["engine"]["detail"]
        assert checks["redis"]["detail"].startswith(f"{settings.redis_url}: redis ")
        assert engine.calls("GET", "/version")
        assert checks["sandbox"]["detail"].startswith("bubblewrap ") and "isolates" in checks["sandbox"]["detail"]

        # A required part down (Redis at a dead port, inference required too): exit 1, named in the table.
        dead_redis = f"redis://127.0.0.1:{free_port()}/0"
        r = doctor({**env, "TRAINER_REDIS_URL": dead_redis}, "--require", "inference")
        assert r.returncode == 1, r.stdout + r.stderr
        rows = {line.split()[0]: line.split()[1:3] for line in r.stdout.splitlines()[1:-1]}
        assert rows["redis"] == ["yes", "down"] and rows["inference"] == ["yes", "down"]
        assert rows["registry"] == ["yes", "up"] and r.stdout.rstrip().endswith("NOT OK: a required part is not up")
    finally:
        engine.stop()

    # The engine gone: down and required under the docker executor.
    r = doctor(env, "--json")
    assert r.returncode == 1
    engine_check = next(c for c in json.loads(r.stdout)["checks"] if c["part"] == "engine")
    assert engine_check["status"] == "down" and "docker.sock is not reachable" in engine_check["detail"]


def test_database_check_postgres_sqlite_and_missing(postgres_server, tmp_path):
    url = create_database(postgres_server, "doctor_check")
    assert check_database(url).startswith("postgresql ")
    missing = tmp_path / "nothing.db"
    with pytest.raises(Down, match="unable to open database file"):
        check_database(f"sqlite:///{missing}")
    assert not missing.exists()  # never created by a check
    dead = url.replace(f":{postgres_server.port}/", f":{free_port()}/")
    with pytest.raises(Down, match="OperationalError"):
        check_database(dead)


def test_doctor_says_when_humaneval_cannot_be_sandboxed(settings):
    """No bubblewrap (as in a container that refuses its namespaces): the sandbox is down with
    what to do, not required by default, and `--require sandbox` makes the doctor fail."""
    env = {**settings_env(settings), "NANOCHAT_BWRAP": "/nonexistent/bwrap"}
    r = doctor(env, "--json")
    sandbox = next(c for c in json.loads(r.stdout)["checks"] if c["part"] == "sandbox")
    assert sandbox["status"] == "down" and not sandbox["required"]
    assert "allow_unsandboxed" in sandbox["detail"] and "/nonexistent/bwrap" in sandbox["detail"]
    required = doctor(env, "--require", "sandbox")
    assert required.returncode == 1
    assert [line.split()[1:3] for line in required.stdout.splitlines() if line.startswith("sandbox")] == [
        ["yes", "down"]
    ]
