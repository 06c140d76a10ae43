"""Helpers of the trainer tests (kept out of conftest.py: several suites have a conftest module,
so importing from "conftest" would be ambiguous in a whole-repo run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from trainer.db import TERMINAL
from trainer.settings import Settings

TOKEN = "trainer-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
REGISTRY_TOKEN = "registry-test-token"
TESTS = Path(__file__).parent


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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "trainer", "worker"], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            # RQ's warm stop would wait for the running job; tests end workers at once.
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.log.close()


def wait_job(
    api: TestClient, job_id: str, until: tuple[str, ...] = TERMINAL, timeout: float = 120, worker: Worker | None = None
) -> dict:
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
