"""The trainer's guards against its stores and its queue: a Redis restart during a job, a task that
names a foreign function, the one reaper per host, a heartbeat limit that outlasts SQLite's busy
timeout. Real redis-server processes and real workers; the bigger faults are in tests/faults."""

from __future__ import annotations

import time
import uuid

import pytest
from fastapi.testclient import TestClient
from nanochat_testing.servers import start_redis
from pydantic import ValidationError
from redis import Redis
from rq import Queue
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer
from sqlalchemy import text
from trainer.api import create_app
from trainer.db import Database, Job, JobAttempt, JobNode, migrate
from trainer.reaper import Reaper
from trainer.settings import Settings
from trainer_testlib import AUTH, wait_job, wait_progress

SLEEPY = {"stage_modules": {"make_data": "sleepy_stage"}}


@pytest.mark.slow
def test_a_redis_restart_during_a_job_does_not_fail_it(settings, start_worker, tmp_path):
    # Its own Redis: this test stops it, and the session's is shared by every other test.
    redis = start_redis()
    try:
        settings = settings.model_copy(update={"redis_url": redis.url})
        worker = start_worker(extra_env={"SLEEPY_STEPS": "40"}, redis_url=redis.url, **SLEEPY)
        with TestClient(create_app(settings)) as api:
            job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
            wait_progress(api, job_id, worker=worker)
            port = redis.port
            redis.stop()  # what the issue saw: Redis gone, then back within seconds
            time.sleep(3)
            redis = start_redis(port)
            job = wait_job(api, job_id, timeout=120, worker=worker)
        assert job["status"] == "succeeded", (job["error"], worker.output())
        assert job["attempt"] == 1
        assert "Redis unreachable; the job keeps running" in worker.log_path.read_text()
    finally:
        redis.stop()


@pytest.mark.slow
def test_the_worker_refuses_a_task_that_names_another_function(settings, start_worker, tmp_path):
    marker = tmp_path / "ran"
    worker = start_worker()
    redis = Redis.from_url(settings.redis_url)
    queue = Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)
    # Whoever can write to Redis can queue this; RQ would import and call it.
    task = queue.enqueue_call("os.system", args=(f"touch {marker}",), job_id=f"evil-{uuid.uuid4().hex[:6]}")
    deadline = time.monotonic() + 60
    while (status := RqJob.fetch(task.id, connection=redis, serializer=JSONSerializer).get_status()) != "failed":
        assert time.monotonic() < deadline, (status, worker.output())
        time.sleep(0.2)
    assert not marker.exists(), "the worker ran a foreign function"
    refused = RqJob.fetch(task.id, connection=redis, serializer=JSONSerializer)
    assert "runs only trainer.worker.run_node, not 'os.system'" in refused.latest_result().exc_string
    assert worker.proc.poll() is None, "the worker died instead of refusing"


def test_the_heartbeat_limit_must_outlast_a_busy_database():
    # The old defaults: a heartbeat stuck behind SQLite's lock for its whole busy timeout reached
    # the limit exactly, and the reaper killed a healthy job.
    with pytest.raises(ValidationError, match="heartbeat_limit"):
        Settings(heartbeat_limit=30, db_busy_timeout=30)
    default = Settings()
    assert default.heartbeat_limit >= 2 * (default.db_busy_timeout + default.heartbeat_interval)


def test_sqlite_waits_the_configured_busy_timeout(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'busy.db'}", busy_timeout=4.5)
    with db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA busy_timeout")).scalar() == 4500


def _stale_job(db: Database, host: str) -> str:
    job_id = uuid.uuid4().hex
    with db.session() as s:
        job = Job(
            id=job_id,
            status="running",
            spec={"steps": [{"stage": "make_data", "options": {}}], "output_name": "x", "resources": {}},
            request_hash="x",
            nnodes=1,
            created_at=time.time(),
            step_index=0,
            metrics={},
            produced=[],
            attempts=0,
            max_attempts=1,
            cancel_requested=False,
        )
        job.nodes = [JobNode(node_rank=0, status="running", host=host, worker=f"{host}.1", heartbeat_at=1.0)]
        job.attempt_rows = [JobAttempt(attempt=1, status="running")]
        s.add(job)
    return job_id


def test_one_reaper_per_host_acts(settings):
    migrate(settings.database_url)
    db, redis = Database(settings.database_url), Redis.from_url(settings.redis_url)
    job_id = _stale_job(db, settings.host)
    first, second = Reaper(settings, db, redis), Reaper(settings, db, redis)
    assert first.reap_once() == [job_id]
    assert second.reap_once() == [] and not second.leads()
    assert first.leads()
    with db.session() as s:
        job = s.get(Job, job_id)
        assert job.status == "failed" and [a.status for a in job.attempt_rows] == ["lost"]
    first.lease.release()
    assert second.leads()


@pytest.mark.slow
def test_a_stage_error_is_retried_only_when_the_job_asks(api, start_worker):
    worker = start_worker(extra_env={"SLEEPY_FAIL": "1"}, **SLEEPY)
    once = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
    job = wait_job(api, once, worker=worker)
    assert job["status"] == "failed" and [a["status"] for a in job["attempts"]] == ["failed"]
    assert "sleepy stage was told to fail" in job["error"]

    asked = api.post(
        "/v1/jobs", json={"stage": "make_data", "retry_on_error": True, "max_attempts": 2}, headers=AUTH
    ).json()["id"]
    job = wait_job(api, asked, timeout=180, worker=worker)
    assert job["status"] == "failed" and job["attempt"] == 2, job
    assert [(a["attempt"], a["status"]) for a in job["attempts"]] == [(1, "failed"), (2, "failed")]
    assert all("sleepy stage was told to fail" in a["error"] for a in job["attempts"])
    assert "2 of 2 attempts failed" in job["error"]
