"""The trainer under faults, on `make up`'s pieces (tests/faults/conftest.py): Redis with its
password and append-only file, the registry, the trainer API and two workers as real processes
through the images' entry point, their job records in PostgreSQL (compose's database), real
torchrun stages. Each test is bounded in time.

- A worker SIGKILLed in the middle of a base_train: the job is retried (attempt 2) on the live
  worker within 60 s, its stage resumes from the last resumable checkpoint (the step counter does
  not start again at 0), and no process of the dead attempt is left.
- Redis stopped for 30 s, then PostgreSQL paused (SIGSTOP) for 10 s, while a job runs: the job
  rides both out and succeeds in its first attempt.

The long, steady stage of the second test is the trainer tests' `sleepy_stage` (a real stage
process under torchrun that reports progress every 0.2 s) in place of make_data.
"""

from __future__ import annotations

import json
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fault_harness import REPO, FaultStack, Paused, alive, poll
from nanochat_testing.data import make_tiny_data
from nanochat_testing.servers import Server, create_database, start_postgres
from trainer.procs import job_processes, node_tag

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

TOKENIZER = "faults-tok"
SLEEPY_STEPS = 300  # 0.2 s each: a minute, longer than the two outages together
BASE_TRAIN = {
    "depth": 2,
    "max_seq_len": 64,
    "device_batch_size": 2,
    "total_batch_size": 128,
    "num_iterations": 100_000,
    "eval_every": -1,
    "eval_tokens": 128,
    "save_every": 5,
    "core_metric_every": -1,
    "sample_every": -1,
    "log_every": 1,
}
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture(scope="module")
def postgres() -> Iterator[Server]:
    server = start_postgres()
    yield server
    Paused(server.proc.pid).resume()  # never leave it stopped, whatever a test did
    server.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, postgres: Server) -> Iterator[FaultStack]:
    tmp = tmp_path_factory.mktemp("trainer-faults")
    url = create_database(postgres, f"trainer_{uuid.uuid4().hex[:8]}")
    database = {"TRAINER_DATABASE_URL": "postgresql+psycopg://" + url.split("://", 1)[1]}
    worker = {
        **database,
        "TRAINER_STAGE_MODULES": json.dumps({"make_data": "sleepy_stage"}),
        "SLEEPY_STEPS": str(SLEEPY_STEPS),
        "PYTHONPATH": str(REPO / "services" / "trainer" / "tests"),
    }
    stack = FaultStack.create(
        tmp,
        ["registry", "trainer-api", "trainer-worker", "trainer-worker"],
        extra_env={"trainer-api": database, "trainer-worker": worker},
    )
    try:
        make_tiny_data(stack.home / "data", tmp)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def tokenizer(stack: FaultStack) -> str:
    """A tokenizer version trained by a job of this stack (base_train reads it)."""
    r = stack.trainer.post(
        "/v1/jobs",
        json={"stage": "tok_train", "options": {"vocab_size": 300, "max_chars": 20000}, "output_name": TOKENIZER},
    )
    assert r.status_code == 202, r.text
    job = poll(lambda: (j := stack.job(r.json()["id"]))["status"] in TERMINAL and j, 240, "the tokenizer job")
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])
    return TOKENIZER


def events(stack: FaultStack, job_id: str) -> list[dict]:
    path = stack.home / "runs" / "jobs" / job_id / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def first_step_of_attempt(stack: FaultStack, job_id: str, attempt: int) -> int | None:
    """The step of the first progress event after the `attempt`-th stage start."""
    evs = events(stack, job_id)
    starts = [i for i, e in enumerate(evs) if e["type"] == "started"]
    if len(starts) < attempt:
        return None
    return next((e["step"] for e in evs[starts[attempt - 1] :] if e["type"] == "progress"), None)


def worker_named(stack: FaultStack, worker: str) -> str:
    """The stack's process name of the worker a job row names (`host.pid`)."""
    pid = int(worker.rsplit(".", 1)[1])
    return next(name for name, proc in stack.procs.procs.items() if proc.pid == pid)


def test_worker_killed_mid_base_train_is_retried_on_the_live_worker_and_resumes(stack, tokenizer):
    r = stack.trainer.post(
        "/v1/jobs",
        json={
            "stage": "base_train",
            "input": {"name": tokenizer, "stage": "tokenizer"},
            "options": BASE_TRAIN,
            "output_name": "faults-killed",
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    resume = stack.home / "runs" / "jobs" / job_id / "steps" / "00-base_train.resume"
    poll(lambda: (resume / "manifest.json").is_file(), 180, f"a resumable checkpoint at {resume}")
    first = stack.job(job_id)
    victim = worker_named(stack, first["attempts"][0]["worker"])
    survivor = next(n for n in stack.procs.procs if n.startswith("trainer-worker") and n != victim)
    old = job_processes(first["nodes"][0]["pgid"], node_tag(job_id, 0))
    assert old, "the stage is not running"

    killed_at = time.monotonic()
    stack.kill(victim)
    live = f"{socket.gethostname()}.{stack.pid(survivor)}"
    poll(
        lambda: (j := stack.job(job_id))["attempt"] == 2 and j["attempts"][1]["worker"] == live,
        60,
        "attempt 2 to start on the live worker",
        interval_s=0.5,
    )
    retried_in = time.monotonic() - killed_at
    poll(lambda: (first_step_of_attempt(stack, job_id, 2) or 0) > 0, 120, "attempt 2 to train a step", 0.5)
    trains_in = time.monotonic() - killed_at
    job = stack.job(job_id)
    try:
        assert job["status"] == "running" and job["attempt"] == 2, job
        lost, second = job["attempts"]
        assert lost["status"] == "lost" and "stopped sending heartbeats" in lost["error"]
        assert second["status"] == "running"
        # The step counter goes on from the checkpoint: the stage resumed, it did not start over.
        assert second["resumed_from_step"] is not None and second["resumed_from_step"] >= 5
        assert first_step_of_attempt(stack, job_id, 2) == second["resumed_from_step"] + 1
        assert [p for p in old if alive(p)] == [], "a process of the dead attempt is still alive"
        print(f"attempt 2 started {retried_in:.1f} s and trained a step {trains_in:.1f} s after the kill")
    finally:
        stack.trainer.post(f"/v1/jobs/{job_id}/cancel")
        poll(lambda: stack.job(job_id)["status"] in TERMINAL, 60, "the cancel")
        stack.start(victim, "trainer-worker")


def test_redis_restart_and_database_pause_during_a_job_do_not_fail_it(stack, postgres, paused):
    r = stack.trainer.post("/v1/jobs", json={"stage": "make_data"})
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    running = poll(
        lambda: (
            (j := stack.job(job_id))["status"] == "running" and (j["step"] or 0) >= 1 and j["nodes"][0]["pgid"] and j
        ),
        120,
        "the job to report a step",
    )
    stage = job_processes(running["nodes"][0]["pgid"], node_tag(job_id, 0))

    stack.kill("redis", signal.SIGTERM)
    back_at = time.monotonic() + 30
    while time.monotonic() < back_at:  # the outage itself: the job must keep running throughout
        job = stack.job(job_id)
        assert job["status"] == "running", (job["error"], job["log_tail"])
        time.sleep(1)
    stack.start_redis()
    step_before_pause = stack.job(job_id)["step"]

    paused.append(Paused(postgres.proc.pid))
    resume_at = time.monotonic() + 10
    while time.monotonic() < resume_at:  # no API call now: its database is frozen
        assert all(alive(p) for p in stage), "the stage died while the database was paused"
        time.sleep(0.5)
    paused[-1].resume()

    job = poll(lambda: (j := stack.job(job_id))["status"] in TERMINAL and j, 120, "the job to end", interval_s=1)
    logs = stack.log("trainer-worker-1") + stack.log("trainer-worker-2")
    assert job["status"] == "succeeded", (job["error"], job["log_tail"], logs)
    assert job["attempt"] == 1 and [a["status"] for a in job["attempts"]] == ["succeeded"]
    assert job["step"] == SLEEPY_STEPS > step_before_pause
    assert "Redis unreachable; the job keeps running" in Path(stack.home / "logs").joinpath(
        f"{worker_named(stack, job['attempts'][0]['worker'])}.log"
    ).read_text(errors="replace")
