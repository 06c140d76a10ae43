"""The container executor: each stage of each node of a job runs in a container of its own,
through the Docker SDK for Python (`TRAINER_EXECUTOR=docker`, extra `nanochat-trainer[docker]`).

    result = DockerExecutor(settings).run_stage(command, env, log_path, on_event, should_stop,
                                                on_started, grace, tag, job_id=..., node_rank=0, gpus=8)

It plugs in where `trainer.runner.run_stage` runs a local torchrun and keeps its contract: the
command line is the one the worker built (only its torchrun head is swapped for the image's,
`docker_torchrun`); stdout and stderr go to the job log line by line, stdout's stage events to
`on_event`; `should_stop()` is polled and a stop reason stops the container (SIGTERM, `grace`
seconds, SIGKILL, done by the engine); on return the container has exited and is removed.

What the container gets: the worker image (`docker_image`, pulled when the engine lacks it);
`gpus` GPUs as a device request when `docker_gpus` is on; data_dir and runs_dir (job folders and
the registry's model cache) mounted at the paths the worker sees them at, as named volumes when
the worker itself runs in a container (`docker_data_volume`, `docker_runs_volume`) or as bind
mounts otherwise, so every path in the command line holds inside; /dev/shm of `docker_shm_size`
or `docker_ipc_mode`; the host network by default (torchrun's rendezvous, NCCL); an init process
that passes SIGTERM on to torchrun; labels naming the job, node and tag (`stop_containers` finds
a dead worker's containers by them).

Docker's `count` device request takes the first N GPUs of the host: two jobs on one host share
GPUs unless the operator runs one worker per GPU set.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import docker
from docker.errors import DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount
from docker.utils import parse_repository_tag
from nanochat_contracts.events import parse_event_line

from trainer.runner import StageResult, _Log, _record, tail, watch
from trainer.settings import Settings

LABEL_JOB = "nanochat.job"
LABEL_NODE = "nanochat.node"
LABEL_TAG = "nanochat.tag"
CONNECT_TIMEOUT_S = 30
# IPC modes with a namespace of their own, the only ones Docker lets ShmSize size.
PRIVATE_IPC = (None, "private", "shareable")


class EngineUnavailable(RuntimeError):
    """The Docker engine could not be reached or refused the container."""


def connect(settings: Settings, timeout: float = CONNECT_TIMEOUT_S) -> docker.DockerClient:
    """A client of the configured engine; its API version is negotiated (GET /version) here."""
    try:
        if settings.docker_host:
            return docker.DockerClient(base_url=settings.docker_host, version="auto", timeout=timeout)
        return docker.from_env(version="auto", timeout=timeout)
    except DockerException as e:
        where = settings.docker_host or os.environ.get("DOCKER_HOST") or "the default socket"
        raise EngineUnavailable(f"Docker engine at {where} is not reachable: {e}") from None


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Whole lines out of the engine's log frames (a frame may hold part of a line, or several)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line + b"\n"
    if pending:
        yield pending


def _pump(chunks: Iterator[bytes], log: _Log, events: queue.Queue | None) -> None:
    try:
        for line in _split_lines(chunks):
            log.write(line)
            if events is not None:
                event = parse_event_line(line.decode("utf-8", "replace"))
                if event is not None:
                    events.put(event.model_dump(mode="json"))
    except DockerException as e:
        log.write(f"[trainer] log stream of the container broke: {e}".encode())


def _wait(container: Container, exited: queue.Queue) -> None:
    """Block until the container exits (no HTTP timeout); an error counts as an exit too, so the
    supervising loop never waits for a wait that broke."""
    try:
        exited.put(container.wait(timeout=None))
    except DockerException as e:
        exited.put(e)


def stop_containers(settings: Settings, tag: str, grace: float) -> int:
    """Stop and remove every container of one node of a job (by its tag label); returns how many."""
    client = connect(settings)
    try:
        found = client.containers.list(all=True, filters={"label": f"{LABEL_TAG}={tag}"})
        for container in found:
            _stop(container, grace)
            if settings.docker_remove:
                _remove(container)
        return len(found)
    except DockerException as e:
        raise EngineUnavailable(f"could not stop the containers of {tag}: {e}") from None
    finally:
        client.close()


def _stop(container: Container, grace: float) -> None:
    try:
        container.stop(timeout=max(0, round(grace)))
    except NotFound:
        pass


def _remove(container: Container) -> None:
    try:
        container.remove(force=True)
    except NotFound:
        pass


class DockerExecutor:
    def __init__(self, settings: Settings):
        self.s = settings

    def command(self, command: list[str]) -> list[str]:
        """The stage's command line with the worker's torchrun head swapped for the image's."""
        head = self.s.torchrun
        if command[: len(head)] != head:
            raise ValueError(f"the stage command does not start with the configured torchrun {head}: {command}")
        return [*self.s.docker_torchrun, *command[len(head) :]]

    def environment(self, env: dict[str, str]) -> dict[str, str]:
        """The job's own variables (those the worker added or changed) and the passed-through ones;
        never the worker's whole environment (its PATH, venv and tokens are not the image's)."""
        own = {k: v for k, v in env.items() if os.environ.get(k) != v}
        passed = {k: v for k, v in env.items() if k.startswith(tuple(self.s.docker_env_prefixes))}
        return {**passed, **own}

    def mounts(self) -> list[Mount]:
        mounts = []
        for folder, volume in (
            (self.s.data_dir, self.s.docker_data_volume),
            (self.s.runs_dir, self.s.docker_runs_volume),
        ):
            target = str(Path(folder).resolve())
            if volume:
                mounts.append(Mount(target=target, source=volume, type="volume"))
            else:
                Path(target).mkdir(parents=True, exist_ok=True)
                mounts.append(Mount(target=target, source=target, type="bind"))
        return mounts

    def create_options(self, job_id: str, node_rank: int, tag: str, gpus: int) -> dict[str, Any]:
        """Everything but the image and command of `containers.create` for one node's stage."""
        options: dict[str, Any] = {
            "labels": {LABEL_JOB: job_id, LABEL_NODE: str(node_rank), LABEL_TAG: tag},
            "mounts": self.mounts(),
            "working_dir": os.getcwd(),
            "user": self.s.docker_user or f"{os.getuid()}:{os.getgid()}",
            "init": True,
            "stop_signal": "SIGTERM",
        }
        if self.s.docker_gpus:
            options["device_requests"] = [DeviceRequest(count=gpus, capabilities=[["gpu"]])]
        if self.s.docker_ipc_mode is not None:
            options["ipc_mode"] = self.s.docker_ipc_mode
        if self.s.docker_ipc_mode in PRIVATE_IPC:
            options["shm_size"] = self.s.docker_shm_size
        if self.s.docker_network is not None:
            options["network_mode"] = self.s.docker_network
        return options

    def _create(
        self,
        client: docker.DockerClient,
        command: list[str],
        environment: dict[str, str],
        options: dict[str, Any],
        log: _Log,
    ) -> Container:
        try:
            return client.containers.create(self.s.docker_image, command, environment=environment, **options)
        except ImageNotFound:
            log.write(f"[trainer] pulling {self.s.docker_image}".encode())
        repository, image_tag = parse_repository_tag(self.s.docker_image)
        for status in client.api.pull(repository, tag=image_tag or "latest", stream=True, decode=True):
            if "error" in status:
                raise EngineUnavailable(f"pull of {self.s.docker_image} failed: {status['error']}")
        return client.containers.create(self.s.docker_image, command, environment=environment, **options)

    def run_stage(
        self,
        command: list[str],
        env: dict[str, str],
        log_path: Path,
        on_event: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], str | None],
        on_started: Callable[[int], None],
        grace: float,
        tag: str,
        *,
        job_id: str,
        node_rank: int,
        gpus: int,
    ) -> StageResult:
        """Run one node's stage in a container; see the module docstring. `on_started(0)`: the
        container has no process group on this host (the reaper finds it by label instead)."""
        inner = self.command(command)
        client = connect(self.s)
        log = _Log(log_path)
        log.write(f"[trainer] $ docker run {self.s.docker_image} {' '.join(inner)}".encode())
        result = StageResult(returncode=-1)
        container: Container | None = None
        readers: list[threading.Thread] = []
        events: queue.Queue = queue.Queue()
        exited: queue.Queue = queue.Queue()
        try:
            try:
                container = self._create(
                    client, inner, self.environment(env), self.create_options(job_id, node_rank, tag, gpus), log
                )
                container.start()
            except DockerException as e:
                raise EngineUnavailable(f"the engine refused the stage's container: {e}") from None
            log.write(f"[trainer] container {container.short_id} started".encode())
            readers = [
                threading.Thread(
                    target=_pump,
                    args=(container.logs(stdout=True, stderr=False, stream=True, follow=True), log, events),
                    daemon=True,
                ),
                threading.Thread(
                    target=_pump,
                    args=(container.logs(stdout=False, stderr=True, stream=True, follow=True), log, None),
                    daemon=True,
                ),
                threading.Thread(target=_wait, args=(container, exited), daemon=True),
            ]
            for t in readers:
                t.start()
            on_started(0)
            watch(
                result, events, on_event, lambda: not exited.empty(), should_stop, lambda: _stop(container, grace), log
            )
        finally:
            # Whatever happened (an exception in a callback, RQ's timeout), leave no container running.
            if container is not None:
                _stop(container, grace)
                try:
                    result.returncode = int(container.wait(timeout=max(30.0, 2 * grace)).get("StatusCode", -1))
                except DockerException as e:
                    log.write(f"[trainer] could not read the container's exit: {e}".encode())
                for t in readers:
                    t.join(timeout=5)
                while not events.empty():
                    _record(result, events.get_nowait(), on_event)
                if self.s.docker_remove:
                    _remove(container)
            log.write(f"[trainer] stage exited with code {result.returncode}".encode())
            log.close()
            client.close()
        result.log_tail = tail(log_path)
        return result
