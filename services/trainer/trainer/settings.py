"""The trainer's settings, from `TRAINER_*` environment variables (pydantic-settings).

e.g. `TRAINER_REDIS_URL=redis://127.0.0.1:6379/0 TRAINER_WRITE_TOKEN=... python -m trainer api`.
"""

from __future__ import annotations

import socket
import sys
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TRAINER_", extra="ignore")

    database_url: str = Field(
        "sqlite:///runs/trainer.db",
        description="SQLAlchemy URL of the job records (SQLite by default, PostgreSQL in compose).",
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis of the RQ queues and the cancel flags.")
    redis_prefix: str = Field(
        "nanochat:trainer:", min_length=1, description="Prefix of the trainer's own Redis keys (RQ keeps its rq: keys)."
    )
    queue_name: str = Field(
        "nanochat-trainer",
        min_length=1,
        description="RQ queue the API fills and the workers drain; jobs with nnodes > 1 go to `<name>:multi-node`, "
        "which only workers with the ray executor drain.",
    )
    registry_url: str = Field("http://127.0.0.1:8002", description="Base URL of the model registry.")
    registry_token: str | None = Field(
        None, description="Bearer token for registry writes (uploads, metric patches, attachments)."
    )
    write_token: str | None = Field(
        None, description="Bearer token that POST /v1/jobs and cancel require; unset refuses every write."
    )
    data_dir: Path = Field(Path("data"), description="The --data-dir every stage reads (make_data fills it).")
    runs_dir: Path = Field(Path("runs"), description="Job folders: logs, events, stage outputs, downloaded inputs.")
    torchrun: list[str] = Field(
        default_factory=lambda: [sys.executable, "-m", "torch.distributed.run"],
        description="The torchrun command; by default the running venv's.",
    )
    stage_modules: dict[str, str] = Field(
        default_factory=dict,
        description="Operator override: stage name -> module torchrun runs instead of nanochat.stages.<stage>.",
    )
    job_timeout: int = Field(7 * 24 * 3600, ge=60, description="RQ job timeout in seconds (RQ's own default is 180 s).")
    heartbeat_interval: float = Field(2.0, gt=0, le=20, description="Seconds between a running job's heartbeats.")
    heartbeat_file: Path | None = Field(
        None,
        description="File the worker touches every heartbeat_interval; `python -m trainer worker-health` checks its age.",
    )
    heartbeat_limit: float = Field(
        30.0,
        gt=0,
        le=600,
        description="A running job whose heartbeat is older is reaped: its processes killed, then re-queued or failed. "
        "At least twice db_busy_timeout + heartbeat_interval: a heartbeat held up by a busy SQLite must not look dead.",
    )
    db_busy_timeout: float = Field(
        10.0, gt=0, le=300, description="Seconds a SQLite write waits for another writer's lock before it fails."
    )
    store_outage_limit: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="Seconds a running job rides out an unreachable Redis or database (its stop check and heartbeat "
        "retry meanwhile) before its node gives up and the job is retried.",
    )
    reap_interval: float = Field(2.0, gt=0, le=60, description="Seconds between the reaper's scans.")
    cancel_grace: float = Field(
        5.0, ge=0, le=300, description="Seconds between SIGTERM and SIGKILL of a job's process group."
    )
    upload_retries: int = Field(5, ge=0, le=50, description="Retries of a failed registry call at upload time.")
    upload_backoff: float = Field(1.0, ge=0, le=60, description="First retry delay in seconds, doubled each retry.")
    gang_timeout: float = Field(
        120.0,
        gt=0,
        description="Seconds the Ray cluster has to place a multi-node job's nodes before the job fails unstarted.",
    )
    host: str = Field(
        default_factory=socket.gethostname,
        description="This machine's name in job records (the reaper kills only its own host's groups).",
    )
    executor: Literal["local", "docker", "ray"] = Field(
        "local",
        description="How workers start stages: local processes (torchrun in its own session), or one container per stage and node through the Docker SDK (`trainer.docker_executor`); ray runs jobs with nnodes > 1 as a placement group on a Ray cluster (`trainer.ray_executor`), one-node jobs locally. The API accepts jobs with nnodes > 1 only when it is ray (422 otherwise).",
    )
    ray_address: str | None = Field(
        None,
        description="Address of the Ray cluster's head (host:port of its GCS) for the ray executor; unset reads RAY_ADDRESS.",
    )
    ray_gpus: bool = Field(
        True, description="Each node of a Ray job reserves nproc_per_node GPUs (off: CPUs, for a cluster without GPUs)."
    )
    docker_host: str | None = Field(
        None,
        description="Docker Engine address (unix:///var/run/docker.sock, tcp://...); unset reads DOCKER_HOST, else the default socket.",
    )
    docker_image: str = Field(
        "nanochat/trainer-worker:dev",
        min_length=1,
        description="Image each stage container runs (the worker image: nanochat[train] and torchrun).",
    )
    docker_torchrun: list[str] = Field(
        default_factory=lambda: ["python", "-m", "torch.distributed.run"],
        description="The torchrun command inside the image; replaces `torchrun` at the head of the stage's command line.",
    )
    docker_gpus: bool = Field(
        True, description="Request nproc_per_node GPUs per container (off for an engine without GPUs)."
    )
    docker_data_volume: str | None = Field(
        None, description="Named volume mounted at data_dir in the containers; unset bind-mounts data_dir itself."
    )
    docker_runs_volume: str | None = Field(
        None, description="Named volume mounted at runs_dir (job folders, the model cache); unset bind-mounts runs_dir."
    )
    docker_shm_size: str = Field(
        "16g",
        description="/dev/shm of a container (torchrun's ranks and DataLoader workers share memory through it); unused with an ipc mode other than private/shareable.",
    )
    docker_ipc_mode: str | None = Field(
        None,
        description="IpcMode of the containers, e.g. host; unset keeps Docker's private namespace with docker_shm_size.",
    )
    docker_network: str | None = Field(
        "host",
        description="Network mode: host lets torchrun's rendezvous and NCCL reach the other nodes; unset is Docker's bridge.",
    )
    docker_user: str | None = Field(
        None,
        description="uid:gid the stage runs as; unset uses the worker's own, so files in bind mounts stay the worker's.",
    )
    docker_env_prefixes: list[str] = Field(
        default_factory=lambda: ["NANOCHAT_", "HF_", "NCCL_", "TORCH_", "OMP_"],
        description="Worker environment variables passed into the containers, by name prefix (the job's own variables always are).",
    )
    docker_remove: bool = Field(
        True, description="Remove each container once its stage has ended and its log has been read."
    )
    inference_url: str = Field("http://127.0.0.1:8000", description="Inference service base URL (`doctor` checks it).")
    webui_url: str = Field("http://127.0.0.1:8080", description="Web UI base URL (`doctor` checks it).")
    api_url: str | None = Field(
        None, description="Trainer API base URL for `doctor`; unset is http://api_host:api_port."
    )
    api_host: str = Field("127.0.0.1", description="Address the API listens on.")
    api_port: int = Field(8001, ge=1, le=65535, description="Port the API listens on.")
    log_level: str = Field("INFO", description="Python logging level.")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body the API accepts.")
    max_followers: int = Field(
        150, ge=1, le=100_000, description="Open log and event streams the API serves at once; more get 429."
    )
    follow_poll_s: float = Field(
        1.0, gt=0, le=60, description="Seconds between the job-state checks of a followed job (one per job, shared)."
    )
    data_root: Path | None = Field(
        None,
        description="Folder a job's path options (make_data's docs_path, base_eval's bundle) must lie in; "
        "unset is data_dir.",
    )

    @model_validator(mode="after")
    def _heartbeat_outlasts_a_busy_database(self) -> Settings:
        # A heartbeat write may wait the whole busy timeout for SQLite's lock, and the previous
        # one was up to an interval earlier: a limit below twice that reaps healthy jobs.
        floor = 2 * (self.db_busy_timeout + self.heartbeat_interval)
        if self.heartbeat_limit < floor:
            raise ValueError(
                f"heartbeat_limit ({self.heartbeat_limit:g} s) must be at least 2 x (db_busy_timeout + "
                f"heartbeat_interval) = {floor:g} s, or a heartbeat delayed by a busy database reaps a healthy job"
            )
        return self


@lru_cache
def get_settings() -> Settings:
    return Settings()
