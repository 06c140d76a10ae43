"""Jobs run end to end: real workers, real torchrun, real stages (make_data, tok_train), the real
registry, real redis-server; PostgreSQL for the happy path. Faults: a failing stage, cancel, a
SIGKILLed worker, an unreachable registry at upload. (Jobs on more than one node run on Ray:
test_ray_executor.py.)

Supervision tests run `sleepy_stage` (this folder) in place of make_data: a long, predictable
stage that leaves a grandchild process behind on purpose.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from nanochat_testing.data import TINY_DATA, make_tiny_data
from nanochat_testing.servers import create_database, free_port
from redis import Redis
from registry_client import RegistryClient
from trainer.api import create_app
from trainer.procs import job_processes as node_processes
from trainer.procs import node_tag
from trainer_testlib import AUTH, REGISTRY_TOKEN, wait_job, wait_progress

pytestmark = pytest.mark.slow

SLEEPY = {"stage_modules": {"make_data": "sleepy_stage"}}


def job_processes(job: dict) -> list[int]:
    """Live processes of a job: by its marker variable and by each node's process group."""
    pids = set()
    for node in job["nodes"]:
        pids.update(node_processes(node["pgid"], node_tag(job["id"], node["node_rank"])))
    return sorted(pids)


def sse_events(text: str) -> list[dict]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        event = {"data": []}
        for line in block.split("\n"):
            key, _, value = line.partition(": ")
            if key == "data":
                event["data"].append(value)
            else:
                event[key] = value
        events.append(event)
    return events


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A make_data output made once, directly (no trainer), for tests that only need data."""
    scratch = tmp_path_factory.mktemp("tiny-data")
    return make_tiny_data(scratch / "data", scratch)


def test_real_stages_run_and_register_on_postgres(settings, start_worker, postgres_server, registry_url, tmp_path):
    url = create_database(postgres_server, f"trainer_{uuid.uuid4().hex[:8]}")
    settings = settings.model_copy(update={"database_url": "postgresql+psycopg://" + url.split("://", 1)[1]})
    worker = start_worker(database_url=settings.database_url)
    with TestClient(create_app(settings)) as api:
        data = api.post("/jobs", json={"stage": "make_data", "options": TINY_DATA}, headers=AUTH).json()
        job = wait_job(api, data["id"], worker=worker)
        assert job["status"] == "succeeded", job
        assert job["metrics"]["train_docs"] == 250 and job["progress"] == 100.0
        assert (settings.data_dir / "eval_bundle").is_dir()

        name = f"tok-{uuid.uuid4().hex[:6]}"
        tok = api.post(
            "/v1/jobs",
            json={"stage": "tok_train", "options": {"vocab_size": 300, "max_chars": 20000}, "output_name": name},
            headers=AUTH,
        ).json()
        job = wait_job(api, tok["id"], worker=worker)
        assert job["status"] == "succeeded", job
        [made] = job["produced"]
        assert made["name"] == name and made["stage"] == "tokenizer"
        with RegistryClient(registry_url, token=REGISTRY_TOKEN, cache_dir=tmp_path / "cache") as rc:
            version = rc.get_version(name, made["version"])
        assert version.job_id == tok["id"] and version.state == "ready"
        assert version.meta["job_id"] == tok["id"]
        paths = {f.path for f in version.files}
        assert "meta.json" in paths and any(p.startswith("tokenizer/") for p in paths)

        # A vocab the corpus cannot reach fails the job with the numbers, never a smaller tokenizer.
        short = api.post(
            "/v1/jobs", json={"stage": "tok_train", "options": {"vocab_size": 4096, "max_chars": 2000}}, headers=AUTH
        ).json()
        failed = wait_job(api, short["id"], worker=worker)
        assert failed["status"] == "failed" and failed["produced"] == []
        assert "the corpus cannot reach the vocab asked: vocab asked 4096, vocab reached" in failed["error"]

        log = api.get(f"/v1/jobs/{tok['id']}/logs")
        assert "trained 291 ranks" in log.text and int(log.headers["X-Next-Offset"]) == len(log.content)
        assert api.get(f"/v1/jobs/{tok['id']}/logs?offset=10").content == log.content[10:]
        # A follower that drops after the first event and reconnects with Last-Event-ID loses nothing.
        first = sse_events(api.get(f"/v1/jobs/{tok['id']}/logs?follow=true").text)
        assert first[-1]["event"] == "end"
        resumed = sse_events(
            api.get(f"/v1/jobs/{tok['id']}/logs?follow=true", headers={"Last-Event-ID": first[0]["id"]}).text
        )
        text = "\n".join(first[0]["data"]) + "\n" + "".join("\n".join(e["data"]) + "\n" for e in resumed[:-1])
        assert text == log.text
        sse = [e for e in sse_events(api.get(f"/v1/jobs/{tok['id']}/events").text) if e.get("event") != "end"]
        events = [json.loads("\n".join(e["data"])) for e in sse]
        assert [e["type"] for e in events][0] == "started" and events[-1]["type"] == "finished"
        assert all(e["job_id"] == tok["id"] for e in events)
        # The events stream resumes the same way: after the first event, every later one, once.
        after = [
            json.loads("\n".join(e["data"]))
            for e in sse_events(api.get(f"/v1/jobs/{tok['id']}/events", headers={"Last-Event-ID": sse[0]["id"]}).text)
            if e.get("event") != "end"
        ]
        assert after == events[1:]
        assert api.get(f"/v1/jobs/{tok['id']}/events", headers={"Last-Event-ID": "x"}).status_code == 400

        # An eval stage reads the registered tokenizer (downloaded, verified) and its metrics are
        # patched onto that version.
        ev = api.post(
            "/v1/jobs",
            json={"stage": "tok_eval", "options": {"max_chars": 5000}, "input": {"name": name, "stage": "tokenizer"}},
            headers=AUTH,
        ).json()
        assert ev["input"] == {"name": name, "version": made["version"], "stage": "tokenizer"}
        job = wait_job(api, ev["id"], worker=worker)
        assert job["status"] == "succeeded", job
        assert job["produced"] == []
        log = api.get(f"/v1/jobs/{ev['id']}/logs").text
        assert f"--input-version {name}:{made['version']}" in log
        with RegistryClient(registry_url, token=REGISTRY_TOKEN, cache_dir=tmp_path / "cache") as rc:
            patched = rc.get_version(name, made["version"]).metrics
        finished = [
            json.loads("\n".join(e["data"]))
            for e in sse_events(api.get(f"/v1/jobs/{ev['id']}/events").text)
            if e.get("event") != "end"
        ][-1]
        measured = {k: v for k, v in finished["metrics"].items() if isinstance(v, (int, float))}
        assert measured and all(patched[k] == v for k, v in measured.items())
        assert api.get("/metrics").text.count('trainer_job_duration_seconds_count{outcome="succeeded"} 3.0') == 1


def test_failing_stage_fails_with_its_error_event_and_log_tail(api, settings, start_worker):
    worker = start_worker()
    missing = settings.data_dir / "nonexistent-docs"  # docs_path must lie under the data root
    r = api.post(
        "/v1/jobs",
        json={"stage": "make_data", "options": {"source": "python-docs", "docs_path": str(missing)}},
        headers=AUTH,
    )
    job = wait_job(api, r.json()["id"], worker=worker)
    assert job["status"] == "failed"
    assert f"FileNotFoundError: no python-docs text files under {missing}" in job["error"]
    assert job["log_tail"].endswith("[trainer] stage exited with code 1")
    assert "FileNotFoundError" in api.get(f"/v1/jobs/{job['id']}/logs").text
    assert job["finished_at"] >= job["started_at"] >= job["created_at"]


def test_cancel_stops_the_whole_process_group(api, start_worker):
    worker = start_worker(**SLEEPY)
    job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
    job = wait_progress(api, job_id, worker=worker)
    assert len(job_processes(job)) >= 3  # torchrun, the stage, its grandchild
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
    job = wait_job(api, job_id, timeout=30, worker=worker)
    assert job["status"] == "cancelled" and job["cancel_requested"]
    assert job_processes(job) == []
    series = api.get(f"/v1/jobs/{job_id}/metrics").json()["series"]
    assert series["loss"][0] == [1, 1.0] and len(series["loss"]) == len(series["lr"]) >= 1


def test_stage_that_ignores_sigterm_is_killed_after_the_grace_period(api, settings, start_worker):
    worker = start_worker(extra_env={"SLEEPY_IGNORE_TERM": "1"}, **SLEEPY)
    job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
    job = wait_progress(api, job_id, worker=worker)
    events = settings.runs_dir / "jobs" / job_id / "events.jsonl"

    def last_step() -> int:
        return max(e["step"] for e in map(json.loads, events.read_text().splitlines()) if e["type"] == "progress")

    at_cancel = last_step()
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
    job = wait_job(api, job_id, timeout=settings.cancel_grace + 30, worker=worker)
    assert job["status"] == "cancelled"
    assert job_processes(job) == []
    # A step is 0.2 s and the grace period 3 s: the stage stepped on through SIGTERM until SIGKILL.
    assert last_step() >= at_cancel + 5


def test_sigkilled_worker_is_reaped_and_its_job_failed(api, settings, start_worker):
    victim = start_worker(**SLEEPY)
    job_id = api.post("/v1/jobs", json={"stage": "make_data", "max_attempts": 1}, headers=AUTH).json()["id"]
    job = wait_progress(api, job_id, worker=victim)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    # torchrun sits in its own session: the SIGKILL left the job's processes running.
    assert job_processes(job)
    job = wait_job(api, job_id, timeout=settings.heartbeat_limit + settings.cancel_grace + 20)
    assert job["status"] == "failed" and "stopped sending heartbeats" in job["error"]
    assert [(a["attempt"], a["status"]) for a in job["attempts"]] == [(1, "lost")]
    assert job_processes(job) == []


def test_unreachable_registry_retries_then_fails_keeping_the_checkpoint(api, settings, start_worker, tiny_data):
    worker = start_worker(registry_url=f"http://127.0.0.1:{free_port()}", data_dir=str(tiny_data))
    job_id = api.post(
        "/v1/jobs", json={"stage": "tok_train", "options": {"vocab_size": 300, "max_chars": 20000}}, headers=AUTH
    ).json()["id"]
    job = wait_job(api, job_id, worker=worker)
    assert job["status"] == "failed"
    attempts = settings.upload_retries + 1
    assert f"the registry failed {attempts} times" in job["error"] and "stays on disk" in job["error"]
    log = api.get(f"/v1/jobs/{job_id}/logs").text
    assert f"(attempt 1/{attempts})" in log and f"(attempt {attempts - 1}/{attempts})" in log
    out = settings.runs_dir / "jobs" / job_id / "steps" / "00-tok_train"
    assert (out / "meta.json").is_file() and (out / "tokenizer").is_dir()
    assert job["produced"] == []


def test_lost_worker_job_is_requeued_by_its_retry_policy(api, settings, start_worker):
    env = {"SLEEPY_STEPS": "10"}
    victim = start_worker(extra_env=env, **SLEEPY)
    job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
    first = wait_progress(api, job_id, worker=victim)
    assert first["max_attempts"] == 3 and first["attempt"] == 1
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    requeued = wait_job(api, job_id, until=("queued",), timeout=30)
    assert requeued["attempt"] == 2 and "queued again as attempt 2" in requeued["error"]
    assert [(a["attempt"], a["status"]) for a in requeued["attempts"]] == [(1, "lost"), (2, "queued")]
    # The reaper claims the job before it kills (a heartbeat arriving meanwhile keeps both), and
    # queues the new attempt's task only once the old processes are gone.
    deadline = time.monotonic() + settings.cancel_grace + 10
    while job_processes(first):
        assert time.monotonic() < deadline, job_processes(first)
        time.sleep(0.1)
    rescuer = start_worker(extra_env=env, **SLEEPY)
    job = wait_job(api, job_id, timeout=120, worker=rescuer)
    assert job["status"] == "succeeded" and job["error"] is None and job["attempt"] == 2
    assert [a["status"] for a in job["attempts"]] == ["lost", "succeeded"]
    assert job["attempts"][1]["worker"] != job["attempts"][0]["worker"]


def test_queued_job_whose_task_left_redis_is_queued_again(api, settings, start_worker):
    job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
    redis = Redis.from_url(settings.redis_url)
    # What a restarted Redis without persistence leaves: none of this queue's keys.
    lost = redis.keys(f"rq:job:{job_id}*") + redis.keys(f"rq:queue:{settings.queue_name}")
    assert redis.delete(*lost) == 2
    worker = start_worker(extra_env={"SLEEPY_STEPS": "3"}, **SLEEPY)
    job = wait_job(api, job_id, timeout=settings.heartbeat_limit + 120, worker=worker)
    assert job["status"] == "succeeded", job
    assert job["attempt"] == 1


def test_stopped_worker_queues_its_job_again_and_the_next_one_resumes_it(api, settings, start_worker, tiny_data):
    """SIGTERM to a worker (Ctrl-C of make up, `docker compose stop`): it stops the running stage
    instead of waiting for it, the job goes back to the queue, and the next worker continues the
    training stage from its resumable checkpoint."""
    worker = start_worker(data_dir=str(tiny_data))
    tok = api.post(
        "/v1/jobs",
        json={"stage": "tok_train", "options": {"vocab_size": 300, "max_chars": 20000}, "output_name": "resume-tok"},
        headers=AUTH,
    ).json()
    assert wait_job(api, tok["id"], worker=worker)["status"] == "succeeded"
    options = {
        "depth": 2,
        "max_seq_len": 64,
        "device_batch_size": 2,
        "total_batch_size": 128,
        "num_iterations": 300,
        "eval_every": -1,
        "eval_tokens": 128,
        "save_every": 5,
        "core_metric_every": -1,
        "log_every": 1,
    }
    job_id = api.post(
        "/v1/jobs",
        json={"stage": "base_train", "input": {"name": "resume-tok", "stage": "tokenizer"}, "options": options},
        headers=AUTH,
    ).json()["id"]
    resume = settings.runs_dir / "jobs" / job_id / "steps" / "00-base_train.resume"
    deadline = time.monotonic() + 120
    while not (resume / "manifest.json").is_file():
        assert time.monotonic() < deadline, worker.output()
        time.sleep(0.2)
    running = api.get(f"/v1/jobs/{job_id}").json()
    worker.proc.send_signal(signal.SIGTERM)
    # The worker ends within the stage's grace period, not after the 300 steps.
    assert worker.proc.wait(timeout=settings.cancel_grace + 30) == 0, worker.output()
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "queued" and job["attempt"] == 2, job
    assert [a["status"] for a in job["attempts"]] == ["interrupted", "queued"]
    assert "shut down during step 1 (base_train)" in job["error"]
    assert job_processes(running) == []

    rescuer = start_worker(data_dir=str(tiny_data))
    job = wait_job(api, job_id, timeout=300, worker=rescuer)
    assert job["status"] == "succeeded" and job["error"] is None and job["step"] == 300, (
        job["error"],
        job["log_tail"],
    )
    log = api.get(f"/v1/jobs/{job_id}/logs").text
    commands = [line for line in log.splitlines() if line.startswith("[trainer] $ ")]
    assert len(commands) == 2 and "--resume" not in commands[0] and commands[1].endswith("--resume"), commands
    events = [
        json.loads(line) for line in (settings.runs_dir / "jobs" / job_id / "events.jsonl").read_text().splitlines()
    ]
    starts = [i for i, e in enumerate(events) if e["type"] == "started"]
    first_step_after = next(e["step"] for e in events[starts[1] :] if e["type"] == "progress")
    assert first_step_after > 5, "the second attempt started over instead of resuming"
    assert job["attempts"][1]["resumed_from_step"] == first_step_after - 1
