"""The container executor against a stand-in Engine API (`standin_engine`, a real HTTP server on a
unix socket that runs each container's command as a local process): the create payload (image,
GPU device requests, mounts, shm/ipc, network, labels, the torchrun command line), the image pull,
log streaming with stage events, cancel (SIGTERM, grace, SIGKILL), removal, a dead worker's
containers found by label, and a job through the API and a real worker with TRAINER_EXECUTOR=docker.

No real Docker engine runs here: what the engine itself does with the payload is not exercised.
"""

from __future__ import annotations

import os
import signal
import sys
import uuid
from pathlib import Path

import docker
import pytest
from fastapi.testclient import TestClient
from standin_engine import StandinEngine, wait_until
from trainer.api import create_app
from trainer.docker_executor import LABEL_JOB, LABEL_TAG, DockerExecutor, EngineUnavailable, stop_containers
from trainer.procs import JOB_MARKER, node_tag, processes_with_env
from trainer.settings import Settings
from trainer_testlib import AUTH, TESTS, wait_job

IMAGE = "nanochat/trainer-worker:test"
WORKER_TORCHRUN = ["/opt/worker/bin/torchrun"]
IMAGE_TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture
def engine(tmp_path: Path):
    engine = StandinEngine(tmp_path / "docker.sock").start()
    yield engine
    engine.stop()


def docker_settings(tmp_path: Path, engine: StandinEngine, **overrides: object) -> Settings:
    values = dict(
        executor="docker",
        docker_host=engine.url,
        docker_image=IMAGE,
        torchrun=WORKER_TORCHRUN,
        docker_torchrun=IMAGE_TORCHRUN,
        data_dir=tmp_path / "data",
        runs_dir=tmp_path / "runs",
    )
    return Settings(**{**values, **overrides})


def sleepy_command(tmp_path: Path, job_id: str) -> list[str]:
    config = tmp_path / "runs" / "step.json"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text("{}")
    return [
        *WORKER_TORCHRUN,
        "--nproc-per-node=1",
        "--standalone",
        "-m",
        "sleepy_stage",
        "--config",
        str(config),
        "--data-dir",
        str(tmp_path / "data"),
        "--job-id",
        job_id,
    ]


def job_env(tag: str, steps: int) -> dict[str, str]:
    return {
        **os.environ,
        JOB_MARKER: tag,
        "PYTHONUNBUFFERED": "1",
        "SLEEPY_STEPS": str(steps),
        "PYTHONPATH": str(TESTS),
        "NANOCHAT_TEST_PASSTHROUGH": "yes",
    }


def test_stage_runs_in_a_container_with_gpus_mounts_and_the_torchrun_command(tmp_path, engine):
    settings = docker_settings(tmp_path, engine, docker_data_volume="nanochat-data", docker_shm_size="8g")
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    tag = node_tag(job_id, 0)
    events, started = [], []
    command = sleepy_command(tmp_path, job_id)
    log_path = tmp_path / "log.txt"
    result = DockerExecutor(settings).run_stage(
        command,
        job_env(tag, 3),
        log_path,
        events.append,
        lambda: None,
        started.append,
        2.0,
        tag,
        job_id=job_id,
        node_rank=0,
        gpus=4,
    )

    assert result.returncode == 0 and result.stopped is None
    assert [e["type"] for e in events] == ["started", "progress", "progress", "progress", "finished"]
    assert result.finished["metrics"] == {"world_size": 1} and result.events == 5 and started == [0]
    # The image was missing: the executor pulled it and created the container again.
    pulls = engine.calls("POST", "/images/create")
    assert [(q["fromImage"], q["tag"]) for _, _, q, _ in pulls] == [(["nanochat/trainer-worker"], ["test"])]
    creates = engine.calls("POST", "/containers/create")
    assert len(creates) == 2
    body = creates[-1][3]
    host = body["HostConfig"]
    assert body["Image"] == IMAGE
    assert body["Cmd"] == [*IMAGE_TORCHRUN, *command[len(WORKER_TORCHRUN) :]]
    assert body["Labels"] == {LABEL_JOB: job_id, "nanochat.node": "0", LABEL_TAG: tag}
    env = dict(e.split("=", 1) for e in body["Env"])
    assert env[JOB_MARKER] == tag and env["SLEEPY_STEPS"] == "3" and env["NANOCHAT_TEST_PASSTHROUGH"] == "yes"
    assert "PATH" not in env and "HOME" not in env  # the worker's own environment stays out
    assert [(d["Count"], d["Capabilities"]) for d in host["DeviceRequests"]] == [(4, [["gpu"]])]
    assert {(m["Type"], m["Source"], m["Target"]) for m in host["Mounts"]} == {
        ("volume", "nanochat-data", str((tmp_path / "data").resolve())),
        ("bind", str((tmp_path / "runs").resolve()), str((tmp_path / "runs").resolve())),
    }
    assert host["ShmSize"] == 8 * 1024**3 and "IpcMode" not in host
    assert host["NetworkMode"] == "host" and host["Init"] is True and body["StopSignal"] == "SIGTERM"
    # Everything the stage printed is in the job log, and the container is gone.
    log = log_path.read_text()
    assert "[trainer] pulling nanochat/trainer-worker:test" in log and '"type":"finished"' in log
    assert log.rstrip().endswith("[trainer] stage exited with code 0")
    cid = engine.calls("POST", r"/containers/[0-9a-f]+/start")[0][1].split("/")[2]
    assert engine.calls("DELETE", f"/containers/{cid}") and engine.containers == {}


def test_ipc_host_and_no_gpus_leave_shm_and_device_requests_out(tmp_path, engine):
    settings = docker_settings(tmp_path, engine, docker_ipc_mode="host", docker_gpus=False, docker_network=None)
    options = DockerExecutor(settings).create_options("j", 1, node_tag("j", 1), gpus=8)
    assert options["ipc_mode"] == "host"
    assert "shm_size" not in options and "device_requests" not in options and "network_mode" not in options
    with pytest.raises(ValueError, match="does not start with the configured torchrun"):
        DockerExecutor(settings).command(["python", "-m", "nanochat.stages.base_train"])


def test_cancel_stops_the_container_with_sigterm_then_removes_it(tmp_path, engine):
    engine.images.add(IMAGE)
    settings = docker_settings(tmp_path, engine)
    job_id = f"job-{uuid.uuid4().hex[:8]}"
    tag = node_tag(job_id, 0)
    events: list[dict] = []
    stop = lambda: "cancelled" if any(e["type"] == "progress" for e in events) else None  # noqa: E731
    result = DockerExecutor(settings).run_stage(
        sleepy_command(tmp_path, job_id),
        job_env(tag, 600),
        tmp_path / "log.txt",
        events.append,
        stop,
        lambda _: None,
        3.0,
        tag,
        job_id=job_id,
        node_rank=0,
        gpus=1,
    )
    assert result.stopped == "cancelled" and result.returncode != 0
    stops = engine.calls("POST", r"/containers/[0-9a-f]+/stop")
    assert stops and stops[0][2]["t"] == ["3"]
    assert engine.containers == {} and processes_with_env(JOB_MARKER, tag) == []
    assert "[trainer] stopping the stage: cancelled" in (tmp_path / "log.txt").read_text()


def test_dead_workers_containers_are_found_by_label_and_stopped(tmp_path, engine):
    engine.images.add(IMAGE)
    settings = docker_settings(tmp_path, engine)
    client = docker.DockerClient(base_url=engine.url, version="auto")
    ours = client.containers.create(IMAGE, ["sleep", "300"], labels={LABEL_TAG: "j1/n0"})
    other = client.containers.create(IMAGE, ["sleep", "300"], labels={LABEL_TAG: "j2/n0"})
    ours.start()
    other.start()
    assert stop_containers(settings, "j1/n0", grace=1) == 1
    assert list(engine.containers) == [other.id]
    client.close()


def test_unreachable_engine_is_a_clear_error(tmp_path):
    settings = Settings(executor="docker", docker_host=f"unix://{tmp_path / 'none.sock'}", torchrun=WORKER_TORCHRUN)
    with pytest.raises(EngineUnavailable, match="none.sock is not reachable"):
        DockerExecutor(settings).run_stage(
            [*WORKER_TORCHRUN, "-m", "x"],
            {},
            tmp_path / "log.txt",
            print,
            lambda: None,
            print,
            1.0,
            "j/n0",
            job_id="j",
            node_rank=0,
            gpus=1,
        )


@pytest.mark.slow
def test_jobs_run_through_a_worker_with_the_docker_executor(settings, start_worker, engine):
    """Cancel stops the job's container; a SIGKILLed worker's container is stopped by the reaper."""
    engine.images.add(IMAGE)
    use_docker = dict(
        executor="docker",
        docker_host=engine.url,
        docker_image=IMAGE,
        torchrun=WORKER_TORCHRUN,
        docker_torchrun=IMAGE_TORCHRUN,
        docker_gpus=False,
        stage_modules={"make_data": "sleepy_stage"},
        docker_env_prefixes=["SLEEPY_", "PYTHONPATH"],
    )
    with TestClient(create_app(settings.model_copy(update=use_docker))) as api:
        worker = start_worker(extra_env={"SLEEPY_STEPS": "600"}, **use_docker)
        job_id = api.post("/v1/jobs", json={"stage": "make_data"}, headers=AUTH).json()["id"]
        # wait_progress would also wait for a process group: a container has none on the worker's host.
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["step"], timeout=90)
        assert engine.calls("POST", "/containers/create")[0][3]["Labels"][LABEL_JOB] == job_id
        assert api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH).status_code == 202
        assert wait_job(api, job_id, timeout=60, worker=worker)["status"] == "cancelled"
        wait_until(lambda: engine.containers == {})
        logs = api.get(f"/v1/jobs/{job_id}/logs").text
        assert f"[trainer] $ docker run {IMAGE}" in logs and '"type":"progress"' in logs

        # One attempt: with none left the reaper fails the job instead of queueing it again.
        job_id = api.post("/v1/jobs", json={"stage": "make_data", "max_attempts": 1}, headers=AUTH).json()["id"]
        wait_until(lambda: api.get(f"/v1/jobs/{job_id}").json()["step"], timeout=90)
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        assert len(engine.containers) == 1  # the container outlived its worker
        job = wait_job(api, job_id, timeout=settings.heartbeat_limit + settings.cancel_grace + 30)
        assert job["status"] == "failed" and "stopped sending heartbeats" in job["error"]
        wait_until(lambda: engine.containers == {})
        assert processes_with_env(JOB_MARKER, node_tag(job_id, 0)) == []
