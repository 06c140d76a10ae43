"""The Ray actor that runs one node's torchrun of a multi-node job (see `trainer.ray_executor`).

One actor sits in each bundle of the job's placement group, so on its own Ray node. It picks the
rendezvous port (rank 0), starts torchrun in a session of its own with the job's marker variable,
buffers its stdout and stderr lines for the driver to collect (`drain`), and stops it on request
(`stop`: SIGTERM, grace, SIGKILL to every process carrying the marker, as the local executor does).

torchrun gets SIGTERM when the actor's process dies (Linux's parent-death signal): an actor killed
by Ray, or one whose raylet died, takes its torchrun and, through torchrun, its ranks along.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO

import ray

from trainer.procs import terminate_job

PR_SET_PDEATHSIG = 1
# The interpreter of this Ray node runs torchrun: the worker's own path may not exist here.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STDOUT, STDERR = 1, 2
DRAIN_WAIT_S = 0.5


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@ray.remote(max_concurrency=4)
class StageActor:
    """One node of one stage: torchrun plus its buffered output."""

    def __init__(self, tag: str):
        self.tag = tag
        self.proc: subprocess.Popen | None = None
        self.lines: list[tuple[int, bytes]] = []
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.readers: list[threading.Thread] = []

    def rendezvous_endpoint(self) -> str:
        """host:port of a free port on this node, where rank 0's torchrun hosts the c10d store."""
        host = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        return f"{host}:{port}"

    def node_address(self) -> str:
        return ray.util.get_node_ip_address()

    def niceness(self) -> int:
        """The priority torchrun inherits (Ray starts its workers at 15 unless the cluster sets
        worker_niceness)."""
        return os.nice(0)

    def start(self, args: list[str], env: dict[str, str]) -> int:
        """Start `torchrun args...` with `env` added to this node's environment; returns its pid."""
        self.proc = subprocess.Popen(
            [*TORCHRUN, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **env},
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        self.readers = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, STDOUT), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, STDERR), daemon=True),
        ]
        for t in self.readers:
            t.start()
        return self.proc.pid

    def _pump(self, stream: IO[bytes], which: int) -> None:
        for line in iter(stream.readline, b""):
            with self.changed:
                self.lines.append((which, line))
                self.changed.notify_all()
        stream.close()
        with self.changed:
            self.changed.notify_all()

    def drain(self, wait: float = DRAIN_WAIT_S) -> tuple[list[tuple[int, bytes]], int | None]:
        """The output lines since the last call (waiting up to `wait` s for one: the driver polls
        without spinning), and torchrun's exit code once it has exited and every line of it was
        handed out (None while it runs)."""
        with self.changed:
            if not self.lines and any(t.is_alive() for t in self.readers):
                self.changed.wait(wait)
        code = self.proc.poll() if self.proc else None
        if code is not None:
            for t in self.readers:
                t.join(timeout=5)
        with self.lock:
            lines, self.lines = self.lines, []
        return lines, code

    def stop(self, grace: float) -> None:
        """Stop torchrun and every process of this node's stage; returns once none is left."""
        terminate_job(self.proc.pid if self.proc else None, self.tag, grace)
        if self.proc is not None:
            self.proc.wait()
