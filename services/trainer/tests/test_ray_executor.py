"""Multi-node jobs on a real Ray cluster: a head and two worker nodes (`ray.cluster_utils.Cluster`,
one CPU each) started here, a real `python -m trainer worker` with TRAINER_EXECUTOR=ray as the
driver, real torchrun, real base_train, the real registry and redis-server.

Everything stays on the loopback: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray take 127.0.0.1
as every node's address (it would otherwise pick this machine's outside address).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nanochat_testing.data import TINY_DATA
from ray import cluster_utils
from trainer.procs import JOB_MARKER, PROC, node_tag, processes_with_env
from trainer.settings import Settings
from trainer_testlib import AUTH, REGISTRY_TOKEN, TOKEN, wait_job, wait_progress

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
# One thread per rank on both layouts, so 2 nodes x 1 process and 1 node x 2 processes do the
# same arithmetic (torchrun sets it only for nproc_per_node > 1); gloo on the loopback.
WORKER_ENV = {**LOOPBACK, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
BASE = {
    "depth": 2,
    "max_seq_len": 64,
    "device_batch_size": 2,
    "total_batch_size": 256,
    "num_iterations": 6,
    "eval_every": -1,
    "eval_tokens": 128,
    "core_metric_every": -1,
    "log_every": 1,
    "compile": "off",
}


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator:
    saved = {k: os.environ.get(k) for k in LOOPBACK}
    os.environ.update(LOOPBACK)
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "node_ip_address": "127.0.0.1",
            "include_dashboard": False,
            # Ray starts its workers at niceness 15; the stages are the cluster's work.
            "_system_config": {"worker_niceness": 0},
        },
    )
    for _ in range(2):
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    yield cluster
    cluster.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """TINY_DATA in row groups small enough for two ranks to get a share of each split."""
    scratch = tmp_path_factory.mktemp("ray-tiny-data")
    config = scratch / "make_data.json"
    config.write_text(json.dumps({**TINY_DATA, "row_group_size": 25}))
    data = scratch / "data"
    command = [sys.executable, "-m", "nanochat.stages.make_data", "--config", str(config), "--data-dir", str(data)]
    subprocess.run(command, check=True, capture_output=True, timeout=300)
    return data


@pytest.fixture
def settings(tmp_path: Path, redis_server, registry_url: str, tiny_data: Path) -> Settings:
    values = {
        "database_url": f"sqlite:///{tmp_path / 'trainer.db'}",
        "redis_url": redis_server.url,
        "queue_name": f"test-{os.urandom(4).hex()}",
        "redis_prefix": f"test-{os.urandom(4).hex()}:",
        "registry_url": registry_url,
        "registry_token": REGISTRY_TOKEN,
        "write_token": TOKEN,
        "data_dir": tiny_data,
        "runs_dir": tmp_path / "runs",
        "heartbeat_interval": 0.5,
        "heartbeat_limit": 10.0,
        "reap_interval": 0.5,
        "cancel_grace": 3.0,
        "gang_timeout": 90.0,
        "job_timeout": 900,
        "log_level": "WARNING",
        "db_busy_timeout": 2.0,
        # The API takes multi-node jobs only when the ray executor runs them.
        "executor": "ray",
    }
    return Settings(**{k: v for k, v in values.items() if k in Settings.model_fields})


@pytest.fixture
def ray_worker(settings: Settings, start_worker, ray_cluster):
    return start_worker(extra_env=WORKER_ENV, executor="ray", ray_address=ray_cluster.address, ray_gpus=False)


def tokenizer(api, worker, name: str) -> None:
    job = api.post(
        "/v1/jobs",
        json={"stage": "tok_train", "options": {"vocab_size": 300, "max_chars": 20000}, "output_name": name},
        headers=AUTH,
    ).json()
    assert wait_job(api, job["id"], timeout=180, worker=worker)["status"] == "succeeded"


def base_train(api, tok: str, nnodes: int, nproc: int, **options: object) -> str:
    body = {
        "stage": "base_train",
        "input": {"name": tok, "stage": "tokenizer"},
        "options": {**BASE, **options},
        "resources": {"nnodes": nnodes, "nproc_per_node": nproc},
    }
    response = api.post("/v1/jobs", json=body, headers=AUTH)
    assert response.status_code == 202, response.text
    return response.json()["id"]


def losses(settings: Settings, job_id: str) -> list[tuple[int, float]]:
    events = (settings.runs_dir / "jobs" / job_id / "events.jsonl").read_text().splitlines()
    return [(e["step"], e["loss"]) for e in map(json.loads, events) if e["type"] == "progress" and "loss" in e]


def stage_actors() -> list[int]:
    """Live processes of Ray actors of the executor (their process title names the class)."""
    found = []
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            try:
                if b"StageActor" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def leftovers(job_id: str, nnodes: int) -> list[int]:
    pids = [pid for r in range(nnodes) for pid in processes_with_env(JOB_MARKER, node_tag(job_id, r))]
    return sorted(set(pids + stage_actors()))


def test_two_ray_nodes_train_step_for_step_like_one_node_with_two_processes(api, settings, ray_worker):
    tokenizer(api, ray_worker, "ray-tok")
    local = base_train(api, "ray-tok", nnodes=1, nproc=2)
    local_job = wait_job(api, local, timeout=300, worker=ray_worker)
    assert local_job["status"] == "succeeded", local_job["log_tail"]
    gang = base_train(api, "ray-tok", nnodes=2, nproc=1)
    job = wait_job(api, gang, timeout=300, worker=ray_worker)
    assert job["status"] == "succeeded", (job["error"], job["log_tail"])

    expected = losses(settings, local)
    assert [step for step, _ in expected] == list(range(1, BASE["num_iterations"] + 1))
    # The same arithmetic in the same order on both layouts: equal to the last bit.
    assert losses(settings, gang) == expected
    assert job["step"] == BASE["num_iterations"]
    assert [p["stage"] for p in job["produced"]] == ["base"]
    assert [n["status"] for n in job["nodes"]] == ["succeeded", "succeeded"]
    assert job["nodes"][1]["host"] == "ray:127.0.0.1"
    for rank in (0, 1):
        log = api.get(f"/v1/jobs/{gang}/logs?node={rank}").text
        assert "(ray node 127.0.0.1) torchrun" in log and f"--node-rank={rank}" in log, log[-2000:]
        assert "stage exited with code 0" in log
    assert leftovers(gang, 2) == []


def test_cancel_removes_every_process_of_a_ray_job_within_5_s(api, settings, ray_worker):
    tokenizer(api, ray_worker, "ray-tok-cancel")
    job_id = base_train(api, "ray-tok-cancel", nnodes=2, nproc=1, num_iterations=100000)
    wait_progress(api, job_id, timeout=240, worker=ray_worker)
    assert len(stage_actors()) == 2
    start = time.monotonic()
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
    while leftovers(job_id, 2):
        assert time.monotonic() - start < 5, f"still alive after 5 s: {leftovers(job_id, 2)}"
        time.sleep(0.05)
    job = wait_job(api, job_id, timeout=30, worker=ray_worker)
    assert job["status"] == "cancelled", job
    assert [n["status"] for n in job["nodes"]] == ["cancelled", "cancelled"]


def test_a_gang_the_cluster_has_no_room_for_fails_unstarted(api, settings, start_worker, ray_cluster):
    worker = start_worker(
        extra_env=WORKER_ENV, executor="ray", ray_address=ray_cluster.address, ray_gpus=False, gang_timeout=5
    )
    job_id = api.post(
        "/v1/jobs", json={"stage": "make_data", "resources": {"nnodes": 3, "nproc_per_node": 1}}, headers=AUTH
    ).json()["id"]
    job = wait_job(api, job_id, timeout=90, worker=worker)
    assert job["status"] == "failed" and "did not place the job's 3 nodes" in job["error"], job
    assert "torchrun" not in api.get(f"/v1/jobs/{job_id}/logs").text
    assert leftovers(job_id, 3) == []


def test_a_ray_node_lost_mid_job_ends_the_attempt_within_60_s(api, settings, ray_worker, ray_cluster):
    """Last in this file: it takes a node away (and adds a fresh one for the retry)."""
    tokenizer(api, ray_worker, "ray-tok-lost")
    job_id = base_train(api, "ray-tok-lost", nnodes=2, nproc=1, num_iterations=100000, save_every=3)
    resume = settings.runs_dir / "jobs" / job_id / "steps" / "00-base_train.resume"
    wait_progress(api, job_id, timeout=240, worker=ray_worker)
    deadline = time.monotonic() + 120
    while not (resume / "manifest.json").is_file():
        assert time.monotonic() < deadline, ray_worker.output()
        time.sleep(0.2)
    victim = next(iter(ray_cluster.worker_nodes))
    start = time.monotonic()
    victim.kill_raylet()
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] != "running" or job["attempt"] > 1:
            break
        assert time.monotonic() - start < 60, f"job still running 60 s after its node was lost: {job}"
        time.sleep(0.2)
    # Per the job's retry policy (max_attempts 3 by default): queued again, or failed.
    assert job["attempt"] == 2 or job["status"] == "failed", job
    assert "lost" in (job["error"] or ""), job
    # Attempt 1's processes are gone; attempt 2 waits for a second Ray node to be placed.
    deadline = time.monotonic() + 30
    while leftovers(job_id, 2):
        assert time.monotonic() < deadline, leftovers(job_id, 2)
        time.sleep(0.2)
    if job["status"] == "failed":
        return
    ray_cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    retried = wait_progress(api, job_id, timeout=240, worker=ray_worker)
    assert retried["attempt"] == 2 and "was lost" in retried["attempts"][0]["error"], retried["attempts"]
    log = api.get(f"/v1/jobs/{job_id}/logs").text
    commands = [line for line in log.splitlines() if "torchrun " in line and line.startswith("[trainer] $")]
    assert commands[-1].endswith("--resume"), commands
    assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
    assert wait_job(api, job_id, timeout=60, worker=ray_worker)["status"] == "cancelled"
